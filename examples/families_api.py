"""README "Backbones: torchvision's families and your own model": a registry family (a ViT) and your own model."""
import os
import tempfile

import torch
from torch import nn

from branched.artifact import load_model, save_model
from branched.backbones import build_backbone
from branched.blocks import CutError, cut_model
from branched.build.placement import exit_specs, place_exits
from branched.config import ModelConfig
from branched.families import register_backbone
from branched.model import BranchedModel


class MyNet(nn.Module):  # stands in for your own model: a stem, two stages, a head
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()),
            nn.Sequential(nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU()))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


register_backbone("mynet", MyNet, input_size=32, blocks=["stem", "stages.0", "stages.1"])  # blocks=None: traced
backbone = build_backbone("mynet", 10)  # or load_backbone_weights("mynet", 10, "mynet.pt")
model = BranchedModel(ModelConfig(backbone="mynet", num_classes=10, input_size=32,
                                  exits=place_exits(backbone, 32, count=2)), backbone).eval()
images = torch.randn(8, 3, 32, 32)
off = model.routed_forward(images, thresholds=[float("inf")] * 2)  # every exit off: your model's own answers
with torch.no_grad():
    torch.testing.assert_close(off.logits, backbone.model.eval()(images))
print("mynet blocks", backbone.block_names, "exits", [(e.after, e.kind) for e in model.config.exits])

vit = build_backbone("cifar_vit_micro", 10)  # torchvision's VisionTransformer at 32 px (vit_b_16: 224 px)
specs = exit_specs(vit, 32, ["encoder.layers.encoder_layer_1"], pool="cls")  # an mlp exit on the class token
vit_model = BranchedModel(ModelConfig(backbone="cifar_vit_micro", num_classes=10, input_size=32, exits=specs),
                          vit).eval()
out = vit_model.routed_forward(images, thresholds=[0.5])
print("vit exits", [(e.after, e.kind, e.pool) for e in specs], "layouts", vit_model.feature_layouts,
      "cost", [round(c, 3) for c in out.cost_fraction.tolist()])
directory = save_model(vit_model, os.path.join(tempfile.mkdtemp(prefix="branched-example-"), "vit"))
again = load_model(directory).routed_forward(images, thresholds=[0.5])
assert torch.equal(again.exit_index, out.exit_index) and torch.equal(again.class_index, out.class_index)

try:
    cut_model(MyNet(), ["stages.0", "stem"], 32)  # blocks out of order
except CutError as exc:
    print("CutError:", exc)
print("ok: your model answers as itself with exits off, and the ViT round-trips")

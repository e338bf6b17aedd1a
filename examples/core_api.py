"""From Python: exits on a trained backbone, routed, saved and loaded back (the README's "From Python").

Run: ``python examples/core_api.py``. It asserts what it shows, and ``tests/test_examples.py`` runs it.
"""
import os
import tempfile

import torch

from branched.artifact import load_model, save_model
from branched.backbones import build_backbone, load_backbone_weights
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel

workdir = tempfile.mkdtemp(prefix="branched-example-")
weights = os.path.join(workdir, "my_resnet18_cifar10.pt")  # stands in for your trained torchvision weights
torch.save(build_backbone("cifar_resnet18", 10).model.state_dict(), weights)

backbone = load_backbone_weights("cifar_resnet18", 10, weights)  # a local state_dict; nothing downloads
config = ModelConfig(backbone="cifar_resnet18", num_classes=10, input_size=32,
                     exits=place_exits(backbone, 32, count=3, spacing="even"))
model = BranchedModel(config, backbone).freeze_backbone()  # train model.exits here (branched.build.train.train_exits)
images = torch.randn(8, 3, 32, 32)  # normalised as config.mean / config.std say
out = model.eval().routed_forward(images, thresholds=[0.9, 0.8, 0.7])
print("classes", out.class_index.tolist(), "exits", out.exit_index.tolist(),
      "cost", [round(c, 3) for c in out.cost_fraction.tolist()])
save_model(model, os.path.join(workdir, "mine"))

again = load_model(os.path.join(workdir, "mine")).routed_forward(images, thresholds=[0.9, 0.8, 0.7])
assert torch.equal(again.class_index, out.class_index) and torch.equal(again.exit_index, out.exit_index)
off = model.routed_forward(images, thresholds=[float("inf")] * 3)  # every exit off: the plain backbone
assert torch.equal(off.class_index, model.backbone_forward(images).argmax(1)) and bool((off.exit_index == 3).all())
print("ok: round trip and all-exits-off answers match")

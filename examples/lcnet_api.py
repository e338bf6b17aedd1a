"""From Python: LC-Net gates on a branched model, trained to a FLOPs budget (the README's LC-Net "From Python").

Run: ``python examples/lcnet_api.py``. It asserts what it shows, and ``tests/test_examples.py`` runs it.
A tiny random set stands in for your training data, so the gates learn nothing useful here; the
calls are the ones a real build makes (``branched build --dynamic both --target-cost 0.2``).
"""
import os
import tempfile

import torch

from branched.artifact import load_model, save_model
from branched.backbones import build_backbone
from branched.build.lcnet_train import add_gates, train_gates
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel

backbone = build_backbone("cifar_resnet20", 10)
config = ModelConfig(backbone="cifar_resnet20", num_classes=10, input_size=16,
                     exits=place_exits(backbone, 16, count=2))
model = BranchedModel(config, backbone).freeze_backbone()
x_train = torch.randn(96, 3, 16, 16)
with torch.no_grad():
    y_train = model.backbone_forward(x_train).argmax(1)  # labels the backbone gets right: the budget does the work

gated = add_gates(model, "both", target_cost=0.2)  # with or without exits
report = train_gates(gated, x_train, y_train, target_cost=0.2, epochs=3, batch_size=32, lr=0.1, cost_weight=50.0,
                     progress=False)
images = torch.randn(8, 3, 16, 16)
cost = gated.eval().routed_forward(images, thresholds=[float("inf")] * 2).cost_fraction  # FLOPs spent / plain backbone
print("per-sample cost fraction", [round(c, 3) for c in cost.tolist()], "training", sorted(report))
assert bool((cost < 1.0).all()), "trained gates skip work"

directory = os.path.join(tempfile.mkdtemp(prefix="branched-example-"), "mine")
save_model(gated, directory)
again = load_model(directory).eval().routed_forward(images, thresholds=[float("inf")] * 2)
assert torch.allclose(again.cost_fraction, cost) and torch.equal(again.class_index, gated.routed_forward(
    images, thresholds=[float("inf")] * 2).class_index)
print("ok: the gated model round-trips through the artifact")

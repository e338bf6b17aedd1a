"""From Python: the load controller picks a batch's thresholds from the calibration curve (the README's
"Load-adaptive operating point / From Python").

Run: ``python examples/controller_api.py``. It asserts what it shows, and ``tests/test_examples.py`` runs it.
"""
import io
import math
import os
import tempfile

import torch
from PIL import Image

from branched.artifact import save_model
from branched.backbones import build_backbone
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.controller import ControllerSettings, OperatingPointController
from branched.model import BranchedModel
from branched.serving import Predictor

# A model with two exits and the calibration curve `branched build` stores (here: three points, the calibrated
# one runs the whole backbone, the cheaper ones answer at exit 1 or exit 0).
backbone = build_backbone("cifar_resnet20", 10)
config = ModelConfig(backbone="cifar_resnet20", num_classes=10, input_size=32, thresholds=[math.inf, math.inf],
                     exits=place_exits(backbone, 32, count=2))
config.meta["calibration"] = {"backbone_accuracy": 0.92, "curve": [
    {"thresholds": [0.0, 0.0], "cost_fraction": 0.3, "accuracy": 0.905},
    {"thresholds": [math.inf, 0.0], "cost_fraction": 0.6, "accuracy": 0.915},
    {"thresholds": [math.inf, math.inf], "cost_fraction": 1.0, "accuracy": 0.92}]}
model_dir = os.path.join(tempfile.mkdtemp(prefix="branched-example-"), "m")
save_model(BranchedModel(config, backbone), model_dir)

predictor = Predictor(model_dir)
controller = OperatingPointController(predictor.config, ControllerSettings(slo_p95_ms=50, max_drop=0.02,
                                                                           batch_size=4, batch_delay_ms=10))
print("ladder costs", [p.cost_fraction for p in controller.points])  # calibrated point first, floor last
assert controller.update().index == 0  # nothing observed yet: the calibrated point

for _ in range(4):  # what a server reports after each batch: size, seconds, mean cost fraction of its answers
    controller.observe_batch(4, 0.200, 1.0)  # 4 requests in 200 ms, back to back: far over a 50 ms p95
point = controller.update()  # the point to serve the next batch at
print("now at point", point.index, "cost", point.cost_fraction, "expected drop", round(point.drop, 3))

buf = io.BytesIO()
Image.new("RGB", (32, 32), (90, 120, 200)).save(buf, "PNG")
requests = [(buf.getvalue(), {}), (buf.getvalue(), {"thresholds": "inf,inf"})]  # the second names its own
answers = predictor.answer_batch(requests, torch.tensor(point.thresholds))
print("exits", [a["exit"] for a in answers])
assert point == controller.floor and [a["exit"] for a in answers] == [0, 2]
print("ok: an overloaded server moves to the floor; a request's own thresholds still win")

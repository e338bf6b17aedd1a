"""A compute-heavy model without training: random weights, BN statistics from real images, and
thresholds at quantiles of the exit scores so that a chosen share of the images leaves at each exit.

Serving benchmarks need a model whose compute, not the server, dominates a request (a 224-px
``resnet50``: about 4 GFLOPs per image), and a known exit mix; accuracy is beside the point (it is
chance level). :func:`make_random_model` builds one in a minute or two on a CPU:

1. the backbone with its random initialisation and exits placed by FLOPs (``place_exits``; linear exits by
   default, so the exit heads cost next to nothing and the FLOPs saved are the segments');
2. every BatchNorm's running statistics set from ``bn_images`` calibration images (cumulative
   averages in train mode, no weight changes), so activations keep a sane scale through 50 layers
   and exit scores differ from image to image;
3. thresholds, exit by exit, at the quantile of the calibration images' scores that lets the asked
   share ``exit_mix[k]`` of all images out at exit ``k`` (of those still there).

The model directory records ``meta.random_weights`` and the exit mix on the calibration images
(``meta.calibration.exit_rates``), which ``branched ray-plan`` and the load-test report read.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..artifact import save_model
from ..backbones import build_backbone
from ..config import ModelConfig
from ..model import BranchedModel
from ..preprocess import Preprocessor
from ..routing import exit_score
from .datasets import load_splits
from .evaluate import evaluate
from .placement import place_exits

__all__ = ["make_random_model", "quantile_thresholds"]


def quantile_thresholds(scores: Sequence[torch.Tensor], exit_mix: Sequence[float]) -> list[float]:
    """Thresholds that let ``exit_mix[k]`` of all samples out at side exit ``k`` (in order; the rest reach the head).

    Args:
        scores: per side exit, every sample's exit score ``[N]``.
        exit_mix: one share per exit including the backbone head; sums to 1.

    Raises:
        ValueError: shares that are negative, do not sum to 1, or do not match the exits.
    """
    if len(exit_mix) != len(scores) + 1 or any(r < 0 for r in exit_mix) or abs(sum(exit_mix) - 1) > 1e-6:
        raise ValueError(f"--exit-mix needs {len(scores) + 1} shares >= 0 summing to 1 (last = backbone head), "
                         f"got {list(exit_mix)}")
    n = len(scores[0])
    left = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k, s in enumerate(scores):
        want = int(round(exit_mix[k] * n))
        candidates = s[left].sort(descending=True).values
        if want <= 0 or not len(candidates):
            thresholds.append(math.inf)
            continue
        want = min(want, len(candidates))
        lowest = float(candidates[want - 1])
        # Everyone left leaves: go halfway down to 0 (scores are >= 0), not below it, so the config stays readable.
        below = float(candidates[want]) if want < len(candidates) else (0.0 if lowest > 0 else lowest - 1.0)
        t = (lowest + below) / 2  # halfway: no sample sits on the threshold
        thresholds.append(t)
        left &= ~(s >= t)
    return thresholds


@torch.no_grad()
def _set_bn_statistics(model: nn.Module, x: torch.Tensor, batch_size: int = 32) -> None:
    """Running BN statistics = plain averages over ``x`` (train-mode forward passes; no weight changes)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i in range(0, len(x), batch_size):
        model(x[i:i + batch_size])
    model.eval()


def make_random_model(out: str, backbone: str = "resnet50", input_size: int = 224, dataset: str = "imagefolder",
                      data_root: Optional[str] = None, exits: int = 3, exit_mix: Sequence[float] = (0.5, 0.2, 0.1, 0.2),
                      exit_kind: str = "linear", policy: str = "max_softmax", calib_images: int = 128, seed: int = 0,
                      threads: Optional[int] = None) -> dict:
    """Write a random-weight branched model with a fixed exit mix to ``out``; returns its evaluation on the
    calibration images (``exit_rates``, ``cost_fraction``).

    Args:
        out: model directory to write.
        backbone, input_size: the backbone and its input side (images are resized to it).
        dataset, data_root: where the BN-statistics and calibration images come from (and the load test's pool).
        exits: side exits, placed evenly by FLOPs.
        exit_mix: share of images per exit, the backbone head last.
        exit_kind: ``linear`` (pool + classifier: next to free) or ``conv`` (PTEENet's; on resnet50's wide
            features a depth-2 conv exit costs about 45% of the backbone).
        policy: exit score (``max_softmax`` needs no trained confidence head).
        calib_images: calibration-split images for BN statistics and thresholds.
        seed: seeds the weights and the dataset split.
        threads: torch threads.
    """
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    splits = load_splits(dataset, data_root, seed=seed)
    calib = splits["calib"].subset(list(range(min(calib_images, len(splits["calib"])))))
    num_classes = len(calib.class_names)
    net = build_backbone(backbone, num_classes)
    pre = Preprocessor(input_size, calib.mean, calib.std)
    x, y = calib.tensors(pre)
    config = ModelConfig(backbone=backbone, num_classes=num_classes, input_size=input_size, mean=list(calib.mean),
                         std=list(calib.std), class_names=list(calib.class_names),
                         exits=place_exits(net, input_size, exits, "even", exit_kind, 2, 2), policy=policy,
                         meta={"dataset": dataset, "split_seed": seed, "random_weights": True})
    if data_root:
        import os

        config.meta["data_root"] = os.path.abspath(data_root)
    model = BranchedModel(config, net)
    _set_bn_statistics(model, x)
    with torch.no_grad():
        outs = [o for o in (model(x[i:i + 32]) for i in range(0, len(x), 32))]
    scores = [torch.cat([exit_score(o[k], policy) for o in outs]) for k in range(exits)]
    model.config.thresholds = quantile_thresholds(scores, exit_mix)
    result = evaluate(model, x, y)
    model.config.meta["calibration"] = {
        "exit_rates": result["exit_rates"], "cost_fraction": result["cost_fraction"], "samples": result["samples"],
        "asked_exit_mix": list(exit_mix),
        "method": f"random weights; thresholds at quantiles of the {policy} exit scores on {len(x)} calibration "
                  f"images fix the exit mix (accuracy is chance level)"}
    save_model(model, out)
    return result

"""What the tests share: small models the tests make, images, thresholds, and server helpers.

Unit tests build small models with random weights (``make_model``); server tests start real
TorchServe and Ray Serve through :mod:`loadtests.launchers` (``free_port`` and ``wait_for`` are that
module's).
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
from typing import Optional

import numpy as np
import requests
import torch
from PIL import Image

from branched.artifact import save_model
from branched.backbones import build_backbone
from branched.build.datasets import load_split
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel
from branched.preprocess import Preprocessor
from branched.routing import exit_score
from loadtests.launchers import free_port, wait_for

__all__ = ["make_model", "between", "median_thresholds", "save_mnist_model", "save_ladder_model", "png", "free_port",
           "wait_for", "metrics", "metric", "readme_curls", "run_curl"]

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def make_model(name: str, size: int, n_exits: int = 2, kind: Optional[str] = None) -> BranchedModel:
    """A branched model on an untrained backbone with random BN statistics (so BN is not the identity).

    The torchvision model the blocks were cut from stays reachable as ``model.source``.
    """
    bb = build_backbone(name, 10)
    for m in bb.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    cfg = ModelConfig(backbone=name, num_classes=10, input_size=size,
                      exits=place_exits(bb, size, n_exits, kind=kind))
    model = BranchedModel(cfg, bb).eval()
    model.__dict__["source"] = bb.model.eval()  # a plain attribute, not a registered submodule
    return model


def between(scores: torch.Tensor) -> float:
    """A threshold that lets about half of ``scores`` through, halfway between two neighbouring scores.

    ``median()`` would return a sample's own score, and float differences between a batch and a
    single-sample run (1e-7) could then flip that sample's exit.
    """
    s = scores.flatten().sort().values
    mid = len(s) // 2
    return float((s[mid - 1] + s[mid]) / 2) if len(s) > 1 else float(s[0])


def median_thresholds(model: BranchedModel, x: torch.Tensor) -> list[float]:
    """Thresholds that let about half of the samples out at each exit."""
    with torch.no_grad():
        outs = model(x)
    return [between(exit_score(o, model.config.policy)) for o in outs[:-1]]


def assert_optimizing_keeps_answers(model: BranchedModel, x: torch.Tensor) -> None:
    """``optimize_for_inference`` (in place) leaves every exit and answer of ``x`` as it was (to float noise)."""
    thr = median_thresholds(model, x)
    before = model.routed_forward(x, thr)
    model.optimize_for_inference()
    after = model.routed_forward(x, thr)
    assert torch.equal(before.exit_index, after.exit_index)
    torch.testing.assert_close(before.logits, after.logits, rtol=1e-4, atol=1e-4)


def save_mnist_model(directory: str, input_size: int) -> str:
    """``cifar_resnet20`` with untrained exits, thresholds at the score medians of the first 24 mnist5k test
    images (the load tests' pool spreads over every exit), saved to ``directory``."""
    model = make_model("cifar_resnet20", input_size)
    model.config.meta.update(dataset="mnist5k", split_seed=0)
    x, _ = load_split("mnist5k", "test").subset(list(range(24))).tensors(Preprocessor.for_config(model.config))
    model.config.thresholds = median_thresholds(model, x)
    save_model(model, directory)
    return directory


def save_ladder_model(directory: str, calibrated: bool = True, size: int = 32) -> str:
    """cifar_resnet20 with untrained exits whose calibrated point is the backbone ([inf, inf]) and whose
    cheaper points send everything out at exit 1 ([inf, 0]) or exit 0 ([0, 0]): the exit of an answer
    shows the point it was served at. Recorded as built on mnist5k (so a load test can write its pool)."""
    model = make_model("cifar_resnet20", size)
    model.config.thresholds = [math.inf, math.inf]
    model.config.meta.update(dataset="mnist5k", split_seed=0)
    if calibrated:
        model.config.meta["calibration"] = {"backbone_accuracy": 0.7, "curve": [
            {"thresholds": [0.0, 0.0], "cost_fraction": 0.3, "accuracy": 0.68},
            {"thresholds": [math.inf, 0.0], "cost_fraction": 0.6, "accuracy": 0.69},
            {"thresholds": [math.inf, math.inf], "cost_fraction": 1.0, "accuracy": 0.7}]}
    save_model(model, str(directory))
    return str(directory)


def png(seed: int, size: int = 32) -> bytes:
    """A random RGB image of ``size`` x ``size`` as PNG bytes (the same bytes for the same seed)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def metrics(url: str) -> dict[tuple, float]:
    """Prometheus text at ``url`` -> ``{(name, ((label, value), ...)): sample}`` (the host label dropped)."""
    out = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        m = re.match(r"^(\w+)\{(.*)\}\s+(\S+)$", line)
        if m:
            labels = tuple(sorted((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', m.group(2)) if k != "Hostname"))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(snapshot: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in snapshot.items() if n == name and set(labels.items()) <= set(ls))


def readme_curls(*urls: str) -> list[str]:
    """The README's ``curl`` commands (code blocks and inline table cells) that send an image to one of ``urls``.

    Commands that need a shell variable (``$KEY``) are left out; ``$(base64 ...)`` stays (bash runs it).
    """
    text = open(README).read()
    found = re.findall(r"^(curl .+?)(?:\s+#.*)?$", text, re.M) + re.findall(r"`(curl [^`]+)`", text)
    out = []
    for cmd in found:
        if any(u in cmd for u in urls) and "digit.png" in cmd and "$KEY" not in cmd and cmd not in out:
            out.append(cmd.strip())
    return out


def run_curl(command: str, cwd: str, replace: dict[str, str]) -> dict:
    """Run one README curl command in ``cwd`` (which holds ``digit.png``) after replacing addresses; its JSON answer."""
    for old, new in replace.items():
        command = command.replace(old, new)
    proc = subprocess.run(["bash", "-c", command + " --silent --show-error"], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, f"{command}: {proc.stderr}"
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"{command}: not JSON: {proc.stdout[:300]}") from None

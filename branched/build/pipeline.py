"""The build pipeline: dataset + backbone -> a served-ready model directory.

Steps: load the seeded train / calibration / test splits; train the backbone when no weights are
given (a short recipe per dataset), or load them; freeze it; optionally add and train LC-Net
gates (``dynamic``); attach and post-train the exits (PTEENet objective); calibrate the
thresholds on the calibration split to a budget with a Learn-then-Test guarantee; check the
guarantee on the test split; write ``config.json`` + ``weights.pt``, the trade-off curve
(``tradeoff.csv``, ``tradeoff.png``) and ``build_report.json``.

The Python API is :func:`run_build` with a :class:`BuildSettings`; ``branched build`` (argparse, in
:mod:`branched.cli`) fills one from the command line. With neither ``backbone`` nor ``dataset`` it
builds the demo default offline (:data:`~branched.build.settings.DEMO`): ``cifar_resnet56`` on the bundled ``mnist5k`` at 16x16
input (the 28x28 digits stay legible and the build takes a quarter of the compute of 32x32), exits
after each stage's first block. The deeper He et al. ResNet puts the first exit at 5% of the FLOPs,
where most digits are already recognised, so the saving survives the overhead of a small network on a CPU.
"""
from __future__ import annotations

import os
import time
from typing import Any

import torch

from ..artifact import save_model
from ..backbones import build_backbone
from ..config import ModelConfig
from ..errors import UsageError
from ..model import BranchedModel
from ..preprocess import Preprocessor
from . import steps
from .datasets import load_splits
from .placement import exit_specs, place_exits
from .settings import LR_SCALE, RECIPES, BuildSettings, Recipe
from .tradeoff import plot_tradeoff, write_tradeoff_csv
from .train import FitSettings

__all__ = ["run_build", "print_summary", "BuildSettings"]

def print_summary(out: str, report: dict) -> None:
    """The build report in a few lines, as ``branched build`` prints it."""
    cal, test = report["calibration"], report["test"]
    exits = ", ".join(e["after"] for e in report["exits"])
    print(f"built {out}: {report['backbone']} on {report['dataset']}, exits after {exits} ({report['exit_kind']})")
    print(f"  calibration ({cal['samples']}): {cal['status']} - {cal['message']}")
    if report.get("dropped_exits"):
        print(f"    exits switched off by calibration, left out of the model: {', '.join(report['dropped_exits'])}")
    thr = ", ".join(f"{t:.4f}" for t in cal["thresholds"])
    print(f"    thresholds [{thr}]  cost {cal['cost_fraction']:.3f}  accuracy {cal['accuracy']:.4f} "
          f"(backbone {cal['backbone_accuracy']:.4f})")
    print(f"    guarantee: {cal['guarantee']['statement']}")
    print(f"  test ({test['samples']}): accuracy {test['accuracy']:.4f} (backbone {test['backbone_accuracy']:.4f}, "
          f"drop {test['drop']:+.4f})  cost {test['cost_fraction']:.3f}  exit rates "
          f"{', '.join(f'{r:.2f}' for r in test['exit_rates'])}")
    if test["backbone_accuracy"] < 2.0 / report["num_classes"]:
        print(f"  warning: the backbone is near chance ({test['backbone_accuracy']:.3f}); "
              f"lower --lr or raise --epochs, or pass trained --weights")
    print(f"    guarantee held on test: {'yes' if test['guarantee_held'] else 'NO'} "
          f"(drop {test['drop']:+.4f} <= bound {cal['guarantee']['drop_bound']:.4f})")
    print(f"  wrote config.json, weights.pt, tradeoff.csv, tradeoff.png, build_report.json "
          f"in {report['seconds']['total']:.0f} s")


def _recipe_value(s: BuildSettings, name: str, recipe: Recipe) -> Any:
    value = getattr(s, name, None)
    return getattr(recipe, name) if value is None else value


def run_build(settings: BuildSettings) -> dict:
    """Run the whole pipeline; returns the build report (also saved as ``OUT/build_report.json``).

    Args:
        settings: what to build (:class:`BuildSettings`; defaults are resolved here).

    Raises:
        UsageError, DataError: settings or data that cannot work; the message carries the fix.
    """
    s = settings.resolved()
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    if s.threads:
        torch.set_num_threads(s.threads)
    progress = not s.quiet
    recipe = RECIPES.get(s.dataset, RECIPES["imagefolder"])

    # ---- data
    t0 = time.perf_counter()
    splits = load_splits(s.dataset, s.data_root, seed=s.split_seed, calib_fraction=s.calib_fraction)
    for split, limit in (("train", s.limit_train), ("calib", s.limit_calib), ("test", s.limit_test)):
        if limit is not None:
            splits[split] = splits[split].sample(limit, s.split_seed)
    for split, data in splits.items():
        if len(data) == 0:
            raise ValueError(f"the {split} split of {s.dataset} is empty; give a larger dataset")
    train = splits["train"]
    num_classes = len(train.class_names)
    probe = build_backbone(s.backbone, num_classes)
    size = s.input_size or probe.default_input_size
    mean, std = s.mean or train.mean, s.std or train.std
    if len(mean) != 3 or len(std) != 3:
        raise UsageError("--mean and --std take three comma-separated values (R,G,B)")
    pre = Preprocessor(size, mean, std)
    tensors = {k: v.tensors(pre, progress=progress) for k, v in splits.items()}
    seconds["data"] = time.perf_counter() - t0

    # ---- backbone: weights given, a resumable checkpoint, or the short recipe
    t0 = time.perf_counter()
    lr = s.lr if s.lr is not None else recipe.lr * next(
        (v for k, v in LR_SCALE.items() if k in s.backbone), 1.0)
    backbone_fit = FitSettings(epochs=_recipe_value(s, "epochs", recipe),
                               batch_size=_recipe_value(s, "batch_size", recipe), lr=lr,
                               augment=_recipe_value(s, "augment", recipe), device=s.device, seed=s.seed,
                               progress=progress, precision=s.precision)
    backbone, backbone_meta = steps.backbone(s, num_classes, (size, list(mean), list(std)), backbone_fit,
                                             tensors["train"], progress)
    seconds["backbone"] = time.perf_counter() - t0

    # ---- exits (and optional LC-Net gates), on the frozen backbone; calibration; the test split
    t0 = time.perf_counter()
    shape = dict(kind=s.exit_kind, depth=s.exit_depth, stride=s.exit_stride, cells=s.exit_cells,
                 hidden=s.exit_hidden, pool=s.exit_pool)
    if s.exits.strip() == "all":  # one exit after every block but the last; calibration keeps the ones that pay
        specs = exit_specs(backbone, size, backbone.block_names[:-1], **shape)
    elif s.exits.strip().isdigit():
        specs = place_exits(backbone, size, int(s.exits), s.spacing, **shape)
    else:
        specs = exit_specs(backbone, size, [n.strip() for n in s.exits.split(",") if n.strip()], **shape)
    meta = {"dataset": s.dataset, "split_seed": s.split_seed, "calib_fraction": s.calib_fraction,
            "limits": {"train": s.limit_train, "calib": s.limit_calib, "test": s.limit_test}}
    if s.data_root:
        meta["data_root"] = os.path.abspath(s.data_root)
    config = ModelConfig(backbone=s.backbone, num_classes=num_classes, input_size=size, mean=list(mean),
                         std=list(std), class_names=list(train.class_names), exits=specs,
                         policy="confidence" if s.policy == "auto" else s.policy,
                         meta=meta)
    torch.manual_seed(s.seed)
    model = BranchedModel(config, backbone).freeze_backbone()
    training = {"backbone": backbone_meta}
    exit_fit = FitSettings(epochs=_recipe_value(s, "exit_epochs", recipe),
                           batch_size=_recipe_value(s, "batch_size", recipe),
                           lr=_recipe_value(s, "exit_lr", recipe), optimizer="adamw", weight_decay=1e-4,
                           augment=s.exit_augment, device=s.device, seed=s.seed, progress=progress)
    if s.dynamic:
        gated, training["gates"] = steps.gates(model, s, tensors["train"], progress)
        seconds["gates"] = time.perf_counter() - t0
        outcome = steps.exits_and_calibration(gated, s, exit_fit, tensors, seconds)
        speed = steps.measured_speedup(outcome.model, tensors["calib"][0])
        training["gates"]["measured_speedup"] = speed
        if speed < 1.0:
            # Gated blocks slower than the plain ones on this machine: fall back to exits on the plain backbone.
            if progress:
                print(f"the gated model runs at {speed:.2f}x its backbone here (slower); building exits on the "
                      f"plain backbone instead")
            training["gates"]["fallback"] = f"measured {speed:.2f}x of the backbone: gates dropped"
            outcome = steps.exits_and_calibration(model, s, exit_fit, tensors, seconds)
    else:
        outcome = steps.exits_and_calibration(model, s, exit_fit, tensors, seconds)
    model, report_cal = outcome.model, outcome.calibration
    training["exits"] = outcome.exit_training

    report_cal["policy_selection"]["asked"] = s.policy
    model.config.meta["calibration"] = report_cal
    model.config.meta["training"] = training
    seconds["total"] = time.perf_counter() - t_start
    model.config.meta["build"] = {"seed": s.seed, "torch": torch.__version__, "device": s.device,
                                  "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    report = {"backbone": s.backbone, "dataset": s.dataset, "num_classes": num_classes,
              "input_size": size, "exit_kind": s.exit_kind or "/".join(sorted({e.kind for e in specs})),
              "exits": [{"after": e.after, "kind": e.kind} for e in model.config.exits],
              "dropped_exits": report_cal.get("dropped_exits", []),
              "cost_fractions": model.cost.exit_cost_fractions(),
              "calibration": {k: v for k, v in report_cal.items() if k != "curve"}, "test": report_cal["test"],
              "training": training, "seconds": seconds}
    save_model(model, s.out, extra_files={"build_report.json": report})
    write_tradeoff_csv(os.path.join(s.out, "tradeoff.csv"), outcome.calibrated, outcome.test_points)
    plot_tradeoff(os.path.join(s.out, "tradeoff.png"), outcome.calibrated, outcome.test_points,
                  title=f"{s.backbone} on {s.dataset}: {len(specs)} exits, {report_cal['policy']} policy")
    return report

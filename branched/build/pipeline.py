"""The build pipeline: dataset + backbone -> a served-ready model directory.

Steps: load the seeded train / calibration / test splits; train the backbone when no weights are
given (a short recipe per dataset), or load them; freeze it; optionally add and train LC-Net
gates (``dynamic``); attach and post-train the exits (PTEENet objective); calibrate the
thresholds on the calibration split to a budget with a Learn-then-Test guarantee; check the
guarantee on the test split; write ``config.json`` + ``weights.pt``, the trade-off curve
(``tradeoff.csv``, ``tradeoff.png``) and ``build_report.json``.

The Python API is :func:`run_build` with a :class:`BuildSettings`; ``branched build`` (argparse, in
:mod:`branched.cli`) fills one from the command line. With neither ``backbone`` nor ``dataset`` it
builds the demo default offline (:data:`DEMO`): ``cifar_resnet56`` on the bundled ``mnist5k`` at 16x16
input (the 28x28 digits stay legible and the build takes a quarter of the compute of 32x32), exits
after each stage's first block. The deeper He et al. ResNet puts the first exit at 5% of the FLOPs,
where most digits are already recognised, so the saving survives the overhead of a small network on a CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..artifact import save_model
from ..backbones import build_backbone, load_backbone_weights
from ..config import ModelConfig
from ..errors import UsageError
from ..exits import ExitSpec
from ..model import BranchedModel
from ..preprocess import Preprocessor
from ..routing import POLICIES
from .calibrate import calibrate, choose_policy, collect_records, collect_records_by_policy
from .datasets import load_splits
from .evaluate import evaluate
from .lcnet_train import add_gates, train_gates
from .placement import place_exits
from .tradeoff import plot_tradeoff, write_tradeoff_csv
from .train import ExitObjective, FitSettings, train_backbone, train_exits

__all__ = ["BuildSettings", "Recipe", "RECIPES", "run_build", "print_summary", "DEFAULT_BACKBONE",
           "DEFAULT_DATASET", "DEMO"]

DEFAULT_BACKBONE = "cifar_resnet56"
DEFAULT_DATASET = "mnist5k"
# What a build with neither backbone nor dataset named builds.
DEMO = {"backbone": DEFAULT_BACKBONE, "dataset": DEFAULT_DATASET, "input_size": 16,
        "exits": "layer1.0,layer2.0,layer3.0"}


@dataclass(frozen=True)
class Recipe:
    """Per-dataset training defaults (every field can be overridden in :class:`BuildSettings`)."""

    epochs: int
    lr: float
    augment: str
    exit_epochs: int
    exit_lr: float = 0.01
    batch_size: int = 128


RECIPES: dict[str, Recipe] = {
    # Bundled digits: 3,000 training images are learned in a few epochs without augmentation.
    "mnist5k": Recipe(epochs=4, lr=0.1, augment="none", exit_epochs=15),
    "cifar10": Recipe(epochs=30, lr=0.1, augment="crop_flip", exit_epochs=10),
    "svhn": Recipe(epochs=15, lr=0.05, augment="crop", exit_epochs=8),
    "imagefolder": Recipe(epochs=30, lr=0.05, augment="crop_flip", exit_epochs=10),
}


# Plain (non-residual) VGGs diverge at the ResNet learning rate on short one-cycle schedules.
LR_SCALE = {"vgg": 0.2}


@dataclass
class BuildSettings:
    """Everything a build needs; ``None`` means "the default" (the demo, or the dataset's :class:`Recipe`).

    ``branched build --help`` describes each option; the field names are the options' names with
    ``_`` for ``-``. Only ``out`` is required.
    """

    out: str
    # backbone and data
    backbone: Optional[str] = None
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    weights: Optional[str] = None
    input_size: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    split_seed: int = 0
    limit_train: Optional[int] = None
    limit_calib: Optional[int] = None
    limit_test: Optional[int] = None
    # exits
    exits: Optional[str] = None
    spacing: str = "even"
    exit_kind: str = "conv"
    exit_depth: int = 2
    exit_stride: int = 2
    policy: str = "auto"
    # training (None: the dataset's recipe)
    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    augment: Optional[str] = None
    exit_epochs: Optional[int] = None
    exit_lr: Optional[float] = None
    objective: str = "pteenet"
    cost_weight: float = 0.5
    ce_weight: float = 0.5
    distill: float = 0.0
    temperature: float = 1.0
    precision: str = "fp32"
    resume: bool = False
    # calibration
    max_drop: Optional[float] = None
    max_cost: Optional[float] = None
    delta: float = 0.1
    family: str = "fixed_sequence"
    p_value: str = "binomial"
    select: str = "ltt"
    path_fraction: float = 0.3
    # LC-Net gates
    dynamic: Optional[str] = None
    target_cost: float = 0.5
    gate_epochs: int = 10
    # run
    device: str = "cpu"
    seed: int = 0
    threads: Optional[int] = None
    quiet: bool = False

    def resolved(self) -> "BuildSettings":
        """A copy with the defaults filled in (the demo when neither backbone nor dataset is named).

        Raises:
            UsageError: a setting that cannot work (with the fix in the message).
        """
        s = dataclasses.replace(self)
        if s.backbone is None and s.dataset is None:
            for key, value in DEMO.items():
                if getattr(s, key) is None:
                    setattr(s, key, value)
        s.backbone = s.backbone or DEFAULT_BACKBONE
        s.dataset = s.dataset or DEFAULT_DATASET
        s.exits = s.exits or "3"
        if s.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
        elif s.device != "cpu":
            raise UsageError(f"--device must be cpu or cuda, got {s.device!r}")
        for name in ("limit_train", "limit_calib", "limit_test", "epochs", "exit_epochs", "batch_size", "input_size"):
            value = getattr(s, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if s.max_drop is not None and s.max_cost is not None:
            raise UsageError("give at most one budget: --max-drop or --max-cost")
        return s


def print_summary(out: str, report: dict) -> None:
    """The build report in a few lines, as ``branched build`` prints it."""
    cal, test = report["calibration"], report["test"]
    exits = ", ".join(e["after"] for e in report["exits"])
    print(f"built {out}: {report['backbone']} on {report['dataset']}, exits after {exits} ({report['exit_kind']})")
    print(f"  calibration ({cal['samples']}): {cal['status']} - {cal['message']}")
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
    splits = load_splits(s.dataset, s.data_root, seed=s.split_seed)
    for split, limit in (("train", s.limit_train), ("calib", s.limit_calib), ("test", s.limit_test)):
        if limit is not None and limit < len(splits[split]):
            splits[split] = splits[split].subset(np.arange(limit))
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
    backbone, backbone_meta = _backbone(s, num_classes, (size, list(mean), list(std)), backbone_fit,
                                        tensors["train"], progress)
    seconds["backbone"] = time.perf_counter() - t0

    # ---- exits (and optional LC-Net gates), on the frozen backbone
    t0 = time.perf_counter()
    if s.exits.strip().isdigit():
        specs = place_exits(backbone, size, int(s.exits), s.spacing, s.exit_kind, s.exit_depth,
                            s.exit_stride)
    else:
        specs = [ExitSpec(n.strip(), s.exit_kind, s.exit_depth, s.exit_stride)
                 for n in s.exits.split(",") if n.strip()]
    meta = {"dataset": s.dataset, "split_seed": s.split_seed,
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
    if s.dynamic:
        model, training["gates"] = _gates(model, s, tensors["train"], progress)
    seconds["gates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    objective = ExitObjective(s.objective, s.cost_weight, s.ce_weight, s.distill, s.temperature)
    exit_settings = FitSettings(epochs=_recipe_value(s, "exit_epochs", recipe),
                                batch_size=_recipe_value(s, "batch_size", recipe),
                                lr=_recipe_value(s, "exit_lr", recipe), optimizer="adamw", weight_decay=1e-4,
                                device=s.device, seed=s.seed, progress=progress)
    history = train_exits(model, *tensors["train"], exit_settings, objective) if specs else []
    training["exits"] = {**exit_settings.to_dict(), **objective.to_dict(), "loss_history": history}
    seconds["exits"] = time.perf_counter() - t0

    # ---- calibrate on the calibration split; check the guarantee on the test split
    t0 = time.perf_counter()
    policies = list(POLICIES) if s.policy == "auto" else [s.policy]
    by_policy = collect_records_by_policy(model, *tensors["calib"], policies)
    policy, policy_scores = choose_policy(by_policy, s.max_drop, s.max_cost, s.path_fraction, s.seed)
    cal = calibrate(by_policy[policy], max_drop=s.max_drop, max_cost=s.max_cost, delta=s.delta,
                    family=s.family, p_value_method=s.p_value, select=s.select,
                    path_fraction=s.path_fraction, seed=s.seed)
    model.config.policy = policy
    model.config.thresholds = list(cal.thresholds)
    test_records = collect_records(model, *tensors["test"], policy=policy)
    test_points = [test_records.point(t) for t in cal.path]
    result = evaluate(model, *tensors["test"])  # the routed model itself, as `branched evaluate` runs it
    bound = cal.report["guarantee"]["drop_bound"]
    test = {**{k: result[k] for k in ("samples", "accuracy", "backbone_accuracy", "cost_fraction", "exit_rates",
                                      "exit_accuracy")},
            "drop": result["backbone_accuracy"] - result["accuracy"], "risk": test_points[cal.chosen]["risk"]}
    test["guarantee_held"] = bool(test["drop"] <= bound + 1e-12)
    test["routing_matches_records"] = abs(test_points[cal.chosen]["accuracy"] - result["accuracy"]) < 1e-6
    seconds["calibration"] = time.perf_counter() - t0

    report_cal = {**cal.report, "policy": policy, "test": test,
                  "policy_selection": {"asked": s.policy, "scores": policy_scores,
                                       "rule": "best threshold path on the path part of the calibration split"}}
    model.config.meta["calibration"] = report_cal
    model.config.meta["training"] = training
    seconds["total"] = time.perf_counter() - t_start
    model.config.meta["build"] = {"seed": s.seed, "torch": torch.__version__, "device": s.device,
                                  "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    report = {"backbone": s.backbone, "dataset": s.dataset, "num_classes": num_classes,
              "input_size": size, "exit_kind": s.exit_kind,
              "exits": [{"after": e.after, "kind": e.kind} for e in specs],
              "cost_fractions": model.cost.exit_cost_fractions(),
              "calibration": {k: v for k, v in report_cal.items() if k != "curve"}, "test": test,
              "training": training, "seconds": seconds}
    save_model(model, s.out, extra_files={"build_report.json": report})
    write_tradeoff_csv(os.path.join(s.out, "tradeoff.csv"), cal, test_points)
    plot_tradeoff(os.path.join(s.out, "tradeoff.png"), cal, test_points,
                  title=f"{s.backbone} on {s.dataset}: {len(specs)} exits, {policy} policy")
    return report


def _backbone(s: BuildSettings, num_classes: int, inputs: tuple, settings: FitSettings, train_tensors,
              progress: bool):
    """The trained backbone and a record of where it came from.

    A trained backbone is saved to ``OUT/checkpoints/backbone.pt`` with the settings it was trained
    under; ``--resume`` reuses it when those settings match.
    """
    if s.weights:
        return load_backbone_weights(s.backbone, num_classes, s.weights), {"source": "weights", "weights": s.weights}
    ckpt_dir = os.path.join(s.out, "checkpoints")
    ckpt = os.path.join(ckpt_dir, "backbone.pt")
    key = {"backbone": s.backbone, "dataset": s.dataset, "data_root": s.data_root,
           "split_seed": s.split_seed, "limit_train": s.limit_train, "inputs": list(inputs),
           **settings.to_dict()}
    key.pop("progress")
    key_file = ckpt + ".json"
    if s.resume and os.path.isfile(ckpt) and os.path.isfile(key_file):
        with open(key_file) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            if progress:
                print(f"resuming: backbone from {ckpt}")
            backbone = load_backbone_weights(s.backbone, num_classes, ckpt)
            return backbone, {"source": "trained", "resumed": True, **saved["record"]}
        if progress:
            print(f"not resuming: {ckpt} was trained with other settings")
    torch.manual_seed(s.seed)
    backbone = build_backbone(s.backbone, num_classes)
    history = train_backbone(backbone, *train_tensors, settings)
    record = {**settings.to_dict(), "loss_history": history}
    record.pop("progress")
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(backbone.state_dict(), ckpt)
    with open(key_file, "w") as f:
        json.dump({"key": key, "record": record}, f, indent=2)
    return backbone, {"source": "trained", "resumed": False, **record}


def _gates(model: BranchedModel, s: BuildSettings, train_tensors, progress: bool):
    """LC-Net: gate the frozen backbone (:func:`add_gates`) and train the gates to ``target_cost``."""
    gated = add_gates(model, s.dynamic, target_cost=s.target_cost).freeze_backbone()
    report = train_gates(gated, *train_tensors, s.target_cost, epochs=s.gate_epochs, seed=s.seed,
                         progress=progress)
    return gated, report

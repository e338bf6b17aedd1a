"""``branched build``: dataset + backbone -> a served-ready model directory, in one command.

Steps: load the seeded train / calibration / test splits; train the backbone when no weights are
given (a short recipe per dataset), or load them; freeze it; optionally add and train LC-Net
gates (``--dynamic``); attach and post-train the exits (PTEENet objective); calibrate the
thresholds on the calibration split to a budget with a Learn-then-Test guarantee; check the
guarantee on the test split; write ``config.json`` + ``weights.pt``, the trade-off curve
(``tradeoff.csv``, ``tradeoff.png``) and ``build_report.json``.

With neither ``--backbone`` nor ``--dataset`` it builds the demo default offline
(:data:`DEMO`): ``cifar_resnet56`` on the bundled ``mnist5k`` at 16x16 input (the 28x28 digits stay
legible and the build takes a quarter of the compute of 32x32), exits after each stage's first block.
The deeper He et al. ResNet puts the first exit at 5% of the FLOPs, where most digits are already
recognised, so the saving survives the overhead of a small network on a CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from typing import Optional

__all__ = ["register", "Recipe", "RECIPES", "run_build", "DEFAULT_BACKBONE", "DEFAULT_DATASET", "DEMO"]

DEFAULT_BACKBONE = "cifar_resnet56"
DEFAULT_DATASET = "mnist5k"
# What `branched build --out DIR` builds when neither --backbone nor --dataset is given.
DEMO = {"backbone": DEFAULT_BACKBONE, "dataset": DEFAULT_DATASET, "input_size": 16,
        "exits": "layer1.0,layer2.0,layer3.0"}


@dataclass(frozen=True)
class Recipe:
    """Per-dataset training defaults (every field can be overridden on the command line)."""

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


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(subparsers) -> None:
    """Add the ``build`` sub-command (called by :func:`branched.cli.build_parser`)."""
    p = subparsers.add_parser(
        "build", help="train (if needed), add and post-train exits, calibrate, evaluate, write a model directory",
        description="Dataset + backbone -> a served-ready model directory, in one command.")
    p.add_argument("--out", required=True, help="model directory to write")
    g = p.add_argument_group("backbone and data")
    g.add_argument("--backbone", help=f"backbone name (default {DEFAULT_BACKBONE})")
    g.add_argument("--dataset", help=f"{DEFAULT_DATASET} (bundled, the default), cifar10, svhn or imagefolder")
    g.add_argument("--data-root", help="local folder of cifar10 / svhn / imagefolder data")
    g.add_argument("--weights", help="backbone state_dict (.pt) or torchvision weights name; skips backbone training")
    g.add_argument("--input-size", type=int, help="model input side (default: the backbone's, 32 for cifar_*)")
    g.add_argument("--mean", type=_floats, help="normalisation mean R,G,B (default: the dataset's)")
    g.add_argument("--std", type=_floats, help="normalisation std R,G,B (default: the dataset's)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/calib/test split (default 0)")
    g.add_argument("--limit-train", type=int, help="use only the first N training images (quick builds)")
    g.add_argument("--limit-calib", type=int, help="use only the first N calibration images")
    g.add_argument("--limit-test", type=int, help="use only the first N test images")
    g = p.add_argument_group("exits")
    g.add_argument("--exits", help="number of exits placed by FLOPs, or comma-separated block names (default 3)")
    g.add_argument("--spacing", default="even", choices=["even", "pareto"], help="exit placement by FLOPs")
    g.add_argument("--exit-kind", default="conv", choices=["conv", "linear"])
    g.add_argument("--exit-depth", type=int, default=2, help="conv layers in a conv exit (default 2)")
    g.add_argument("--exit-stride", type=int, default=2, help="stride of an exit's first conv (default 2)")
    g.add_argument("--policy", default="auto", choices=["auto", "confidence", "max_softmax", "entropy"],
                   help="exit policy; auto picks the best on the path part of the calibration split")
    g = p.add_argument_group("training (defaults from the dataset's recipe)")
    g.add_argument("--epochs", type=int, help="backbone epochs (only without --weights)")
    g.add_argument("--lr", type=float, help="backbone peak learning rate (SGD, one-cycle)")
    g.add_argument("--batch-size", type=int, help="mini-batch size")
    g.add_argument("--augment", choices=["none", "crop", "crop_flip"], help="backbone training augmentation")
    g.add_argument("--exit-epochs", type=int, help="exit post-training epochs")
    g.add_argument("--exit-lr", type=float, help="exit peak learning rate (AdamW, one-cycle)")
    g.add_argument("--objective", default="pteenet", choices=["pteenet", "ce"],
                   help="exit loss: PTEENet/EENets confidence-weighted mixture + cost, or per-exit CE")
    g.add_argument("--cost-weight", type=float, default=0.5, help="lambda of the expected-cost term (pteenet)")
    g.add_argument("--ce-weight", type=float, default=0.5, help="added per-exit cross-entropy (pteenet)")
    g.add_argument("--distill", type=float, default=0.0, help="share of the backbone's soft predictions in the target")
    g.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="training arithmetic: bf16 autocast + channels-last is 2x faster on AVX-512 BF16 CPUs")
    g.add_argument("--resume", action="store_true", help="reuse OUT/checkpoints/backbone.pt from an earlier run")
    g = p.add_argument_group("calibration")
    b = g.add_mutually_exclusive_group()
    b.add_argument("--max-drop", type=float, help="accuracy budget: at most this drop vs. the backbone (default 0.01)")
    b.add_argument("--max-cost", type=float, help="compute budget: at most this fraction of the backbone's FLOPs")
    g.add_argument("--delta", type=float, default=0.1, help="the guarantee holds with probability >= 1 - delta")
    g.add_argument("--family", default="fixed_sequence", choices=["fixed_sequence", "bonferroni"])
    g.add_argument("--p-value", default="binomial", choices=["binomial", "hoeffding_bentkus"])
    g.add_argument("--select", default="ltt", choices=["ltt", "empirical"],
                   help="ship the cheapest certified point (ltt) or the cheapest within budget on calibration data")
    g.add_argument("--path-fraction", type=float, default=0.3, help="calibration share that orders the sweep")
    g = p.add_argument_group("LC-Net gates")
    g.add_argument("--dynamic", choices=["layer", "channel", "both"], help="add LC-Net gates before the exits")
    g.add_argument("--target-cost", type=float, default=0.5, help="gates' FLOPs budget (fraction of the backbone)")
    g.add_argument("--gate-epochs", type=int, default=10, help="gate training epochs")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, shuffling and calibration")
    g.add_argument("--threads", type=int, help="torch intra-op threads")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_build)


def _apply_defaults(args: argparse.Namespace) -> None:
    """The demo when neither backbone nor dataset is named; otherwise the plain defaults."""
    if args.backbone is None and args.dataset is None:
        for key, value in DEMO.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.backbone = args.backbone or DEFAULT_BACKBONE
    args.dataset = args.dataset or DEFAULT_DATASET
    args.exits = args.exits or "3"


def _cmd_build(args: argparse.Namespace) -> None:
    from .cli import fail

    _apply_defaults(args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA device is available here; use --device cpu")
    elif args.device != "cpu":
        fail(f"--device must be cpu or cuda, got {args.device!r}")
    for name in ("limit_train", "limit_calib", "limit_test", "epochs", "exit_epochs", "batch_size", "input_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    result = run_build(args)
    if not args.quiet:
        _print_summary(args.out, result)


def _print_summary(out: str, report: dict) -> None:
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


def _recipe_value(args: argparse.Namespace, name: str, recipe: Recipe):
    value = getattr(args, name, None)
    return getattr(recipe, name) if value is None else value


def run_build(args: argparse.Namespace) -> dict:
    """Run the whole pipeline for parsed ``build`` arguments; returns the build report (also saved)."""
    import torch

    from .artifact import save_model
    from .backbones import build_backbone, load_backbone_weights
    from .calibrate import calibrate, choose_policy, collect_records, collect_records_by_policy
    from .routing import POLICIES
    from .evaluate import evaluate
    from .exits import ExitSpec
    from .model import BranchedModel, ModelConfig, place_exits
    from .preprocess import Preprocessor
    from .tradeoff import plot_tradeoff, write_tradeoff_csv
    from .train import ExitObjective, FitSettings, train_exits

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = not args.quiet
    recipe = RECIPES.get(args.dataset, RECIPES["imagefolder"])

    # ---- data
    t0 = time.perf_counter()
    from .data import load_splits

    splits = load_splits(args.dataset, args.data_root, seed=args.split_seed)
    for split, limit in (("train", args.limit_train), ("calib", args.limit_calib), ("test", args.limit_test)):
        if limit is not None and limit < len(splits[split]):
            import numpy as np

            splits[split] = splits[split].subset(np.arange(limit))
    for split, data in splits.items():
        if len(data) == 0:
            raise ValueError(f"the {split} split of {args.dataset} is empty; give a larger dataset")
    train = splits["train"]
    num_classes = len(train.class_names)
    probe = build_backbone(args.backbone, num_classes)
    size = args.input_size or probe.default_input_size
    mean, std = args.mean or train.mean, args.std or train.std
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("--mean and --std take three comma-separated values (R,G,B)")
    pre = Preprocessor(size, mean, std)
    tensors = {k: v.tensors(pre, progress=progress) for k, v in splits.items()}
    seconds["data"] = time.perf_counter() - t0

    # ---- backbone: weights given, a resumable checkpoint, or the short recipe
    t0 = time.perf_counter()
    lr = args.lr if args.lr is not None else recipe.lr * next(
        (v for k, v in LR_SCALE.items() if k in args.backbone), 1.0)
    settings = FitSettings(epochs=_recipe_value(args, "epochs", recipe), batch_size=_recipe_value(args, "batch_size", recipe),
                           lr=lr, augment=_recipe_value(args, "augment", recipe),
                           device=args.device, seed=args.seed, progress=progress, precision=args.precision)
    backbone, backbone_meta = _backbone(args, num_classes, (size, list(mean), list(std)), settings,
                                        tensors["train"], progress)
    seconds["backbone"] = time.perf_counter() - t0

    # ---- exits (and optional LC-Net gates), on the frozen backbone
    t0 = time.perf_counter()
    if args.exits.strip().isdigit():
        specs = place_exits(backbone, size, int(args.exits), args.spacing, args.exit_kind, args.exit_depth,
                            args.exit_stride)
    else:
        specs = [ExitSpec(n.strip(), args.exit_kind, args.exit_depth, args.exit_stride)
                 for n in args.exits.split(",") if n.strip()]
    meta = {"dataset": args.dataset, "split_seed": args.split_seed,
            "limits": {"train": args.limit_train, "calib": args.limit_calib, "test": args.limit_test}}
    if args.data_root:
        meta["data_root"] = os.path.abspath(args.data_root)
    config = ModelConfig(backbone=args.backbone, num_classes=num_classes, input_size=size, mean=list(mean),
                         std=list(std), class_names=list(train.class_names), exits=specs,
                         policy="confidence" if args.policy == "auto" else args.policy,
                         meta=meta)
    torch.manual_seed(args.seed)
    model = BranchedModel(config, backbone).freeze_backbone()
    training = {"backbone": backbone_meta}
    if args.dynamic:
        model, training["gates"] = _gates(model, args, tensors["train"], progress)
    seconds["gates"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    objective = ExitObjective(args.objective, args.cost_weight, args.ce_weight, args.distill, args.temperature)
    exit_settings = FitSettings(epochs=_recipe_value(args, "exit_epochs", recipe),
                                batch_size=_recipe_value(args, "batch_size", recipe),
                                lr=_recipe_value(args, "exit_lr", recipe), optimizer="adamw", weight_decay=1e-4,
                                device=args.device, seed=args.seed, progress=progress)
    history = train_exits(model, *tensors["train"], exit_settings, objective) if specs else []
    training["exits"] = {**exit_settings.to_dict(), **objective.to_dict(), "loss_history": history}
    seconds["exits"] = time.perf_counter() - t0

    # ---- calibrate on the calibration split; check the guarantee on the test split
    t0 = time.perf_counter()
    policies = list(POLICIES) if args.policy == "auto" else [args.policy]
    by_policy = collect_records_by_policy(model, *tensors["calib"], policies)
    policy, policy_scores = choose_policy(by_policy, args.max_drop, args.max_cost, args.path_fraction, args.seed)
    cal = calibrate(by_policy[policy], max_drop=args.max_drop, max_cost=args.max_cost, delta=args.delta,
                    family=args.family, p_value_method=args.p_value, select=args.select,
                    path_fraction=args.path_fraction, seed=args.seed)
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
                  "policy_selection": {"asked": args.policy, "scores": policy_scores,
                                       "rule": "best threshold path on the path part of the calibration split"}}
    model.config.meta["calibration"] = report_cal
    model.config.meta["training"] = training
    seconds["total"] = time.perf_counter() - t_start
    model.config.meta["build"] = {"seed": args.seed, "torch": torch.__version__, "device": args.device,
                                  "seconds": {k: round(v, 1) for k, v in seconds.items()}}
    report = {"backbone": args.backbone, "dataset": args.dataset, "num_classes": num_classes,
              "input_size": size, "exit_kind": args.exit_kind,
              "exits": [{"after": e.after, "kind": e.kind} for e in specs],
              "cost_fractions": model.cost.exit_cost_fractions(),
              "calibration": {k: v for k, v in report_cal.items() if k != "curve"}, "test": test,
              "training": training, "seconds": seconds}
    save_model(model, args.out, extra_files={"build_report.json": report})
    write_tradeoff_csv(os.path.join(args.out, "tradeoff.csv"), cal, test_points)
    plot_tradeoff(os.path.join(args.out, "tradeoff.png"), cal, test_points,
                  title=f"{args.backbone} on {args.dataset}: {len(specs)} exits, {policy} policy")
    return report


def _backbone(args: argparse.Namespace, num_classes: int, inputs: tuple, settings, train_tensors,
              progress: bool):
    """The trained backbone and a record of where it came from.

    A trained backbone is saved to ``OUT/checkpoints/backbone.pt`` with the settings it was trained
    under; ``--resume`` reuses it when those settings match.
    """
    import torch

    from .backbones import build_backbone, load_backbone_weights
    from .train import train_backbone

    if args.weights:
        return load_backbone_weights(args.backbone, num_classes, args.weights), {"source": "weights",
                                                                                 "weights": args.weights}
    ckpt_dir = os.path.join(args.out, "checkpoints")
    ckpt = os.path.join(ckpt_dir, "backbone.pt")
    key = {"backbone": args.backbone, "dataset": args.dataset, "data_root": args.data_root,
           "split_seed": args.split_seed, "limit_train": args.limit_train, "inputs": list(inputs),
           **settings.to_dict()}
    key.pop("progress")
    key_file = ckpt + ".json"
    if args.resume and os.path.isfile(ckpt) and os.path.isfile(key_file):
        with open(key_file) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            if progress:
                print(f"resuming: backbone from {ckpt}")
            backbone = load_backbone_weights(args.backbone, num_classes, ckpt)
            return backbone, {"source": "trained", "resumed": True, **saved["record"]}
        if progress:
            print(f"not resuming: {ckpt} was trained with other settings")
    torch.manual_seed(args.seed)
    backbone = build_backbone(args.backbone, num_classes)
    history = train_backbone(backbone, *train_tensors, settings)
    record = {**settings.to_dict(), "loss_history": history}
    record.pop("progress")
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(backbone.state_dict(), ckpt)
    with open(key_file, "w") as f:
        json.dump({"key": key, "record": record}, f, indent=2)
    return backbone, {"source": "trained", "resumed": False, **record}


def _gates(model, args: argparse.Namespace, train_tensors, progress: bool):
    """LC-Net hook: gate the frozen backbone (:mod:`branched.dynamic`) and train the gates to ``--target-cost``."""
    from .cli import fail

    try:
        from .dynamic import add_gates
        from .dynamic_train import train_gates
    except ImportError as exc:
        fail(f"--dynamic needs the LC-Net module (branched.dynamic): {exc}")
    gated = add_gates(model, args.dynamic, target_cost=args.target_cost).freeze_backbone()
    report = train_gates(gated, *train_tensors, args.target_cost, epochs=args.gate_epochs, seed=args.seed,
                         progress=progress)
    return gated, report

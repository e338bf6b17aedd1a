"""The ``branched`` command line (argparse lives here only).

Core sub-commands (``evaluate``, ``bench``, ``build``) are defined here; the serving adapters
(``handlers``, ``ray_app``, ``loadtests``) add theirs through the ``branched.commands`` entry-point
group, each a ``register(subparsers)`` function, so the core never imports a serving framework.
Errors a user can fix are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from importlib.metadata import entry_points
from typing import Callable, Optional, Sequence

from .errors import BranchedError

__all__ = ["main", "build_parser", "parse_thresholds", "add_data_args", "add_routing_args"]


def parse_thresholds(text: str) -> list[float]:
    """``"0.9,0.8,inf"`` -> ``[0.9, 0.8, inf]`` (argparse type)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_bench_thresholds(text: str) -> list:
    """``"q20,q50,inf"`` -> ``["q20", "q50", inf]``: numbers, or ``qP`` percentiles (argparse type)."""
    out: list = []
    for v in (v.strip() for v in text.split(",")):
        if not v:
            continue
        if v.lower().startswith("q"):
            try:
                p = float(v[1:])
            except ValueError:
                p = -1.0
            if not 0 <= p <= 100:
                raise argparse.ArgumentTypeError(f"a percentile threshold is q0..q100, got {v!r}")
            out.append(f"q{p:g}")
        else:
            out.extend(parse_thresholds(v))
    return out


def add_data_args(p: argparse.ArgumentParser, split_default: str = "test") -> None:
    p.add_argument("--dataset", help="dataset name (default: the one the model was built on)")
    p.add_argument("--data-root", help="local folder of the dataset (CIFAR-10, SVHN, ImageFolder)")
    p.add_argument("--split", default=split_default, help=f"train, calib or test (default: {split_default})")


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thresholds", type=parse_thresholds, help="per early exit, comma-separated (inf = exit off)")
    p.add_argument("--policy", help="exit policy: confidence, max_softmax or entropy (default: the model's)")


def _split_tensors(model, args: argparse.Namespace):
    from .build.datasets import split_tensors

    return split_tensors(model.config, args.split, args.dataset, args.data_root)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .artifact import load_model
    from .build.evaluate import evaluate

    model = load_model(args.model_dir)
    x, y = _split_tensors(model, args)
    result = evaluate(model, x, y, args.thresholds, args.policy)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model_dir}: {model.config.backbone}, {result['samples']} {args.split} samples, "
          f"policy {result['policy']}")
    print(f"  backbone accuracy {result['backbone_accuracy']:.4f}   routed accuracy {result['accuracy']:.4f}   "
          f"cost fraction {result['cost_fraction']:.3f} (ideal speed-up {1 / result['cost_fraction']:.2f}x)")
    names = [e.after for e in model.config.exits] + ["backbone head"]
    thr = result["thresholds"] + [None]
    print(f"  {'exit':>4}  {'after':<34} {'threshold':>9} {'rate':>7} {'accuracy':>8} {'cost':>6}")
    for k, name in enumerate(names):
        acc = result["exit_accuracy"][k]
        t = "-" if thr[k] is None else f"{thr[k]:.4f}"
        print(f"  {k:>4}  {name:<34} {t:>9} {result['exit_rates'][k]:>7.3f} "
              f"{'-' if acc is None else f'{acc:.4f}':>8} {result['exit_cost_fractions'][k]:>6.3f}")


def _cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from .artifact import load_model
    from .build.evaluate import bench, percentile_thresholds

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model_dir).optimize_for_inference()
    if args.random_inputs:
        g = torch.Generator().manual_seed(0)
        s = model.config.input_size
        x = torch.randn(args.batch_size * args.batches, 3, s, s, generator=g)
    else:
        x, _ = _split_tensors(model, args)
        x = x[: args.batch_size * args.batches]
    thresholds = args.thresholds
    if thresholds and any(isinstance(t, str) for t in thresholds):
        thresholds = percentile_thresholds(model, x, thresholds, args.policy)
    result = bench(model, x, args.batch_size, thresholds, args.policy, rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model_dir}: batch {result['batch_size']}, {result['images']} images, {result['threads']} threads")
    print(f"  plain backbone {result['full_images_per_s']:9.1f} img/s")
    print(f"  routed         {result['routed_images_per_s']:9.1f} img/s")
    print(f"  measured speed-up {result['measured_speedup']:.2f}x   ideal {result['ideal_speedup']:.2f}x "
          f"(cost fraction {result['cost_fraction']:.3f})   efficiency {result['efficiency']:.2f}")
    if result["time_ideal_speedup"] is not None:
        print(f"  at this machine's segment times the exit mix would give {result['time_ideal_speedup']:.2f}x: "
              f"routing efficiency {result['routing_efficiency']:.2f}")
    for name in ("time", "flops"):
        shares = ", ".join(f"{s:.3f}" for s in result[f"segment_{name}_shares"])
        print(f"  segment shares of the plain pass, {name + ':':6} {shares}")


def _model_commands(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy, exit rates and cost of a model directory on a dataset split")
    p.add_argument("model_dir")
    add_data_args(p)
    add_routing_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("bench", help="wall-clock: plain backbone against routed model on the same inputs")
    p.add_argument("model_dir")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="distinct batches per round (default 8)")
    p.add_argument("--rounds", type=int, default=5, help="passes over the batches (default 5)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--random-inputs", action="store_true", help="random tensors instead of the dataset")
    add_data_args(p)
    p.add_argument("--policy", help="exit policy: confidence, max_softmax or entropy (default: the model's)")
    p.add_argument("--thresholds", type=parse_bench_thresholds,
                   help="per early exit, comma-separated: numbers (inf = exit off) or percentiles of the scores "
                        "of the samples reaching that exit on the bench inputs (q20: 80%% of them leave there)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)


def _build_command(sub) -> None:
    p = sub.add_parser(
        "build", help="train (if needed), add and post-train exits, calibrate, evaluate, write a model directory",
        description="Dataset + backbone -> a served-ready model directory, in one command.")
    p.add_argument("--out", required=True, help="model directory to write")
    g = p.add_argument_group("backbone and data")
    g.add_argument("--backbone", help="backbone name (default: the demo's, cifar_resnet56)")
    g.add_argument("--dataset", help="mnist5k (bundled, the default), cifar10, svhn or imagefolder")
    g.add_argument("--data-root", help="local folder of cifar10 / svhn / imagefolder data")
    g.add_argument("--weights", help="backbone state_dict (.pt) or torchvision weights name; skips backbone training")
    g.add_argument("--input-size", type=int, help="model input side (default: the backbone's, 32 for cifar_*)")
    g.add_argument("--mean", type=_floats, help="normalisation mean R,G,B (default: the dataset's)")
    g.add_argument("--std", type=_floats, help="normalisation std R,G,B (default: the dataset's)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the train/calib/test split (default 0)")
    g.add_argument("--calib-fraction", type=float, help="share of the non-test images held out for calibration "
                   "(default 0.1 beside an official test set, else 0.25); more certifies closer to the empirical point")
    g.add_argument("--limit-train", type=int, help="use only N training images, drawn at random (seeded; quick builds)")
    g.add_argument("--limit-calib", type=int, help="use only N calibration images, drawn at random (seeded)")
    g.add_argument("--limit-test", type=int, help="use only N test images, drawn at random (seeded)")
    g = p.add_argument_group("exits")
    g.add_argument("--exits", help="number of exits placed by FLOPs, comma-separated block names, or all (one "
                   "after every block but the last; calibration switches off those that do not pay; default 3)")
    g.add_argument("--spacing", default="even", choices=["even", "pareto"], help="exit placement by FLOPs")
    g.add_argument("--exit-kind", choices=["conv", "linear", "sdn", "mlp"],
                   help="conv: PTEENet conv branch; linear: global pool + classifier; sdn: SDN mixed pooling to "
                        "cells; mlp: pool + LayerNorm + MLP (default: conv on conv feature maps, mlp on tokens and "
                        "channels-last maps)")
    g.add_argument("--exit-pool", default="avg", choices=["avg", "cls"],
                   help="mean over positions / tokens, or the class token (token sequences; default avg)")
    g.add_argument("--exit-depth", type=int, default=2, help="conv (or mlp) layers in an exit (default 2)")
    g.add_argument("--exit-stride", type=int, default=2, help="stride of an exit's first conv (default 2)")
    g.add_argument("--exit-cells", type=int, default=4, help="side of an sdn exit's pooled map (default 4)")
    g.add_argument("--exit-hidden", type=int, default=0, help="hidden width of an sdn exit (default 0: none)")
    g.add_argument("--policy", default="auto", choices=["auto", "confidence", "max_softmax", "entropy"],
                   help="exit policy; auto picks the best on the path part of the calibration split")
    g = p.add_argument_group("training (defaults from the dataset's recipe)")
    g.add_argument("--epochs", type=int, help="backbone epochs (only without --weights)")
    g.add_argument("--lr", type=float, help="backbone peak learning rate (SGD, one-cycle)")
    g.add_argument("--batch-size", type=int, help="mini-batch size")
    g.add_argument("--augment", choices=["none", "crop", "crop_flip"], help="backbone training augmentation")
    g.add_argument("--exit-epochs", type=int, help="exit post-training epochs")
    g.add_argument("--exit-lr", type=float, help="exit peak learning rate (AdamW, one-cycle)")
    g.add_argument("--exit-augment", choices=["none", "crop", "crop_flip"], default="none",
                   help="exit training augmentation (default none: the backbone's features are computed once and "
                        "cached; with augmentation the frozen backbone runs on every batch, slower)")
    g.add_argument("--objective", default="pteenet", choices=["pteenet", "ce", "kd"],
                   help="exit loss: PTEENet/EENets confidence-weighted mixture + cost, per-exit CE, or knowledge "
                        "distillation from the backbone (kd, with --distill 1 --temperature 2)")
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
    g.add_argument("--p-value", choices=["binomial", "hoeffding_bentkus", "paired", "clopper_pearson_pair"],
                   help="the test's p-value: binomial (default) or hoeffding_bentkus for --loss harm; paired (default: "
                        "an exact test of the paired difference) or clopper_pearson_pair for --loss net")
    g.add_argument("--select", default="ltt", choices=["ltt", "empirical"],
                   help="ship the cheapest certified point (ltt) or the cheapest within budget on calibration data")
    g.add_argument("--path-fraction", type=float, default=0.3, help="calibration share that orders the sweep")
    g.add_argument("--guarantee", default="ltt", choices=["ltt", "crc"],
                   help="ltt: with probability >= 1 - delta the drop is <= --max-drop (Learn-then-Test); crc: the "
                        "expected drop is <= --max-drop (conformal risk control: closer to the empirical point, an "
                        "average, not a high-probability bound)")
    g.add_argument("--loss", default="harm", choices=["harm", "net"],
                   help="what Learn-then-Test certifies: harm (answers the backbone gets right that the routed model "
                        "gets wrong; bounds the drop from above) or net (the accuracy drop itself: harm minus the "
                        "backbone's errors the exits fix; certifies cheaper points)")
    g.add_argument("--head-cost", default="flops", choices=["flops", "measured"],
                   help="what an exit's head costs when calibration orders the exits and picks the cheapest point: "
                        "its FLOPs, or its wall-clock share of the backbone measured here at batch 64, in place "
                        "between the segments (pooling, scoring and gathering the survivors included; exits that "
                        "stop paying for their head are switched off again); reported costs stay FLOPs")
    g.add_argument("--keep-off-exits", action="store_true",
                   help="keep exits that calibration switches off (they cost nothing at run time; per-request "
                        "thresholds can switch them on) instead of leaving them out of the model")
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


def _cmd_build(args: argparse.Namespace) -> None:
    from .build import pipeline
    from .build.settings import BuildSettings

    settings = BuildSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(BuildSettings)})
    report = pipeline.run_build(settings)
    if not args.quiet:
        pipeline.print_summary(args.out, report)


def _random_model_command(sub) -> None:
    p = sub.add_parser(
        "random-model", help="a compute-heavy model for serving benchmarks: random weights, a fixed exit mix",
        description="Random backbone weights (BN statistics from real images), exits placed by FLOPs, and thresholds "
                    "at quantiles of the exit scores so that --exit-mix of the images leaves at each exit. Accuracy "
                    "is chance level; the compute per request and the exit mix are real.")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--dataset", default="imagefolder", help="where the images come from (default imagefolder)")
    p.add_argument("--data-root", help="local folder of the dataset, e.g. ../shared/data/cifar10")
    p.add_argument("--exits", type=int, default=3, help="side exits, placed evenly by FLOPs (default 3)")
    p.add_argument("--exit-mix", type=_floats, default=[0.5, 0.2, 0.1, 0.2],
                   help="share of images per exit, backbone head last (default 0.5,0.2,0.1,0.2)")
    p.add_argument("--exit-kind", default="linear", choices=["linear", "conv"],
                   help="linear (pool + classifier, next to free; default) or conv (PTEENet's, costly on wide features)")
    p.add_argument("--calib-images", type=int, default=128, help="images for BN statistics and thresholds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.set_defaults(func=_cmd_random_model)


def _cmd_random_model(args: argparse.Namespace) -> None:
    from .build.random_model import make_random_model

    result = make_random_model(args.out, args.backbone, args.input_size, args.dataset, args.data_root, args.exits,
                               args.exit_mix, args.exit_kind, calib_images=args.calib_images, seed=args.seed,
                               threads=args.threads)
    print(f"wrote {args.out}: {args.backbone} @{args.input_size} px, random weights; on {result['samples']} "
          f"calibration images exit rates {', '.join(f'{r:.2f}' for r in result['exit_rates'])}, cost fraction "
          f"{result['cost_fraction']:.3f} (ideal speed-up {1 / result['cost_fraction']:.2f}x)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branched", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registrars: list[Callable] = [_model_commands, _build_command, _random_model_command]
    registrars += [ep.load() for ep in sorted(entry_points(group="branched.commands"), key=lambda e: e.name)]
    for register in registrars:
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (BranchedError, FileNotFoundError, ValueError) as exc:
        print(f"branched: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

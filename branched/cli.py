"""The ``branched`` command line.

Core sub-commands live here; the serving adapters (``handlers``, ``ray_app``, ``loadtests``) add
theirs through the ``branched.commands`` entry-point group, each a ``register(subparsers)``
function, so the core never imports a serving framework.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import entry_points
from typing import Callable, Optional, Sequence

__all__ = ["main", "parse_thresholds", "add_data_args", "load_eval_tensors", "fail"]


class CommandError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def fail(message: str) -> None:
    raise CommandError(message)


def parse_thresholds(text: str) -> list[float]:
    """``"0.9,0.8,inf"`` -> ``[0.9, 0.8, inf]`` (argparse type)."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"thresholds must be comma-separated numbers, got {text!r}") from None


def add_data_args(p: argparse.ArgumentParser, split_default: str = "test") -> None:
    p.add_argument("--dataset", help="dataset name (default: the one the model was built on)")
    p.add_argument("--data-root", help="local folder of the dataset (CIFAR-10, SVHN, ImageFolder)")
    p.add_argument("--split", default=split_default, help=f"train, calib or test (default: {split_default})")


def add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--thresholds", type=parse_thresholds, help="per early exit, comma-separated (inf = exit off)")
    p.add_argument("--policy", help="exit policy: confidence, max_softmax or entropy (default: the model's)")


def load_eval_tensors(model, args: argparse.Namespace):
    """Tensors and labels of the split named by ``args``, preprocessed as the model expects."""
    from .data import load_split
    from .preprocess import Preprocessor

    name = args.dataset or model.config.meta.get("dataset")
    if not name:
        fail("the model does not record its dataset; pass --dataset NAME")
    root = args.data_root or model.config.meta.get("data_root")
    data = load_split(name, args.split, root=root, seed=int(model.config.meta.get("split_seed", 0)))
    return data.tensors(Preprocessor.for_config(model.config), progress=True)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from .artifact import load_model
    from .evaluate import evaluate

    model = load_model(args.model_dir)
    x, y = load_eval_tensors(model, args)
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
    from .evaluate import bench

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model_dir).optimize_for_inference()
    if args.random_inputs:
        g = torch.Generator().manual_seed(0)
        s = model.config.input_size
        x = torch.randn(args.batch_size * args.batches, 3, s, s, generator=g)
    else:
        x, _ = load_eval_tensors(model, args)
        x = x[: args.batch_size * args.batches]
    result = bench(model, x, args.batch_size, args.thresholds, args.policy, rounds=args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.model_dir}: batch {result['batch_size']}, {result['images']} images, {result['threads']} threads")
    print(f"  plain backbone {result['full_images_per_s']:9.1f} img/s")
    print(f"  routed         {result['routed_images_per_s']:9.1f} img/s")
    print(f"  measured speed-up {result['measured_speedup']:.2f}x   ideal {result['ideal_speedup']:.2f}x "
          f"(cost fraction {result['cost_fraction']:.3f})   efficiency {result['efficiency']:.2f}")


def _core_commands(sub) -> None:
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
    add_routing_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="branched", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registrars: list[Callable] = [_core_commands]
    try:
        from . import build as _build  # noqa: F401 - the build pipeline registers itself when present
        registrars.append(_build.register)
    except ImportError:
        pass
    registrars += [ep.load() for ep in sorted(entry_points(group="branched.commands"), key=lambda e: e.name)]
    for register in registrars:
        register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .artifact import ArtifactError
    from .preprocess import ImageError

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ArtifactError, ImageError, FileNotFoundError, ValueError) as exc:
        print(f"branched: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

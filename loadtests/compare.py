"""Early-exit model against the plain backbone under the same Locust load, on one server kind.

``python -m loadtests.compare --server torchserve --model-dir models/demo --out reports/torchserve``
(also ``branched loadtest ...``): start the server with both models, warm up, run Locust headless for
the early-exit model, then for the baseline (same weights, no exits, same code path), stop, and
write ``report.json``, ``report.csv``, ``report.png`` and Locust's own CSV/HTML pages into ``--out``.
See :mod:`loadtests.harness` for how the cores are split between server and load generator.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from branched.artifact import load_config

from .harness import SERVERS, VARIANTS, add_load_arguments, drive, make_pool, run_command, say, serve
from .report import comparison, read_run, write_report
from .stepload import add_step_arguments, print_step_summary, run_step

__all__ = ["compare", "register", "main"]


def compare(server: str, model_dir: str, out_dir: str, users: int = 8, duration: str = "30s",
            pool_size: int = 200, server_cpus: Optional[int] = None, batch_size: int = 8,
            max_batch_delay: int = 10) -> dict:
    """Run the comparison and write the report; returns the report dict.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        model_dir: a model directory (``branched build``).
        out_dir: where the report and Locust's files go.
        users: concurrent Locust users (each sends its next request when the last is answered).
        duration: Locust run time per model, e.g. ``"30s"``.
        pool_size: test-split images in the request pool.
        server_cpus: CPUs for the server (default: all but one, which Locust gets).
        batch_size, max_batch_delay: server-side batching (TorchServe batchSize/maxBatchDelay ms;
            Ray Serve @serve.batch max_batch_size/batch_wait_timeout_s).
    """
    if server not in SERVERS:
        raise ValueError(f"--server must be one of {SERVERS}, got {server!r}")
    config = load_config(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(model_dir, out_dir, pool_size, VARIANTS)
    runs = {}
    with serve(server, model_dir, out_dir, server_cpus, batch_size, max_batch_delay) as target:
        for variant in VARIANTS:
            run = drive(target, pool, out_dir, users, duration, variant, prefix=f"locust_{variant}")
            runs[variant] = read_run(run["tally"])
    report = comparison(runs["early_exit"], runs["baseline"], len(config.exits) + 1, {
        "server": server, "model": config.backbone, "model_dir": model_dir, "users": users, "duration": duration,
        "pool_size": len(pool.images), "server_cpus": sorted(target.server_cpus),
        "load_cpus": sorted(target.load_cpus),
        "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay,
        "calibrated_cost_fraction": (config.meta.get("calibration") or {}).get("cost_fraction"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    paths = write_report(report, out_dir)
    say("report: " + ", ".join(paths))
    return report


def print_summary(report: dict) -> None:
    """A short table of the report's key rows."""
    print(f"\n{report['server']}: {report['model']}, {report['users']} users x {report['duration']}")
    print(f"  {'':<11} {'req/s':>8} {'accuracy':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for key, name in (("baseline", "baseline"), ("early_exit", "early-exit")):
        lat = report[f"{key}_latency_ms"]
        print(f"  {name:<11} {report[f'{key}_rps']:>8.1f} {report[f'{key}_accuracy']:>9.4f} "
              f"{lat['p50']:>8.0f} {lat['p95']:>8.0f} {lat['p99']:>8.0f}")
    print(f"  gain {report['gain']:.2f}x   ideal {report['ideal_speedup']:.2f}x (served cost fraction "
          f"{report['served_cost_fraction']:.3f})   gain/ideal {report['gain_over_ideal']:.2f}   "
          f"failures {report['failures']}")
    print("  exit mix " + " ".join(f"{r:.3f}" for r in report["exit_rates"]))


def _run(args: argparse.Namespace) -> None:
    if args.shape == "step":
        run_command(args, "step-load test", lambda out: run_step(args, out), print_step_summary,
                    os.path.join("reports", f"{args.server}-step"), "report.json")
        return
    run_command(args, "load test", lambda out: compare(
        args.server, args.model_dir, out, args.users, args.duration, args.pool_size, args.server_cpus, args.batch_size,
        args.max_batch_delay), print_summary, os.path.join("reports", args.server), "report.json")


def register(subparsers) -> None:
    """``branched loadtest``: the same as ``python -m loadtests.compare``."""
    p = subparsers.add_parser("loadtest", help="Locust: early-exit model against the plain backbone on a server")
    add_load_arguments(p, "30s", "reports/SERVER (step: reports/SERVER-step)")
    add_step_arguments(p)
    p.set_defaults(func=_run)


def main(argv=None) -> int:
    from branched.cli import main as branched_main

    return branched_main(["loadtest", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

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

from .harness import (SERVERS, VARIANTS, add_load_arguments, drive, make_pool, ray_options, run_command, say, serve,
                      split_cpus)
from .overhead import CpuMeter, compute_cost, per_request, serving_bound
from .report import comparison, read_run, write_report
from .stepload import add_step_arguments, print_step_summary, run_step

__all__ = ["compare", "register", "main"]


def compare(server: str, model_dir: str, out_dir: str, users: int = 8, duration: str = "30s",
            pool_size: int = 200, server_cpus: Optional[int] = None, batch_size: int = 8,
            max_batch_delay: int = 10, ray: Optional[dict] = None) -> dict:
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
        ray: Ray Serve launcher options (``profile``, ``grouping``, ``env``), see ``branched loadtest --help``.
    """
    if server not in SERVERS:
        raise ValueError(f"--server must be one of {SERVERS}, got {server!r}")
    config = load_config(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(model_dir, out_dir, pool_size, VARIANTS)
    server_set, _ = split_cpus(server_cpus)
    say(f"model compute in this process on CPUs {sorted(server_set)}: plain backbone and routed, batch {batch_size}")
    compute = compute_cost(model_dir, pool.images, batch_size, server_set)
    runs, cpu = {}, {}
    with serve(server, model_dir, out_dir, server_cpus, batch_size, max_batch_delay, ray=ray) as target:
        for variant in VARIANTS:
            meter = CpuMeter(server, target.sid)
            run = drive(target, pool, out_dir, users, duration, variant, prefix=f"locust_{variant}",
                        on_start=meter.start)
            spent = meter.stop()
            runs[variant] = read_run(run["tally"])
            cpu[variant] = per_request(spent, runs[variant].requests)
        served = {k: target.handle.ready.get(k) for k in ("grouping", "profile", "urls", "proxy", "plan")} \
            if server == "ray" else {}
    report = comparison(runs["early_exit"], runs["baseline"], len(config.exits) + 1, {
        "server": server, "model": config.backbone, "model_dir": model_dir, "users": users, "duration": duration,
        "pool_size": len(pool.images), "server_cpus": sorted(target.server_cpus),
        "load_cpus": sorted(target.load_cpus),
        "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay,
        "calibrated_cost_fraction": (config.meta.get("calibration") or {}).get("cost_fraction"),
        "random_weights": bool(config.meta.get("random_weights")),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **({"ray": served} if served else {}),
    })
    bound = serving_bound(cpu["baseline"].get("total", 0.0), cpu["early_exit"].get("total", 0.0), compute)
    report.update({"cpu_ms_per_request": cpu, "compute_ms": compute, **bound,
                   "gain_over_bound": report["gain"] / bound["serving_bound"] if bound["serving_bound"] else None})
    paths = write_report(report, out_dir)
    say("report: " + ", ".join(paths))
    return report


def print_summary(report: dict) -> None:
    """A short table of the report's key rows, with what serving costs beyond the model."""
    print(f"\n{report['server']}: {report['model']}, {report['users']} users x {report['duration']}"
          + (f", grouping {report['ray']['grouping']}" if report.get("ray") else "")
          + (" (random weights: exit mix fixed by quantile thresholds)" if report.get("random_weights") else ""))
    print(f"  {'':<11} {'req/s':>8} {'accuracy':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'CPU ms/req':>10}")
    for key, name in (("baseline", "baseline"), ("early_exit", "early-exit")):
        lat = report[f"{key}_latency_ms"]
        print(f"  {name:<11} {report[f'{key}_rps']:>8.1f} {report[f'{key}_accuracy']:>9.4f} "
              f"{lat['p50']:>8.0f} {lat['p95']:>8.0f} {lat['p99']:>8.0f} "
              f"{report['cpu_ms_per_request'][key].get('total', float('nan')):>10.2f}")
    c = report["compute_ms"]
    print(f"  serving overhead {report['overhead_ms']:.2f} ms/request (baseline CPU less its compute; early-exit "
          f"{report['early_exit_overhead_ms']:.2f}); model compute {c['backbone']:.2f} ms/sample plain, "
          f"{c['routed']:.2f} routed ({report['compute_speedup']:.2f}x in process)")
    print(f"  gain {report['gain']:.2f}x   serving bound {report['serving_bound']:.2f}x (= (overhead + plain) / "
          f"(overhead + routed))   FLOPs ideal {report['ideal_speedup']:.2f}x (served cost fraction "
          f"{report['served_cost_fraction']:.3f})")
    print(f"  gain/ideal {report['gain_over_ideal']:.2f}   gain/bound {report['gain_over_bound']:.2f}   "
          f"failures {report['failures']}")
    print("  exit mix " + " ".join(f"{r:.3f}" for r in report["exit_rates"]))
    for key in ("baseline", "early_exit"):
        roles = {k: v for k, v in report["cpu_ms_per_request"][key].items() if k != "total"}
        print(f"  CPU ms/request {key}: " + ", ".join(f"{k} {v:.2f}" for k, v in roles.items()))


def _run(args: argparse.Namespace) -> None:
    if args.shape == "step":
        run_command(args, "step-load test", lambda out: run_step(args, out), print_step_summary,
                    os.path.join("reports", f"{args.server}-step"), "report.json")
        return
    run_command(args, "load test", lambda out: compare(
        args.server, args.model_dir, out, args.users, args.duration, args.pool_size, args.server_cpus, args.batch_size,
        args.max_batch_delay, ray_options(args)), print_summary, os.path.join("reports", args.server), "report.json")


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

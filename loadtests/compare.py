"""Early-exit model against the plain backbone under the same Locust load, on one server kind.

``python -m loadtests.compare --server torchserve --model-dir models/demo --out reports/torchserve``
(also ``branched loadtest ...``): start the server with both models, warm up, run Locust headless for
the early-exit model, then for the baseline (same weights, no exits, same code path), stop, and
write ``report.json``, ``report.csv``, ``report.png`` and Locust's own CSV/HTML pages into ``--out``.
See :mod:`loadtests.runner` for how the cores are split between server and load generator.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Iterator, Optional

from branched.artifact import load_config

from .answers import write_expected
from .report import comparison, read_run, write_report
from .runner import SERVERS, add_load_arguments, run_locust, split_cpus, warm_up, write_pool

__all__ = ["compare", "register", "main"]



@contextlib.contextmanager
def torchserve_endpoints(model_dir: str, out_dir: str, cpus: set[int], batch_size: int,
                         max_batch_delay: int) -> Iterator[dict[str, tuple[str, str]]]:
    """Archive the model, start one TorchServe with both archives, yield ``{variant: (host, path)}``."""
    from handlers.archive import ArchiveSettings, build_archives
    from handlers.server import TorchServe

    store = os.path.join(out_dir, "archives")
    name = "model"
    settings = ArchiveSettings(batch_size=batch_size, max_batch_delay=max_batch_delay, workers=1)
    _say(f"archiving {model_dir} -> {store}/{name}.mar and {name}-baseline.mar")
    build_archives(model_dir, store, name, settings)
    workdir = tempfile.mkdtemp(prefix="branched-ts-")
    server = TorchServe(store, workdir, {name: f"{name}.mar", f"{name}-baseline": f"{name}-baseline.mar"}, cpus=cpus)
    _say(f"starting TorchServe on CPUs {sorted(cpus)} (logs in {workdir}/logs)")
    with server:
        yield {"early_exit": (server.inference_url, f"/predictions/{name}"),
               "baseline": (server.inference_url, f"/predictions/{name}-baseline")}
    _say("TorchServe stopped")


@contextlib.contextmanager
def ray_endpoints(model_dir: str, out_dir: str, cpus: set[int], batch_size: int,
                  max_batch_delay: int) -> Iterator[dict[str, tuple[str, str]]]:
    """Start Ray Serve with the staged and the baseline app, yield ``{variant: (host, path)}``."""
    from ray_app.server import RayServe

    _say(f"starting Ray Serve on CPUs {sorted(cpus)}")
    with RayServe(model_dir, cpus=cpus, max_batch_size=batch_size,
                  batch_wait_timeout_s=max_batch_delay / 1000.0) as server:
        yield {"early_exit": (server.url, "/predict"), "baseline": (server.url, "/baseline/predict")}
    _say("Ray Serve stopped")


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
    dataset = config.meta.get("dataset")
    if not dataset:
        raise ValueError(f"{model_dir} does not record its dataset; build it with `branched build`")
    pool = write_pool(os.path.join(out_dir, "pool"), dataset, pool_size, config.meta.get("data_root"),
                      int(config.meta.get("split_seed", 0)))
    pool_images = [open(os.path.join(pool, n), "rb").read() for n in sorted(os.listdir(pool)) if n.endswith(".png")]
    # Each image's answer alone: the locustfile fails any answer that is not its own request's.
    expected = {v: write_expected(model_dir, pool, os.path.join(out_dir, f"expected_{v}.json"), v == "baseline")
                for v in ("early_exit", "baseline")}
    server_set, load_set = split_cpus(server_cpus)
    endpoints = torchserve_endpoints if server == "torchserve" else ray_endpoints
    runs = {}
    with endpoints(model_dir, out_dir, server_set, batch_size, max_batch_delay) as urls:
        for variant in ("early_exit", "baseline"):
            host, path = urls[variant]
            _say(f"warming up {variant} at {host}{path}")
            warm_up(host + path, pool_images[:32])
            _say(f"locust: {users} users for {duration} against {variant} (load generator on CPUs {sorted(load_set)})")
            tally = run_locust(host, path, pool, os.path.join(out_dir, f"locust_{variant}"), users,
                               duration, load_set, extra=["--expected", expected[variant]])
            runs[variant] = read_run(tally)
    report = comparison(runs["early_exit"], runs["baseline"], len(config.exits) + 1, {
        "server": server, "model": config.backbone, "model_dir": model_dir, "users": users, "duration": duration,
        "pool_size": len(pool_images), "server_cpus": sorted(server_set), "load_cpus": sorted(load_set),
        "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay,
        "calibrated_cost_fraction": (config.meta.get("calibration") or {}).get("cost_fraction"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    })
    paths = write_report(report, out_dir)
    _say("report: " + ", ".join(paths))
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


def _say(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)


def _run(args: argparse.Namespace) -> None:
    from branched.cli import fail

    try:
        report = compare(args.server, args.model_dir, args.out or os.path.join("reports", args.server), args.users,
                         args.duration, args.pool_size, args.server_cpus, args.batch_size, args.max_batch_delay)
    except RuntimeError as exc:  # a server that did not start, Locust that did not run: say why, in one go
        fail(f"load test on {args.server} failed: {exc}")
    if args.json:
        print(json.dumps(report))
    else:
        print_summary(report)
        print(f"  report: {os.path.join(args.out or os.path.join('reports', args.server), 'report.json')}")


def register(subparsers) -> None:
    """``branched loadtest``: the same as ``python -m loadtests.compare``."""
    p = subparsers.add_parser("loadtest", help="Locust: early-exit model against the plain backbone on a server")
    add_load_arguments(p, "30s", "reports/SERVER")
    p.set_defaults(func=_run)


def main(argv=None) -> int:
    from branched.cli import main as branched_main

    return branched_main(["loadtest", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())

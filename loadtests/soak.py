"""Soak run: the early-exit model on one server under steady Locust load for a long time.

``branched soak --server torchserve --model-dir models/demo --duration 10m --out reports/soak-torchserve``
starts the server (:mod:`loadtests.harness`), samples the RSS of its processes every ``--rss-interval``
seconds while Locust runs, checks every answer against its image's own answer, and writes
``soak.json``, ``soak_minutes.csv``, ``soak_rss.csv`` and ``soak.png`` beside Locust's CSV/HTML files.
It exits 1 (one line) when any request failed or got another request's answer.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from typing import Optional

from branched.artifact import load_config

from .answers import per_window, read_log
from .harness import add_load_arguments, drive, make_pool, ray_options, run_command, say, serve
from .procs import RssSampler
from .report import read_run

__all__ = ["soak", "register"]


def soak(server: str, model_dir: str, out_dir: str, users: int = 8, duration: str = "10m", pool_size: int = 200,
         server_cpus: Optional[int] = None, batch_size: int = 8, max_batch_delay: int = 10,
         rss_interval: float = 10.0, window_s: float = 60.0, ray: Optional[dict] = None) -> dict:
    """Run the soak and write its report; returns the report dict.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        model_dir: a model directory (``branched build``).
        out_dir: where the report and Locust's files go.
        users, duration, pool_size, server_cpus, batch_size, max_batch_delay: as ``branched loadtest``.
        rss_interval: seconds between memory samples.
        window_s: length of the latency/throughput windows (default one minute).
        ray: Ray Serve launcher options (``profile``, ``grouping``, ``env``).
    """
    config = load_config(model_dir)
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(model_dir, out_dir, pool_size, variants=["early_exit"])
    with serve(server, model_dir, out_dir, server_cpus, batch_size, max_batch_delay, baseline=False, ray=ray) as target:
        sampler = RssSampler(server, target.sid, rss_interval)
        try:
            run = drive(target, pool, out_dir, users, duration, log_requests=True, on_start=sampler.start)
        finally:
            if sampler.is_alive():
                sampler.stop()
    result = read_run(run["tally"])
    with open(run["tally"]) as f:
        tally = json.load(f)
    rows = read_log(run["log"])
    windows = per_window(rows, min((r.start for r in rows), default=0.0), window_s)  # from the first request
    p95 = [w["p95"] for w in windows if w["requests"]]
    report = {
        "server": server, "model": config.backbone, "model_dir": model_dir, "users": users, "duration": duration,
        "pool_size": len(pool.images), "server_cpus": sorted(target.server_cpus),
        "load_cpus": sorted(target.load_cpus), "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "requests": result.requests, "answers": result.answers, "failures": result.failures,
        "mismatches": int(tally.get("mismatches", 0)), "borderline_answers": int(tally.get("borderline", 0)),
        "logged_requests": len(rows), "rps": result.rps, "accuracy": result.accuracy,
        "latency_ms": {"p50": result.p50, "p95": result.p95, "p99": result.p99},
        "p95_range_ms": [min(p95), max(p95)] if p95 else None,
        "window_s": window_s, "windows": windows,
        "rss_interval_s": rss_interval, "rss": sampler.summary(settle_s=window_s),
    }
    _write(report, sampler, out_dir)
    return report


def _write(report: dict, sampler: RssSampler, out_dir: str) -> None:
    with open(os.path.join(out_dir, "soak.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "soak_minutes.csv"), "w", newline="") as f:
        keys = ["window", "start_s", "seconds", "requests", "failures", "mismatches", "rps", "p50", "p95", "p99"]
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(report["windows"])
    sampler.write_csv(os.path.join(out_dir, "soak_rss.csv"))
    _plot(report, sampler, os.path.join(out_dir, "soak.png"))
    say("report: " + ", ".join(os.path.join(out_dir, n) for n in
                              ("soak.json", "soak_minutes.csv", "soak_rss.csv", "soak.png")))


def _plot(report: dict, sampler: RssSampler, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    windows = report["windows"]
    unit = report["window_s"] / 60.0
    mids = [(w["window"] + 0.5) * unit for w in windows]
    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        axes[0].plot(mids, [w[q] for w in windows], style, marker="o", label=q, color="#2a7")
    axes[0].set_title("latency per window (ms)")
    axes[0].set_xlabel("minutes")
    axes[0].legend()
    axes[1].plot(mids, [w["rps"] for w in windows], marker="o", color="#27a")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title(f"answers/s per window (failures {report['failures']})")
    axes[1].set_xlabel("minutes")
    for name in sorted({r[1] for r in sampler.rows}):
        rows = [r for r in sampler.rows if r[1] == name]
        axes[2].plot([r[0] / 60 for r in rows], [r[3] for r in rows], marker=".", label=name)
    axes[2].set_ylim(bottom=0)
    axes[2].set_title("RSS by process role (MiB, summed)")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"soak on {report['server']}: {report['model']}, {report['users']} users x {report['duration']}, "
                 f"{report['requests']} requests, mismatches {report['mismatches']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict) -> None:
    """The soak's key figures."""
    lat = report["latency_ms"]
    print(f"\nsoak on {report['server']}: {report['model']}, {report['users']} users x {report['duration']}")
    print(f"  requests {report['requests']}  failures {report['failures']}  mismatches {report['mismatches']}  "
          f"{report['rps']:.1f} req/s  p50/p95/p99 {lat['p50']:.0f}/{lat['p95']:.0f}/{lat['p99']:.0f} ms")
    if report["p95_range_ms"]:
        lo, hi = report["p95_range_ms"]
        print(f"  p95 per {report['window_s']:.0f} s window: {lo:.0f}-{hi:.0f} ms "
              f"over {len(report['windows'])} windows")
    for name, r in report["rss"].items():
        growth = "n/a" if r["growth"] is None else f"{100 * r['growth']:+.1f}%"
        settled = "n/a" if r["growth_after_settled"] is None else f"{100 * r['growth_after_settled']:+.1f}%"
        print(f"  RSS {name:<25} {r['start_mib']:>8.1f} -> {r['end_mib']:>8.1f} MiB ({growth}; from "
              f"{r['settled_s']:.0f} s: {settled}; {r['processes_start']} -> {r['processes_end']} processes)")


def _run(args: argparse.Namespace) -> None:
    report, out = run_command(args, "soak", lambda out: soak(
        args.server, args.model_dir, out, args.users, args.duration, args.pool_size, args.server_cpus, args.batch_size,
        args.max_batch_delay, args.rss_interval, args.window, ray_options(args)), print_summary,
        os.path.join("reports", f"soak-{args.server}"), "soak.json")
    if report["failures"] or report["mismatches"]:
        print(f"soak on {args.server}: {report['failures']} failed requests, {report['mismatches']} answers that "
              f"were not their request's own (see {out}/locust_failures.csv)", file=sys.stderr)
        sys.exit(1)


def register(subparsers) -> None:
    """``branched soak``."""
    p = subparsers.add_parser("soak", help="long Locust run on one server: failures, RSS over time, "
                                           "latency per minute")
    add_load_arguments(p, "10m", "reports/soak-SERVER")
    p.add_argument("--rss-interval", type=float, default=10.0, help="seconds between RSS samples (default 10)")
    p.add_argument("--window", type=float, default=60.0, help="latency window in seconds (default 60)")
    p.set_defaults(func=_run)

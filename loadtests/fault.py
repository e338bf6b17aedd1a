"""Fault run: kill a serving process mid-load and check that the server recovers by itself.

``branched fault --server torchserve|ray --model-dir models/demo --duration 60s --kill-at 20``
starts the server with the early-exit model (:mod:`loadtests.harness`), runs Locust with every answer
checked against its image's own answer, and at ``--kill-at`` seconds SIGKILLs

* TorchServe: the model's Python worker (a child of the Java frontend, which starts a new one);
* Ray Serve: the replica of deployment ``Stage{--stage}`` (the Serve controller starts a new one).

It reports the requests that failed, how long until answers through the killed part flowed again
(from the per-request log), the longest gap without such answers, when the replacement process
appeared, and the answers that were not their request's own. After the load it sends every pool
image once more, one by one: all must be answered correctly. ``fault.json``, ``fault_timeline.csv``
and ``fault.png`` land in ``--out``. Exit 1 (one line) when the server did not recover.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Optional

import requests

from branched.artifact import load_config

from .answers import read_log, recovery
from .checks import check_answer
from .harness import MODEL, Pool, Target, add_load_arguments, drive, make_pool, ray_options, run_command, say, serve
from .launchers import wait_for
from .procs import ray_replica_pids, torchserve_worker_pids
from .report import read_run

__all__ = ["fault", "Killer", "probe", "load_with_fault", "read_fault_run", "write_report", "print_summary",
           "register"]


class Killer(threading.Thread):
    """Waits ``kill_at`` seconds, SIGKILLs the victim processes, then waits for their replacement.

    Attributes:
        victims: the killed PIDs; ``t_kill``: when (epoch s); ``t_replaced``: when a new process was up
            (TorchServe: a READY worker with a new PID; Ray: a new replica process), or None.
    """

    def __init__(self, target: Target, kill_at: float, stage: int = 1, replace_timeout: float = 120.0) -> None:
        super().__init__(daemon=True)
        self.target, self.kill_at, self.stage, self.replace_timeout = target, kill_at, stage, replace_timeout
        self.victims: list[int] = []
        self.t_kill: Optional[float] = None
        self.t_replaced: Optional[float] = None
        self.error = ""

    def find(self) -> list[int]:
        """The PIDs to kill right now."""
        if self.target.server == "torchserve":
            return torchserve_worker_pids(self.target.handle.workers(MODEL))
        return ray_replica_pids(self.target.sid, f"Stage{self.stage}")

    def replaced(self) -> bool:
        """Whether a new process does the victims' job."""
        if self.target.server == "torchserve":
            workers = self.target.handle.workers(MODEL)
            return bool(workers) and all(w.get("status") == "READY" for w in workers) and \
                not set(torchserve_worker_pids(workers)) & set(self.victims)
        pids = ray_replica_pids(self.target.sid, f"Stage{self.stage}")
        return bool(pids) and not set(pids) & set(self.victims)

    def run(self) -> None:
        time.sleep(self.kill_at)
        self.victims = self.find()
        if not self.victims:
            self.error = "found no process to kill"
            return
        self.t_kill = time.time()
        for pid in self.victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        say(f"killed {self.victim_name()} (pid {', '.join(map(str, self.victims))})")
        self.t_replaced = wait_for(lambda: self.replaced() and time.time(), self.replace_timeout, poll=0.2)

    def victim_name(self) -> str:
        return "the TorchServe worker" if self.target.server == "torchserve" else f"the Stage{self.stage} replica"


def probe(target: Target, pool: Pool, limit: int = 50) -> dict:
    """Send up to ``limit`` pool images one by one; count errors and answers that are not their own."""
    with open(pool.expected["early_exit"]) as f:
        expected = json.load(f)
    names = sorted(expected)[:limit]
    errors = wrong = 0
    for name, image in zip(names, pool.images):
        try:
            r = requests.post(target.host + target.path, data=image, headers={"Content-Type": "image/png"},
                              timeout=30)
        except requests.RequestException:
            errors += 1
            continue
        if r.status_code != 200:
            errors += 1
        elif check_answer(r.json(), expected[name]) not in ("", "borderline"):
            wrong += 1
    return {"sent": len(names), "errors": errors, "wrong": wrong}


def load_with_fault(target: Target, pool: Pool, out_dir: str, users: int, duration: str, killer: threading.Thread,
                    wait_s: float) -> tuple[dict, dict]:
    """Locust against ``target`` with ``killer`` started with the load (after the warm-up, so its delay counts
    from the load's start); then wait up to ``wait_s`` for the killer and probe the server one image at a time.

    Returns:
        ``(drive's run dict, probe counts)``.
    """
    run = drive(target, pool, out_dir, users, duration, log_requests=True, on_start=killer.start)
    killer.join(timeout=wait_s)
    return run, probe(target, pool)


def read_fault_run(run: dict, killer: threading.Thread) -> tuple:
    """``(RunResult, the answers' tally, the request log)`` of a fault run.

    Raises:
        RuntimeError: the killer never struck (``killer.t_kill`` is None), with its error and the fix.
    """
    if getattr(killer, "t_kill", None) is None:
        raise RuntimeError(f"the fault was not injected: {getattr(killer, 'error', '') or 'the run ended first'}; "
                           f"use a --kill-at well inside --duration")
    with open(run["tally"]) as f:
        tally = json.load(f)
    return read_run(run["tally"]), tally, read_log(run["log"])


def fault(server: str, model_dir: str, out_dir: str, users: int = 8, duration: str = "60s", kill_at: float = 20.0,
          stage: int = 1, pool_size: int = 200, server_cpus: Optional[int] = None, batch_size: int = 8,
          max_batch_delay: int = 10, ray: Optional[dict] = None) -> dict:
    """Run the fault injection and write its report; returns the report dict (``recovered`` says the verdict).

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        model_dir: a model directory (``branched build``).
        out_dir: where the report and Locust's files go.
        kill_at: seconds after Locust starts to kill (keep it well inside ``duration``).
        stage: the Ray Serve stage whose replica is killed (ignored for TorchServe).
        users, duration, pool_size, server_cpus, batch_size, max_batch_delay: as ``branched loadtest``.
        ray: Ray Serve launcher options; the grouping must give stage ``stage`` a deployment of its own
            (``per-stage``, the default here).
    """
    config = load_config(model_dir)
    if server == "ray" and not 0 <= stage <= len(config.exits):
        raise ValueError(f"--stage {stage}: the model has stages 0..{len(config.exits)}")
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(model_dir, out_dir, pool_size, variants=["early_exit"])
    ray = {"grouping": "per-stage", **(ray or {})}
    with serve(server, model_dir, out_dir, server_cpus, batch_size, max_batch_delay, baseline=False, ray=ray) as target:
        killer = Killer(target, kill_at, stage)
        run, after = load_with_fault(target, pool, out_dir, users, duration, killer, killer.replace_timeout)
    result, tally, rows = read_fault_run(run, killer)
    rec = recovery(rows, killer.t_kill, min_exit=stage if server == "ray" else 0)
    replaced_s = None if killer.t_replaced is None else round(killer.t_replaced - killer.t_kill, 3)
    recovered = replaced_s is not None and rec["answers_back_s"] is not None and not after["errors"] \
        and not after["wrong"]
    report = {
        "server": server, "model": config.backbone, "model_dir": model_dir, "users": users, "duration": duration,
        "kill_at_s": kill_at, "killed": killer.victim_name(), "killed_pids": killer.victims,
        "pool_size": len(pool.images), "server_cpus": sorted(target.server_cpus), "load_cpus": sorted(target.load_cpus),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "requests": result.requests, "answers": result.answers, "failures": result.failures,
        "logged_requests": len(rows), "mismatches": int(tally.get("mismatches", 0)),
        "borderline_answers": int(tally.get("borderline", 0)),
        **rec, "replaced_s": replaced_s, "probe_after": after, "recovered": recovered,
    }
    write_report(report, rows, killer.t_kill, out_dir)
    return report


def _timeline(rows: list, t_kill: float) -> list[dict]:
    """Per second relative to the kill: good answers, failures, mismatches."""
    if not rows:
        return []
    lo, hi = math.floor(min(r.end for r in rows) - t_kill), math.floor(max(r.end for r in rows) - t_kill)
    counts = {s: {"second": s, "answers": 0, "failures": 0, "mismatches": 0} for s in range(lo, hi + 1)}
    for r in rows:
        c = counts[math.floor(r.end - t_kill)]
        c["answers" if r.ok else "failures"] += 1
        c["mismatches"] += int(r.mismatch)
    return list(counts.values())


def write_report(report: dict, rows: list, t_kill: float, out_dir: str) -> None:
    """Write `fault.json`, `fault_timeline.csv` and `fault.png` (answers and failures per second around the kill)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(os.path.join(out_dir, "fault.json"), "w") as f:
        json.dump(report, f, indent=2)
    timeline = _timeline(rows, t_kill)
    with open(os.path.join(out_dir, "fault_timeline.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, ["second", "answers", "failures", "mismatches"])
        w.writeheader()
        w.writerows(timeline)
    fig, ax = plt.subplots(figsize=(9, 3.6))
    secs = [t["second"] for t in timeline]
    ax.bar(secs, [t["answers"] for t in timeline], width=1.0, align="edge", color="#2a7", label="answers/s")
    ax.bar(secs, [t["failures"] for t in timeline], width=1.0, align="edge", color="#c33", label="failures/s",
           bottom=[t["answers"] for t in timeline])
    ax.axvline(0, color="k", linestyle="--", label=f"kill {report['killed']}")
    if report["answers_back_s"] is not None:
        ax.axvline(report["answers_back_s"], color="#27a", linestyle=":",
                   label=f"answers back +{report['answers_back_s']:.1f}s")
    ax.set_xlabel("seconds after the kill")
    ax.set_title(f"fault on {report['server']}: {report['failed_after']} failed after the kill, "
                 f"{report['mismatches']} mismatches, recovered={report['recovered']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "fault.png"), dpi=110)
    plt.close(fig)
    say("report: " + ", ".join(os.path.join(out_dir, n) for n in ("fault.json", "fault_timeline.csv", "fault.png")))


def print_summary(report: dict) -> None:
    """The fault run's key figures."""
    print(f"\nfault on {report['server']}: killed {report['killed']} at {report['kill_at_s']:.0f}s of "
          f"{report['duration']} ({report['users']} users)")
    print(f"  requests {report['requests']}  failed {report['failures']} (after the kill {report['failed_after']})  "
          f"mismatches {report['mismatches']}")
    print(f"  replacement up after {report['replaced_s']} s; answers back after {report['answers_back_s']} s; "
          f"longest gap {report['longest_gap_s']} s")
    p = report["probe_after"]
    print(f"  probe after the run: {p['sent']} sent, {p['errors']} errors, {p['wrong']} wrong; "
          f"recovered: {report['recovered']}")
    for e in report["errors"]:
        print(f"  error seen: {e}")


def _run(args: argparse.Namespace) -> None:
    report, out = run_command(args, "fault run", lambda out: fault(
        args.server, args.model_dir, out, args.users, args.duration, args.kill_at, args.stage, args.pool_size,
        args.server_cpus, args.batch_size, args.max_batch_delay, ray_options(args)), print_summary,
        os.path.join("reports", f"fault-{args.server}"), "fault.json")
    if not report["recovered"] or report["mismatches"]:
        print(f"fault run on {args.server}: the server did not recover by itself after {report['killed']} was killed "
              f"(replacement after {report['replaced_s']} s, answers back after {report['answers_back_s']} s, "
              f"probe {report['probe_after']}, mismatches {report['mismatches']}); see {out}/fault.json",
              file=sys.stderr)
        sys.exit(1)


def register(subparsers) -> None:
    """``branched fault``."""
    p = subparsers.add_parser("fault", help="kill a TorchServe worker or a Ray Serve stage replica mid-load; "
                                            "report failures and recovery")
    add_load_arguments(p, "60s", "reports/fault-SERVER", ray_grouping="per-stage")
    p.add_argument("--kill-at", type=float, default=20.0, help="seconds into the load to kill (default 20)")
    p.add_argument("--stage", type=int, default=1, help="Ray Serve: the stage whose replica is killed (default 1)")
    p.set_defaults(func=_run)

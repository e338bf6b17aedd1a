"""Pieces of a load-test run that do not depend on the server kind.

Core split on a small machine: the server under test gets its own CPUs and Locust (one gevent
process, FastHttpUser) gets the rest, by CPU affinity (``os.sched_setaffinity``; child processes
inherit it), so the load generator never steals the server's cores. With 2 cores: server on CPU 1,
Locust on CPU 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

import requests

from branched.data import load_split

__all__ = ["SERVERS", "add_load_arguments", "write_pool", "split_cpus", "pinned", "warm_up", "run_locust"]

SERVERS = ("torchserve", "ray")

LOCUSTFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locustfile.py")


def add_load_arguments(p: argparse.ArgumentParser, duration: str, out_default: str) -> None:
    """The options every load command shares (``branched loadtest``, ``soak``, ``fault``)."""
    p.add_argument("--server", choices=SERVERS, default="torchserve")
    p.add_argument("--model-dir", default="models/demo")
    p.add_argument("--out", help=f"report folder (default: {out_default})")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", default=duration, help=f"Locust run time (default {duration})")
    p.add_argument("--pool-size", type=int, default=200, help="test-split images to send (default 200)")
    p.add_argument("--server-cpus", type=int, help="CPUs for the server (default: all but one)")
    p.add_argument("--batch-size", type=int, default=8, help="server-side batch size (default 8)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="server-side batch wait in ms (default 10)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def write_pool(out_dir: str, dataset: str, size: int, root: Optional[str] = None, seed: int = 0) -> str:
    """Write the first ``size`` test-split images as PNG files plus ``labels.json``; returns ``out_dir``."""
    data = load_split(dataset, "test", root=root, seed=seed)
    os.makedirs(out_dir, exist_ok=True)
    labels = {}
    for i in range(min(size, len(data))):
        name = f"{i:05d}.png"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data.image_bytes(i))
        labels[name] = int(data.labels[i])
    with open(os.path.join(out_dir, "labels.json"), "w") as f:
        json.dump(labels, f)
    return out_dir


def split_cpus(server_cpus: Optional[int] = None) -> tuple[set[int], set[int]]:
    """(server CPUs, load-generator CPUs) from the CPUs this process may use.

    The load generator keeps one CPU; the server gets ``server_cpus`` (default: all the others).
    On a single-CPU machine both share it.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) == 1:
        return set(cpus), set(cpus)
    n = min(server_cpus or len(cpus) - 1, len(cpus) - 1)
    return set(cpus[-n:]), {cpus[0]}


def pinned(cpus: set[int]):
    """A ``preexec_fn`` that pins the child process (and all it starts) to ``cpus``."""
    def pin() -> None:
        os.sched_setaffinity(0, cpus)
    return pin


def warm_up(url: str, images: Sequence[bytes], rounds: int = 2, timeout: float = 60.0) -> None:
    """Send every image ``rounds`` times, so lazy initialisation and first batches are out of the way.

    Raises:
        RuntimeError: the server answers with an error (its message is included).
    """
    for _ in range(rounds):
        for image in images:
            r = requests.post(url, data=image, headers={"Content-Type": "image/png"}, timeout=timeout)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request to {url} failed: HTTP {r.status_code} {r.text[:300]}")


def run_locust(host: str, predict_path: str, pool: str, out_prefix: str, users: int, duration: str,
               cpus: set[int], query: str = "", extra: Sequence[str] = ()) -> str:
    """Run Locust headless against ``host``; returns the tally JSON path (see the locustfile).

    Writes Locust's own ``<prefix>_stats.csv``, ``_stats_history.csv``, ``_failures.csv`` and an
    HTML report ``<prefix>.html``. ``extra``: more locustfile options, e.g. ``["--expected", FILE]``.
    """
    tally = f"{out_prefix}_answers.json"
    locust = os.path.join(os.path.dirname(sys.executable), "locust")
    cmd = [locust, "-f", LOCUSTFILE, "--headless", "--host", host, "-u", str(users), "-r", str(users),
           "-t", duration, "--csv", out_prefix, "--csv-full-history", "--html", f"{out_prefix}.html",
           "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING",
           "--pool", pool, "--predict-path", predict_path, "--answers-out", tally]
    if query:
        cmd += ["--query", query]
    cmd += list(extra)
    started = time.monotonic()
    proc = subprocess.run(cmd, preexec_fn=pinned(cpus), capture_output=True, text=True)
    # Locust exits 1 when any request failed; the report counts failures, so only a crash is an error.
    if not os.path.isfile(tally) or not os.path.isfile(f"{out_prefix}_stats.csv"):
        raise RuntimeError(f"locust did not finish (exit {proc.returncode} after {time.monotonic() - started:.0f}s):\n"
                           f"{proc.stderr[-2000:]}")
    return tally

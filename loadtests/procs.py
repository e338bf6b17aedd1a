"""The processes of a running server: grouped for memory sampling, and found to be killed.

Both servers run in a session of their own (:class:`loadtests.launchers.TorchServe` and
:class:`loadtests.launchers.RayServe` start them with ``start_new_session``), so the server's processes
are those whose session id is the launcher's pid. They are grouped by role:

* TorchServe: ``frontend`` (the Java process), ``workers`` (Python model workers);
* Ray Serve: ``replica APP/DEPLOYMENT`` (``ray::ServeReplica:APP:DEPLOYMENT``, one role per
  deployment), ``proxy``, ``controller`` and ``ray`` (driver, raylet, GCS and other Ray helpers,
  including idle workers).
"""
from __future__ import annotations

import csv
import os
import re
import threading
import time
from typing import Optional

import psutil

__all__ = ["session_processes", "role", "RssSampler", "ray_replica_pids", "torchserve_worker_pids"]


_REPLICA = re.compile(r"ServeReplica:([\w.-]+?):([\w-]+)")


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes whose session id is ``sid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return found


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return ""


def role(server: str, proc: psutil.Process) -> Optional[str]:
    """The role of one server process (see the module doc); None for a process that is gone."""
    cmd = _cmdline(proc)
    if not cmd:
        return None
    if server == "torchserve":
        if "model_service_worker" in cmd:
            return "workers"
        return "frontend" if "java" in cmd.split(" ", 1)[0] or "org.pytorch.serve" in cmd else "other"
    replica = _REPLICA.search(cmd)
    if replica:
        return f"replica {replica.group(1)}/{replica.group(2)}"
    if "ProxyActor" in cmd:
        return "proxy"
    if "ServeController" in cmd:
        return "controller"
    return "ray"


def ray_replica_pids(sid: int, deployment: str, app: str = "staged") -> list[int]:
    """PIDs of the replica actors of ``app``'s ``deployment`` (their title is ``ray::ServeReplica:APP:NAME``)."""
    tag = f"ServeReplica:{app}:{deployment}"
    pids = []
    for proc in session_processes(sid):
        cmd = _cmdline(proc)
        end = cmd.find(tag) + len(tag)
        if tag in cmd and (end == len(cmd) or not (cmd[end].isalnum() or cmd[end] == "-")):  # Stage1, not Stage1-2
            pids.append(proc.pid)
    return pids


def torchserve_worker_pids(workers: list[dict]) -> list[int]:
    """PIDs from TorchServe's management API worker list (``TorchServe.workers(name)``)."""
    return [int(w["pid"]) for w in workers if w.get("pid") not in (None, -1)]


class RssSampler(threading.Thread):
    """Samples the summed RSS (MiB) of each role of a server's processes every ``interval`` seconds.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        sid: the server's session id.
        interval: seconds between samples.

    Attributes:
        rows: ``(seconds since start, role, processes, rss_mib)`` per role per sample.
    """

    def __init__(self, server: str, sid: int, interval: float = 10.0) -> None:
        super().__init__(daemon=True)
        self.server, self.sid, self.interval = server, sid, interval
        self.rows: list[tuple[float, str, int, float]] = []
        self.t0 = time.time()
        self._stop_event = threading.Event()

    def sample(self) -> None:
        """Take one sample now."""
        totals: dict[str, list] = {}
        for proc in session_processes(self.sid):
            try:
                name, rss = role(self.server, proc), proc.memory_info().rss
            except psutil.Error:
                continue
            if name:
                entry = totals.setdefault(name, [0, 0])
                entry[0] += 1
                entry[1] += rss
        t = round(time.time() - self.t0, 1)
        self.rows.extend((t, name, n, round(rss / 2 ** 20, 1)) for name, (n, rss) in sorted(totals.items()))

    def run(self) -> None:
        self.t0 = time.time()  # the load starts now (the thread starts with Locust)
        while True:
            self.sample()
            if self._stop_event.wait(self.interval):
                break

    def stop(self) -> None:
        """Stop after one last sample."""
        self._stop_event.set()
        self.join()
        self.sample()

    def summary(self, settle_s: float = 60.0) -> dict[str, dict]:
        """Per role: RSS (MiB) and process count at the first and last sample, the relative growth, and
        the growth from the first sample at or after ``settle_s`` (allocators and the JVM heap grow
        during the first minute of load; a leak keeps growing after it)."""
        out = {}
        for name in sorted({r[1] for r in self.rows}):
            rows = [r for r in self.rows if r[1] == name]
            start, end = rows[0], rows[-1]
            settled = next((r for r in rows if r[0] >= settle_s), end)
            out[name] = {"start_mib": start[3], "end_mib": end[3], "max_mib": max(r[3] for r in rows),
                         "growth": round(end[3] / start[3] - 1.0, 4) if start[3] else None,
                         "settled_s": settled[0], "settled_mib": settled[3],
                         "growth_after_settled": round(end[3] / settled[3] - 1.0, 4) if settled[3] else None,
                         "processes_start": start[2], "processes_end": end[2]}
        return out

    def write_csv(self, path: str) -> str:
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["seconds", "role", "processes", "rss_mib"])
            w.writerows(self.rows)
        return path

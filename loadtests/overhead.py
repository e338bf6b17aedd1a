"""What serving costs beyond the model: CPU per request by process, and the gain a server allows.

* :class:`CpuMeter` sums the CPU time (user + system, ``psutil``) of every process of a running
  server, by role (:func:`loadtests.procs.role`: TorchServe frontend / workers; Ray proxy,
  controller, each deployment's replicas, Ray's own processes), between the start and the end of a
  Locust run: divided by the requests answered, that is the CPU each request cost in each process.
* :func:`compute_cost` times the model itself in this process, pinned to the server's CPUs with as
  many torch threads: CPU ms per sample of the plain backbone and of the routed model on the pool's
  images, at the server's batch size.
* :func:`serving_bound`: with ``O`` = the baseline's CPU per request less its compute (what serving
  a request costs whatever the model), an early-exit server can gain at most
  ``(O + backbone) / (O + routed)`` on a CPU-bound machine, beside the FLOPs ideal
  ``1 / cost_fraction``. A gain near this bound but far below the ideal means the server, not the
  model, is the limit.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Sequence

import psutil
import torch

from .procs import role, session_processes

__all__ = ["CpuMeter", "compute_cost", "serving_bound", "per_request"]


class CpuMeter:
    """CPU seconds of a server's processes by role between :meth:`start` and :meth:`stop`.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        sid: the server's session id (its launcher's pid).
    """

    def __init__(self, server: str, sid: int) -> None:
        self.server, self.sid = server, sid
        self.before: dict[int, tuple[str, float]] = {}

    def snapshot(self) -> dict[int, tuple[str, float]]:
        """pid -> (role, CPU seconds so far) for every live process of the server."""
        out = {}
        for proc in session_processes(self.sid):
            try:
                name, t = role(self.server, proc), proc.cpu_times()
            except psutil.Error:
                continue
            if name:
                out[proc.pid] = (name, t.user + t.system)
        return out

    def start(self) -> None:
        self.before = self.snapshot()

    def stop(self) -> dict[str, float]:
        """CPU seconds per role since :meth:`start` (a process started meanwhile counts from its start)."""
        totals: dict[str, float] = {}
        for pid, (name, cpu) in self.snapshot().items():
            spent = cpu - self.before.get(pid, (name, 0.0))[1]
            totals[name] = totals.get(name, 0.0) + max(0.0, spent)
        return totals


def per_request(cpu_s: dict[str, float], requests: int) -> dict[str, float]:
    """CPU ms per request per role, plus ``total``."""
    if requests <= 0:
        return {}
    out = {name: round(1e3 * s / requests, 3) for name, s in sorted(cpu_s.items())}
    out["total"] = round(1e3 * sum(cpu_s.values()) / requests, 3)
    return out


@contextlib.contextmanager
def _pinned(cpus: set[int], threads: int) -> Iterator[None]:
    affinity, before = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        os.sched_setaffinity(0, affinity)


@torch.inference_mode()
def compute_cost(model_dir: str, images: Sequence[bytes], batch_size: int, cpus: set[int], max_images: int = 64,
                 min_seconds: float = 3.0) -> dict[str, float]:
    """CPU ms per sample of the plain backbone and the routed model (served thresholds) on ``images``.

    Batches of ``batch_size`` alternate between the two (as ``branched bench`` does); passes repeat
    until both have spent ``min_seconds`` of CPU. Runs pinned to ``cpus`` with one torch thread each.
    """
    from branched.serving import Predictor

    predictor = Predictor(model_dir)
    prepared = [predictor.prepare(b) for b in images[:max_images]]
    x = torch.stack([p.image for p in prepared])
    thresholds = torch.stack([p.thresholds for p in prepared])
    model = predictor.model
    batches = [(x[i:i + batch_size], thresholds[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    spent = {"backbone": 0.0, "routed": 0.0}
    samples = 0
    with _pinned(cpus, len(cpus)):
        for xb, tb in batches:  # warm-up
            model.backbone_forward(xb)
            model.routed_forward(xb, tb)
        while min(spent.values()) < min_seconds or not samples:
            for xb, tb in batches:
                t0 = time.process_time()
                model.backbone_forward(xb)
                t1 = time.process_time()
                model.routed_forward(xb, tb)
                spent["backbone"] += t1 - t0
                spent["routed"] += time.process_time() - t1
                samples += len(xb)
    return {"backbone": 1e3 * spent["backbone"] / samples, "routed": 1e3 * spent["routed"] / samples,
            "images": len(x), "batch_size": batch_size, "threads": len(cpus)}


def serving_bound(baseline_cpu_ms: float, early_cpu_ms: float, compute_ms: dict[str, float]) -> dict[str, float]:
    """Serving overhead per request of each app and the gain a server with the baseline's overhead allows.

    Args:
        baseline_cpu_ms, early_cpu_ms: measured server CPU ms per request of each app.
        compute_ms: :func:`compute_cost`'s ``backbone`` and ``routed`` ms per sample.
    """
    backbone, routed = compute_ms["backbone"], compute_ms["routed"]
    overhead = round(max(0.0, baseline_cpu_ms - backbone), 3)
    return {"overhead_ms": overhead, "early_exit_overhead_ms": round(max(0.0, early_cpu_ms - routed), 3),
            "compute_speedup": backbone / routed if routed else float("nan"),
            "serving_bound": (overhead + backbone) / (overhead + routed) if overhead + routed else float("nan")}

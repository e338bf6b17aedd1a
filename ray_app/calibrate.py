"""The planner's short calibration run on the target machine: stage compute and the cost of a hop.

* :func:`measure_steps`: ``model.step(k)`` timed in this process on random inputs of each stage's
  shape, at batch sizes 1, 2, 4, ... up to the expected batch, with the replica's torch threads
  (thresholds above every score, so every exit head is computed and nobody leaves).
* :func:`measure_hop`: CPU seconds of a ``DeploymentHandle`` call between two replicas, with every
  process of the local Ray counted (``psutil``): a probe app sends stacked :class:`Samples` from one
  deployment to another, which answers one small dict per sample as a stage does. Three payloads
  separate the cost per call, per sample and per byte. Needs Serve running on a Ray this process
  started (``ray.init(address="local")``, as ``python -m ray_app.server`` and ``branched ray-plan
  --calibrate`` do); the Ray Serve profile in force (:mod:`ray_app.options`) is the one measured.
"""
from __future__ import annotations

import asyncio
import os
import platform
import statistics
import time
from typing import Any, Optional

import psutil
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from branched.artifact import load_model

from .batching import Samples
from .costmodel import Calibration

__all__ = ["measure_steps", "measure_hop", "calibrate", "batch_grid"]

KEEP_ALL = 2.0  # above every exit score (scores are in [0, 1]): the heads run, nobody exits


def batch_grid(batch_size: int) -> list[int]:
    """1, 2, 4, ... below ``batch_size``, and ``batch_size`` itself."""
    sizes, b = [], 1
    while b < batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [batch_size]


@torch.inference_mode()
def measure_steps(model_dir: str, batch_size: int, threads: int = 1, device: str = "cpu",
                  rounds: int = 3) -> tuple[list[dict[int, float]], list[int]]:
    """Seconds of one ``model.step(k)`` per stage and batch size (median of ``rounds``), and the bytes a
    sample carries into each stage.

    Args:
        model_dir: the model directory.
        batch_size: the largest batch timed (the expected batch of a loaded replica).
        threads: torch intra-op threads (a replica's whole CPUs).
        device: ``cpu`` or ``cuda``.
        rounds: timed repetitions per point after one warm-up.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        model = load_model(model_dir).optimize_for_inference().to(device)
        s, K = model.config.input_size, model.num_exits
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, 3, s, s, generator=g).to(device)
        thresholds = torch.full((batch_size, K - 1), KEEP_ALL, device=device)
        flops = None
        seconds, sizes = [], []
        for k in range(K):
            sizes.append(int(x[0].numel() * x.element_size() + (K - 1) * 4 + 8))
            times = {}
            for b in batch_grid(batch_size):
                f = None if flops is None else flops[:b]
                model.step(k, x[:b], thresholds[:b], flops=f)  # warm-up
                runs = []
                for _ in range(rounds):
                    _sync(device)
                    t0 = time.perf_counter()
                    model.step(k, x[:b], thresholds[:b], flops=f)
                    _sync(device)
                    runs.append(time.perf_counter() - t0)
                times[b] = statistics.median(runs)
            seconds.append(times)
            r = model.step(k, x, thresholds, flops=flops)
            x, flops = r.features, r.survivor_flops
        return seconds, sizes
    finally:
        torch.set_num_threads(before)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.01})
class HopReceiver:
    """Answers a batch as a stage does: one small dict per sample."""

    async def __call__(self, samples: Samples) -> list[dict[str, Any]]:
        return [{"class_index": 0, "label": "0", "confidence": 1.0, "exit": 1, "cost_fraction": 0.5,
                 "exit_score": 1.0} for _ in range(len(samples))]


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.01})
class HopSender:
    """Sends ``calls`` batches, one after another, to the receiver through a ``DeploymentHandle``."""

    def __init__(self, receiver) -> None:
        self.receiver = receiver

    async def run(self, calls: int, n: int, floats: int, thresholds: int) -> int:
        samples = Samples(torch.zeros(n, max(1, floats)), torch.zeros(n, thresholds), torch.zeros(n, dtype=torch.float64))
        answered = 0
        for _ in range(calls):
            answered += len(await self.receiver.remote(samples))
        return answered


def _ray_cpu() -> float:
    """CPU seconds so far of this process's children (the local Ray: GCS, raylet, workers, replicas)."""
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


async def _probe(app_name: str, batch_size: int, image_bytes: int, thresholds: int, calls: int
                 ) -> tuple[float, float, float]:
    """CPU seconds per call of the local Ray for one tiny sample, ``batch_size`` tiny ones, ``batch_size`` images.

    A handle of its own, made and shut down on this loop (with RAY_SERVE_THROUGHPUT_OPTIMIZED a handle's router
    runs on its caller's loop, which closes after the probe)."""
    sender = DeploymentHandle("HopSender", app_name)
    await sender.run.remote(10, 1, 4, thresholds)  # warm-up
    idle_t0, idle_c0 = time.monotonic(), _ray_cpu()
    await asyncio.sleep(1.0)
    idle_rate = (_ray_cpu() - idle_c0) / (time.monotonic() - idle_t0)

    async def cpu_per_call(n: int, floats: int) -> float:
        t0, c0 = time.monotonic(), _ray_cpu()
        await sender.run.remote(calls, n, floats, thresholds)
        return max(0.0, (_ray_cpu() - c0) - idle_rate * (time.monotonic() - t0)) / calls

    try:
        return (await cpu_per_call(1, 4), await cpu_per_call(batch_size, 4),
                await cpu_per_call(batch_size, image_bytes // 4))
    finally:
        await sender.shutdown_async()


def measure_hop(batch_size: int, image_bytes: int, thresholds: int, calls: int = 150,
                app_name: str = "branched-hop-probe") -> tuple[float, float, float]:
    """``(call_s, sample_s, byte_s)``: CPU seconds of a handle call, per sample and per byte, all Ray processes counted.

    Raises:
        RuntimeError: Serve is not running on a Ray this process started.
    """
    serve.run(HopSender.bind(HopReceiver.bind()), name=app_name, route_prefix=None)
    try:
        small, many, heavy = asyncio.run(_probe(app_name, batch_size, image_bytes, thresholds, calls))
    finally:
        serve.delete(app_name)
    sample_s = max(0.0, (many - small) / max(1, batch_size - 1))
    call_s = max(0.0, small - sample_s)
    byte_s = max(0.0, (heavy - many) / max(1, batch_size * (image_bytes - 16)))
    return call_s, sample_s, byte_s


def calibrate(model_dir: str, batch_size: int, threads: int = 1, device: str = "cpu",
              hop: Optional[tuple[float, float, float]] = None, batch_wait_s: Optional[float] = None) -> Calibration:
    """Measure stage compute (in this process) and the hop cost (on the running local Serve, unless ``hop`` is given);
    ``batch_wait_s``: the deployments' batch wait, which bounds how full a later deployment's batches get."""
    seconds, sizes = measure_steps(model_dir, batch_size, threads, device)
    k_thresholds = len(seconds) - 1
    call_s, sample_s, byte_s = hop or measure_hop(batch_size, sizes[0], k_thresholds)
    meta = {"device": device, "threads": threads, "host": platform.node(), "cpus": len(os.sched_getaffinity(0)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "hop": "given" if hop else "measured"}
    return Calibration(batch_size, seconds, sizes, call_s, sample_s, byte_s, meta, batch_wait_s)

"""The stages a replica hosts, and the ``StageGroup`` deployment (one run of consecutive stages).

:class:`StageRunner` holds the model cut down to a replica's stages (``model.keep_stages``) and runs
them on a batch with the core's :func:`branched.stages.run_stages` (``model.step`` per stage), counting
per stage what it received, answered and sent on. The ``Ingress`` uses one for the stages it hosts,
and every ``StageGroup`` replica uses one for its run. :func:`run_and_forward` is what both do with a
batch: run the stages, answer the samples that exited, and send the survivors to the next
deployment in **one** handle call (each request then awaits only its own answer).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any, Optional, Sequence

import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from branched.artifact import load_model
from branched.stages import check_stages, run_stages

from .batching import Forwarded, Samples, num_samples, resolve, set_batching
from .control import replica_id

__all__ = ["StageRunner", "StageGroup", "run_and_forward", "replica_threads", "replica_device"]

logger = logging.getLogger("ray.serve")


def replica_threads() -> int:
    """Torch threads for this replica: its whole logical CPUs (at least one)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = 1.0
    return max(1, int(cpus))


def replica_device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES from num_gpus, so a replica without GPUs sees none.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class StageRunner:
    """Stages ``stages`` of the model in ``model_dir``, on this replica's device, with per-stage counters.

    Args:
        model_dir: the model directory (loaded, then cut down to ``stages``).
        stages: consecutive stage indices this replica hosts.
    """

    def __init__(self, model_dir: str, stages: Sequence[int]) -> None:
        from ray.serve import metrics

        model = load_model(model_dir)
        self.stages = check_stages(stages, model.num_exits)
        self.last = self.stages[-1] == model.num_exits - 1
        self.device = replica_device()
        self.model = model.keep_stages(self.stages).optimize_for_inference().to(self.device)
        self.counts = {k: {"samples": 0, "exited": 0, "forwarded": 0, "batches": 0, "max_batch": 0}
                       for k in self.stages}
        self.busy_s = 0.0  # seconds spent computing; the ingress's load controller reads it
        self.samples_metric = metrics.Counter(
            "branched_stage_samples", description="Samples a stage received, answered (exited) or sent on.",
            tag_keys=("stage", "outcome"))
        self.batch_metric = metrics.Histogram(
            "branched_stage_batch_size", description="Batch size of one segment step.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("stage",))

    @torch.inference_mode()
    def run(self, batch: Samples) -> tuple[list[Any], Optional[tuple[list[int], Samples]]]:
        """The hosted stages on a batch: answers of the samples that exit (None elsewhere), and the
        survivors' positions with their :class:`Samples` for the next deployment (None if none)."""
        start = time.monotonic()
        x = batch.features.to(self.device)
        flops = None if batch.flops is None else batch.flops.to(self.device)
        out = run_stages(self.model, self.stages, x, batch.thresholds.to(self.device), flops)
        self.busy_s += time.monotonic() - start
        for k, (received, exited) in zip(self.stages, out.counts):
            self._count(k, received, exited)
        if not out.survivors.numel():
            return out.answers, None
        return out.answers, (out.survivors.tolist(),
                             Samples(out.features.cpu(), out.thresholds.cpu(), out.flops.cpu()))

    def _count(self, k: int, n: int, exited: int) -> None:
        c = self.counts[k]
        forwarded = n - exited
        c["samples"] += n
        c["exited"] += exited
        c["forwarded"] += forwarded
        c["batches"] += 1
        c["max_batch"] = max(c["max_batch"], n)
        stage = str(k)
        self.samples_metric.inc(n, tags={"stage": stage, "outcome": "received"})
        if exited:
            self.samples_metric.inc(exited, tags={"stage": stage, "outcome": "exited"})
        if forwarded:
            self.samples_metric.inc(forwarded, tags={"stage": stage, "outcome": "forwarded"})
        self.batch_metric.observe(n, tags={"stage": stage})

    def stats(self, next_group: Optional[DeploymentHandle]) -> dict[str, Any]:
        """``stages``: per hosted stage, samples received, exited, forwarded, batches, largest batch; the
        replica's seconds ``busy_s`` computing at monotonic ``time``, its ``replica`` id, and the ``next``
        deployment's name (the load controller follows the chain through it)."""
        return {"stages": [{"stage": k, **c} for k, c in self.counts.items()], "busy_s": self.busy_s,
                "time": time.monotonic(), "replica": replica_id(),
                "next": None if next_group is None else next_group.deployment_name}


async def run_and_forward(runner: StageRunner, batch: Samples, next_group: Optional[DeploymentHandle]) -> list[Any]:
    """Run ``runner``'s stages on ``batch`` on the event loop's thread; the survivors go to ``next_group`` in one
    call. One entry per sample: its answer, or ``(Forwarded, j)``.

    Not in ``asyncio.to_thread``: every torch op releases the GIL, and a compute thread then waits for it behind
    a busy loop thread (a backlog of requests to parse), up to Python's 5 ms switch interval per op. On one CPU
    that convoy held a CIFAR-10 ResNet-56 Ingress below its load under 639 paced users (p95 2.2 s at 70 req/s,
    against 160 ms with the batch on the loop; README "Ray Serve under paced load"). The loop reads no request
    while a batch runs; ``@serve.batch`` makes up for it, as what arrived meanwhile forms the next batch.
    """
    results, survivors = runner.run(batch)
    if survivors is not None:
        if next_group is None:
            raise RuntimeError(f"stages {runner.stages} left {len(survivors[0])} samples and no next deployment")
        forwarded = Forwarded(next_group, survivors[1])
        for j, i in enumerate(survivors[0]):
            results[i] = (forwarded, j)
    return results


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class StageGroup:
    """Consecutive stages (segment + exit each) batched across calls; each batch's survivors go to the
    next deployment in one call.

    Args:
        model_dir: the model directory (every replica loads it and keeps only its own stages).
        stages: the consecutive stages this deployment hosts.
        next_group: handle to the deployment of the following stages (None when this run ends with the head).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings (also via ``user_config``).
    """

    def __init__(self, model_dir: str, stages: Sequence[int], next_group: Optional[DeploymentHandle] = None,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005) -> None:
        torch.set_num_threads(replica_threads())
        self.runner = StageRunner(model_dir, stages)
        if next_group is None and not self.runner.last:
            raise ValueError(f"stages {self.runner.stages} do not end with the backbone head: they need a handle "
                             f"to the deployment of stage {self.runner.stages[-1] + 1}")
        self.next = next_group
        self.max_batch_size = max_batch_size
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``{max_batch_size: int, batch_wait_timeout_s: float}`` (either)."""
        set_batching(self.run_batch, config)
        self.max_batch_size = int(config.get("max_batch_size", self.max_batch_size))

    async def __call__(self, samples: Samples) -> list[dict[str, Any]]:
        """The answers for ``samples``, in order: from these stages' exits, or from a later deployment."""
        parts = await asyncio.gather(*(self.run_batch(c) for c in samples.chunks(self.max_batch_size)))
        return await resolve([r for part in parts for r in part])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=num_samples)
    async def run_batch(self, calls: list[Samples]) -> list[list[Any]]:
        results = await run_and_forward(self.runner, Samples.cat(calls), self.next)
        bounds = list(itertools.accumulate(len(c) for c in calls))
        return [results[b - len(c):b] for b, c in zip(bounds, calls)]

    def stats(self) -> dict[str, Any]:
        """This replica's counters (:meth:`StageRunner.stats`)."""
        return self.runner.stats(self.next)

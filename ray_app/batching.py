"""How samples travel between the staged app's deployments: stacked, one handle call per batch.

A Ray Serve handle call costs far more CPU than a sample's share of a small segment (measured on
2 cores: several milliseconds per call), so the ingress sends a whole ``@serve.batch`` to stage 0 in
one call, and each stage sends its batch's survivors to the next stage in one call. Every request
awaits only its own answer (:class:`Forwarded`), so a stage's batch slot is free as soon as its step
is done.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Optional

import torch
from ray.serve.handle import DeploymentHandle

__all__ = ["Samples", "num_samples", "Forwarded", "resolve", "set_batching"]


@dataclass
class Samples:
    """Samples in flight between deployments, stacked (one tensor each: cheap to send between processes).

    Attributes:
        features: the stage's input, ``[n, C, H, W]`` maps or ``[n, N, D]`` tokens (the images for stage 0).
        thresholds: each sample's side-exit thresholds, ``[n, K-1]``.
        flops: FLOPs spent on each sample so far, ``[n]`` float64; None before stage 0.
    """

    features: torch.Tensor
    thresholds: torch.Tensor
    flops: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.features.shape[0]

    @staticmethod
    def cat(parts: list["Samples"]) -> "Samples":
        if len(parts) == 1:
            return parts[0]
        flops = None if parts[0].flops is None else torch.cat([p.flops for p in parts])
        return Samples(torch.cat([p.features for p in parts]), torch.cat([p.thresholds for p in parts]), flops)

    def chunks(self, size: int) -> list["Samples"]:
        """Consecutive pieces of at most ``size`` samples."""
        return [Samples(self.features[i:i + size], self.thresholds[i:i + size],
                        None if self.flops is None else self.flops[i:i + size]) for i in range(0, len(self), size)]


def num_samples(calls: list[Samples]) -> int:
    return sum(len(c) for c in calls)


class Forwarded:
    """One handle call that carries a whole batch's survivors; each survivor's request awaits its own answer."""

    def __init__(self, handle: DeploymentHandle, samples: Samples) -> None:
        self.task = asyncio.ensure_future(self._call(handle, samples))

    @staticmethod
    async def _call(handle: DeploymentHandle, samples: Samples) -> list[dict[str, Any]]:
        return await handle.remote(samples)

    async def answer(self, j: int) -> dict[str, Any]:
        return (await self.task)[j]


async def resolve(results: list[Any]) -> list[dict[str, Any]]:
    """Answers in order: the ones already known, and the later stages' for forwarded samples."""
    return [await r[0].answer(r[1]) if isinstance(r, tuple) else r for r in results]


def set_batching(batched: Any, config: dict[str, Any]) -> None:
    """Apply ``max_batch_size`` / ``batch_wait_timeout_s`` from a ``user_config`` to a ``@serve.batch`` method.

    Raises:
        ValueError: unknown keys or out-of-range values (the deployment update then fails with this message).
    """
    unknown = set(config) - {"max_batch_size", "batch_wait_timeout_s"}
    if unknown:
        raise ValueError(f"unknown user_config keys {sorted(unknown)}; use max_batch_size, batch_wait_timeout_s")
    if "max_batch_size" in config:
        batched.set_max_batch_size(int(config["max_batch_size"]))
    if "batch_wait_timeout_s" in config:
        batched.set_batch_wait_timeout_s(float(config["batch_wait_timeout_s"]))



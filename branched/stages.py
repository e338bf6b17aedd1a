"""Consecutive stages in one process: what a serving replica that hosts several stages runs.

A replica may host one stage or a run of consecutive stages (the Ray Serve adapter groups them so
that a request that exits early crosses no process boundary). :func:`run_stages` runs such a run
on one batch by calling the core's :meth:`BranchedModel.step` stage after stage, compacting the
batch after each, and returns the answers of the samples that exited (built by
:meth:`StepResult.answers`, the same JSON as the TorchServe handler's) and the survivors, ready for
the next process. Routing itself stays in ``step``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from .model import BranchedModel

__all__ = ["StagesOutput", "run_stages", "check_stages"]


@dataclass
class StagesOutput:
    """What a run of stages did with one batch of ``n`` samples.

    Attributes:
        answers: one per input sample, in input order: the JSON-ready answer of a sample that exited
            in these stages, None for a survivor.
        survivors: positions ``[S]`` (in the input batch) of the samples that go on.
        features: the survivors' features ``[S, ...]``: the next stage's input.
        thresholds: the survivors' threshold rows ``[S, K-1]``.
        flops: FLOPs spent on each survivor so far ``[S]`` (float64).
        counts: per stage run, ``(received, exited)``.
    """

    answers: list[Optional[dict[str, Any]]]
    survivors: torch.Tensor
    features: torch.Tensor
    thresholds: torch.Tensor
    flops: torch.Tensor
    counts: list[tuple[int, int]]


def check_stages(stages: Sequence[int], num_stages: int) -> list[int]:
    """``stages`` as a list, checked to be a non-empty run of consecutive stage indices.

    Raises:
        ValueError: an empty, non-consecutive or out-of-range run (the message names the valid range).
    """
    run = [int(k) for k in stages]
    if not run or run != list(range(run[0], run[0] + len(run))) or run[0] < 0 or run[-1] >= num_stages:
        raise ValueError(f"a replica hosts consecutive stages within 0..{num_stages - 1}, got {run}")
    return run


@torch.inference_mode()
def run_stages(model: BranchedModel, stages: Sequence[int], features: torch.Tensor, thresholds: torch.Tensor,
               flops: Optional[torch.Tensor] = None, policy: Optional[str] = None) -> StagesOutput:
    """Run consecutive ``stages`` on a batch: ``model.step`` per stage, survivors compacted between them.

    Args:
        model: a model holding at least ``stages`` (:meth:`BranchedModel.keep_stages`).
        stages: consecutive stage indices; the first one's input is ``features``.
        features: images ``[n, 3, S, S]`` when the first stage is 0, else the previous stage's survivors' features.
        thresholds: one row per sample ``[n, K-1]`` (validated, as :func:`branched.routing.resolve_thresholds` gives).
        flops: FLOPs already spent on each sample ``[n]``; None before stage 0.
        policy: exit policy; the model's own by default.

    Returns:
        :class:`StagesOutput`; after the last stage (the backbone head) nobody survives.
    """
    run = check_stages(stages, model.num_exits)
    n = features.shape[0]
    if thresholds.dim() != 2 or thresholds.shape[0] != n:
        raise ValueError(f"need one threshold row per sample: {n} rows, got shape {tuple(thresholds.shape)}")
    names, unit = model.config.class_names, float(model.cost.backbone_flops)
    answers: list[Optional[dict[str, Any]]] = [None] * n
    active = torch.arange(n)  # input positions of the samples still in the batch
    counts = []
    for k in run:
        r = model.step(k, features, thresholds, policy, flops)
        exited = r.exited.cpu()
        where = active if exited.numel() == active.numel() else active.index_select(0, exited)
        for i, answer in zip(where.tolist(), r.answers(k, names, unit)):
            answers[i] = answer
        counts.append((int(active.numel()), int(exited.numel())))
        if r.survivors.numel() != active.numel():
            active = active.index_select(0, r.survivors.cpu())
            thresholds = thresholds.index_select(0, r.survivors)
        features, flops = r.features, r.survivor_flops
        if not active.numel():
            break
    return StagesOutput(answers, active, features, thresholds, flops, counts)

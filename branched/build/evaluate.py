"""Accuracy, exit rates and cost of a branched model on labelled tensors, and the wall-clock bench."""
from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

import torch

from ..model import BranchedModel
from ..outputs import RoutedOutput
from ..routing import Thresholds, exit_score, resolve_thresholds

__all__ = ["predict", "evaluate", "bench", "percentile_thresholds"]


@torch.no_grad()
def predict(model: BranchedModel, x: torch.Tensor, thresholds: Optional[Thresholds] = None,
            policy: Optional[str] = None, batch_size: int = 256) -> RoutedOutput:
    """Routed forward over ``x`` in batches, concatenated."""
    parts = [model.routed_forward(x[i:i + batch_size], thresholds, policy) for i in range(0, len(x), batch_size)]
    return RoutedOutput(torch.cat([p.logits for p in parts]), torch.cat([p.exit_index for p in parts]),
                        torch.cat([p.score for p in parts]), torch.cat([p.flops for p in parts]),
                        parts[0].backbone_flops)


@torch.no_grad()
def evaluate(model: BranchedModel, x: torch.Tensor, y: torch.Tensor, thresholds: Optional[Thresholds] = None,
             policy: Optional[str] = None, batch_size: int = 256) -> dict:
    """Routed and plain-backbone accuracy, exit rates, per-exit accuracy and mean cost fraction."""
    thr = resolve_thresholds(thresholds, model.config.thresholds)
    out = predict(model, x, thr, policy, batch_size)
    backbone = torch.cat([model.backbone_forward(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    correct = out.class_index == y
    counts = torch.bincount(out.exit_index, minlength=model.num_exits)
    per_exit = [float(correct[out.exit_index == k].float().mean()) if counts[k] else None
                for k in range(model.num_exits)]
    return {
        "samples": int(len(y)),
        "backbone_accuracy": float((backbone.argmax(1) == y).float().mean()),
        "accuracy": float(correct.float().mean()),
        "cost_fraction": float(out.cost_fraction.mean()),
        "exit_rates": (counts.double() / len(y)).tolist(),
        "exit_accuracy": per_exit,
        "exit_cost_fractions": model.cost.exit_cost_fractions(),
        "thresholds": [float(t) for t in thr.tolist()],
        "policy": policy or model.config.policy,
    }


@torch.inference_mode()
def percentile_thresholds(model: BranchedModel, x: torch.Tensor, spec: Sequence[Union[float, str]],
                          policy: Optional[str] = None) -> list[float]:
    """Thresholds that give a chosen exit mix on ``x``: ``"qP"`` at exit ``k`` is the ``P``-th percentile
    of the scores of the samples that reach exit ``k``, so ``100 - P`` % of them leave there
    (``"q20"`` at exit 0: 80% of ``x`` leaves at exit 0). Numbers pass through unchanged.

    A percentile threshold lies halfway between two neighbouring scores, so float noise between
    batch shapes cannot move a sample across it. (:func:`branched.build.random_model.quantile_thresholds`
    fixes shares of *all* samples from precomputed scores; this one runs the model, exit by exit.)
    """
    if len(spec) != model.num_exits - 1:
        raise ValueError(f"need {model.num_exits - 1} thresholds (one per early exit), got {len(spec)}")
    policy = policy or model.config.policy
    out: list[float] = []
    h = x.contiguous(memory_format=model.memory_format)
    for k, item in enumerate(spec):
        if not any(isinstance(s, str) for s in spec[k:]):  # numbers from here on: nothing to measure
            out += [float(s) for s in spec[k:]]
            break
        h = model.segments[k](h)
        scores = exit_score(model.exits[k](h), policy).float()
        if isinstance(item, str):
            ranked, n = scores.sort().values, len(scores)
            i = round(float(item[1:]) / 100 * n)
            t = 0.0 if i <= 0 else math.inf if i >= n else float((ranked[i - 1] + ranked[i]) / 2)
        else:
            t = float(item)
        out.append(t)
        h = h[scores < t]
    return out


@torch.inference_mode()
def bench(model: BranchedModel, x: torch.Tensor, batch_size: int, thresholds: Optional[Thresholds] = None,
          policy: Optional[str] = None, rounds: int = 5, warmup: int = 1) -> dict:
    """Time the plain backbone and the routed model on the same batches, in this process.

    Batches alternate between the two (full, routed, full, ...) so that both see the same machine
    state; the figures are totals over ``rounds`` passes over ``x``.

    Besides the FLOPs ideal (``ideal_speedup`` = 1 / ``cost_fraction``), the plain passes time each segment:
    ``segment_time_shares`` are their shares of the plain pass (beside ``segment_flops_shares``), and
    ``time_ideal_speedup`` is what the same exit mix would give at those times if routing cost nothing (no
    heads, no gathers). ``routing_efficiency`` = measured / time ideal is the router's own efficiency, while
    ``efficiency`` (measured / FLOPs ideal) also carries how unevenly this machine runs the segments per FLOP
    (memory-bound early layers, say). A model with LC-Net gates saves inside its segments, which the plain
    pass cannot time: there both keys are None.
    """
    thr = resolve_thresholds(thresholds, model.config.thresholds)
    batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)] or [x]
    for _ in range(warmup):
        for b in batches:
            model.backbone_forward(b)
            model.routed_forward(b, thr, policy)
    full_s = routed_s = 0.0
    segment_s = [0.0] * model.num_exits
    flops, reached = [], torch.zeros(model.num_exits)
    for r in range(rounds):
        for b in batches:
            t0 = time.perf_counter()
            model.backbone_forward(b, segment_s)
            t1 = time.perf_counter()
            out = model.routed_forward(b, thr, policy)
            t2 = time.perf_counter()
            full_s += t1 - t0
            routed_s += t2 - t1
            if r == 0:
                flops.append(out.cost_fraction)
                # Samples that ran segment k: those that left at exit k or later.
                reached += torch.bincount(out.exit_index, minlength=model.num_exits).flip(0).cumsum(0).flip(0)
    images = rounds * sum(len(b) for b in batches)
    cost_fraction = float(torch.cat(flops).mean())
    measured = full_s / routed_s
    ideal = 1.0 / cost_fraction
    shares = torch.tensor(segment_s, dtype=torch.float64) / sum(segment_s)
    # LC-Net gates save inside segments, which the plain pass's times cannot show: no time ideal for them.
    time_ideal = None if model.config.dynamic else 1.0 / float((shares * reached.double() / reached[0]).sum())
    cost = model.cost
    flops_shares = [(f + (cost.exit_flops[-1] if k == model.num_exits - 1 else 0)) / cost.backbone_flops
                    for k, f in enumerate(cost.segment_flops)]
    return {
        "batch_size": batch_size, "images": images, "threads": torch.get_num_threads(),
        "full_images_per_s": images / full_s, "routed_images_per_s": images / routed_s,
        "measured_speedup": measured, "cost_fraction": cost_fraction, "ideal_speedup": ideal,
        "efficiency": measured / ideal, "thresholds": [float(t) for t in thr.tolist()],
        "segment_time_shares": shares.tolist(), "segment_flops_shares": flops_shares,
        "time_ideal_speedup": time_ideal,
        "routing_efficiency": None if time_ideal is None else measured / time_ideal,
    }

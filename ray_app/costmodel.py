"""Choosing a grouping from measurements: what each hop costs against what it frees.

Per request, a grouping costs the compute of every stage a request reaches plus every hop its
samples cross (:func:`grouping_cost`):

* **compute**: stage ``k`` runs on the samples of its process's batch that are still there. A
  deployment fills its batch (``B`` samples, the expected batch size) from many upstream calls, or, with
  ``batch_wait_s`` measured against the upstream batch time, from the calls that arrive within one wait;
  inside one process, stage ``k`` only gets the survivors of its run's batch, ``B * reach_k / reach_s``
  (``s`` = the run's first stage). Per request that is ``reach_k * t_k(b) / b`` with ``t_k(b)`` the
  measured time of ``model.step(k)`` on a batch of ``b``.
* **hops**: a deployment starting at stage ``s`` receives one handle call per upstream batch
  (``reach_p / B`` calls per request, ``p`` = the upstream run's first stage) carrying ``reach_s``
  samples of ``bytes_s`` each: ``calls * call_s + reach_s * (sample_s + bytes_s * byte_s)``, with
  ``call_s``, ``sample_s`` and ``byte_s`` the CPU a handle call costs on this machine.

Splitting a run before stage ``k`` (a new deployment) lets the later stages compute on full batches
again, which frees replica time where small batches are wasteful (GPUs), and adds a hop.
:func:`choose_grouping` takes the cheapest grouping, so a stage is split off only where the replica
time it frees is worth more than the hop; ties go to fewer deployments. Pure arithmetic (no Ray, no
torch): the measurements come from :mod:`ray_app.calibrate` or a saved plan.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from .grouping import Grouping

__all__ = ["Calibration", "GroupingCost", "grouping_cost", "choose_grouping", "boundaries", "explain", "describe"]


@dataclass
class Calibration:
    """What a short run on the target machine measured (saved in the plan; see :mod:`ray_app.calibrate`).

    Attributes:
        batch_size: the expected batch size ``B`` of a loaded replica.
        step_seconds: per stage, ``{batch size: seconds of one model.step on a batch that size}``.
        input_bytes: per stage, bytes one sample carries into it (features, thresholds, FLOPs so far).
        call_s: CPU seconds of one handle call between two replicas (both sides and Ray's own processes).
        sample_s: CPU seconds per sample in a call (answers back, bookkeeping).
        byte_s: CPU seconds per byte sent.
        meta: where and how it was measured (device, threads, host, date).
        batch_wait_s: the deployments' batch wait (``batch_wait_timeout_s``). A deployment's batch then holds
            the survivors of the upstream batches that arrive within one wait, at most ``batch_size``: with one
            upstream replica that runs a batch every ``T`` seconds, ``max(1, wait / T)`` of them. None: every
            deployment gets full batches (many upstream replicas, or a long wait).
    """

    batch_size: int
    step_seconds: list[dict[int, float]]
    input_bytes: list[int]
    call_s: float
    sample_s: float
    byte_s: float
    meta: dict[str, Any] = field(default_factory=dict)
    batch_wait_s: Optional[float] = None

    def __post_init__(self) -> None:
        self.step_seconds = [{int(b): float(t) for b, t in s.items()} for s in self.step_seconds]
        if len(self.step_seconds) != len(self.input_bytes) or not self.step_seconds:
            raise ValueError("a calibration needs step times and input bytes for every stage")
        if any(not s for s in self.step_seconds) or self.batch_size < 1:
            raise ValueError("a calibration needs at least one measured batch size per stage and batch_size >= 1")

    def per_sample(self, k: int, b: float) -> float:
        """Seconds per sample of stage ``k`` on a batch of ``b`` samples (batch time interpolated linearly
        between measured sizes; below the smallest, that size's per-sample time; above the largest, its)."""
        sizes = sorted(self.step_seconds[k])
        times = self.step_seconds[k]
        if b <= sizes[0]:
            return times[sizes[0]] / sizes[0]
        if b >= sizes[-1]:
            return times[sizes[-1]] / sizes[-1]
        i = bisect.bisect_left(sizes, b)
        lo, hi = sizes[i - 1], sizes[i]
        t = times[lo] + (times[hi] - times[lo]) * (b - lo) / (hi - lo)
        return t / b

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["step_seconds"] = [{str(b): t for b, t in s.items()} for s in self.step_seconds]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        return cls(**{**d, "step_seconds": [{int(b): t for b, t in s.items()} for s in d["step_seconds"]]})


@dataclass
class GroupingCost:
    """Seconds per request of one grouping: compute per process run and hops per deployment.

    Attributes:
        grouping: the grouping.
        compute: per run (the Ingress's first, then each deployment's): compute seconds per request.
        hops: per deployment: seconds per request of the calls that reach it.
    """

    grouping: Grouping
    compute: list[float]
    hops: list[float]

    @property
    def total(self) -> float:
        return sum(self.compute) + sum(self.hops)


def grouping_cost(grouping: Grouping, reach: Sequence[float], cal: Calibration) -> GroupingCost:
    """Compute and hop seconds per request of ``grouping`` (see the module doc for the arithmetic)."""
    if grouping.num_stages != len(reach) or len(reach) != len(cal.step_seconds):
        raise ValueError(f"the grouping, exit rates and calibration disagree on the number of stages "
                         f"({grouping.num_stages}, {len(reach)}, {len(cal.step_seconds)}); re-run the calibration")
    B = float(cal.batch_size)
    compute, hops = [], []
    # The upstream run: its first stage (0 for the Ingress, which batches fresh requests), the samples of its
    # batch at that stage, and the seconds one of its batches takes.
    up_first, up_batch, up_period = 0, B, 0.0
    for i, run in enumerate([grouping.ingress, *grouping.groups]):
        batch, per_call = B, 0.0
        if i > 0:
            s = run[0]
            if cal.batch_wait_s is not None and up_period > 0:
                per_call = up_batch * reach[s] / reach[up_first] if reach[up_first] > 0 else 0.0
                batch = min(B, max(1.0, per_call * max(1.0, cal.batch_wait_s / up_period)))
            calls = reach[up_first] / up_batch  # one call per upstream batch
            hops.append(calls * cal.call_s + reach[s] * (cal.sample_s + cal.input_bytes[s] * cal.byte_s))
        first = reach[run[0]] if run else 0.0
        sizes = {k: max(1.0, batch * reach[k] / first) for k in run} if first > 0 else {}
        compute.append(sum(reach[k] * cal.per_sample(k, b) for k, b in sizes.items()))
        if run or i == 0:
            # A batch's period also holds the calls it takes in: each fresh request reaches the Ingress as one call
            # (an HTTP request costs at least a handle call), a deployment's batch as its upstream calls.
            taken = B if i == 0 else max(1.0, batch / per_call) if per_call > 0 else 1.0
            up_first, up_batch = (run[0] if run else 0), batch
            up_period = sum(cal.per_sample(k, b) * b for k, b in sizes.items()) + taken * cal.call_s
    return GroupingCost(grouping, compute, hops)


def choose_grouping(reach: Sequence[float], cal: Calibration, ingress_may_host: bool = True
                    ) -> tuple[GroupingCost, list[GroupingCost]]:
    """The cheapest grouping per request, and every grouping's cost, cheapest first (ties: fewer deployments).

    Args:
        reach: fraction of requests reaching each stage.
        cal: the measurements.
        ingress_may_host: False keeps every stage out of the Ingress (a CPU-only ingress in front of GPU stages).
    """
    costs = [grouping_cost(g, reach, cal) for g in Grouping.all(len(reach), ingress_may_host)]
    costs.sort(key=lambda c: (round(c.total, 12), len(c.grouping.groups)))
    return costs[0], costs


def boundaries(best: GroupingCost, reach: Sequence[float], cal: Calibration,
               ingress_may_host: bool = True) -> list[dict[str, Any]]:
    """For each stage ``k``, against the chosen grouping: the replica seconds per request a deployment starting
    at ``k`` frees (``freed_s``), what its hop costs (``hop_s``), and whether the chosen grouping has it (``split``).
    Stage 0 "split" means out of the Ingress. Without ``ingress_may_host``, stage 0 is always split (no figures)."""
    out = []
    cuts = set(best.grouping.cuts)
    n = len(reach)
    for k in range(n):
        if k == 0 and not ingress_may_host:
            out.append({"stage": 0, "freed_s": None, "hop_s": None, "split": True})
            continue
        other = grouping_cost(Grouping.from_cuts(n, cuts ^ {k}), reach, cal)
        split, whole = (best, other) if k in cuts else (other, best)
        out.append({"stage": k, "freed_s": sum(whole.compute) - sum(split.compute),
                    "hop_s": sum(split.hops) - sum(whole.hops), "split": k in cuts})
    return out


def explain(best: GroupingCost, reach: Sequence[float], cal: Calibration, ingress_may_host: bool = True) -> list[str]:
    """The choice in words: for each place a deployment could start, what splitting there frees and
    what the hop costs, measured against the chosen grouping."""
    lines = []
    for b in boundaries(best, reach, cal, ingress_may_host):
        k = b["stage"]
        if b["freed_s"] is None:
            lines.append("  stage 0 in a deployment: the Ingress (CPU only) hosts no stage when the stages run on GPUs")
            continue
        what = "out of the Ingress" if k == 0 else f"apart from stage {k - 1}"
        lines.append(f"  stage {k} {what}: frees {b['freed_s'] * 1e3:.3f} ms/request of replica time, the hop costs "
                     f"{b['hop_s'] * 1e3:.3f} ms/request -> {'split' if b['split'] else 'kept together'}")
    return lines


def describe(best: GroupingCost, costs: Sequence[GroupingCost], reach: Sequence[float], cal: Calibration,
             ingress_may_host: bool = True, top: int = 5) -> list[str]:
    """The planner's reasoning as printed lines: the measurements, the cheapest groupings, and why."""
    B = cal.batch_size
    lines = [f"calibration ({cal.meta.get('device', '?')}, {cal.meta.get('threads', '?')} thread(s), expected batch {B}): "
             f"a hop costs {cal.call_s * 1e3:.3f} ms CPU per call + {cal.sample_s * 1e3:.4f} ms per sample + "
             f"{cal.byte_s * 1e9:.3f} ms per MB",
             f"  {'stage':>5} {'reach':>6} {'ms/sample @1':>12} {f'ms/sample @{B}':>13} {'bytes in':>9}"]
    for k, r in enumerate(reach):
        lines.append(f"  {k:>5} {r:>6.3f} {cal.per_sample(k, 1) * 1e3:>12.3f} {cal.per_sample(k, B) * 1e3:>13.3f} "
                     f"{cal.input_bytes[k]:>9}")
    lines.append(f"cost per request of the {min(top, len(costs))} cheapest of {len(costs)} groupings "
                 f"(Ingress's stages | each deployment's):")
    for c in costs[:top]:
        lines.append(f"  {str(c.grouping):<18} {c.total * 1e3:8.3f} ms  (compute {sum(c.compute) * 1e3:.3f}, "
                     f"hops {sum(c.hops) * 1e3:.3f})")
    lines.append(f"chosen: {best.grouping} (deployments: {', '.join(best.grouping.names) or 'none, the Ingress runs all'})")
    return lines + explain(best, reach, cal, ingress_may_host)

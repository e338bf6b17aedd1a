"""Replica planner: resources per stage in proportion to the work that reaches it.

A sample reaches stage ``k`` only if it did not leave at exits ``0..k-1``, so with exit rates
``r_j`` (fractions of all requests leaving at exit ``j``, last = backbone head)::

    reach_k = 1 - (r_0 + ... + r_{k-1})          # P(a request reaches stage k); reach_0 = 1
    work_k  = reach_k * stage_flops_k             # FLOPs stage k spends per incoming request
    share_k = work_k / (work_0 + ... + work_{K-1})

Each stage gets ``share_k`` of the budget: ``share_k * G`` GPUs (as replicas with a fractional
``num_gpus`` that pack onto whole GPUs) or ``share_k`` of the CPUs (as replicas of a fixed size).
When several stages share a process (:mod:`ray_app.grouping`), the process gets the sum of their
shares (:func:`group_shares`, :func:`plan_groups`); which stages share one is chosen in
:mod:`ray_app.costmodel` from measurements. Pure arithmetic: no Ray here, so the CLI and the tests
run without a cluster.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .grouping import Grouping, deployment_name

__all__ = ["StagePlan", "calibrated_exit_rates", "stage_flops", "reach_probabilities", "work_shares", "group_shares",
           "plan_gpus", "plan_cpus", "plan_groups", "plan_baseline", "pack_fractions", "serve_config"]

GPU_STEP = 0.01  # num_gpus is rounded down to this grain, so fractions add up predictably


@dataclass
class StagePlan:
    """Resources of one deployment that hosts a run of stages (one stage in the per-stage layout).

    Attributes:
        stage: its first stage ``k``.
        reach: probability that a request reaches that stage.
        stage_flops: FLOPs of its segments + exits for one sample.
        share: its share of the total work.
        replicas: ``num_replicas``.
        num_cpus, num_gpus: per replica (``ray_actor_options``).
        stages: the stages it hosts (default: ``stage`` alone).
        name: the deployment name (default: ``Stage{k}`` / ``Stage{a}-{b}``; ``Ingress`` when the Ingress hosts them).
    """

    stage: int
    reach: float
    stage_flops: int
    share: float
    replicas: int
    num_cpus: float
    num_gpus: float = 0.0
    stages: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        self.stages = tuple(self.stages) or (self.stage,)
        self.name = self.name or deployment_name(self.stages)


def calibrated_exit_rates(config) -> Optional[list[float]]:
    """The exit rates ``branched build`` stored in ``config.meta["calibration"]``, or None."""
    rates = (config.meta.get("calibration") or {}).get("exit_rates")
    return [float(r) for r in rates] if rates else None


def stage_flops(config) -> list[int]:
    """Per-sample FLOPs of each stage (segment ``k`` + exit ``k``) from a model config's cost table."""
    from branched.cost import CostTable

    if not config.cost:
        raise ValueError("the model config has no cost table; rebuild it with `branched build`")
    cost = CostTable.from_dict(config.cost)
    return [cost.stage_flops(k) for k in range(len(cost.exit_flops))]


def reach_probabilities(exit_rates: Sequence[float]) -> list[float]:
    """``reach_k = 1 - sum(exit_rates[:k])``: the fraction of requests that stage ``k`` sees.

    Raises:
        ValueError: negative rates, or rates that do not sum to 1 (within 1e-3).
    """
    if any(r < 0 for r in exit_rates) or abs(sum(exit_rates) - 1.0) > 1e-3:
        raise ValueError(f"exit rates must be >= 0 and sum to 1 (last = backbone head), got {list(exit_rates)}")
    reach, left = [], 1.0
    for r in exit_rates:
        reach.append(max(left, 0.0))
        left -= r
    return reach


def work_shares(stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]]) -> tuple[list[float], list[float]]:
    """``(reach, share)`` per stage; no rates means every request reaches every stage.

    Args:
        stage_flops: ``model.cost.stage_flops(k)`` for each stage.
        exit_rates: one per exit (last = backbone head), or None.
    """
    if exit_rates is not None and len(exit_rates) != len(stage_flops):
        raise ValueError(f"need {len(stage_flops)} exit rates (one per exit, last = backbone head), "
                         f"got {len(exit_rates)}")
    reach = reach_probabilities(exit_rates) if exit_rates is not None else [1.0] * len(stage_flops)
    work = [p * f for p, f in zip(reach, stage_flops)]
    total = sum(work)
    if total <= 0:
        raise ValueError("no stage does any work; check the exit rates and the model's cost table")
    return reach, [w / total for w in work]


def group_shares(stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]], grouping: Grouping,
                 work: Optional[Sequence[float]] = None) -> list[float]:
    """Share of the work of each process run: the Ingress's first (0 when it hosts no stage), then each deployment's.

    Args:
        stage_flops, exit_rates: as for :func:`work_shares` (FLOPs-weighted shares).
        grouping: which process runs which stages.
        work: measured seconds per request of each run instead (``GroupingCost.compute``), if known.
    """
    if work is not None:
        total = sum(work)
        return [w / total if total > 0 else 0.0 for w in work]
    _, shares = work_shares(stage_flops, exit_rates)
    return [sum(shares[k] for k in run) for run in (grouping.ingress, *grouping.groups)]


def _largest_remainder(total: int, shares: Sequence[float], minimum: int = 1) -> list[int]:
    """Split ``total`` integer units by ``shares``, at least ``minimum`` each (needs ``total >= n*minimum``)."""
    spare = total - minimum * len(shares)
    exact = [s * spare for s in shares]
    units = [math.floor(e) for e in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - units[i], reverse=True)
    for i in order[: spare - sum(units)]:
        units[i] += 1
    return [u + minimum for u in units]


def pack_fractions(fractions: Sequence[float], gpus: int) -> Optional[list[list[int]]]:
    """First-fit-decreasing of replica GPU fractions onto ``gpus`` whole GPUs.

    Ray places a replica with ``num_gpus < 1`` on a single GPU, so a plan is only schedulable if its
    fractions pack. Returns the replica indices on each GPU, or None if they do not fit.
    """
    bins: list[list[int]] = [[] for _ in range(gpus)]
    free = [1.0] * gpus
    for i in sorted(range(len(fractions)), key=lambda i: fractions[i], reverse=True):
        f = fractions[i]
        if f >= 1.0:
            need = int(round(f))
            whole = [g for g in range(gpus) if free[g] >= 1.0 - 1e-9][:need]
            if len(whole) < need:
                return None
            for g in whole:
                bins[g].append(i)
                free[g] = 0.0
            continue
        g = next((g for g in range(gpus) if free[g] + 1e-9 >= f), None)
        if g is None:
            return None
        bins[g].append(i)
        free[g] -= f
    return bins


def _fit(want: Sequence[float], replicas: Sequence[int], gpus: int) -> tuple[float, list[float]]:
    """Largest common scale (<= 1) at which ``want[k] / replicas[k]`` per replica packs, and those fractions."""
    scale = 1.0
    while scale >= 0.05:
        per = [min(1.0, max(GPU_STEP, math.floor(w * scale / r / GPU_STEP + 1e-9) * GPU_STEP))
               for w, r in zip(want, replicas)]
        per = [round(p, 2) for p in per]
        if pack_fractions([p for p, r in zip(per, replicas) for _ in range(r)], gpus) is not None:
            return scale, per
        scale *= 0.97
    return 0.0, []


def _gpu_replicas(shares: Sequence[float], gpus: int) -> tuple[list[int], list[float]]:
    """Replicas and per-replica ``num_gpus`` giving each unit about ``share * gpus`` GPUs (see :func:`plan_gpus`)."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    want = [s * gpus for s in shares]
    least = [max(1, math.ceil(w - 1e-9)) for w in want]
    extra = range(3) if 3 ** len(want) <= 729 else range(1)
    best: tuple[float, int, list[int], list[float]] = (0.0, 0, [], [])
    for add in itertools.product(extra, repeat=len(want)):
        replicas = [n + a for n, a in zip(least, add)]
        if sum(replicas) > max(gpus * 100, len(want)):  # never below the 0.01 grain
            continue
        scale, per = _fit(want, replicas, gpus)
        if (scale, -sum(replicas)) > (best[0], best[1]):
            best = (scale, -sum(replicas), replicas, per)
    if not best[2]:
        raise ValueError(f"{len(shares)} deployments do not fit on {gpus} GPU(s); give more GPUs")
    return best[2], best[3]


def _cpu_replicas(shares: Sequence[float], cpus: float, cpus_per_replica: float) -> tuple[list[int], list[float]]:
    """Replicas and per-replica ``num_cpus`` giving each unit about ``share * cpus`` CPUs (see :func:`plan_cpus`)."""
    if cpus <= 0 or cpus_per_replica <= 0:
        raise ValueError(f"--cpus (less the ingress's) and --cpus-per-replica must be > 0, got {cpus:g} and "
                         f"{cpus_per_replica:g}")
    slots = int(math.floor(cpus / cpus_per_replica + 1e-9))
    if slots >= len(shares):
        return _largest_remainder(slots, shares), [cpus_per_replica] * len(shares)
    return [1] * len(shares), [max(0.01, math.floor(s * cpus * 100) / 100) for s in shares]


def plan_gpus(stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]], gpus: int,
              cpus_per_replica: float = 1.0) -> list[StagePlan]:
    """Give stage ``k`` about ``share_k * gpus`` GPUs, as replicas with equal fractional ``num_gpus``.

    A stage needs at least ``ceil(share_k * gpus)`` replicas (a replica holds at most one GPU). Ray
    puts a fractional replica on one GPU, so the per-replica fractions (rounded down to 0.01) must
    pack onto the GPUs; among up to two extra replicas per stage, the plan that packs with the
    least common shrinking of the fractions wins (then the one with fewer replicas).
    """
    reach, shares = work_shares(stage_flops, exit_rates)
    replicas, per = _gpu_replicas(shares, gpus)
    return [StagePlan(k, reach[k], int(stage_flops[k]), shares[k], replicas[k], cpus_per_replica, per[k])
            for k in range(len(stage_flops))]


def plan_cpus(stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]], cpus: float,
              cpus_per_replica: float = 1.0) -> list[StagePlan]:
    """Give stage ``k`` about ``share_k * cpus`` CPUs.

    With room for at least one ``cpus_per_replica``-sized replica per stage, the replicas are
    split by largest remainder (at least one each); otherwise every stage is one replica with a
    fractional ``num_cpus`` of ``share_k * cpus`` (at least 0.01).
    """
    reach, shares = work_shares(stage_flops, exit_rates)
    replicas, per = _cpu_replicas(shares, cpus, cpus_per_replica)
    return [StagePlan(k, reach[k], int(stage_flops[k]), shares[k], replicas[k], per[k])
            for k in range(len(stage_flops))]


def plan_groups(grouping: Grouping, stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]],
                gpus: Optional[int] = None, cpus: Optional[float] = None, cpus_per_replica: float = 1.0,
                ingress_replicas: int = 1, ingress_cpus: float = 1.0,
                work: Optional[Sequence[float]] = None) -> list[StagePlan]:
    """Resources of every process run of ``grouping`` that computes, in order: an ``Ingress`` entry first
    when the Ingress hosts stages, then one entry per deployment.

    With ``gpus``, the deployments share the GPUs as :func:`plan_gpus` shares them among stages (the
    Ingress may not host stages then). With ``cpus``, an Ingress that hosts no stage keeps
    ``ingress_replicas x ingress_cpus`` and the rest is split as :func:`plan_cpus` splits it; an Ingress
    that hosts stages takes its share of all of them, in at least ``ingress_replicas`` replicas.

    Args:
        work: measured seconds per request of each run (Ingress first), to share by instead of FLOPs.
    """
    if (gpus is None) == (cpus is None):
        raise ValueError("give the budget as exactly one of gpus or cpus")
    reach, _ = work_shares(stage_flops, exit_rates)
    runs = [grouping.ingress, *grouping.groups]
    shares = group_shares(stage_flops, exit_rates, grouping, work)
    if not grouping.ingress:
        runs, shares = runs[1:], shares[1:]
        total = sum(shares)
        shares = [s / total for s in shares]
    if gpus is not None:
        if grouping.ingress:
            raise ValueError("with --gpus the stages run on GPU replicas; the Ingress (CPU) cannot host stages")
        replicas, per = _gpu_replicas(shares, gpus)
        options = [(cpus_per_replica, g) for g in per]
    else:
        budget = cpus if grouping.ingress else cpus - ingress_replicas * ingress_cpus
        replicas, per = _cpu_replicas(shares, budget, cpus_per_replica)
        if grouping.ingress and replicas[0] < ingress_replicas:
            replicas[0] = ingress_replicas
        options = [(c, 0.0) for c in per]
    plans = []
    for i, (run, share) in enumerate(zip(runs, shares)):
        name = "Ingress" if i == 0 and grouping.ingress else ""
        plans.append(StagePlan(run[0], reach[run[0]], int(sum(stage_flops[k] for k in run)), share, replicas[i],
                               options[i][0], options[i][1], tuple(run), name))
    return plans


def plan_baseline(gpus: int = 0, cpus: float = 0.0, cpus_per_replica: float = 1.0) -> tuple[int, dict[str, float]]:
    """``(num_replicas, ray_actor_options)`` of the one-deployment baseline on the same budget.

    ``gpus`` replicas of one GPU each, or the CPUs cut into ``cpus_per_replica``-sized replicas
    (one replica with all of them when they are fewer than one replica's worth).
    """
    if gpus:
        return gpus, {"num_cpus": cpus_per_replica, "num_gpus": 1}
    slots = int(math.floor(cpus / cpus_per_replica + 1e-9))
    if slots >= 1:
        return slots, {"num_cpus": cpus_per_replica}
    return 1, {"num_cpus": max(0.01, round(cpus, 2))}


def serve_config(model_dir: str, plans: Sequence[StagePlan], baseline: Optional[tuple[int, dict]] = None,
                 staged: bool = True, ingress_replicas: int = 1, ingress_cpus: float = 1.0,
                 host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32,
                 record: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """A Serve config (the ``serve run`` / ``serve deploy`` schema) with the planned resources.

    Args:
        model_dir: the model directory every node can read.
        plans: one :class:`StagePlan` per deployment that computes (:func:`plan_groups`; an ``Ingress``
            entry first when the Ingress hosts stages), or one per stage (:func:`plan_cpus` / :func:`plan_gpus`).
        baseline: ``(num_replicas, ray_actor_options)`` of the baseline app (:func:`plan_baseline`),
            or None to leave it out.
        staged: include the staged app.
        ingress_replicas, ingress_cpus: the staged app's HTTP ingress when it hosts no stage (decodes images; CPU only).
        host, port: where Serve's HTTP proxy listens.
        max_batch_size: ``@serve.batch`` size of every stage and of the baseline.
        record: what the planner measured and decided, kept in the staged app's ``args.plan``.
    """
    args = {"model_dir": model_dir, "max_batch_size": max_batch_size}
    ongoing = max(256, 8 * max_batch_size)  # a stage holds a request until later stages answer it
    applications = []
    if staged:
        ingress = plans[0] if plans and plans[0].name == "Ingress" else None
        groups = [p for p in plans if p is not ingress]
        grouping = Grouping(ingress.stages if ingress else (), tuple(p.stages for p in groups))
        deployments = [{"name": "Ingress", "num_replicas": ingress.replicas if ingress else ingress_replicas,
                        "max_ongoing_requests": ongoing,
                        "ray_actor_options": {"num_cpus": ingress.num_cpus if ingress else ingress_cpus}}]
        for p in groups:
            options: dict[str, Any] = {"num_cpus": p.num_cpus}
            if p.num_gpus:
                options["num_gpus"] = p.num_gpus
            deployments.append({"name": p.name, "num_replicas": p.replicas,
                                "max_ongoing_requests": ongoing, "ray_actor_options": options})
        staged_args = {**args, "grouping": str(grouping), **({"plan": record} if record else {})}
        applications.append({"name": "staged", "route_prefix": "/", "import_path": "ray_app.app:staged_app",
                             "args": staged_args, "deployments": deployments})
    if baseline is not None:
        replicas, options = baseline
        applications.append({"name": "baseline", "route_prefix": "/baseline",
                             "import_path": "ray_app.app:baseline_app", "args": dict(args),
                             "deployments": [{"name": "Baseline", "num_replicas": replicas,
                                              "max_ongoing_requests": ongoing, "ray_actor_options": dict(options)}]})
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": applications}

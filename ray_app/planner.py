"""Replica planner: resources per stage in proportion to the work that reaches it.

A sample reaches stage ``k`` only if it did not leave at exits ``0..k-1``, so with exit rates
``r_j`` (fractions of all requests leaving at exit ``j``, last = backbone head)::

    reach_k = 1 - (r_0 + ... + r_{k-1})          # P(a request reaches stage k); reach_0 = 1
    work_k  = reach_k * stage_flops_k             # FLOPs stage k spends per incoming request
    share_k = work_k / (work_0 + ... + work_{K-1})

Each stage gets ``share_k`` of the budget: ``share_k * G`` GPUs (as replicas with a fractional
``num_gpus`` that pack onto whole GPUs) or ``share_k`` of the CPUs (as replicas of a fixed size).
Pure arithmetic: no Ray here, so the CLI and the tests run without a cluster.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

__all__ = ["StagePlan", "calibrated_exit_rates", "stage_flops", "reach_probabilities", "work_shares", "plan_gpus",
           "plan_cpus", "plan_baseline", "pack_fractions", "serve_config", "place_deployments", "replica_demands",
           "demand_totals", "unplaceable"]

GPU_STEP = 0.01  # num_gpus is rounded down to this grain, so fractions add up predictably


@dataclass
class StagePlan:
    """Resources of one stage deployment.

    Attributes:
        stage: stage index ``k``.
        reach: probability that a request reaches the stage.
        stage_flops: FLOPs of segment ``k`` + exit ``k`` for one sample.
        share: the stage's share of the total work.
        replicas: ``num_replicas``.
        num_cpus, num_gpus: per replica (``ray_actor_options``).
    """

    stage: int
    reach: float
    stage_flops: int
    share: float
    replicas: int
    num_cpus: float
    num_gpus: float = 0.0


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


def plan_gpus(stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]], gpus: int,
              cpus_per_replica: float = 1.0) -> list[StagePlan]:
    """Give stage ``k`` about ``share_k * gpus`` GPUs, as replicas with equal fractional ``num_gpus``.

    A stage needs at least ``ceil(share_k * gpus)`` replicas (a replica holds at most one GPU). Ray
    puts a fractional replica on one GPU, so the per-replica fractions (rounded down to 0.01) must
    pack onto the GPUs; among up to two extra replicas per stage, the plan that packs with the
    least common shrinking of the fractions wins (then the one with fewer replicas).
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    reach, shares = work_shares(stage_flops, exit_rates)
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
    scale, _, replicas, per = best
    if not replicas:
        raise ValueError(f"{len(stage_flops)} stages do not fit on {gpus} GPU(s); give more GPUs")
    return [StagePlan(k, reach[k], int(stage_flops[k]), shares[k], replicas[k], cpus_per_replica, per[k])
            for k in range(len(stage_flops))]


def plan_cpus(stage_flops: Sequence[int], exit_rates: Optional[Sequence[float]], cpus: float,
              cpus_per_replica: float = 1.0) -> list[StagePlan]:
    """Give stage ``k`` about ``share_k * cpus`` CPUs.

    With room for at least one ``cpus_per_replica``-sized replica per stage, the replicas are
    split by largest remainder (at least one each); otherwise every stage is one replica with a
    fractional ``num_cpus`` of ``share_k * cpus`` (at least 0.01).
    """
    if cpus <= 0 or cpus_per_replica <= 0:
        raise ValueError("--cpus and --cpus-per-replica must be > 0")
    reach, shares = work_shares(stage_flops, exit_rates)
    slots = int(math.floor(cpus / cpus_per_replica + 1e-9))
    n = len(stage_flops)
    if slots >= n:
        reps = _largest_remainder(slots, shares)
        return [StagePlan(k, reach[k], int(stage_flops[k]), shares[k], reps[k], cpus_per_replica) for k in range(n)]
    return [StagePlan(k, reach[k], int(stage_flops[k]), shares[k], 1,
                      max(0.01, math.floor(shares[k] * cpus * 100) / 100)) for k in range(n)]


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
                 host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 32) -> dict[str, Any]:
    """A Serve config (the ``serve run`` / ``serve deploy`` schema) with the planned resources.

    Args:
        model_dir: the model directory every node can read.
        plans: one :class:`StagePlan` per stage.
        baseline: ``(num_replicas, ray_actor_options)`` of the baseline app (:func:`plan_baseline`),
            or None to leave it out.
        staged: include the staged app.
        ingress_replicas, ingress_cpus: the staged app's HTTP ingress (decodes images; CPU only).
        host, port: where Serve's HTTP proxy listens.
        max_batch_size: ``@serve.batch`` size of every stage and of the baseline.
    """
    args = {"model_dir": model_dir, "max_batch_size": max_batch_size}
    ongoing = max(256, 8 * max_batch_size)  # a stage holds a request until later stages answer it
    applications = []
    if staged:
        deployments = [{"name": "Ingress", "num_replicas": ingress_replicas, "max_ongoing_requests": ongoing,
                        "ray_actor_options": {"num_cpus": ingress_cpus}}]
        for p in plans:
            options: dict[str, Any] = {"num_cpus": p.num_cpus}
            if p.num_gpus:
                options["num_gpus"] = p.num_gpus
            deployments.append({"name": f"Stage{p.stage}", "num_replicas": p.replicas,
                                "max_ongoing_requests": ongoing, "ray_actor_options": options})
        applications.append({"name": "staged", "route_prefix": "/", "import_path": "ray_app.app:staged_app",
                             "args": dict(args), "deployments": deployments})
    if baseline is not None:
        replicas, options = baseline
        applications.append({"name": "baseline", "route_prefix": "/baseline",
                             "import_path": "ray_app.app:baseline_app", "args": dict(args),
                             "deployments": [{"name": "Baseline", "num_replicas": replicas,
                                              "max_ongoing_requests": ongoing, "ray_actor_options": dict(options)}]})
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
            "applications": applications}


# ---------------------------------------------------------------------------------------- placement
def place_deployments(doc: dict[str, Any], pins: Optional[dict[str, str]] = None,
                      prefer: Optional[dict[str, tuple[str, str]]] = None,
                      proxy_location: Optional[str] = None) -> dict[str, Any]:
    """Pin deployments of a :func:`serve_config` document to nodes (in place; returns ``doc``).

    Args:
        doc: the Serve config.
        pins: deployment name -> a custom resource that only the chosen node(s) have (``ray start
            --resources '{"node_b": 1}'``). A hard constraint: the replicas ask 0.01 of it, so they run
            only there, and a replica lost with its node waits until such a node is back.
        prefer: deployment name -> ``(label key, value)`` of the preferred node(s) (``ray start --labels
            key=value``). A soft constraint (``label_selector`` with a ``fallback_strategy`` to any other
            node), so Serve places a lost replica on a surviving node.
        proxy_location: ``EveryNode`` (one HTTP proxy per node) or ``HeadOnly``.

    Raises:
        ValueError: a named deployment is not in the config.
    """
    deployments = {d["name"]: d for app in doc["applications"] for d in app.get("deployments", [])}
    for name in [*(pins or {}), *(prefer or {})]:
        if name not in deployments:
            raise ValueError(f"no deployment {name!r} in the plan; it has {', '.join(deployments)}")
    for name, resource in (pins or {}).items():
        options = deployments[name].setdefault("ray_actor_options", {})
        options.setdefault("resources", {})[resource] = 0.01
    for name, (key, value) in (prefer or {}).items():
        options = deployments[name].setdefault("ray_actor_options", {})
        options["label_selector"] = {key: value}
        options["fallback_strategy"] = [{"label_selector": {key: f"!{value}"}}]
    if proxy_location:
        doc["proxy_location"] = proxy_location
    return doc


def replica_demands(doc: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """``(app/deployment, resources of one replica)`` for every replica a Serve config asks for.

    ``CPU`` is ``num_cpus`` (Ray's default of 1 when unset), ``GPU`` is ``num_gpus``, custom resources as
    given; Serve's controller and proxies ask for none.
    """
    out = []
    for app in doc["applications"]:
        for d in app.get("deployments", []):
            options = d.get("ray_actor_options") or {}
            need = {"CPU": float(options.get("num_cpus", 1.0)), "GPU": float(options.get("num_gpus", 0.0)),
                    **{k: float(v) for k, v in (options.get("resources") or {}).items()}}
            out += [(f"{app['name']}/{d['name']}", {k: v for k, v in need.items() if v})] * int(d.get("num_replicas", 1))
    return out


def demand_totals(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Resources each application of a Serve config asks for, summed over its replicas: ``{app: {CPU: ...}}``."""
    totals: dict[str, dict[str, float]] = {a["name"]: {} for a in doc["applications"]}
    for name, need in replica_demands(doc):
        app = totals[name.split("/")[0]]
        for k, v in need.items():
            app[k] = round(app.get(k, 0.0) + v, 4)
    return totals


def unplaceable(doc: dict[str, Any], nodes: Sequence[dict[str, float]]) -> list[str]:
    """The replicas of a Serve config that do not fit on ``nodes`` (each node's total resources), by
    first-fit-decreasing; empty when everything fits.

    Ray places a replica on one node with all its resources free, so a plan whose sum fits the cluster
    may still leave a replica without a node; Serve then keeps the deployment ``UPDATING`` forever.
    """
    free = [dict(n) for n in nodes]
    left = []
    for name, need in sorted(replica_demands(doc), key=lambda r: (r[1].get("GPU", 0), r[1].get("CPU", 0)), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) + 1e-9 >= v for k, v in need.items())), None)
        if node is None:
            left.append(f"{name} {{{', '.join(f'{k}: {v:g}' for k, v in sorted(need.items()))}}}")
            continue
        for k, v in need.items():
            node[k] -= v
    return left

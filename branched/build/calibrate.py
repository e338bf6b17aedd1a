"""Per-exit thresholds for an accuracy or compute budget, with a distribution-free guarantee.

Everything here works on :class:`~branched.build.records.ExitRecords`: every exit's prediction and
score and the cost of reaching it, recorded once per sample, so routing under any thresholds is a
table look-up that reproduces :meth:`BranchedModel.routed_forward` exactly.

The loss the guarantee controls is the **disagreement loss**
``L = 1[routed prediction wrong and backbone prediction right]``. Its mean ``R`` bounds the
accuracy drop from above: ``acc(backbone) - acc(routed) = R - P(routed right, backbone wrong) <= R``.
``L`` is Bernoulli, so the exact binomial tail gives valid p-values (Hoeffding-Bentkus is the
option for other bounded losses). ``loss="net"`` certifies the drop itself, ``R - P(routed right,
backbone wrong)``: on natural images the exits fix about as many backbone errors as they make, so
the drop sits well below ``R`` and a bound on ``R`` wastes most of the budget.

Procedure (Learn-then-Test, Angelopoulos et al. 2021):

1. Split the calibration records (seeded) into a *path* part and a *certify* part.
2. On the path part, build a monotone path of threshold vectors from "every exit off" (the
   backbone) to "everything leaves at exit 0": each step lowers one exit's threshold by one grid
   level, choosing the exit that saves the most cost per unit of added disagreement.
3. On the certify part, test ``H_j: R(path[j]) > epsilon`` for every point with a binomial p-value,
   as a fixed sequence along the path (stop at the first non-rejection) or with Bonferroni.
   The rejected set is certified: with probability >= 1 - delta, *every* certified point has
   ``R <= epsilon`` on new data from the same distribution, so the accuracy drop is <= epsilon.
4. ``max_drop``: ship the cheapest certified point (cost measured on the whole calibration split).
   ``max_cost``: ship the most accurate point within the cost budget, and state the
   Bonferroni-simultaneous upper confidence bound on its drop (valid however the point was chosen).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .guarantee import (FAMILIES, LOSSES, P_VALUES_BY_LOSS, crc_last_valid, loss_p_value, loss_upper_bound,
                        ltt_certify, samples_needed)
from .records import ExitRecords

__all__ = ["split_calibration", "choose_policy", "Calibration", "threshold_path", "calibrate", "GUARANTEES"]

#: ``ltt``: with probability >= 1 - delta the drop is <= epsilon (Learn-then-Test); ``crc``: the expected
#: drop is <= epsilon (conformal risk control), closer to the empirical point, a weaker promise.
GUARANTEES = ("ltt", "crc")


# ---------------------------------------------------------------- the threshold path
def _grid(scores: np.ndarray, levels: int) -> np.ndarray:
    """Descending thresholds for one exit: inf, then midpoints between distinct observed scores
    at about ``levels`` evenly spaced quantiles, then 0. Midpoints keep every sample clear of a
    threshold, so float noise between batch shapes cannot flip a routing decision."""
    u = np.unique(scores)[::-1]
    if len(u) < 2:
        return np.array([np.inf, 0.0])
    mids = (u[:-1] + u[1:]) / 2
    pick = np.unique(np.round(np.linspace(0, len(mids) - 1, min(levels, len(mids)))).astype(int))
    return np.concatenate([[np.inf], mids[pick], [0.0]])


def _switch_on_levels(n: int) -> list[int]:
    """Grid levels at which an exit that is off may switch on: the first ten, then every fifth (dozens of exits
    times every level at every step would make the sweep quadratic for nothing; later steps refine by one level)."""
    return [*range(1, min(n, 11)), *range(11, n, 5)]


def threshold_path(records: ExitRecords, levels: int = 50, switch_off: bool = False) -> list[list[float]]:
    """A greedy path of threshold vectors from all-off (the backbone) towards the cheapest point.

    Each step moves one exit: an exit that is on lowers its threshold by one grid level; an exit that
    is off may switch on at any level, because its head then costs every sample that passes it and
    the first level alone rarely pays for that. Moves that save nothing come first, then moves that add
    no disagreement on the path part, the smallest saving first (a big jump that looks free here may
    fail the certify part's test, and the fixed-sequence test stops at the first failure), then the
    move that adds the least disagreement per unit of cost saved. Switching an exit on must save cost,
    so cost never rises along the path, and an exit whose head never pays for itself stays off.

    With ``switch_off``, an exit that is on may also switch off again when that saves cost: once earlier exits
    take most of its samples, its head can cost more than the few it still lets out save. That is a real case
    with measured head costs (4-17x their FLOPs on CIFAR-10 ResNet-56, where it took 27 exits down to 11). With
    FLOPs head costs a head is nearly free, switching it off saves next to nothing, and allowing it only made
    the path zigzag (off, then on again further down: a certified 0.523 of the backbone against 0.491).
    """
    k1 = records.scores.shape[1]
    if k1 == 0:
        return [[]]
    grids = [_grid(records.scores[:, k], levels) for k in range(k1)]
    level = [0] * k1
    rows = np.arange(len(records))
    backbone = records.backbone_correct

    def measure(lv: list[int]) -> tuple[float, float]:
        thresholds = [grids[k][lv[k]] for k in range(k1)]
        exits = records.route(thresholds)
        wrong = (records.preds[rows, exits] != records.labels) & backbone
        return float(wrong.sum()), float(records.sample_costs(exits, thresholds).sum())

    path = [[float(grids[k][0]) for k in range(k1)]]
    risk, cost = measure(level)
    while True:
        best = None
        for k in range(k1):
            if level[k] == len(grids[k]) - 1:
                continue
            for target in (_switch_on_levels(len(grids[k])) if level[k] == 0 else (level[k] + 1, *([0] if switch_off else []))):
                lv = level.copy()
                lv[k] = target
                r, c = measure(lv)
                saved, added = cost - c, r - risk
                if (level[k] == 0 or target == 0) and saved <= 1e-12:
                    continue  # switching an exit on must pay for its head, switching it off must save one
                # Free moves (no saving) first; then moves that add no disagreement, the smallest first (one
                # big jump that looks free on the path part can fail the certify part's test and, the tests
                # being a fixed sequence, end the certified path there); then by disagreement per cost saved.
                if saved <= 1e-12:
                    key = (0, 0.0, 0.0)
                elif added <= 0:
                    key = (1, 0.0, saved)
                else:
                    key = (2, added / saved, -saved)
                if best is None or key < best[0]:
                    best = (key, lv, r, c)
        if best is None:
            return path
        _, level, risk, cost = best
        path.append([float(grids[k][level[k]]) for k in range(k1)])


# ---------------------------------------------------------------- choosing an operating point
def _with_head_costs(records: ExitRecords, head_costs: Optional[np.ndarray]) -> ExitRecords:
    """The same records with other head costs (to order the path by), or the records themselves."""
    if head_costs is None:
        return records
    if len(head_costs) != records.num_exits:
        raise ValueError(f"{len(head_costs)} head costs for {records.num_exits} exits")
    return dataclasses.replace(records, head_costs=np.asarray(head_costs, dtype=np.float64))


def split_calibration(n: int, path_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, disjoint (path, certify) index sets of the calibration records."""
    perm = np.random.default_rng(seed).permutation(n)
    n_path = int(round(path_fraction * n))
    if n_path < 2 or n - n_path < 2:
        raise ValueError(f"{n} calibration samples are too few to build and certify thresholds")
    return perm[:n_path], perm[n_path:]


def choose_policy(records: dict[str, ExitRecords], max_drop: Optional[float] = None,
                  max_cost: Optional[float] = None, path_fraction: float = 0.3, seed: int = 0,
                  levels: int = 50, path_head_costs: Optional[np.ndarray] = None) -> tuple[str, dict[str, float]]:
    """The exit policy whose threshold path does best on the *path* part of the calibration split.

    Only the path part is looked at (the same seeded split :func:`calibrate` makes), so the
    certify part stays untouched and the Learn-then-Test guarantee keeps its validity.
    Score: with ``max_cost``, the best accuracy within the budget; otherwise the least cost at
    disagreement risk <= ``max_drop`` (default 0.01). Ties go to the first policy given.

    Returns:
        The chosen policy and each policy's score (higher is better).
    """
    eps = 0.01 if max_drop is None and max_cost is None else max_drop
    scores: dict[str, float] = {}
    for name, rec in records.items():
        part = _with_head_costs(rec, path_head_costs).subset(split_calibration(len(rec), path_fraction, seed)[0])
        points = [part.point(t) for t in threshold_path(part, levels, switch_off=path_head_costs is not None)]
        if max_cost is not None:
            fits = [p["accuracy"] for p in points if p["cost_fraction"] <= max_cost + 1e-12]
            scores[name] = max(fits) if fits else -math.inf
        else:
            fits = [p["cost_fraction"] for p in points if p["risk"] <= eps]
            scores[name] = -min(fits) if fits else -math.inf
    best = max(scores.values())
    return next(n for n, v in scores.items() if v == best), scores


@dataclass
class Calibration:
    """The outcome of :func:`calibrate`.

    Attributes:
        thresholds: the chosen per-exit thresholds.
        report: JSON-ready summary stored as ``config.meta["calibration"]`` (includes ``curve``).
        path: every threshold vector of the path, in test order (cost falling).
        calib_points: :meth:`ExitRecords.point` of each path entry on the whole calibration split.
        certify_points: the same on the certify part.
        p_values: per path entry (None for entry 0, the backbone itself, whose risk is 0 by construction).
        certified: per path entry, whether Learn-then-Test certified it (``max_drop`` only).
        chosen: index of the chosen path entry.
    """

    thresholds: list[float]
    report: dict
    path: list[list[float]]
    calib_points: list[dict]
    certify_points: list[dict]
    p_values: list[Optional[float]]
    certified: list[bool]
    chosen: int


def _what_would_certify(points: list[dict], cost: list[float], eps: float, delta: float, p_value_method: str,
                        path_fraction: float, kind: str, loss: str = "harm") -> str:
    """What the requested budget would need: the empirical point, and the calibration size that would certify it."""
    key = "drop" if loss == "net" else "risk"
    within = [j for j in range(1, len(points)) if points[j][key] < eps]
    if not within:
        return "No early-exit point stays within the budget even on the calibration data: better exits are needed."
    j = min(within, key=lambda i: cost[i])
    p = points[j]
    head = (f"The cheapest point within it on the calibration data costs {cost[j]:.3f} "
            f"(drop {p['drop']:+.4f}, risk {p['risk']:.4f}).")
    if kind == "crc":
        return head + " Conformal risk control needs about 1 / (epsilon - risk) certify samples: calibrate on more data."
    helps = p["risk"] - p["drop"] if loss == "net" else None
    n = samples_needed(p["risk"], eps, delta, p_value_method, help_rate=helps)
    if n is None:
        return head + " No calibration size would certify it at this delta."
    return head + (f" Certifying it at delta {delta:g} needs about {n} certify samples "
                   f"({int(math.ceil(n / (1 - path_fraction)))} calibration images with path fraction {path_fraction:g}).")


def _pareto_curve(points: list[dict], limit: int) -> list[dict]:
    """Points not beaten by a cheaper one, cheapest first, thinned evenly to at most ``limit``."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["cost_fraction"], -p["accuracy"])):
        if p["accuracy"] > best:
            front.append({k: p[k] for k in ("thresholds", "cost_fraction", "accuracy", "drop", "risk")})
            best = p["accuracy"]
    if len(front) > limit:
        keep = np.unique(np.round(np.linspace(0, len(front) - 1, limit)).astype(int))
        front = [front[i] for i in keep]
    return front


def calibrate(records: ExitRecords, max_drop: Optional[float] = None, max_cost: Optional[float] = None,
              delta: float = 0.1, family: str = "fixed_sequence", p_value_method: Optional[str] = None,
              select: str = "ltt", path_fraction: float = 0.3, levels: int = 50, seed: int = 0,
              curve_points: int = 64, guarantee: str = "ltt", loss: str = "harm",
              path_head_costs: Optional[np.ndarray] = None) -> Calibration:
    """Choose thresholds on calibration records for an accuracy budget or a compute budget.

    Args:
        records: :func:`collect_records` on the calibration split.
        max_drop: accuracy budget: the cheapest point whose accuracy drop (vs. the backbone) is
            <= this, certified by Learn-then-Test. The default budget (0.01) when neither is given.
        max_cost: compute budget: the most accurate point with expected cost fraction <= this.
        delta: 1 - confidence of the guarantee.
        family: ``"fixed_sequence"`` or ``"bonferroni"`` (:func:`ltt_certify`).
        p_value_method: for the ``harm`` loss ``"binomial"`` (default) or ``"hoeffding_bentkus"`` (:func:`p_value`);
            for ``net`` ``"paired"`` (default, :func:`paired_drop_p_value`) or ``"clopper_pearson_pair"``.
        select: ``"ltt"`` (certified points only) or ``"empirical"`` (the cheapest point whose drop on
            the whole calibration split is within ``max_drop``; its bound is reported instead).
        path_fraction: share of the records that build the path; the rest certify.
        levels: threshold grid levels per exit.
        seed: seeds the path/certify split.
        curve_points: most points kept in the stored trade-off curve.
        guarantee: ``"ltt"`` (high probability, ``delta``) or ``"crc"`` (expected drop; ``max_drop``
            only). See :data:`GUARANTEES`.
        loss: what Learn-then-Test certifies: ``"harm"`` (right answers turned wrong, an upper bound on the
            drop) or ``"net"`` (the drop itself). See :data:`~branched.build.guarantee.LOSSES`.
        path_head_costs: ``[K]`` what each exit's head costs when the path is ordered and the cheapest certified
            point is picked (e.g. measured wall-clock shares, which count the pooling, scoring and gathering
            that FLOPs miss); None: the records' own (FLOPs). The reported costs stay the records'.

    Raises:
        ValueError: both budgets, out-of-range settings, or too few records.
    """
    if max_drop is not None and max_cost is not None:
        raise ValueError("give one budget: --max-drop (accuracy) or --max-cost (compute), not both")
    if max_drop is None and max_cost is None:
        max_drop = 0.01
    if max_drop is not None and not 0 < max_drop < 1:
        raise ValueError(f"max_drop must be a fraction in (0, 1), e.g. 0.01 for 1 pt; got {max_drop}")
    if max_cost is not None and not max_cost > 0:
        raise ValueError(f"max_cost must be a cost fraction > 0, e.g. 0.4; got {max_cost}")
    if not 0 < delta < 1 or not 0 < path_fraction < 1:
        raise ValueError(f"delta and path_fraction must be in (0, 1); got {delta}, {path_fraction}")
    if select not in ("ltt", "empirical"):
        raise ValueError(f"select must be 'ltt' or 'empirical', got {select!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if guarantee not in GUARANTEES:
        raise ValueError(f"guarantee must be one of {', '.join(GUARANTEES)}, got {guarantee!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "net" and guarantee == "crc":
        raise ValueError("--loss net is certified by Learn-then-Test; conformal risk control needs a loss in [0, 1] "
                         "(use --loss harm with --guarantee crc)")
    methods = P_VALUES_BY_LOSS[loss]
    p_value_method = p_value_method or methods[0]
    if p_value_method not in methods:
        raise ValueError(f"the {loss} loss takes p-value {' or '.join(methods)}, got {p_value_method!r}")
    if guarantee == "crc" and (max_cost is not None or select != "ltt"):
        raise ValueError("--guarantee crc certifies an accuracy budget (--max-drop) and picks the point itself; "
                         "drop --max-cost / --select empirical")
    path_index, certify_index = split_calibration(len(records), path_fraction, seed)
    n_path = len(path_index)
    path_records = _with_head_costs(records, path_head_costs)
    path = threshold_path(path_records.subset(path_index), levels, switch_off=path_head_costs is not None)
    certify = records.subset(certify_index)
    calib_points = [records.point(t) for t in path]
    certify_points = [certify.point(t) for t in path]
    n_cert, m = len(certify), max(len(path) - (1 if records.last_exit_is_backbone else 0), 1)
    cost = [p["cost_fraction"] for p in calib_points]
    kind = guarantee
    net_test = ("an exact test of the paired difference" if p_value_method == "paired" else
                "two Clopper-Pearson bounds at delta / 2")
    loss_text = (f"1[routed wrong and backbone right] - 1[routed right and backbone wrong] (its mean is the accuracy "
                 f"drop; {net_test})" if loss == "net" else
                 "1[routed wrong and backbone right] (its mean bounds the accuracy drop)")
    guarantee = {"method": "Learn-then-Test", "kind": kind, "loss": loss_text, "loss_name": loss,
                 "p_value": p_value_method, "delta": delta,
                 "certify_samples": n_cert, "path_samples": n_path, "tested_points": len(path) - 1}

    def upper_bound(point: dict, level: float) -> float:
        return loss_upper_bound(point["errors"], point["helps"], n_cert, level, loss, p_value_method)

    if max_drop is not None:
        eps = max_drop
        # Entry 0 (every exit off) is the backbone itself, risk 0 by construction, unless gates change it.
        first = 1 if records.last_exit_is_backbone else 0
        if kind == "crc":
            last, adjusted = crc_last_valid(certify.losses(path), eps)
            p_values = [None] * len(path)
            certified = [j <= last for j in range(len(path))]
            guarantee_info = {"method": "conformal risk control"}
        else:
            p_values = [None] * first + [loss_p_value(p["errors"], p["helps"], n_cert, eps, loss, p_value_method, delta)
                                         for p in certify_points[first:]]
            certified = [True] * first + ltt_certify(p_values[first:], delta, family)
            guarantee_info = {"family": family}
        if select == "ltt":
            candidates = [j for j in range(len(path)) if certified[j]] or [0]
        else:
            candidates = [j for j in range(len(path)) if calib_points[j]["drop"] <= eps] or [0]
        # Cheapest by the cost the path was ordered by (FLOPs, or the measured heads'); reported costs stay FLOPs.
        order = cost if path_head_costs is None else [path_records.point(path[j])["cost_fraction"] for j in range(len(path))]
        chosen = min(candidates, key=lambda j: (order[j], -calib_points[j]["accuracy"]))
        bound = eps if select == "ltt" else upper_bound(certify_points[chosen], delta / m)
        if kind == "crc":
            guarantee_info["adjusted_risk"] = adjusted[chosen]
        guarantee.update(**guarantee_info, epsilon=eps, certified_points=int(sum(certified[1:])))
        budget = {"max_drop": eps}
        if not certified[chosen] and select == "ltt":
            bound = 1.0
            status, met = "unreachable", False
            message = (f"budget unreachable: not even the all-off point could be certified at drop <= {eps:g} "
                       f"with confidence {1 - delta:g} on {n_cert} samples")
        elif chosen == 0:
            status, met = "backbone_only", True
            message = (f"no early-exit point could be certified at drop <= {eps:g} "
                       f"{'in expectation' if kind == 'crc' else f'with confidence {1 - delta:g}'} on {n_cert} "
                       f"samples: every exit is off (the backbone's accuracy, no saving). "
                       + _what_would_certify(calib_points, cost, eps, delta, p_value_method, path_fraction, kind, loss))
        else:
            status, met = "met", True
            message = f"cheapest {'certified' if select == 'ltt' else 'empirical'} point within drop {eps:g}"
    else:
        p_values, certified = [None] * len(path), [False] * len(path)
        within = [j for j in range(len(path)) if cost[j] <= max_cost + 1e-12]
        budget = {"max_cost": max_cost}
        if within:
            chosen = max(within, key=lambda j: (calib_points[j]["accuracy"], -cost[j]))
            status, met = "met", True
            message = f"most accurate point with cost fraction <= {max_cost:g}"
        else:
            chosen = int(np.argmin(cost))
            status, met = "unreachable", False
            message = (f"budget unreachable: no operating point costs <= {max_cost:g} on the calibration split; "
                       f"the cheapest (chosen) costs {cost[chosen]:.3f}")
        bound = 0.0 if chosen == 0 and records.last_exit_is_backbone else upper_bound(certify_points[chosen], delta / m)
        guarantee.update(family="bonferroni_simultaneous_bound")

    guarantee["drop_bound"] = bound
    if kind == "crc":
        guarantee["statement"] = (f"in expectation (over new data and over the calibration data), the accuracy drop "
                                  f"against the backbone on data from the same distribution is <= {bound:.4f} "
                                  f"(conformal risk control: an average, not a high-probability bound)")
    else:
        guarantee["statement"] = (f"with probability >= {1 - delta:g}, the accuracy drop against the backbone on new "
                                  f"data from the same distribution is <= {bound:.4f}")
    chosen_point = calib_points[chosen]
    off_here = [k for k, t in enumerate(chosen_point["thresholds"]) if math.isinf(t)]
    report = {
        "budget": budget, "budget_met": met, "status": status, "message": message,
        "policy": None, "samples": len(records), "select": select,
        "thresholds": chosen_point["thresholds"], "cost_fraction": chosen_point["cost_fraction"],
        "accuracy": chosen_point["accuracy"], "backbone_accuracy": chosen_point["backbone_accuracy"],
        "drop": chosen_point["drop"], "risk": chosen_point["risk"], "exit_rates": chosen_point["exit_rates"],
        "guarantee": guarantee,
        # Only points the shipped model can serve: the build leaves out the exits that are off here.
        "curve": _pareto_curve([p for p in calib_points if all(math.isinf(p["thresholds"][k]) for k in off_here)],
                               curve_points),
    }
    return Calibration(chosen_point["thresholds"], report, path, calib_points, certify_points, p_values,
                       certified, chosen)

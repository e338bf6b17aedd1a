"""The load controller's ladder: the operating points it may serve, read from a model's calibration.

Index 0 is the calibrated point (the model's own thresholds); then the points of
``config.meta["calibration"]["curve"]`` that are cheaper and whose accuracy drop against the backbone is within
``max_drop``, cheapest (the floor) last. ``basis="measured"`` compares the drop measured on the calibration
split; ``"certified"`` a Clopper-Pearson upper bound, Bonferroni-simultaneous over every tested path point (so
valid however a point is picked), with the whole calibration split's error count standing in for the certify
part's (an upper bound of it, so the bound stays valid and is conservative). Standard library only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .binomial import binomial_upper_bound

__all__ = ["ControllerError", "OperatingPoint", "operating_points", "drop_upper_bound", "BASES"]

BASES = ("measured", "certified")


class ControllerError(ValueError):
    """The controller cannot run as asked; the message says how to fix it."""


@dataclass(frozen=True)
class OperatingPoint:
    """A ladder rung: ``index`` 0 is the calibrated point; higher is cheaper.

    ``drop`` is the expected accuracy drop against the backbone (calibration split); ``drop_bound`` its
    simultaneous upper confidence bound (None when the calibration report lacks what it needs).
    """

    index: int
    thresholds: tuple
    cost_fraction: float
    accuracy: float
    drop: float
    drop_bound: Optional[float]


# ---------------------------------------------------------------------------------------------- ladder
#: Clopper-Pearson upper bound at level ``1 - alpha`` on a rate with ``errors`` of ``n`` observed.
drop_upper_bound = binomial_upper_bound


def _bound(point: Mapping[str, Any], cal: Mapping[str, Any]) -> Optional[float]:
    g = cal.get("guarantee") or {}
    n_all, n_cert, m, delta = cal.get("samples"), g.get("certify_samples"), g.get("tested_points"), g.get("delta")
    if None in (n_all, n_cert, m, delta, point.get("risk")) or not n_cert:
        return None
    errors = min(int(n_cert), int(round(float(point["risk"]) * int(n_all))))  # certify errors <= all errors
    return drop_upper_bound(errors, int(n_cert), float(delta) / max(int(m), 1))


def operating_points(config, max_drop: float, basis: str = "measured") -> list[OperatingPoint]:
    """The controller's ladder for a model: the calibrated point, then the cheaper curve points within
    ``max_drop`` (by measured drop or by its certified bound), cheapest last.

    Raises:
        ControllerError: no curve; thresholds not on the curve; ``max_drop`` out of range or too small
            to leave any cheaper point (the message names the value that would).
    """
    if basis not in BASES:
        raise ControllerError(f"basis must be one of {', '.join(BASES)}, got {basis!r}")
    if not 0 < max_drop < 1:
        raise ControllerError(f"max_drop is an accuracy fraction in (0, 1), e.g. 0.02 for 2 points; got {max_drop}")
    cal = (config.meta or {}).get("calibration") or {}
    curve = cal.get("curve") or []
    if not curve:
        raise ControllerError("this model has no calibration curve (config.meta['calibration']['curve']), so the "
                              "load controller has no cheaper points to move to: rebuild the model with `branched "
                              "build`, which calibrates it, or turn the controller off (no slo_p95_ms)")
    backbone = cal.get("backbone_accuracy")

    def drop_of(p: Mapping[str, Any]) -> float:
        if p.get("drop") is not None:
            return float(p["drop"])
        if backbone is None:
            raise ControllerError("the calibration curve has neither 'drop' per point nor a 'backbone_accuracy': "
                                  "rebuild the model with this version of `branched build`")
        return float(backbone) - float(p["accuracy"])

    def point(i: int, p: Mapping[str, Any], bound: Optional[float]) -> OperatingPoint:
        return OperatingPoint(i, tuple(float(t) for t in p["thresholds"]), float(p["cost_fraction"]),
                              float(p["accuracy"]), drop_of(p), bound)

    own = [float(t) for t in config.thresholds]
    if cal.get("cost_fraction") is not None and cal.get("accuracy") is not None and \
            [float(t) for t in cal.get("thresholds", own)] == own:
        g = cal.get("guarantee") or {}
        home = point(0, {**cal, "thresholds": own}, g.get("drop_bound", _bound(cal, cal)))
    else:
        match = [p for p in curve if [float(t) for t in p["thresholds"]] == own]
        if not match:
            raise ControllerError(f"the model's thresholds {own} are not its calibrated point nor on its calibration "
                                  f"curve, so their cost and accuracy are unknown: restore the calibrated thresholds "
                                  f"or rebuild the model")
        home = point(0, match[0], _bound(match[0], cal))
    cheaper = sorted((p for p in curve if float(p["cost_fraction"]) < home.cost_fraction - 1e-12),
                     key=lambda p: (-float(p["cost_fraction"]), -float(p["accuracy"])))
    if not cheaper:
        raise ControllerError(f"the calibrated point (cost {home.cost_fraction:.3f}) is already the cheapest on the "
                              f"curve: there is nothing to trade for latency; rebuild with a smaller --max-drop "
                              f"(or a --max-cost) so that cheaper points remain, or turn the controller off")
    by = (lambda p: p.drop) if basis == "measured" else (lambda p: math.inf if p.drop_bound is None else p.drop_bound)
    what = "expected drop" if basis == "measured" else "certified drop bound"
    if basis == "certified" and home.drop_bound is None:
        raise ControllerError("the calibration report lacks what a certified bound needs (samples, guarantee "
                              "certify_samples / tested_points / delta): use basis 'measured' or rebuild the model")
    if by(home) > max_drop + 1e-12:
        raise ControllerError(f"max_drop {max_drop:g} is below the calibrated point's own {what} {by(home):.4f}: "
                              f"the controller could never serve it; use max_drop >= {by(home):.4f}")
    ladder = [home]
    for p in cheaper:
        rung = point(len(ladder), p, _bound(p, cal))
        if by(rung) <= max_drop + 1e-12:
            ladder.append(rung)
    if len(ladder) == 1:
        need = min(by(point(1, p, _bound(p, cal))) for p in cheaper)
        raise ControllerError(f"max_drop {max_drop:g} leaves no point cheaper than the calibrated one (cost "
                              f"{home.cost_fraction:.3f}): the next cheaper point's {what} is {need:.5f}; use "
                              f"max_drop >= {math.ceil(need * 1e4 - 1e-6) / 1e4:.4f}")
    return ladder

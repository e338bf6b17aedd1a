"""Exit policies and thresholds: when does a sample leave at an exit?

Every policy maps an exit's output to a score in [0, 1] where higher means "more sure"; a sample
leaves at side exit ``k`` when ``score >= thresholds[k]``. The last exit (the backbone head)
takes every sample that reaches it, so a model with ``K`` exits has ``K - 1`` thresholds.

* ``"confidence"`` (default): PTEENet's learned confidence head (sigmoid output).
* ``"max_softmax"``: the largest class probability (BranchyNet/SDN-style).
* ``"entropy"``: ``1 - H(p) / log(C)``, one minus the normalised entropy of the class distribution.

A threshold of ``inf`` switches an exit off; ``0`` lets everything out there. Thresholds are one
vector ``[K-1]`` for a whole batch, or one row per sample ``[B, K-1]`` (requests batched together
by a server may each carry their own).

Request parameters (the same for TorchServe and Ray Serve, parsed by :func:`thresholds_from_params`):

* ``thresholds=0.9,0.8,inf``: explicit per-exit values;
* ``threshold=0.9``: one value for every early exit;
* ``budget=0.4``: the most accurate calibrated operating point whose expected cost fraction is at
  most 0.4 (needs the calibration curve that ``branched build`` stores in the model config).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .exits import ExitOutput

__all__ = ["POLICIES", "exit_score", "check_policy", "resolve_thresholds", "Thresholds",
           "thresholds_for_budget", "thresholds_from_params", "ROUTING_PARAMS"]

Thresholds = Union[Sequence[float], torch.Tensor]


def _confidence(out: ExitOutput) -> torch.Tensor:
    if out.confidence is None:
        # The backbone head has no confidence head; it only ever scores the last exit,
        # which accepts everything, so max softmax is reported there.
        return _max_softmax(out)
    return out.confidence


def _max_softmax(out: ExitOutput) -> torch.Tensor:
    return torch.softmax(out.logits.float(), dim=1).amax(dim=1)


def _entropy(out: ExitOutput) -> torch.Tensor:
    logp = torch.log_softmax(out.logits.float(), dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    return 1.0 - h / math.log(out.logits.shape[1])


POLICIES: dict[str, Callable[[ExitOutput], torch.Tensor]] = {
    "confidence": _confidence,
    "max_softmax": _max_softmax,
    "entropy": _entropy,
}


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"unknown exit policy {policy!r}; choose one of: {', '.join(POLICIES)}")
    return policy


def exit_score(out: ExitOutput, policy: str) -> torch.Tensor:
    """Score ``[B]`` in [0, 1] of an exit's output under ``policy``."""
    return POLICIES[check_policy(policy)](out)


def resolve_thresholds(thresholds: Optional[Thresholds], defaults: Sequence[float]) -> torch.Tensor:
    """Validate per-exit thresholds (one per side exit) and return them as a float tensor.

    Args:
        thresholds: the caller's values, or None for ``defaults``.
        defaults: the model's calibrated thresholds.

    Raises:
        ValueError: wrong count, NaN, or a value outside [0, 1] other than ``inf``.
    """
    values = defaults if thresholds is None else thresholds
    t = torch.as_tensor(values, dtype=torch.float32)
    if t.dim() > 2 or t.dim() == 0 or t.shape[-1] != len(defaults):
        raise ValueError(f"expected {len(defaults)} thresholds (one per early exit), got shape {tuple(t.shape)}")
    bad = torch.isnan(t) | (t < 0) | ((t > 1) & ~torch.isposinf(t))
    if bool(bad.any()):
        got = ", ".join(f"{v:g}" for v in t.flatten().tolist()[:8])  # :g -> "-0.1", not float32's -0.10000000149
        raise ValueError(f"thresholds must be in [0, 1] (or inf to switch an exit off), got [{got}]")
    return t


def thresholds_for_budget(config, budget: float) -> list[float]:
    """The most accurate calibrated operating point with expected cost fraction <= ``budget``.

    Args:
        config: a :class:`~branched.model.ModelConfig` whose ``meta["calibration"]["curve"]`` holds
            points ``{"thresholds": [...], "cost_fraction": f, "accuracy": a}`` measured on the
            calibration split.
        budget: largest acceptable expected cost fraction (1.0 = the backbone's FLOPs).

    Raises:
        ValueError: no curve, or no point within the budget.
    """
    curve = (config.meta.get("calibration") or {}).get("curve") or []
    if not curve:
        raise ValueError("this model has no calibration curve; pass thresholds instead of a budget")
    fits = [p for p in curve if p["cost_fraction"] <= budget + 1e-12]
    if not fits:
        cheapest = min(p["cost_fraction"] for p in curve)
        raise ValueError(f"no calibrated operating point costs <= {budget:g}; the cheapest costs {cheapest:.3f}")
    best = max(fits, key=lambda p: (p["accuracy"], -p["cost_fraction"]))
    return [float(t) for t in best["thresholds"]]


ROUTING_PARAMS = ("thresholds", "threshold", "budget")


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {text!r}") from None


def thresholds_from_params(params: Mapping[str, Any], config) -> Optional[torch.Tensor]:
    """Per-request thresholds from request parameters (query string or headers), or None.

    Args:
        params: mapping that may hold ``thresholds`` (comma-separated), ``threshold`` or ``budget``
            (string or number values); other keys are ignored.
        config: the model's :class:`~branched.model.ModelConfig`.

    Raises:
        ValueError: a malformed or out-of-range value, or more than one of the three given; the
            message is meant for the client (HTTP 400).
    """
    given = [k for k in ROUTING_PARAMS if params.get(k) not in (None, "")]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(ROUTING_PARAMS)}; got {', '.join(given)}")
    key, value = given[0], params[given[0]]
    n = len(config.thresholds)
    if key == "thresholds":
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        values = [_number("each threshold", v) for v in items]
    elif key == "threshold":
        values = [_number("threshold", value)] * n
    else:
        budget = _number("budget", value)
        if not budget > 0:
            raise ValueError(f"budget must be a cost fraction > 0, got {value!r}")
        values = thresholds_for_budget(config, budget)
    return resolve_thresholds(values, config.thresholds)

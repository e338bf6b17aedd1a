"""Exit policies and thresholds: when does a sample leave at an exit?

Every policy maps an exit's output to a score in [0, 1] where higher means "more sure"; a sample
leaves at side exit ``k`` when ``score >= thresholds[k]``. The last exit (the backbone head)
takes every sample that reaches it, so a model with ``K`` exits has ``K - 1`` thresholds.

* ``"confidence"`` (default): PTEENet's learned confidence head (sigmoid output).
* ``"max_softmax"``: the largest class probability (BranchyNet/SDN-style).
* ``"entropy"``: ``1 - H(p) / log(C)``, one minus the normalised entropy of the class distribution.

A threshold of ``inf`` switches an exit off; ``0`` lets everything out there.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from .exits import ExitOutput

__all__ = ["POLICIES", "exit_score", "check_policy", "resolve_thresholds", "Thresholds"]

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
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() != len(defaults):
        raise ValueError(f"expected {len(defaults)} thresholds (one per early exit), got {t.numel()}")
    bad = torch.isnan(t) | (t < 0) | ((t > 1) & ~torch.isposinf(t))
    if bool(bad.any()):
        raise ValueError(f"thresholds must be in [0, 1] (or inf to switch an exit off), got {t.tolist()}")
    return t

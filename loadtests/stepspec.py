"""The step load's schedule in plain Python (no Locust import, so the runner and the tests can use it):
parse ``--steps`` and draw one user's next send time."""
from __future__ import annotations

import random
from typing import Optional, Sequence

__all__ = ["parse_steps", "next_send"]


def parse_steps(text: str) -> list[tuple[float, float]]:
    """``"20:0.5,20:1"`` -> ``[(20.0, 0.5), (20.0, 1.0)]``.

    Raises:
        ValueError: an empty or malformed list, or a step that is not positive.
    """
    try:
        steps = [(float(a), float(b)) for a, b in (item.split(":") for item in text.split(",") if item.strip())]
    except ValueError:
        raise ValueError(f"--steps wants seconds:multiple pairs, e.g. 20:0.5,20:1,20:2; got {text!r}") from None
    if not steps or any(s <= 0 or m <= 0 for s, m in steps):
        raise ValueError(f"--steps needs at least one step, every seconds and multiple > 0; got {text!r}")
    return steps


def next_send(steps: Sequence[tuple[float, float]], capacity: float, users: int, after: float,
              rng: Optional[random.Random] = None) -> Optional[float]:
    """Run time of one user's next request after run time ``after``: Poisson at ``multiple x capacity / users``
    per step (memoryless, so a draw that crosses a step boundary is drawn again from there); None after the
    last step. ``rng``: a seeded generator (default: the module's)."""
    end = 0.0
    for seconds, multiple in steps:
        start, end = end, end + seconds
        if after >= end:
            continue
        t = max(after, start) + (rng or random).expovariate(multiple * capacity / users)
        if t < end:
            return t
        after = end
    return None

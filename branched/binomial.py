"""Binomial tail and Clopper-Pearson bound, in the standard library: shared by calibration
(``branched.build.guarantee``) and the load controller's certified drop bound (``branched.operating_points``)."""
from __future__ import annotations

import functools
import math

__all__ = ["binomial_cdf", "binomial_upper_bound", "binomial_lower_bound"]


@functools.lru_cache(maxsize=4096)
def _log_choose(k: int, n: int) -> tuple[float, ...]:
    """``log C(n, i)`` for ``i = 0..k`` (cached: a bound's bisection evaluates the same tail many times)."""
    top = math.lgamma(n + 1)
    return tuple(top - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(k + 1))


def binomial_cdf(k: int, n: int, p: float) -> float:
    """``P(Bin(n, p) <= k)``, summed in log space (exact for the sizes a calibration split has)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [c + i * lp + (n - i) * lq for i, c in enumerate(_log_choose(k, n))]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def binomial_upper_bound(errors: int, n: int, delta: float) -> float:
    """One-sided ``1 - delta`` Clopper-Pearson upper bound on a Bernoulli mean."""
    if n == 0:
        return 1.0
    if errors >= n:
        return 1.0
    lo, hi = errors / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(errors, n, mid) > delta else (lo, mid)
    return hi


def binomial_lower_bound(successes: int, n: int, delta: float) -> float:
    """One-sided ``1 - delta`` Clopper-Pearson lower bound on a Bernoulli mean: the ``p`` with
    ``P(Bin(n, p) >= successes) = delta`` (its tail sums ``successes`` terms, not ``n - successes``)."""
    if n == 0 or successes <= 0:
        return 0.0
    lo, hi = 0.0, successes / n
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1.0 - binomial_cdf(successes - 1, n, mid) < delta else (lo, mid)
    return lo

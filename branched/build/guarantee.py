"""The distribution-free part of calibration: p-values for a Bernoulli risk and Learn-then-Test.

Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) turns risk control into multiple
testing: for each candidate setting ``j``, test ``H_j: risk_j > epsilon`` with a valid p-value on
held-out data; any family-wise-error-controlling procedure at level ``delta`` then certifies a set
of settings all of which have ``risk <= epsilon`` with probability >= 1 - delta.
"""
from __future__ import annotations

import math
from typing import Sequence

from ..binomial import binomial_cdf, binomial_upper_bound  # the core's, shared with the load controller

__all__ = ["FAMILIES", "P_VALUES", "binomial_cdf", "p_value", "ltt_certify", "binomial_upper_bound"]

FAMILIES = ("fixed_sequence", "bonferroni")
P_VALUES = ("binomial", "hoeffding_bentkus")


def _kl_bernoulli(a: float, b: float) -> float:
    def term(x: float, y: float) -> float:
        return 0.0 if x == 0 else x * math.log(x / y)
    return term(a, b) + term(1 - a, 1 - b)


def p_value(errors: int, n: int, epsilon: float, method: str = "binomial") -> float:
    """p-value of ``H: risk > epsilon`` after ``errors`` losses in ``n`` samples.

    Args:
        errors: number of samples with loss 1.
        n: number of samples.
        epsilon: the risk level tested.
        method: ``"binomial"`` (exact for a Bernoulli loss) or ``"hoeffding_bentkus"``
            (Bates et al. 2021; valid for any loss in [0, 1], more conservative).
    """
    if n == 0:
        return 1.0
    if method == "binomial":
        return binomial_cdf(errors, n, epsilon)
    if method == "hoeffding_bentkus":
        r = errors / n
        hoeffding = math.exp(-n * _kl_bernoulli(min(r, epsilon), epsilon))
        bentkus = math.e * binomial_cdf(math.ceil(n * r), n, epsilon)
        return min(1.0, hoeffding, bentkus)
    raise ValueError(f"p-value method must be one of {', '.join(P_VALUES)}, got {method!r}")


def ltt_certify(p_values: Sequence[float], delta: float, family: str = "fixed_sequence") -> list[bool]:
    """Which hypotheses Learn-then-Test rejects at family-wise error ``delta``.

    Args:
        p_values: one per hypothesis, in the fixed order chosen before looking at the data tested.
        delta: family-wise error rate.
        family: ``"fixed_sequence"`` (test each at ``delta`` in order, stop at the first failure)
            or ``"bonferroni"`` (each at ``delta / m``).
    """
    if family == "fixed_sequence":
        out, going = [], True
        for p in p_values:
            going = going and p <= delta
            out.append(going)
        return out
    if family == "bonferroni":
        m = max(len(p_values), 1)
        return [p <= delta / m for p in p_values]
    raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")

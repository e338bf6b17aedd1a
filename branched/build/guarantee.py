"""The distribution-free part of calibration: p-values for a Bernoulli risk, Learn-then-Test, and
conformal risk control.

Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021) turns risk control into multiple
testing: for each candidate setting ``j``, test ``H_j: risk_j > epsilon`` with a valid p-value on
held-out data; any family-wise-error-controlling procedure at level ``delta`` then certifies a set
of settings all of which have ``risk <= epsilon`` with probability >= 1 - delta.

Conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster 2022) bounds the *expected* risk
instead: for losses in [0, 1] that do not decrease along an ordered family of settings, the last
setting ``j`` with ``n / (n + 1) * mean_loss_j + 1 / (n + 1) <= epsilon`` has expected risk
``<= epsilon`` (in expectation over the calibration data too). It needs no ``delta`` and certifies
far closer to the empirical point, but it promises an average, not a high-probability bound.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from scipy.stats import binom

from ..binomial import binomial_cdf, binomial_lower_bound, binomial_upper_bound  # the core's, shared with the load controller

__all__ = ["FAMILIES", "P_VALUES", "NET_P_VALUES", "P_VALUES_BY_LOSS", "LOSSES", "binomial_cdf", "p_value", "ltt_certify",
           "binomial_upper_bound", "binomial_lower_bound", "net_drop_upper_bound", "net_drop_p_value",
           "paired_drop_p_value", "paired_drop_upper_bound", "loss_p_value", "loss_upper_bound", "samples_needed",
           "crc_last_valid"]

FAMILIES = ("fixed_sequence", "bonferroni")
P_VALUES = ("binomial", "hoeffding_bentkus")
#: What Learn-then-Test certifies. ``harm``: the share of samples the backbone gets right and the routed model
#: gets wrong (a Bernoulli loss; it bounds the drop from above, and also promises that few right answers turn
#: wrong). ``net``: the accuracy drop itself, harm minus the share the exits get right where the backbone is
#: wrong (the drop the user asked about), tested as :data:`NET_P_VALUES` says.
LOSSES = ("harm", "net")
#: p-values of the ``net`` loss. ``paired`` (the default): an exact test of the paired difference harms - helps
#: (:func:`paired_drop_p_value`); ``clopper_pearson_pair``: a Clopper-Pearson bound on each rate at ``delta / 2``
#: (:func:`net_drop_p_value`), which adds the two bounds' widths where the paired test combines the two noises.
NET_P_VALUES = ("paired", "clopper_pearson_pair")
#: The p-values each loss takes; the first is its default.
P_VALUES_BY_LOSS = {"harm": P_VALUES, "net": NET_P_VALUES}


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


def net_drop_upper_bound(harms: int, helps: int, n: int, delta: float) -> float:
    """``1 - delta`` upper bound on the accuracy drop ``P(harm) - P(help)``.

    Args:
        harms: samples the backbone gets right and the routed model wrong.
        helps: samples the routed model gets right and the backbone wrong.
        n: samples.
        delta: the bound fails with probability <= delta: an upper bound on ``P(harm)`` and a lower bound on
            ``P(help)``, each at ``delta / 2`` (a union bound, valid whatever the two rates are).
    """
    if n == 0:
        return 1.0
    return binomial_upper_bound(harms, n, delta / 2) - binomial_lower_bound(helps, n, delta / 2)


def net_drop_p_value(harms: int, helps: int, n: int, epsilon: float, tolerance: float = 1e-4) -> float:
    """p-value of ``H: P(harm) - P(help) > epsilon``: the smallest ``alpha`` at which
    :func:`net_drop_upper_bound` at ``alpha`` is ``<= epsilon``.

    The rejection regions grow with ``alpha`` (a larger ``alpha`` gives tighter bounds), so
    ``P(p <= alpha) <= alpha`` under ``H``. Found by bisection on ``log(alpha)``, rounded up (conservative).
    """
    if n == 0 or net_drop_upper_bound(harms, helps, n, 1.0 - 1e-12) > epsilon:
        return 1.0
    lo, hi = math.log(1e-12), 0.0  # log(alpha): rejects at hi, maybe not at lo
    if net_drop_upper_bound(harms, helps, n, 1e-12) <= epsilon:
        return 1e-12
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if net_drop_upper_bound(harms, helps, n, math.exp(mid)) <= epsilon else (mid, hi)
    return min(1.0, math.exp(hi))


def _difference_tail(d: int, n: int, harm: float, help_: float) -> float:
    """``P(H - G <= d)`` when ``(H, G, rest) ~ Multinomial(n; harm, help_, 1 - harm - help_)``: summed over ``G``,
    with ``H | G = g ~ Bin(n - g, harm / (1 - help_))``."""
    # Only the G with any weight: a window of 40 standard deviations (and 40 counts) around its mean, so that a
    # large n (samples_needed's search) does not evaluate n + 1 terms.
    spread = 40 * math.sqrt(n * help_ * (1 - help_)) + 40
    g = np.arange(max(0, math.floor(n * help_ - spread)), min(n, math.ceil(n * help_ + spread)) + 1)
    weight = binom.pmf(g, n, help_)
    return float(np.dot(weight, binom.cdf(d + g, n - g, min(1.0, harm / (1.0 - help_)))))


def paired_drop_p_value(harms: int, helps: int, n: int, epsilon: float, gamma: float = 1e-3, grid: int = 16) -> float:
    """p-value of ``H: P(harm) - P(help) >= epsilon`` from the paired difference ``harms - helps``.

    An exact unconditional test (Berger and Boos 1994): under ``H`` the tail ``P(harms - helps <= observed)`` is
    largest on the boundary ``P(harm) - P(help) = epsilon``, where it still depends on the share of samples on
    which the two models disagree, ``q = P(harm) + P(help)``. The p-value is the largest tail over ``q`` within a
    ``1 - gamma`` Clopper-Pearson upper bound on ``q`` (from ``harms + helps``), plus ``gamma``, which pays for
    restricting ``q``. So it is valid for every pair of rates. The largest tail is taken over ``grid`` values of
    ``q`` from ``epsilon`` to that bound (the tail grows with ``q``: more disagreement is more noise).

    Against :func:`net_drop_p_value` it needs about half the margin between the observed drop and ``epsilon``
    (the two noises add in quadrature, not linearly), so the same data certify a cheaper point.
    """
    if n == 0:
        return 1.0
    d = harms - helps
    if d >= n * epsilon:
        return 1.0
    top = min(1.0, max(binomial_upper_bound(harms + helps, n, gamma), epsilon))
    worst = max(_difference_tail(d, n, (q + epsilon) / 2, (q - epsilon) / 2) for q in np.linspace(epsilon, top, grid))
    return min(1.0, worst + gamma)


def paired_drop_upper_bound(harms: int, helps: int, n: int, delta: float, gamma: Optional[float] = None) -> float:
    """``1 - delta`` upper bound on the accuracy drop: the smallest ``epsilon`` that :func:`paired_drop_p_value`
    rejects at ``delta`` (bisection, rounded up). ``gamma`` defaults to ``delta / 100``."""
    if n == 0:
        return 1.0
    gamma = delta / 100 if gamma is None else gamma
    lo, hi = (harms - helps) / n, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if paired_drop_p_value(harms, helps, n, mid, gamma) <= delta else (mid, hi)
    return hi


def loss_p_value(harms: int, helps: int, n: int, epsilon: float, loss: str, method: str, delta: float) -> float:
    """p-value of ``H: risk >= epsilon`` for a point with ``harms`` and ``helps`` in ``n`` samples, where the risk is
    the ``loss`` (:data:`LOSSES`) tested by ``method`` (one of :data:`P_VALUES_BY_LOSS`); ``delta`` is the
    level the p-value will be compared with (the paired test spends ``delta / 100`` of it on its nuisance)."""
    if loss == "harm":
        return p_value(harms, n, epsilon, method)
    if method == "paired":
        return paired_drop_p_value(harms, helps, n, epsilon, delta / 100)
    return net_drop_p_value(harms, helps, n, epsilon)


def loss_upper_bound(harms: int, helps: int, n: int, delta: float, loss: str, method: str) -> float:
    """``1 - delta`` upper bound on the risk :func:`loss_p_value` tests (the drop for ``net``, at least 0)."""
    if loss == "harm":
        return binomial_upper_bound(harms, n, delta)
    bound = paired_drop_upper_bound if method == "paired" else net_drop_upper_bound
    return max(0.0, bound(harms, helps, n, delta))


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


def samples_needed(risk: float, epsilon: float, delta: float, method: Optional[str] = None,
                   limit: int = 10_000_000, help_rate: Optional[float] = None) -> Optional[int]:
    """The fewest test samples at which an observed ``risk`` would be certified ``<= epsilon`` at ``delta``.

    With ``help_rate`` the loss is ``net`` (:data:`LOSSES`): ``risk`` is the harm rate and the drop
    ``risk - help_rate`` is what is certified. ``method``: one of the loss's :data:`P_VALUES_BY_LOSS` (default:
    its first). Returns None when no number of samples would do (the risk, or the drop, is ``>= epsilon``) or more
    than ``limit`` are needed.
    """
    if (risk if help_rate is None else risk - help_rate) >= epsilon:
        return None
    loss = "harm" if help_rate is None else "net"
    method = method or P_VALUES_BY_LOSS[loss][0]

    def passes(n: int) -> bool:
        if help_rate is None:
            harms, helps = int(math.floor(risk * n)), 0
        else:
            harms, helps = int(math.ceil(risk * n)), int(math.floor(help_rate * n))
        return loss_p_value(harms, helps, n, epsilon, loss, method, delta) <= delta

    hi = 16
    while not passes(hi):
        hi *= 2
        if hi > limit:
            return None
    lo = hi // 2
    while lo + 1 < hi:  # p-values are not exactly monotone in n (integer errors); this finds one that passes
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(mid) else (mid, hi)
    return hi


def crc_last_valid(losses: np.ndarray, epsilon: float) -> tuple[int, list[float]]:
    """Conformal risk control along an ordered family of settings.

    Args:
        losses: ``[n, P]`` losses in [0, 1] of ``n`` held-out samples at each of ``P`` settings in the
            order fixed beforehand (setting 0 is the safe one). They are made monotone first (a sample's
            loss at ``j`` is its largest loss at any setting ``<= j``), which can only raise them, so the
            guarantee holds for the original losses too.
        epsilon: the expected risk allowed.

    Returns:
        The last setting whose adjusted risk ``n / (n + 1) * mean + 1 / (n + 1)`` is ``<= epsilon``
        (-1 when not even setting 0 qualifies), and that adjusted risk for every setting.
    """
    n = losses.shape[0]
    envelope = np.maximum.accumulate(np.asarray(losses, dtype=np.float64), axis=1)
    adjusted = (n / (n + 1)) * envelope.mean(axis=0) + 1.0 / (n + 1)
    valid = np.nonzero(adjusted <= epsilon)[0]
    last = -1
    for j in valid:  # a prefix: the envelope's mean never falls along the family
        if j != last + 1:
            break
        last = int(j)
    return last, adjusted.tolist()

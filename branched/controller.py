"""Load-adaptive operating point: hold a p95 latency target by moving along the calibrated trade-off curve.

A model's calibration stores its trade-off curve (``config.meta["calibration"]["curve"]``: Pareto points
``{"thresholds", "cost_fraction", "accuracy", "drop", "risk"}`` measured on the calibration split). The
:class:`OperatingPointController` serves the calibrated point while load is low and moves to cheaper
points of that curve when the p95 latency target is at risk, never to a point whose expected accuracy
drop against the backbone exceeds the declared ``max_drop`` (the floor), and moves back when load falls.

**Ladder.** :func:`operating_points` turns the curve into a ladder: index 0 is the calibrated point (the
model's own thresholds), then every curve point cheaper than it whose drop is within ``max_drop``,
cheapest last (the floor). ``basis="measured"`` compares the drop measured on the calibration split;
``basis="certified"`` compares a Clopper-Pearson upper bound, simultaneous over every tested path point
(Bonferroni, so valid however the point is picked), computed from the stored risk with the calibration
split's error count standing in for the certify part's (an upper bound of it): a guarantee, at the
price of being conservative on small calibration splits.

**Load signal.** A server reports what it can see; every input is optional but the first:

* :meth:`~OperatingPointController.observe_batch`: a batch of ``size`` requests at realised mean cost
  fraction ``c`` kept the server busy ``seconds``. This feeds the service-time model (batch time
  ``= a + b (v + u c)``, weighted non-negative least squares with exponential forgetting: what a cheaper
  point would cost, learned, not assumed proportional to FLOPs) and the load estimate: served rate, busy
  fraction, and the per-batch overhead outside the handler (the gap before a batch that came full: the
  server had a queue, so the gap was pure overhead). A TorchServe handler sees only this: TorchServe tells a
  worker nothing about its queue. While the worker is not saturated, its served rate *is* the arrival rate;
  once it is saturated (busy >= ``saturation``), arrivals are at least the served rate and are taken as
  ``surge`` x served, so the controller searches cheaper points geometrically until the worker has slack.
* :meth:`~OperatingPointController.observe_arrivals`: arrivals counted where they happen (Ray's ingress);
  they replace the served-rate estimate.
* :meth:`~OperatingPointController.observe_queue`: requests waiting or in flight, when the server knows.
* :meth:`~OperatingPointController.observe_latencies`: request latencies (end to end in Ray; in TorchServe
  from an ``X-Request-Start`` header a proxy or client sets). The reactive check on top of the prediction.

**Prediction.** For ladder point ``j``: full-batch time ``S_j = overhead + a + B (v + u c_j)``, capacity
``mu_j = B / S_j``, load ``rho_j = lambda / mu_j`` and
``p95_j = fill wait + S_j + ln(20 rho_j) / (mu_j (1 - rho_j)) + queue / mu_j`` (infinite at
``rho_j >= 1``; the middle term is the M/M/1 p95 wait), where the fill wait is
``min(batch delay, (B - 1) / lambda)``.

**Decision** (:meth:`~OperatingPointController.update`, asymmetric hysteresis): when ``p95_cur > high x
target`` (or observed p95 > target), move at once to the most accurate point with ``p95_j <= high x
target`` (the floor if none); move back only to a point predicted to hold ``high x target`` at
``1 + headroom`` times the load (and with observed p95 <= ``low x target``) after ``hold_s`` without
pressure (hysteresis in load, where the noise is, not in latency, which is steep near saturation); a down-move soon after an up-move doubles the hold
(at most 8x), so a wrong model cannot make it oscillate faster than that. Per-request thresholds and
budgets bypass the controller: it only supplies the default (``Predictor.prepare(..., default=...)``).

Framework-free: the standard library only. Thread-safe (one lock).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

__all__ = ["ControllerError", "ControllerSettings", "OperatingPoint", "operating_points", "drop_upper_bound",
           "ServiceModel", "OperatingPointController", "BASES"]

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
def _binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    c = math.lgamma(n + 1)
    return min(1.0, sum(math.exp(c - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq)
                        for i in range(k + 1)))


def drop_upper_bound(errors: int, n: int, alpha: float) -> float:
    """Clopper-Pearson upper bound at level ``1 - alpha`` on a rate with ``errors`` of ``n`` observed."""
    if errors >= n:
        return 1.0
    lo, hi = errors / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _binom_cdf(errors, n, mid) > alpha else (lo, mid)
    return hi


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
                              f"{home.cost_fraction:.3f}): the next cheaper point's {what} is {need:.4f}; use "
                              f"max_drop >= {math.ceil(need * 1e4 - 1e-6) / 1e4:.4f}")
    return ladder


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class ControllerSettings:
    """What the controller is asked to hold, and how it reads load.

    Args:
        slo_p95_ms: the p95 latency target in milliseconds.
        max_drop: the accuracy floor: largest accuracy drop against the backbone (0.02 = 2 points).
        basis: ``measured`` (calibration-split drop) or ``certified`` (its simultaneous upper bound).
        batch_size: most requests the server puts in one batch (TorchServe ``batchSize``).
        batch_delay_ms: longest wait for a batch to fill (TorchServe ``maxBatchDelay``).
        window_s: load and latency estimates cover this many recent seconds.
        hold_s: seconds without pressure before moving back toward the calibrated point.
        memory_s: half-life of the service-time model's observations.
        high: move cheaper when the predicted p95 exceeds ``high`` x target.
        headroom: move back only to a point that would hold ``high`` x target at ``1 + headroom`` x the load.
        low: and only while the observed p95 (when latencies are reported) is <= ``low`` x target.
        surge: a saturated server's arrival rate is taken as ``surge`` x its served rate.
        saturation: busy fraction above which the server counts as saturated.
        interval_s: least time between two decisions.
    """

    slo_p95_ms: float
    max_drop: float
    basis: str = "measured"
    batch_size: int = 1
    batch_delay_ms: float = 0.0
    window_s: float = 2.0
    hold_s: float = 3.0
    memory_s: float = 20.0
    high: float = 0.9
    headroom: float = 0.3
    low: float = 0.7
    surge: float = 1.3
    saturation: float = 0.97
    interval_s: float = 0.05

    def __post_init__(self) -> None:
        checks = [(self.slo_p95_ms > 0, "slo_p95_ms must be > 0 (milliseconds)"),
                  (self.basis in BASES, f"basis must be one of {', '.join(BASES)}"),
                  (self.batch_size >= 1, "batch_size must be >= 1"),
                  (self.batch_delay_ms >= 0, "batch_delay_ms must be >= 0"),
                  (self.window_s > 0 and self.memory_s > 0, "window_s and memory_s must be > 0"),
                  (self.hold_s >= 0 and self.interval_s >= 0, "hold_s and interval_s must be >= 0"),
                  (0 < self.low < self.high <= 1, "need 0 < low < high <= 1"),
                  (self.headroom >= 0, "headroom must be >= 0"),
                  (self.surge >= 1 and 0 < self.saturation <= 1, "need surge >= 1 and 0 < saturation <= 1")]
        for ok, message in checks:
            if not ok:
                raise ControllerError(f"controller settings: {message}; got {self}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ControllerSettings":
        """From a config section (model-config.yaml ``handler:``, a Ray ``user_config``); unknown keys are refused."""
        known = {f.name: f.type for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ControllerError(f"unknown controller setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        missing = [k for k in ("slo_p95_ms", "max_drop") if values.get(k) is None]
        if missing:
            raise ControllerError(f"the controller needs {' and '.join(missing)}")
        out = {}
        for k, v in values.items():
            try:
                out[k] = str(v) if k == "basis" else int(v) if k == "batch_size" else float(v)
            except (TypeError, ValueError):
                raise ControllerError(f"controller setting {k} must be a number, got {v!r}") from None
        return cls(**out)


# ---------------------------------------------------------------------------------------------- service time
class ServiceModel:
    """Batch time ``h(b, c) = a + b v + b c u`` (all >= 0), fitted by weighted least squares over every
    non-empty subset of the three terms (the best non-negative fit wins), observations forgotten with a
    half-life of ``memory_s``."""

    def __init__(self, memory_s: float = 20.0, min_batches: int = 3) -> None:
        self.memory_s, self.min_batches = memory_s, min_batches
        self._xx = [[0.0] * 3 for _ in range(3)]
        self._xy, self._yy, self._n, self._t = [0.0] * 3, 0.0, 0, None
        self._coef: Optional[list[float]] = None

    @property
    def ready(self) -> bool:
        return self._n >= self.min_batches

    def observe(self, size: int, seconds: float, cost: float, now: float) -> None:
        if self._t is not None and now > self._t:
            f = 0.5 ** ((now - self._t) / self.memory_s)
            self._xx = [[v * f for v in row] for row in self._xx]
            self._xy, self._yy = [v * f for v in self._xy], self._yy * f
        self._t = now if self._t is None else max(self._t, now)
        x = (1.0, float(size), float(size) * float(cost))
        for i in range(3):
            self._xy[i] += x[i] * seconds
            for j in range(3):
                self._xx[i][j] += x[i] * x[j]
        self._yy += seconds * seconds
        self._n += 1
        self._coef = None

    def coefficients(self) -> list[float]:
        """``[a, v, u]`` (seconds per batch, per sample, per sample and unit cost fraction)."""
        if self._coef is None:
            best = (math.inf, [0.0, 0.0, 0.0])
            for r in range(1, 4):
                for sub in combinations(range(3), r):
                    beta = _solve([[self._xx[i][j] for j in sub] for i in sub], [self._xy[i] for i in sub])
                    if beta is None or min(beta) < 0:
                        continue
                    sse = self._yy - sum(b * self._xy[i] for b, i in zip(beta, sub))  # at the optimum
                    if sse < best[0] - 1e-15:
                        full = [0.0, 0.0, 0.0]
                        for b, i in zip(beta, sub):
                            full[i] = b
                        best = (sse, full)
            self._coef = best[1]
        return self._coef

    def predict(self, size: float, cost: float) -> float:
        a, v, u = self.coefficients()
        return a + size * (v + cost * u)


def _solve(m: list[list[float]], y: list[float]) -> Optional[list[float]]:
    """Gaussian elimination with partial pivoting; None for a (near-)singular system."""
    n = len(y)
    a = [row[:] + [y[i]] for i, row in enumerate(m)]
    scale = max(abs(a[i][i]) for i in range(n)) or 1.0
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        if abs(a[p][c]) < 1e-10 * scale:
            return None
        a[c], a[p] = a[p], a[c]
        for r in range(n):
            if r != c:
                f = a[r][c] / a[c][c]
                a[r] = [vr - f * vc for vr, vc in zip(a[r], a[c])]
    return [a[i][n] / a[i][i] for i in range(n)]


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


# ---------------------------------------------------------------------------------------------- controller
class OperatingPointController:
    """Picks the ladder point to serve now (see the module docstring).

    Args:
        config: the model's config (``meta["calibration"]``, ``thresholds``).
        settings: target, floor and tuning.
        clock: monotonic seconds (injectable: tests drive a simulated clock).
    """

    def __init__(self, config, settings: ControllerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.clock = settings, clock
        self.points = operating_points(config, settings.max_drop, settings.basis)
        self.index = 0
        self.service = ServiceModel(settings.memory_s)
        self.moves = {"down": 0, "up": 0}
        self._lock = threading.Lock()
        self._batches: deque = deque()      # (end, size, busy seconds)
        self._arrivals: deque = deque()     # (time, count)
        self._latencies: deque = deque()    # (time, seconds)
        self._gaps: deque = deque(maxlen=64)
        self._queue: Optional[tuple[float, int]] = None
        self._counts_arrivals = False
        self._last_end: Optional[float] = None
        self._start = clock()
        self._last_move = self._last_up = self._last_decision = -math.inf
        self._pressure_at = self._start
        self._hold = settings.hold_s
        self._estimate: dict[str, Any] = {}

    # -- what a server reports -----------------------------------------------------------------
    def observe_batch(self, size: int, seconds: float, cost_fraction: Optional[float] = None,
                      end: Optional[float] = None) -> None:
        """A batch of ``size`` requests took ``seconds`` (ending at ``end``, default now) at realised mean
        cost fraction ``cost_fraction`` (None: no sample was routed, e.g. all bad requests)."""
        with self._lock:
            end = self.clock() if end is None else end
            start = end - seconds
            if self._last_end is not None and size >= self.settings.batch_size and 0 <= start - self._last_end < 1.0:
                self._gaps.append(start - self._last_end)
            self._last_end = end
            self._batches.append((end, int(size), seconds + self.overhead))
            if cost_fraction is not None and size > 0:
                self.service.observe(size, seconds, cost_fraction, end)

    def observe_arrivals(self, count: int = 1, now: Optional[float] = None) -> None:
        with self._lock:
            self._counts_arrivals = True
            self._arrivals.append((self.clock() if now is None else now, int(count)))

    def observe_queue(self, waiting: int, now: Optional[float] = None) -> None:
        with self._lock:
            self._queue = (self.clock() if now is None else now, int(waiting))

    def observe_latencies(self, seconds: Iterable[float], now: Optional[float] = None) -> None:
        with self._lock:
            t = self.clock() if now is None else now
            self._latencies.extend((t, float(s)) for s in seconds)

    # -- what it serves ------------------------------------------------------------------------
    @property
    def current(self) -> OperatingPoint:
        return self.points[self.index]

    @property
    def thresholds(self) -> list[float]:
        return list(self.current.thresholds)

    @property
    def floor(self) -> OperatingPoint:
        return self.points[-1]

    @property
    def overhead(self) -> float:
        """Per-batch time outside ``observe_batch``'s seconds (low quantile of gaps before full batches)."""
        return _quantile(self._gaps, 0.2) if len(self._gaps) >= 4 else 0.0

    def predicted_p95(self, j: int, arrival_rate: float, queue: int = 0) -> float:
        """Predicted p95 latency (seconds) at ladder point ``j`` under ``arrival_rate`` requests/s."""
        s = self.settings
        b = s.batch_size
        batch = self.overhead + self.service.predict(b, self.points[j].cost_fraction)
        mu = b / max(batch, 1e-9)
        rho = arrival_rate / mu
        if rho >= 1:
            return math.inf
        fill = s.batch_delay_ms / 1e3 if arrival_rate <= 0 else min(s.batch_delay_ms / 1e3, (b - 1) / arrival_rate)
        wait = math.log(20 * rho) / (mu * (1 - rho)) if rho > 0.05 else 0.0
        return fill + batch + wait + queue / mu

    def update(self, now: Optional[float] = None) -> OperatingPoint:
        """Decide the point to serve now (at most every ``interval_s``) and return it."""
        with self._lock:
            now = self.clock() if now is None else now
            if now - self._last_decision >= self.settings.interval_s and self.service.ready:
                self._last_decision = now
                self._decide(now)
            return self.current

    def _load(self, now: float) -> tuple[float, int, float, bool]:
        """Arrival rate, queue, busy fraction, saturated: the highest rate over the last quarter, half and
        whole window (a step up in load shows within a quarter window; a fall only after a whole one)."""
        w = self.settings.window_s
        for q in (self._batches, self._arrivals, self._latencies):
            while q and q[0][0] < now - w:
                q.popleft()
        best = (0.0, 0.0, False)
        for h in (w / 4, w / 2, w):
            span = max(min(h, now - self._start), 1e-3)
            busy = sum(b for t, _, b in self._batches if t >= now - h) / span
            events = self._arrivals if self._counts_arrivals else self._batches
            count = sum(e[1] for e in events if e[0] >= now - h)
            if h < w and count < 64:  # too few for a short-horizon rate (relative noise 1 / sqrt(count))
                continue
            saturated = not self._counts_arrivals and busy >= self.settings.saturation
            rate = count / span * (self.settings.surge if saturated else 1.0)
            best = max(best, (rate, busy, saturated))
        queue = self._queue[1] if self._queue and now - self._queue[0] <= w else 0
        return best[0], queue, best[1], best[2]

    def _observed_p95(self, now: float) -> Optional[float]:
        settle = self._last_move + self.settings.window_s / 2
        recent = [s for t, s in self._latencies if t >= settle]
        return _quantile(recent, 0.95) if len(recent) >= 20 else None

    def _decide(self, now: float) -> None:
        s, cur, n = self.settings, self.index, len(self.points)
        target = s.slo_p95_ms / 1e3
        rate, queue, busy, saturated = self._load(now)
        p95 = [self.predicted_p95(j, rate, queue) for j in range(n)]
        observed = self._observed_p95(now)
        self._estimate = {"arrival_rate": rate, "queue": queue, "busy": busy, "saturated": saturated,
                          "predicted_p95_ms": [1e3 * v for v in p95], "observed_p95_ms":
                          None if observed is None else 1e3 * observed}
        at_risk = p95[cur] > s.high * target
        if at_risk or (observed is not None and observed > target):
            if at_risk:  # predictive: the most accurate point predicted to hold the target, else the floor
                new = next((j for j in range(cur + 1, n) if p95[j] <= s.high * target), n - 1)
            else:  # reactive: the model says fine but the latencies say otherwise: one step
                new = min(cur + 1, n - 1)
            self._pressure_at = now
            if new > cur:
                if now - self._last_up < self._hold:
                    self._hold = min(2 * self._hold, 8 * s.hold_s)
                self._move(new, "down", now)
            return
        if cur == 0:
            if now - self._last_move >= 4 * self._hold:
                self._hold = s.hold_s
            return
        calm = [j for j in range(cur) if self.predicted_p95(j, rate * (1 + s.headroom), queue) <= s.high * target]
        if not calm or (observed is not None and observed > s.low * target):
            self._pressure_at = now
        elif now - self._pressure_at >= self._hold:
            self._move(calm[0], "up", now)
            self._last_up = self._pressure_at = now

    def _move(self, new: int, direction: str, now: float) -> None:
        self.index = new
        self.moves[direction] += 1
        self._last_move = now

    def state(self) -> dict[str, Any]:
        """The point served now, its accuracy cost and the last decision's load estimate (JSON-ready)."""
        with self._lock:
            p = self.current
            est = dict(self._estimate)
            pred = est.pop("predicted_p95_ms", None)
            return {"index": p.index, "points": len(self.points), "thresholds": list(p.thresholds),
                    "cost_fraction": p.cost_fraction, "expected_drop": p.drop, "drop_bound": p.drop_bound,
                    "floor_cost_fraction": self.floor.cost_fraction, "moves_down": self.moves["down"],
                    "moves_up": self.moves["up"], "hold_s": self._hold,
                    "predicted_p95_ms": None if pred is None else pred[p.index], **est}

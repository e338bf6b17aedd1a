"""Load-adaptive operating point: hold a p95 latency target by moving along the calibrated trade-off curve.

**Ladder** (:func:`branched.operating_points.operating_points`): index 0 is the calibrated point, then the
cheaper points of the model's calibration curve whose accuracy drop against the backbone is within ``max_drop``
(measured on the calibration split, or its certified bound), cheapest (the floor) last.

**Load signal**: what a server can see. :meth:`~OperatingPointController.observe_batch` (size, seconds, realised
cost) feeds a service-time model (batch time ``a + b (v + u c)``, non-negative weighted least squares, forgetting
with half-life ``memory_s``) and the load estimate: served rate and busy fraction over the last quarter, half and
whole ``window_s`` (the highest rate wins: a step up shows within a quarter window), plus the per-batch overhead
outside the handler (gaps before full batches). A TorchServe worker learns nothing about its queue; while it has
slack its served rate is the arrival rate, and once saturated (busy >= ``saturation``) arrivals are taken as
``surge`` x served, so it searches cheaper points geometrically. Optional: ``observe_arrivals`` (counted at an
ingress; replaces the served rate), ``observe_work`` (instead of batches: answers and bottleneck busy time per
interval, what a Ray ingress learns from its stages), ``observe_queue`` (waiting requests), ``observe_latencies``
(measured: the reactive check; TorchServe gets them from an ``X-Request-Start`` header).

**Prediction** at point ``j``: full-batch time ``S_j``, capacity ``mu_j = B / S_j``, ``rho_j = lambda / mu_j``,
``p95_j = min(delay, (B-1)/lambda) + S_j + ln(20 rho_j) / (mu_j (1 - rho_j)) + queue / mu_j`` (M/M/1 p95 wait;
infinite at ``rho_j >= 1``).

**Decision** (:meth:`~OperatingPointController.update`): when ``p95_cur > high x target`` move at once to the
most accurate point predicted under it (else the floor); when only the observed p95 exceeds the target, the
predictions are scaled by observed / predicted at the current point and it moves to the most accurate point the
scaled prediction says holds (at least one step; else the floor).
Move back after ``hold_s`` without pressure, to the most accurate point that would hold at ``1 + headroom`` x the
load (hysteresis in load, where the noise is) while the observed p95 <= ``low x target``. A down-move soon after
an up-move doubles the hold, once per reversal (up to 8x); ``4 x hold_s`` at the calibrated point resets it.
Per-request thresholds and budgets bypass the controller: it supplies only the default
(``Predictor.prepare(..., default=...)``). Standard library only; thread-safe (one lock).
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from itertools import combinations
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from .operating_points import BASES, ControllerError, OperatingPoint, drop_upper_bound, operating_points

__all__ = ["ControllerError", "ControllerSettings", "OperatingPoint", "operating_points", "drop_upper_bound",
           "ServiceModel", "OperatingPointController", "BASES"]


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

    def observe_work(self, requests: int, busy_seconds: float, cost_fraction: Optional[float],
                     end: Optional[float] = None) -> None:
        """For a front end that sees no batches (a Ray ingress): since its last report, ``requests`` were
        answered at mean cost fraction ``cost_fraction`` while the bottleneck was busy ``busy_seconds``.

        Fed to the service model as a time per request (one request and a full batch at that time each: no
        per-batch intercept, which a run of equal counts could not tell apart) and to the busy fraction; no gap
        heuristic.

        Args:
            requests: requests answered in the interval (nothing is learned from 0).
            busy_seconds: the bottleneck's busy time in the interval.
            cost_fraction: their mean cost fraction (None: none was routed).
            end: the interval's end (default now).
        """
        with self._lock:
            end = self.clock() if end is None else end
            self._batches.append((end, int(requests), float(busy_seconds)))
            if cost_fraction is not None and requests > 0 and busy_seconds > 0:
                per_request = busy_seconds / requests
                for size in (1, self.settings.batch_size):
                    self.service.observe(size, size * per_request, cost_fraction, end)

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
        """Predicted p95 latency (seconds) at ladder point ``j`` under ``arrival_rate`` requests/s.

        Batches hold what arrives during the batch delay and the previous batch (``b = lambda (delay + S(b))``,
        between 1 and ``batch_size``): full under load, small at a trickle, where a full-batch time would
        overstate the latency and keep the controller off the calibrated point."""
        s = self.settings
        cost, delay = self.points[j].cost_fraction, s.batch_delay_ms / 1e3
        b = float(s.batch_size)
        for _ in range(4):  # from a full batch down to the largest fixed point
            batch = self.overhead + self.service.predict(b, cost)
            b = min(float(s.batch_size), max(1.0, arrival_rate * (delay + batch)))
        batch = self.overhead + self.service.predict(b, cost)
        mu = b / max(batch, 1e-9)
        rho = arrival_rate / mu
        if rho >= 1:
            return math.inf
        fill = delay if arrival_rate <= 0 else min(delay, (b - 1) / arrival_rate) if b >= s.batch_size else delay
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
        self._estimate = {"arrival_rate": rate, "queue": queue, "busy": busy, "saturated": saturated, "observed_p95_ms":
                          None if observed is None else 1e3 * observed, "predicted_p95_ms": [1e3 * v for v in p95]}
        at_risk = p95[cur] > s.high * target
        if at_risk or (observed is not None and observed > target):
            if at_risk:  # predictive: the most accurate point predicted to hold the target, else the floor
                new = next((j for j in range(cur + 1, n) if p95[j] <= s.high * target), n - 1)
            else:  # reactive: latencies contradict the model; scale it by observed / predicted here (>= one step)
                scale = observed / p95[cur] if 0 < p95[cur] < math.inf else math.inf
                new = next((j for j in range(cur + 1, n) if p95[j] * scale <= s.high * target), n - 1)
            self._pressure_at = now
            if new > cur:
                if now - self._last_up < self._hold:
                    self._hold = min(2 * self._hold, 8 * s.hold_s)
                    self._last_up = -math.inf  # one reversal doubles it once, however many moves the way down takes
                self._move(new, "down", now)
            return
        if cur == 0:
            if now - self._last_move >= 4 * s.hold_s:  # quiet for 4 base holds: any oscillation is over
                self._hold = s.hold_s
            return
        back = [self.predicted_p95(j, rate * (1 + s.headroom), queue) for j in range(cur)]
        self._estimate["move_back_p95_ms"] = [1e3 * v for v in back]  # what the move-back rule saw (state())
        calm = [j for j in range(cur) if back[j] <= s.high * target]
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

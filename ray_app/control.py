"""The load controller at the Ray Serve ingress (:mod:`branched.controller`): settings from the app args and
the Ingress's ``user_config`` (changeable live), the point broadcast to the stages with the samples, metrics.

The ingress sees what TorchServe's worker cannot: every arrival, how many requests are in flight, and each
request's latency from the moment the ingress got it. It cannot see the stages' service time, so every
``window_s / 4`` it reads its own hosted stages' counters and asks each stage deployment (following the chain
from the first; each names the next in its ``stats()``) for its replica's busy seconds, and reports the busiest deployment's busy fraction with
the answers and mean cost of the interval (:meth:`~branched.controller.OperatingPointController.observe_work`).
A handle call reaches one replica of a deployment; its busy fraction stands for the deployment's (Serve
balances the load), so a stage that scales out shows less busy, and the controller moves back up.

The point travels with the samples: a request without its own routing parameters gets the point's thresholds
in :meth:`branched.serving.Predictor.prepare`, and thresholds already ride per sample to every stage.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Mapping, Optional

import torch

from branched.controller import ControllerError, ControllerSettings, OperatingPointController
from branched.routing import ROUTING_PARAMS, resolve_thresholds, thresholds_from_params

__all__ = ["CONTROL_KEYS", "ControllerError", "IngressControl", "controller_for", "split_user_config", "replica_id"]

logger = logging.getLogger("ray.serve")

#: ``user_config`` / app-args keys of the controller (``controller``: its tuning, ControllerSettings fields).
CONTROL_KEYS = ("slo_p95_ms", "max_drop", "controller")


def controller_for(config, values: Mapping[str, Any], batch_size: int,
                   batch_delay_ms: float) -> Optional[OperatingPointController]:
    """The controller ``values`` ask for (``slo_p95_ms``, ``max_drop``, ``controller`` tuning); None when
    ``slo_p95_ms`` is absent or null (the controller is off; ``max_drop`` alone does nothing).

    Raises:
        ControllerError: bad settings, or a model without a usable curve (the message says what to change).
    """
    if values.get("slo_p95_ms") is None:
        return None
    tuning = dict(values.get("controller") or {})
    settings = ControllerSettings.from_mapping({"batch_size": batch_size, "batch_delay_ms": batch_delay_ms,
                                                **tuning, "slo_p95_ms": values["slo_p95_ms"],
                                                "max_drop": values.get("max_drop")})
    return OperatingPointController(config, settings)


def split_user_config(config: Optional[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``user_config`` -> (controller keys, app-wide threshold keys).

    Raises:
        ValueError: keys that are neither (the message lists the known ones).
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(CONTROL_KEYS) - set(ROUTING_PARAMS))
    if unknown:
        raise ValueError(f"unknown Ingress user_config keys {unknown}; known: "
                         f"{', '.join(ROUTING_PARAMS + CONTROL_KEYS)}")
    return ({k: v for k, v in config.items() if k in CONTROL_KEYS},
            {k: v for k, v in config.items() if k in ROUTING_PARAMS})


class IngressControl:
    """The ingress's controller, its observations and its metrics; off (``default()`` is None) without a target.

    Args:
        config: the model's config (the ladder comes from its calibration curve).
        settings: the app args' ``slo_p95_ms``, ``max_drop``, ``controller`` (None: off until a user_config).
        batch_size, batch_delay_ms: the ingress's ``@serve.batch`` settings (the controller's batch model).
        stage0: handle to the first stage deployment (the chain of stages is followed from it; None when
            the ingress hosts every stage).
        local_stats: the ingress's own stage counters when it hosts stages (a ``StageRunner.stats`` dict).
    """

    def __init__(self, config, settings: Optional[Mapping[str, Any]], batch_size: int, batch_delay_ms: float,
                 stage0: Any, local_stats: Optional[Callable[[], Mapping[str, Any]]] = None) -> None:
        self.config, self.base = config, {k: v for k, v in (settings or {}).items() if k in CONTROL_KEYS}
        self.batching = (batch_size, batch_delay_ms)
        self.stage0, self.local_stats = stage0, local_stats
        self.controller: Optional[OperatingPointController] = None
        self.in_flight = 0
        self._answered, self._cost_sum, self._costed = 0, 0.0, 0
        self._seen: dict[tuple[str, str], tuple[float, float]] = {}  # (deployment, replica) -> (time, busy_s)
        self._handles: dict[str, Any] = {}
        self._cache: dict[int, torch.Tensor] = {}
        self._moves = {"down": 0, "up": 0}
        self._poller: Optional[asyncio.Task] = None
        self._metrics = _Metrics()
        self.configure({})

    # -- settings ------------------------------------------------------------------------------
    def configure(self, overrides: Mapping[str, Any]) -> None:
        """Rebuild the controller from the app args with ``overrides`` (a user_config's controller keys) on
        top; ``{}`` restores the app args. A rebuilt controller starts at the calibrated point.

        Raises:
            ControllerError: the merged settings cannot run (the previous controller stays).
        """
        values = {**self.base, **overrides}
        self.controller = controller_for(self.config, values, *self.batching)
        self._cache.clear()
        self._moves = {"down": 0, "up": 0}
        c = self.controller
        if c is None:
            logger.info("load controller off")
        else:
            logger.info("load controller on: p95 target %g ms, max drop %g (%s); %d points, cost %.3f -> %.3f",
                        c.settings.slo_p95_ms, c.settings.max_drop, c.settings.basis, len(c.points),
                        c.points[0].cost_fraction, c.floor.cost_fraction)
        self._export()

    def reconfigure(self, user_config: Optional[Mapping[str, Any]]) -> Optional[torch.Tensor]:
        """Apply the Ingress's ``user_config``: the controller keys (:meth:`configure`) and the app-wide
        thresholds it names, which this returns (None: the calibrated ones).

        Raises:
            ValueError: unknown keys, bad thresholds, or app-wide thresholds while the controller is on.
            ControllerError: controller settings that cannot run.
        """
        control, params = split_user_config(user_config)
        thresholds = thresholds_from_params(params, self.config)
        on = {**self.base, **control}.get("slo_p95_ms") is not None
        if not on and control.get("max_drop") is not None:
            raise ControllerError("max_drop is the load controller's accuracy floor: give slo_p95_ms too")
        if thresholds is not None and on:
            raise ValueError("user_config sets app-wide thresholds while the load controller is on; the controller "
                             "picks the thresholds of requests that name none: drop thresholds/threshold/budget, "
                             "or turn the controller off with slo_p95_ms: null")
        self.configure(control)
        return thresholds

    # -- per request ---------------------------------------------------------------------------
    def default(self) -> Optional[torch.Tensor]:
        """The thresholds of the point to serve now (for requests that name none); None when off."""
        c = self.controller
        if c is None:
            return None
        point = c.update()
        if point.index not in self._cache:
            self._cache[point.index] = resolve_thresholds(list(point.thresholds), self.config.thresholds)
        return self._cache[point.index]

    async def serve(self, answer: Callable[[], Awaitable[Any]]) -> Any:
        """Run one request's ``answer()`` while counting its arrival, the requests in flight and its latency."""
        c = self.controller
        if c is None:
            return await answer()
        self._start_polling()
        start = time.monotonic()
        c.observe_arrivals(1, start)
        self.in_flight += 1
        c.observe_queue(max(0, self.in_flight - self.batching[0]), start)
        try:
            result = await answer()
        finally:
            self.in_flight -= 1
        if isinstance(result, dict) and "cost_fraction" in result:
            c.observe_latencies([time.monotonic() - start])
            self._answered += 1
            self._cost_sum += float(result["cost_fraction"])
            self._costed += 1
        return result

    # -- the stages' busy time -----------------------------------------------------------------
    def _start_polling(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while self.controller is not None:
            period = self.controller.settings.window_s / 4
            await asyncio.sleep(period)
            c = self.controller
            if c is None:
                break
            busy = None
            if self._answered or self.in_flight:  # idle: no stage calls (each costs the stages CPU)
                try:
                    busy = await self.bottleneck_busy()
                except Exception as exc:  # noqa: BLE001 - a stage restarting: skip this interval
                    logger.warning("load controller: no stage stats (%s: %s)", type(exc).__name__, exc)
            else:
                self._seen.clear()  # the next busy fraction starts from the next sample, not across the idle time
            answered, cost = self._answered, self._cost_sum / self._costed if self._costed else None
            self._answered, self._cost_sum, self._costed = 0, 0.0, 0
            if busy is not None:
                c.observe_work(answered, busy * period, cost)
            c.update()
            self._export()

    async def bottleneck_busy(self) -> Optional[float]:
        """The highest busy fraction over the stage deployments since the last call (one replica each);
        None before two samples of any replica."""
        from ray import serve

        best: Optional[float] = None

        def note(deployment: str, stats: Mapping[str, Any]) -> None:
            nonlocal best
            key = (deployment, str(stats.get("replica", "")))
            now, busy = float(stats["time"]), float(stats["busy_s"])
            last = self._seen.get(key)
            self._seen[key] = (now, busy)
            if last is not None and now > last[0]:
                fraction = min(1.0, max(0.0, (busy - last[1]) / (now - last[0])))
                best = fraction if best is None else max(best, fraction)

        if self.local_stats is not None:  # the stages the ingress runs itself
            note("Ingress", self.local_stats())
        handle, seen = self.stage0, set()
        while handle is not None and handle.deployment_name not in seen:
            seen.add(handle.deployment_name)
            stats = await asyncio.wait_for(handle.stats.remote(), timeout=5.0)
            note(handle.deployment_name, stats)
            name = stats.get("next")
            if name and name not in self._handles:
                self._handles[name] = serve.get_deployment_handle(name, app_name=handle.app_name)
            handle = self._handles.get(name) if name else None
        return best

    # -- what it reports -----------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """``{"on": False}``, or the controller's state with its settings and the requests in flight."""
        c = self.controller
        if c is None:
            return {"on": False, "in_flight": self.in_flight}
        s = c.settings
        return {"on": True, "in_flight": self.in_flight, **c.state(),
                "settings": {"slo_p95_ms": s.slo_p95_ms, "max_drop": s.max_drop, "basis": s.basis,
                             "batch_size": s.batch_size, "batch_delay_ms": s.batch_delay_ms,
                             "window_s": s.window_s, "hold_s": s.hold_s}}

    def _export(self) -> None:
        c = self.controller
        if c is None:
            self._metrics.set(-1.0, -1.0, -1.0, -1.0)
            return
        st = c.state()
        p95 = st.get("predicted_p95_ms")
        self._metrics.set(st["index"], st["cost_fraction"], st["expected_drop"],
                          -1.0 if p95 is None else min(float(p95), 1e6))
        for direction in ("down", "up"):
            n = st[f"moves_{direction}"] - self._moves[direction]
            if n > 0:
                self._metrics.moved(direction, n)
                self._moves[direction] += n
                logger.info("load controller: moved %s to point %d (cost %.3f, expected drop %.4f): %s", direction,
                            st["index"], st["cost_fraction"], st["expected_drop"],
                            {k: st.get(k) for k in ("arrival_rate", "queue", "busy", "predicted_p95_ms",
                                                    "observed_p95_ms")})


class _Metrics:
    """The TorchServe handler's controller metrics as Ray Serve metrics (``ray_`` prefixed on export)."""

    def __init__(self) -> None:
        try:
            from ray.serve import metrics
        except ImportError:  # pragma: no cover - ray is this adapter's dependency
            self.gauges, self.moves = None, None
            return
        self.gauges = [metrics.Gauge(name, description=text) for name, text in (
            ("branched_operating_point", "Ladder index served now: 0 = the calibrated point, higher = cheaper "
                                         "(-1: controller off)."),
            ("branched_operating_cost", "Expected cost fraction of the point served now (calibration split)."),
            ("branched_expected_drop", "Expected accuracy drop of the point served now against the backbone."),
            ("branched_predicted_p95_ms", "The controller's predicted p95 at the point served now, ms "
                                          "(-1: not yet; 1e6: saturated)."))]
        self.moves = metrics.Counter("branched_point_moves", description="Operating-point moves, down (cheaper) "
                                     "and up.", tag_keys=("direction",))

    def set(self, *values: float) -> None:
        if self.gauges:
            for gauge, value in zip(self.gauges, values):
                gauge.set(float(value))

    def moved(self, direction: str, n: int) -> None:
        if self.moves is not None:
            self.moves.inc(n, tags={"direction": direction})


def replica_id() -> str:
    """This Serve replica's id ('' outside a replica)."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica
        return ""

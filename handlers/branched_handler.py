"""TorchServe handler for branched (early-exit) models: request bytes -> the core's routed forward -> JSON.

The ``.mar`` built by ``branched archive`` carries this file, the ``branched`` package and the model
directory (``model/``); ``model-config.yaml`` holds the batching settings and a ``handler:`` section
(``baseline``, ``threads`` and the request limits ``max_bytes``, ``max_pixels``, ``min_side`` of
:class:`branched.preprocess.ImageLimits`, checked on the image header before the pixels are decoded;
``slo_p95_ms`` and ``max_drop`` turn on the load controller, ``controller:`` tunes it; see
:mod:`branched.controller`).
A batch TorchServe forms is answered by one call to `branched.serving.Predictor.answer_batch`, where every request keeps its own thresholds and a bad
request gets its own 4xx while the others are answered.

Per request: the image is the raw body, a multipart form field, or JSON ``{"image": "<base64>"}``;
routing parameters ``thresholds=0.9,0.8`` | ``threshold=0.9`` | ``budget=0.4`` come from the query
string, form fields or request headers of the same names.

This module must only import ``ts``, ``torch`` and ``branched``: it runs from the unpacked archive.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Mapping, Optional

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

import branched
from branched.body import FORM_IMAGE_FIELDS
from branched.controller import ControllerSettings, OperatingPointController
from branched.errors import RequestError
from branched.preprocess import ImageLimits
from branched.routing import ROUTING_PARAMS, resolve_thresholds
from branched.serving import Predictor, extract_image

__all__ = ["BranchedHandler", "MODEL_SUBDIR", "LIMIT_SETTINGS", "METRIC_EXITS", "METRIC_COST_SUM", "METRIC_COST",
           "METRIC_BAD", "METRIC_BATCHES", "CONTROLLER_SETTINGS", "METRIC_POINT", "METRIC_POINT_COST",
           "METRIC_POINT_DROP", "METRIC_PREDICTED_P95", "METRIC_MOVES", "REQUEST_START_HEADER"]

logger = logging.getLogger(__name__)

#: Where the archive keeps the model directory, relative to the unpacked ``.mar``.
MODEL_SUBDIR = "model"
#: ``handler:`` settings in model-config.yaml that become :class:`ImageLimits` fields.
LIMIT_SETTINGS = ("max_bytes", "max_pixels", "min_side")
#: Counter: answered requests per exit (dimension ``Exit``: 0-based, last = backbone head).
METRIC_EXITS = "BranchedExitRequests"
#: Counter: sum of the answered requests' cost fractions (divide by the exit counts for the mean).
METRIC_COST_SUM = "BranchedCostFractionSum"
#: Gauge: mean cost fraction of the last batch.
METRIC_COST = "BranchedCostFraction"
#: Counter: requests answered with a 4xx (dimension ``Status``).
METRIC_BAD = "BranchedBadRequests"
#: Counter: batches handled (requests / batches = mean batch size TorchServe formed).
METRIC_BATCHES = "BranchedBatches"
#: ``handler:`` settings that turn the load controller on (``controller:`` holds its tuning).
CONTROLLER_SETTINGS = ("slo_p95_ms", "max_drop")
#: Gauge: the controller's operating point (0 = the calibrated point; higher = cheaper).
METRIC_POINT = "BranchedOperatingPoint"
#: Gauge: that point's expected cost fraction (calibration split).
METRIC_POINT_COST = "BranchedOperatingCost"
#: Gauge: that point's expected accuracy drop against the backbone (calibration split).
METRIC_POINT_DROP = "BranchedExpectedDrop"
#: Gauge: the controller's predicted p95 latency at that point, in ms (-1 until it can predict; 1e6: saturated).
METRIC_PREDICTED_P95 = "BranchedPredictedP95"
#: Seconds between two log lines of the controller's state while it is away from the calibrated point.
STATE_LOG_S = 5.0
#: The controller state's load keys that the handler's log lines show (what moved it, or keeps it away).
LOAD_KEYS = ("arrival_rate", "busy", "saturated", "predicted_p95_ms", "observed_p95_ms")
#: Counter: operating-point moves (dimension ``Direction``: ``down`` = cheaper, ``up``).
METRIC_MOVES = "BranchedPointMoves"
#: Optional request header with the time the request entered the system (a proxy's or client's clock on
#: this host): ``t=1700000000.123`` (s), or ms / us since the epoch. Gives the controller measured latencies.
REQUEST_START_HEADER = "x-request-start"

_PHRASES = {400: "Bad Request", 413: "Payload Too Large", 415: "Unsupported Media Type"}


class BranchedHandler(BaseHandler):
    """Serves one branched model directory (or its plain backbone, for a baseline archive)."""

    def initialize(self, context) -> None:
        """Load ``model/`` from the unpacked archive with the settings in model-config.yaml.

        Args:
            context: TorchServe's context (``system_properties["model_dir"]``, ``model_yaml_config``).
        """
        self.context = context
        self.manifest = context.manifest
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        settings = yaml_config.get("handler") or {}
        threads = int(settings.get("threads") or 0) or _default_threads(yaml_config)
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)  # one batch at a time per worker; no inter-op pool needed
        except RuntimeError:
            pass  # already fixed for this process
        model_dir = os.path.join(context.system_properties["model_dir"], MODEL_SUBDIR)
        limits = ImageLimits(**{k: int(settings[k]) for k in LIMIT_SETTINGS if settings.get(k) is not None})
        self.predictor = Predictor(model_dir, baseline=bool(settings.get("baseline", False)), limits=limits)
        self.model = self.predictor.model
        self.model_name = context.model_name
        self.controller = _controller(settings, yaml_config, self.predictor)
        self._point: Optional[torch.Tensor] = None  # the controller's thresholds for this batch
        self._point_cache: dict[int, torch.Tensor] = {}
        self._moves = {"down": 0, "up": 0}
        self.initialized = True
        logger.info("branched handler: %s from %s (branched package at %s), %d exits, %d torch threads",
                    "baseline" if settings.get("baseline") else "early-exit model", model_dir,
                    os.path.dirname(branched.__file__), self.model.num_exits, threads)
        if self.controller is not None:
            c = self.controller
            logger.info("branched handler: load controller on: p95 target %g ms, max drop %g (%s); %d points from "
                        "cost %.3f (calibrated) to %.3f (floor, expected drop %.4f)", c.settings.slo_p95_ms,
                        c.settings.max_drop, c.settings.basis, len(c.points), c.points[0].cost_fraction,
                        c.floor.cost_fraction, c.floor.drop)

    def handle(self, data: list[Mapping[str, Any]], context) -> list[Any]:
        """BaseHandler's handle; with a load controller, the batch runs at the controller's point (requests
        with their own thresholds keep them) and its size, time and realised cost feed the controller."""
        if getattr(self, "controller", None) is None:
            return super().handle(data, context)
        start = time.monotonic()
        point = self.controller.update()
        self._point = self._point_cache.get(point.index)
        if self._point is None:
            self._point = self._point_cache[point.index] = resolve_thresholds(list(point.thresholds),
                                                                              self.predictor.config.thresholds)
        self._batch_cost: Optional[float] = None
        self._starts: list[float] = []
        output = super().handle(data, context)
        self.controller.observe_batch(len(data), time.monotonic() - start, self._batch_cost)
        if self._starts:
            now = time.time()
            self.controller.observe_latencies([max(0.0, now - t) for t in self._starts])
        self._controller_metrics()
        return output

    def preprocess(self, data: list[Mapping[str, Any]]) -> list[Any]:
        """Each request -> ``(image bytes, routing params)`` or the :class:`RequestError` it earned."""
        requests: list[Any] = []
        for idx, row in enumerate(data):
            headers = self._headers(idx)
            if getattr(self, "controller", None) is not None and REQUEST_START_HEADER in headers:
                started = _request_start(headers[REQUEST_START_HEADER])
                if started is not None:
                    self._starts.append(started)
            try:
                requests.append((self._image(row, headers), _routing_params(row, headers)))
            except RequestError as exc:
                requests.append(exc)
        return requests

    def inference(self, requests: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Answer the well-formed requests in one routed batch; errors pass through in place."""
        good = [i for i, r in enumerate(requests) if not isinstance(r, RequestError)]
        results: list[Any] = list(requests)
        for i, answer in zip(good, self.predictor.answer_batch([requests[i] for i in good], self._point)):
            results[i] = answer
        return results

    def postprocess(self, results: list[Any]) -> list[Any]:
        """JSON per request; a 4xx status for the bad ones; exit and cost metrics for the batch."""
        out: list[Any] = []
        exits: dict[int, int] = {}
        costs: list[float] = []
        for idx, result in enumerate(results):
            self.context.set_response_content_type(idx, "application/json")
            if isinstance(result, RequestError):
                self.context.set_response_status(result.status, _PHRASES.get(result.status, "Client Error"), idx)
                self._count(METRIC_BAD, 1, [Dimension("Status", str(result.status))])
                out.append({"error": str(result), "status": result.status})
                continue
            exits[result["exit"]] = exits.get(result["exit"], 0) + 1
            costs.append(float(result["cost_fraction"]))
            out.append(result)
        self._count(METRIC_BATCHES, 1, [])
        for k, n in sorted(exits.items()):
            self._count(METRIC_EXITS, n, [Dimension("Exit", str(k))])
        if costs:
            self._batch_cost = sum(costs) / len(costs)
            self._count(METRIC_COST_SUM, sum(costs), [])
            self.context.metrics.add_metric(METRIC_COST, sum(costs) / len(costs), "Fraction", None,
                                            self._dims([]), MetricTypes.GAUGE)
        return out

    # -- helpers -------------------------------------------------------------------------------

    def _controller_metrics(self) -> None:
        state = self.controller.state()
        for name, value, unit in ((METRIC_POINT, state["index"], "Count"),
                                  (METRIC_POINT_COST, state["cost_fraction"], "Fraction"),
                                  (METRIC_POINT_DROP, state["expected_drop"], "Fraction"),
                                  (METRIC_PREDICTED_P95, state.get("predicted_p95_ms") or -1.0, "ms")):
            value = -1.0 if value is None else min(float(value), 1e6)  # 1e6 ms: saturated, no finite p95
            self.context.metrics.add_metric(name, value, unit, None, self._dims([]), MetricTypes.GAUGE)
        now = time.monotonic()
        if state["index"] and now - getattr(self, "_logged_at", -math.inf) >= STATE_LOG_S:
            # Away from the calibrated point: what keeps it there (load estimate, move-back predictions), now and then.
            self._logged_at = now
            logger.info("branched controller: at point %d (cost %.3f): %s", state["index"], state["cost_fraction"],
                        {k: state.get(k) for k in (*LOAD_KEYS, "hold_s", "move_back_p95_ms")})
        for direction in ("down", "up"):
            n = state[f"moves_{direction}"] - self._moves[direction]
            if n:
                self._count(METRIC_MOVES, n, [Dimension("Direction", direction)])
                self._moves[direction] += n
                logger.info("branched controller: moved %s to point %d (cost %.3f, expected drop %.4f): %s",
                            direction, state["index"], state["cost_fraction"], state["expected_drop"],
                            {k: state.get(k) for k in LOAD_KEYS})

    def _dims(self, extra: list[Dimension]) -> list[Dimension]:
        # Explicit list every time: the metrics API appends defaults to a shared mutable default otherwise.
        return [Dimension("ModelName", self.model_name), Dimension("Level", "Model"), *extra]

    def _count(self, name: str, value: float, extra: list[Dimension]) -> None:
        self.context.metrics.add_metric(name, value, "Count", None, self._dims(extra), MetricTypes.COUNTER)

    def _headers(self, idx: int) -> dict[str, str]:
        """Request headers of request ``idx``, keys lower-cased (per-field entries are dicts; skipped)."""
        raw = self.context.get_all_request_header(idx) or {}
        return {str(k).lower(): v for k, v in raw.items() if isinstance(v, str)}

    def _image(self, row: Mapping[str, Any], headers: Mapping[str, str]) -> bytes:
        """The image bytes of one request, whichever way the client sent them."""
        if "body" in row:  # not a form: TorchServe hands the whole body over as "body"
            return extract_image(row["body"], headers.get("content-type", ""))
        # A multipart or url-encoded form: TorchServe has already split it into fields.
        for name in FORM_IMAGE_FIELDS:
            if name in row:
                return extract_image(row[name], "")
        files = [k for k, v in row.items() if isinstance(v, (bytes, bytearray)) and k not in ROUTING_PARAMS]
        if len(files) == 1:
            return extract_image(row[files[0]], "")
        if headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            raise RequestError("the body was sent as application/x-www-form-urlencoded (curl --data-binary does "
                               "that): send the file with `curl -T img.png` or add -H 'Content-Type: image/png'")
        fields = ", ".join(repr(k) for k in row) or "none"
        raise RequestError(f"no image in the request: send the bytes as the body, or one form field named "
                           f"{' / '.join(FORM_IMAGE_FIELDS)} (fields found: {fields})")


def _routing_params(row: Mapping[str, Any], headers: Mapping[str, str]) -> dict[str, str]:
    """``thresholds`` / ``threshold`` / ``budget`` from the query string or form, else from headers."""
    params: dict[str, str] = {}
    for key in ROUTING_PARAMS:
        value: Optional[Any] = row.get(key, headers.get(key))
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8", errors="replace")
        if value is not None:
            params[key] = value if isinstance(value, str) else str(value)
    return params


def _controller(settings: Mapping[str, Any], yaml_config: Mapping[str, Any],
                predictor: Predictor) -> Optional[OperatingPointController]:
    """The load controller the ``handler:`` settings ask for (None without ``slo_p95_ms`` or for a baseline).

    Raises:
        branched.controller.ControllerError: bad settings, or a model without a usable calibration curve.
    """
    if settings.get("slo_p95_ms") is None or settings.get("baseline"):
        return None
    values = {k: settings.get(k) for k in CONTROLLER_SETTINGS}
    values.update({"batch_size": int(yaml_config.get("batchSize") or 1),
                   "batch_delay_ms": float(yaml_config.get("maxBatchDelay") or 0)})
    values.update(settings.get("controller") or {})  # tuning: ControllerSettings fields
    return OperatingPointController(predictor.config, ControllerSettings.from_mapping(values))


def _request_start(value: str) -> Optional[float]:
    """``X-Request-Start`` (``t=`` optional; seconds, ms or us since the epoch) -> epoch seconds, or None."""
    try:
        t = float(value.strip().removeprefix("t="))
    except ValueError:
        return None
    return t / 1e6 if t > 1e14 else t / 1e3 if t > 1e11 else t


def _default_threads(yaml_config: Mapping[str, Any]) -> int:
    """Cores shared by the model's workers, at least one each (workers are separate processes).

    Counts the CPUs this process may run on, so a server pinned to some cores (the load-test
    runner does that) does not oversubscribe them.
    """
    workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))

"""TorchServe handler for branched (early-exit) models: request bytes -> the core's routed forward -> JSON.

The ``.mar`` built by ``branched archive`` carries this file, the ``branched`` package and the model
directory (``model/``); ``model-config.yaml`` holds the batching settings and a ``handler:`` section
(``baseline``, ``threads`` and the request limits ``max_bytes``, ``max_pixels``, ``min_side`` of
:class:`branched.preprocess.ImageLimits`, checked on the image header before the pixels are decoded).
A batch TorchServe forms is answered by one call to `branched.serving.Predictor.answer_batch`, where every request keeps its own thresholds and a bad
request gets its own 4xx while the others are answered.

Per request: the image is the raw body, a multipart form field, or JSON ``{"image": "<base64>"}``;
routing parameters ``thresholds=0.9,0.8`` | ``threshold=0.9`` | ``budget=0.4`` come from the query
string, form fields or request headers of the same names.

This module must only import ``ts``, ``torch`` and ``branched``: it runs from the unpacked archive.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

import torch
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes
from ts.torch_handler.base_handler import BaseHandler

import branched
from branched.body import FORM_IMAGE_FIELDS
from branched.errors import RequestError
from branched.preprocess import ImageLimits
from branched.routing import ROUTING_PARAMS
from branched.serving import Predictor, extract_image

__all__ = ["BranchedHandler", "MODEL_SUBDIR", "LIMIT_SETTINGS", "METRIC_EXITS", "METRIC_COST_SUM", "METRIC_COST",
           "METRIC_BAD", "METRIC_BATCHES"]

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
        self.initialized = True
        logger.info("branched handler: %s from %s (branched package at %s), %d exits, %d torch threads",
                    "baseline" if settings.get("baseline") else "early-exit model", model_dir,
                    os.path.dirname(branched.__file__), self.model.num_exits, threads)

    def preprocess(self, data: list[Mapping[str, Any]]) -> list[Any]:
        """Each request -> ``(image bytes, routing params)`` or the :class:`RequestError` it earned."""
        requests: list[Any] = []
        for idx, row in enumerate(data):
            headers = self._headers(idx)
            try:
                requests.append((self._image(row, headers), _routing_params(row, headers)))
            except RequestError as exc:
                requests.append(exc)
        return requests

    def inference(self, requests: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Answer the well-formed requests in one routed batch; errors pass through in place."""
        good = [i for i, r in enumerate(requests) if not isinstance(r, RequestError)]
        results: list[Any] = list(requests)
        for i, answer in zip(good, self.predictor.answer_batch([requests[i] for i in good])):
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
            self._count(METRIC_COST_SUM, sum(costs), [])
            self.context.metrics.add_metric(METRIC_COST, sum(costs) / len(costs), "Fraction", None,
                                            self._dims([]), MetricTypes.GAUGE)
        return out

    # -- helpers -------------------------------------------------------------------------------

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


def _default_threads(yaml_config: Mapping[str, Any]) -> int:
    """Cores shared by the model's workers, at least one each (workers are separate processes).

    Counts the CPUs this process may run on, so a server pinned to some cores (the load-test
    runner does that) does not oversubscribe them.
    """
    workers = int(yaml_config.get("maxWorkers") or yaml_config.get("minWorkers") or 1)
    return max(1, len(os.sched_getaffinity(0)) // max(1, workers))

"""Ray Serve apps: the staged early-exit app (ingress + one deployment per stage) and the baseline.

Staged app (``staged_app``)::

    HTTP POST /predict -> Ingress --handle--> Stage0 --handle--> Stage1 --> ... --> Stage{K-1}
                          decode, batch       segment 0 + exit 0  (a batch's survivors, one call)

* ``Ingress`` turns the body into an image tensor and per-request thresholds
  (:meth:`branched.serving.Predictor.prepare`; with ``slo_p95_ms`` set, a load controller picks the
  thresholds of requests that name none, :mod:`ray_app.control`); ``@serve.batch`` gathers concurrent requests and
  sends them to stage 0 as one :class:`Samples` (one handle call per batch, not per request).
* ``Stage{k}`` holds backbone segment ``k`` and exit ``k``. ``@serve.batch`` merges the calls that
  arrive while it computes (up to ``max_batch_size`` samples); one ``model.step(k, ...)`` (the core's
  segment step) runs on the batch in a worker thread, so the replica's event loop keeps accepting
  calls. Samples that exit are answered; the survivors' features (with their thresholds and FLOPs so
  far) go to stage ``k+1`` in one call through a ``DeploymentHandle``. Every request awaits only its
  own answer, so the batch slot is free again as soon as the step is done.

Baseline app (``baseline_app``): one deployment, HTTP ``POST /predict`` (mounted at
``/baseline``), the plain backbone batched with ``@serve.batch``.

Thresholds: per request (query parameters or headers ``thresholds`` / ``threshold`` / ``budget``),
and for the whole app through the Ingress's ``user_config`` (same keys; ``serve deploy`` with a
changed ``user_config`` calls ``reconfigure`` without restarting anything).
"""
import asyncio
import itertools
import logging
import math
import os
import time
from typing import Any, Awaitable, Callable, Optional, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from branched.artifact import load_config, load_model
from branched.errors import RequestError
from branched.preprocess import ImageLimits
from branched.routing import ROUTING_PARAMS
from branched.serving import Predictor, Prepared, extract_image

from .batching import Forwarded, Samples, num_samples, resolve, set_batching
from .control import IngressControl, controller_for, replica_id
from .planner import calibrated_exit_rates, stage_flops, work_shares

__all__ = ["Stage", "Ingress", "Baseline", "AppArgs", "staged_app", "baseline_app"]

logger = logging.getLogger("ray.serve")

#: Bodies larger than this many times the image limit are refused before they are read
#: (base64 in JSON is 4/3 of the image; multipart adds a little).
BODY_SLACK = 1.5


def _replica_threads() -> int:
    """Torch threads for this replica: its whole logical CPUs (at least one)."""
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - outside a Ray worker
        cpus = 1.0
    return max(1, int(cpus))


def _device() -> torch.device:
    # Ray sets CUDA_VISIBLE_DEVICES from num_gpus, so a replica without GPUs sees none.
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def routing_params(request: Request) -> dict[str, str]:
    """Routing parameters of a request: query string first, then headers ``X-Threshold`` or ``threshold``."""
    params = {}
    for key in ROUTING_PARAMS:
        value = request.query_params.get(key) or request.headers.get(f"x-{key}") or request.headers.get(key)
        if value not in (None, ""):
            params[key] = value
    return params


async def prepare_request(predictor: Predictor, request: Request,
                          default: Optional[torch.Tensor] = None) -> Prepared:
    """Body -> image bytes -> :class:`Prepared` (decoding runs in a thread, off the event loop); ``default``:
    the thresholds of a request that names none (the load controller's point; None: the app-wide ones).

    Raises:
        RequestError: an oversized, malformed or non-image body, or bad routing parameters.
    """
    limit = predictor.preprocessor.limits.max_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > BODY_SLACK * limit:
        raise RequestError(f"body is {length} bytes; the image limit is {limit} bytes", 413)
    body = await request.body()
    image = extract_image(body, request.headers.get("content-type", ""))
    return await asyncio.to_thread(predictor.prepare, image, routing_params(request), default)


def error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(exc), "status": exc.status}, status_code=exc.status)


def _server_error(exc: Exception) -> JSONResponse:
    logger.exception("prediction failed")
    return JSONResponse({"error": f"prediction failed: {type(exc).__name__}: {exc}", "status": 500},
                        status_code=500)


async def answer_request(predictor: Predictor, request: Request, answer: Callable[[Prepared], Awaitable[Any]],
                         default: Optional[torch.Tensor] = None) -> Any:
    """Decode a request, answer it with ``answer``; a 4xx for a bad request, a JSON 500 (never a hang)
    when answering fails. ``default`` as in :func:`prepare_request`."""
    try:
        prepared = await prepare_request(predictor, request, default)
    except RequestError as exc:
        return error_response(exc)
    try:
        return await answer(prepared)
    except Exception as exc:  # noqa: BLE001 - a stage or batch failed
        return _server_error(exc)


# ---------------------------------------------------------------------------------------------- stages
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
class Stage:
    """Backbone segment ``k`` + exit ``k``, batched across calls; each batch's survivors go to stage
    ``k+1`` in one call.

    Args:
        model_dir: the model directory (every stage loads it and keeps only its own stage).
        k: the stage index.
        next_stage: handle to stage ``k+1`` (None for the last stage, which answers everything).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings (also via ``user_config``).
    """

    def __init__(self, model_dir: str, k: int, next_stage: Optional[DeploymentHandle] = None,
                 max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005) -> None:
        from ray.serve import metrics

        torch.set_num_threads(_replica_threads())
        self.k = k
        self.device = _device()
        model = load_model(model_dir)
        self.model = model.keep_stages([k]).optimize_for_inference().to(self.device)
        self.class_names = model.config.class_names
        self.backbone_flops = float(model.cost.backbone_flops)
        self.last = k == model.num_exits - 1
        if next_stage is None and not self.last:
            raise ValueError(f"stage {k} of {model.num_exits} needs a handle to stage {k + 1}")
        self.next = next_stage
        self.counts = {"samples": 0, "exited": 0, "forwarded": 0, "batches": 0, "max_batch": 0, "busy_s": 0.0}
        self.samples_metric = metrics.Counter(
            "branched_stage_samples", description="Samples a stage received, answered (exited) or sent on.",
            tag_keys=("stage", "outcome"))
        self.batch_metric = metrics.Histogram(
            "branched_stage_batch_size", description="Batch size of one segment step.",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256], tag_keys=("stage",))
        self.max_batch_size = max_batch_size
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``{max_batch_size: int, batch_wait_timeout_s: float}`` (either)."""
        set_batching(self.run_batch, config)
        self.max_batch_size = int(config.get("max_batch_size", self.max_batch_size))

    async def __call__(self, samples: Samples) -> list[dict[str, Any]]:
        """The answers for ``samples``, in order: from this stage's exit, or from a later stage."""
        parts = await asyncio.gather(*(self.run_batch(c) for c in samples.chunks(self.max_batch_size)))
        return await resolve([r for part in parts for r in part])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=num_samples)
    async def run_batch(self, calls: list[Samples]) -> list[list[Any]]:
        # Torch releases the GIL; running it in a thread keeps the event loop (and batching) live.
        start = time.monotonic()
        results, survivors = await asyncio.to_thread(self._step, Samples.cat(calls))
        self.counts["busy_s"] += time.monotonic() - start  # the ingress's load controller reads it
        if survivors is not None:  # one call to the next stage for the whole batch's survivors
            forwarded = Forwarded(self.next, survivors[1])
            for j, i in enumerate(survivors[0]):
                results[i] = (forwarded, j)
        bounds = list(itertools.accumulate(len(c) for c in calls))
        return [results[b - len(c):b] for b, c in zip(bounds, calls)]

    @torch.inference_mode()
    def _step(self, batch: Samples) -> tuple[list[Any], Optional[tuple[list[int], Samples]]]:
        """``model.step(k)`` on a batch: answers of the samples that exit (None elsewhere), and the
        survivors' positions with their :class:`Samples` for the next stage."""
        n = len(batch)
        x = batch.features.to(self.device).contiguous(memory_format=self.model.memory_format)
        flops = None if batch.flops is None else batch.flops.to(self.device)
        r = self.model.step(self.k, x, batch.thresholds.to(self.device), flops=flops)
        results: list[Any] = [None] * n
        for i, answer in zip(r.exited.tolist(), r.answers(self.k, self.class_names, self.backbone_flops)):
            results[i] = answer
        survivors = None
        if r.survivors.numel():
            kept = r.survivors.cpu()
            survivors = (kept.tolist(), Samples(r.features.cpu(), batch.thresholds[kept], r.survivor_flops.cpu()))
        self._count(n, int(r.exited.numel()), int(r.survivors.numel()))
        return results, survivors

    def _count(self, n: int, exited: int, forwarded: int) -> None:
        c = self.counts
        c["samples"] += n
        c["exited"] += exited
        c["forwarded"] += forwarded
        c["batches"] += 1
        c["max_batch"] = max(c["max_batch"], n)
        stage = str(self.k)
        self.samples_metric.inc(n, tags={"stage": stage, "outcome": "received"})
        if exited:
            self.samples_metric.inc(exited, tags={"stage": stage, "outcome": "exited"})
        if forwarded:
            self.samples_metric.inc(forwarded, tags={"stage": stage, "outcome": "forwarded"})
        self.batch_metric.observe(n, tags={"stage": stage})

    def stats(self) -> dict[str, Any]:
        """This replica's counters: samples received, exited, forwarded; batches; largest batch; seconds
        busy computing (``busy_s``, at monotonic ``time``); its ``replica`` id and the ``next`` deployment."""
        return {"stage": self.k, **self.counts, "time": time.monotonic(), "replica": replica_id(),
                "next": None if self.next is None else self.next.deployment_name}


# ---------------------------------------------------------------------------------------------- ingress
staged_api = FastAPI(title="branched early-exit (staged)")


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(staged_api)
class Ingress:
    """HTTP front of the staged app: decode, resolve thresholds, send the sample to stage 0.

    Args:
        model_dir: the model directory (for its preprocessing, limits and thresholds).
        stage0: handle to the first stage.
        control: the load controller's ``slo_p95_ms``, ``max_drop``, ``controller`` (:mod:`ray_app.control`).
    """

    def __init__(self, model_dir: str, stage0: DeploymentHandle, max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, limits: ImageLimits = ImageLimits(),
                 control: Optional[dict[str, Any]] = None) -> None:
        torch.set_num_threads(_replica_threads())
        self.predictor = Predictor(model_dir, optimize=False, limits=limits)
        self.calibrated = self.predictor.default_thresholds
        self.stage0 = stage0
        set_batching(self.dispatch, {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})
        self.control = IngressControl(self.predictor.config, control, max_batch_size, 1e3 * batch_wait_timeout_s,
                                      stage0)

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: app-wide ``thresholds`` (list or "0.9,0.8"), ``threshold`` or ``budget``, or the
        load controller's ``slo_p95_ms``, ``max_drop``, ``controller`` (over the app args'; ``slo_p95_ms: null``
        turns it off); ``{}`` restores the calibrated thresholds and the app args' controller."""
        thresholds = self.control.reconfigure(config)
        self.predictor.default_thresholds = self.calibrated if thresholds is None else thresholds
        logger.info("app thresholds: %s", self.predictor.default_thresholds.tolist())

    @staged_api.api_route("/predict", methods=["POST", "PUT"])  # PUT: `curl -T img.png`, as TorchServe
    async def predict(self, request: Request) -> Any:
        return await self.control.serve(
            lambda: answer_request(self.predictor, request, self._answer, self.control.default()))

    @staged_api.get("/controller")
    def controller_state(self) -> dict[str, Any]:
        """The load controller's point, its accuracy cost and the load behind it (``{"on": false}`` when off)."""
        return self.control.state()

    async def _answer(self, prepared: Prepared) -> dict[str, Any]:
        forwarded, j = await self.dispatch(prepared)
        return await forwarded.answer(j)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def dispatch(self, prepared: list[Prepared]) -> list[tuple[Forwarded, int]]:
        """Concurrent requests go to stage 0 in one call (a handle call costs far more than a sample's stage 0)."""
        forwarded = Forwarded(self.stage0, Samples(torch.stack([p.image for p in prepared]),
                                                    torch.stack([p.thresholds for p in prepared])))
        return [(forwarded, j) for j in range(len(prepared))]

    @staged_api.get("/thresholds")
    def thresholds(self) -> dict[str, Any]:
        """The app-wide thresholds now in force (one per early exit)."""
        return {"thresholds": [t if math.isfinite(t) else "inf" for t in self.predictor.default_thresholds.tolist()]}


# ---------------------------------------------------------------------------------------------- baseline
baseline_api = FastAPI(title="branched plain backbone (baseline)")


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 1})
@serve.ingress(baseline_api)
class Baseline:
    """The plain backbone in one deployment: decode, batch with ``@serve.batch``, answer.

    Args:
        model_dir: the model directory (its exits are ignored).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings.
    """

    def __init__(self, model_dir: str, max_batch_size: int = 32, batch_wait_timeout_s: float = 0.005,
                 limits: ImageLimits = ImageLimits()) -> None:
        torch.set_num_threads(_replica_threads())
        self.predictor = Predictor(model_dir, baseline=True, limits=limits)
        self.predictor.model.to(_device())
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``{max_batch_size: int, batch_wait_timeout_s: float}`` (either)."""
        set_batching(self.run_batch, config)

    @baseline_api.api_route("/predict", methods=["POST", "PUT"])
    async def predict(self, request: Request) -> Any:
        return await answer_request(self.predictor, request, self.run_batch)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run_batch(self, prepared: list[Prepared]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._predict, prepared)

    def _predict(self, prepared: list[Prepared]) -> list[dict[str, Any]]:
        device = next(self.predictor.model.parameters()).device
        return self.predictor.predict([Prepared(p.image.to(device), p.thresholds.to(device)) for p in prepared])


# ---------------------------------------------------------------------------------------------- builders
class AppArgs(BaseModel):
    """``args`` of both application builders (``serve run`` / ``serve deploy`` config)."""

    model_dir: str = Field(description="model directory written by `branched build` (readable on every node)")
    max_batch_size: int = Field(32, ge=1, description="@serve.batch size of every stage / the baseline")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="longest wait for a batch to fill")
    max_ongoing_requests: int = Field(256, ge=1, description="per replica; >= max_batch_size or batches stay small")
    num_cpus: float = Field(1.0, gt=0, description="logical CPUs the stages share (split by their work), "
                                                    "or the baseline replica's; the config's deployments override")
    max_bytes: int = Field(ImageLimits.max_bytes, ge=1, description="largest encoded image accepted, in bytes "
                           "(bodies over 1.5x this are refused from Content-Length before they are read)")
    max_pixels: int = Field(ImageLimits.max_pixels, ge=1, description="largest width x height, read from the "
                            "image header before decoding")
    min_side: int = Field(ImageLimits.min_side, ge=1, description="smallest width or height accepted")
    # The ingress's load controller (ray_app/control.py): p95 target (ms), accuracy floor, tuning.
    slo_p95_ms: Optional[float] = Field(None, gt=0, description="hold this p95 latency (ms): turns the controller on")
    max_drop: Optional[float] = Field(None, gt=0, lt=1, description="largest accuracy drop it may serve, e.g. 0.02")
    controller: dict[str, Any] = Field(default_factory=dict, description="ControllerSettings fields, e.g. hold_s")

    @property
    def limits(self) -> ImageLimits:
        return ImageLimits(self.max_bytes, self.max_pixels, self.min_side)

    @property
    def control(self) -> dict[str, Any]:
        return {"slo_p95_ms": self.slo_p95_ms, "max_drop": self.max_drop, "controller": self.controller}

    @model_validator(mode="after")
    def _check(self) -> "AppArgs":
        self.model_dir = os.path.abspath(os.path.expanduser(self.model_dir))
        if self.max_drop is not None and self.slo_p95_ms is None:
            raise ValueError("max_drop is the load controller's accuracy floor: give slo_p95_ms too")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
                             f"({self.max_batch_size}): a replica never sees more requests at once")
        return self


def _args(args: Union[AppArgs, dict[str, Any]]) -> AppArgs:
    return args if isinstance(args, AppArgs) else AppArgs.model_validate(args)


def staged_app(args: AppArgs) -> serve.Application:
    """Application builder: Ingress + one ``Stage{k}`` deployment per stage.

    Default resources split ``args.num_cpus`` over the stages in proportion to the work that
    reaches each (the planner's arithmetic, with the model's calibrated exit rates when it has them);
    ``branched ray-plan`` writes explicit replicas / ``num_gpus`` for a cluster.
    """
    args = _args(args)
    config = load_config(args.model_dir)  # fails early, with the fix, on a wrong path
    controller_for(config, args.control, args.max_batch_size, 1e3 * args.batch_wait_timeout_s)  # and here
    stages = len(config.exits) + 1
    _, shares = work_shares(stage_flops(config), calibrated_exit_rates(config))
    nxt = None
    for k in reversed(range(stages)):
        nxt = Stage.options(
            name=f"Stage{k}", max_ongoing_requests=args.max_ongoing_requests,
            ray_actor_options={"num_cpus": max(0.01, round(args.num_cpus * shares[k], 2))},
        ).bind(args.model_dir, k, nxt, args.max_batch_size, args.batch_wait_timeout_s)
    return Ingress.options(max_ongoing_requests=args.max_ongoing_requests).bind(
        args.model_dir, nxt, args.max_batch_size, args.batch_wait_timeout_s, args.limits, args.control)


def baseline_app(args: AppArgs) -> serve.Application:
    """Application builder: the plain backbone in one ``Baseline`` deployment."""
    args = _args(args)
    load_config(args.model_dir)
    return Baseline.options(max_ongoing_requests=args.max_ongoing_requests,
                            ray_actor_options={"num_cpus": args.num_cpus}).bind(
        args.model_dir, args.max_batch_size, args.batch_wait_timeout_s, args.limits)

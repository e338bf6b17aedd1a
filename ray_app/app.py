"""Ray Serve apps: the staged early-exit app (an HTTP ingress + deployments hosting runs of stages) and the baseline.

Staged app (``staged_app``), grouped as ``grouping`` says (:mod:`ray_app.grouping`)::

    HTTP POST /predict -> Ingress [stages 0..n-1] --handle--> Stage{a}-{b} --handle--> ... --> [.. head]
                          decode, batch, its stages   the survivors of a batch, in one call

* ``Ingress`` turns the body into an image tensor and per-request thresholds
  (:meth:`branched.serving.Predictor.prepare`; with ``slo_p95_ms`` set, a load controller picks the
  thresholds of requests that name none, :mod:`ray_app.control`); ``@serve.batch`` gathers concurrent
  requests. It runs the stages it hosts on the batch (none in the per-stage layout), answers the samples
  that exit there, and sends the survivors to the next deployment as one :class:`Samples` (one handle
  call per batch, not per request). A request that exits in the Ingress crosses no hop.
* A ``StageGroup`` deployment (:mod:`ray_app.stages`) hosts a run of consecutive stages, merges the
  calls that arrive while it computes (``@serve.batch``), runs ``model.step`` stage after stage on
  the batch, and sends its survivors on in one call. Every request awaits only its own answer.

Baseline app (``baseline_app``): one deployment, HTTP ``POST /predict`` (mounted at
``/baseline``), the plain backbone batched with ``@serve.batch``.

Thresholds: per request (query parameters or headers ``thresholds`` / ``threshold`` / ``budget``),
and for the whole app through the Ingress's ``user_config`` (same keys; ``serve deploy`` with a
changed ``user_config`` calls ``reconfigure`` without restarting anything).
"""
import asyncio
import logging
import math
import os
from typing import Any, Awaitable, Callable, Optional, Sequence, Union

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, model_validator
from ray import serve
from ray.serve.handle import DeploymentHandle

from branched.artifact import load_config
from branched.errors import RequestError
from branched.preprocess import ImageLimits
from branched.routing import ROUTING_PARAMS
from branched.serving import Predictor, Prepared, extract_image

from .batching import Forwarded, Samples, resolve, set_batching
from .control import IngressControl, controller_for
from .grouping import Grouping
from .planner import calibrated_exit_rates, group_shares, stage_flops
from .stages import StageGroup, StageRunner, replica_device, replica_threads, run_and_forward

__all__ = ["Ingress", "Baseline", "AppArgs", "staged_app", "baseline_app"]

logger = logging.getLogger("ray.serve")

#: Bodies larger than this many times the image limit are refused before they are read
#: (base64 in JSON is 4/3 of the image; multipart adds a little).
BODY_SLACK = 1.5


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


# ---------------------------------------------------------------------------------------------- ingress
staged_api = FastAPI(title="branched early-exit (staged)")


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(staged_api)
class Ingress:
    """HTTP front of the staged app: decode, resolve thresholds, batch; run the stages it hosts and send
    the survivors to the next deployment.

    Args:
        model_dir: the model directory (for its preprocessing, limits and thresholds).
        stage0: handle to the deployment of the first stage the Ingress does not host (None when it hosts all).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings of the request batch.
        limits: image limits, checked before decoding.
        control: the load controller's ``slo_p95_ms``, ``max_drop``, ``controller`` (:mod:`ray_app.control`).
        stages: the stages ``0..n-1`` the Ingress runs itself (none: it only decodes).
    """

    def __init__(self, model_dir: str, stage0: Optional[DeploymentHandle], max_batch_size: int = 32,
                 batch_wait_timeout_s: float = 0.005, limits: ImageLimits = ImageLimits(),
                 control: Optional[dict[str, Any]] = None, stages: Sequence[int] = ()) -> None:
        torch.set_num_threads(replica_threads())
        self.predictor = Predictor(model_dir, optimize=False, limits=limits)
        self.calibrated = self.predictor.default_thresholds
        self.runner = StageRunner(model_dir, stages) if stages else None
        if stage0 is None and (self.runner is None or not self.runner.last):
            raise ValueError("the Ingress needs a handle to the next deployment unless it hosts every stage")
        self.stage0 = stage0
        set_batching(self.dispatch, {"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})
        self.control = IngressControl(self.predictor.config, control, max_batch_size, 1e3 * batch_wait_timeout_s,
                                      stage0, self.stats if self.runner else None)

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
        return (await resolve([await self.dispatch(prepared)]))[0]

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def dispatch(self, prepared: list[Prepared]) -> list[Any]:
        """Concurrent requests as one batch: the hosted stages run on it, and the survivors go on in one
        call (a handle call costs far more than a sample's share of a small stage)."""
        batch = Samples(torch.stack([p.image for p in prepared]), torch.stack([p.thresholds for p in prepared]))
        if self.runner is None:
            forwarded = Forwarded(self.stage0, batch)
            return [(forwarded, j) for j in range(len(prepared))]
        return await run_and_forward(self.runner, batch, self.stage0)

    def stats(self) -> dict[str, Any]:
        """Counters of the stages this replica hosts (``stages`` empty when it only decodes)."""
        if self.runner is None:
            return {"stages": [], "next": None if self.stage0 is None else self.stage0.deployment_name}
        return self.runner.stats(self.stage0)

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
        torch.set_num_threads(replica_threads())
        self.predictor = Predictor(model_dir, baseline=True, limits=limits)
        self.predictor.model.to(replica_device())
        self.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s})

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``{max_batch_size: int, batch_wait_timeout_s: float}`` (either)."""
        set_batching(self.run_batch, config)

    @baseline_api.api_route("/predict", methods=["POST", "PUT"])
    async def predict(self, request: Request) -> Any:
        return await answer_request(self.predictor, request, self.run_batch)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run_batch(self, prepared: list[Prepared]) -> list[dict[str, Any]]:
        # On the loop's thread, as the stages (ray_app.stages.run_and_forward says why).
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

    grouping: str = Field("per-stage", description="which process runs which stages: the Ingress's stages, then "
                          "each deployment's, '|'-separated ('0|1,2'), or 'ingress' / 'per-stage' (ray_app/grouping.py)")
    plan: Optional[dict[str, Any]] = Field(None, description="what `branched ray-plan` measured and why it chose "
                                           "this grouping (kept for the record; not used to serve)")

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
    """Application builder: the Ingress (with the stages ``args.grouping`` gives it) and one ``StageGroup``
    deployment per later run of stages (``Stage{k}`` or ``Stage{a}-{b}``).

    Default resources split ``args.num_cpus`` over the processes that compute, in proportion to the
    work that reaches each (the planner's arithmetic, with the model's calibrated exit rates when it
    has them); ``branched ray-plan`` measures this machine, chooses the grouping and writes explicit
    replicas / ``num_gpus``.
    """
    args = _args(args)
    config = load_config(args.model_dir)  # fails early, with the fix, on a wrong path
    controller_for(config, args.control, args.max_batch_size, 1e3 * args.batch_wait_timeout_s)  # and here
    grouping = Grouping.parse(args.grouping, len(config.exits) + 1)
    shares = group_shares(stage_flops(config), calibrated_exit_rates(config), grouping)
    nxt = None
    for group, name, share in reversed(list(zip(grouping.groups, grouping.names, shares[1:]))):
        nxt = StageGroup.options(
            name=name, max_ongoing_requests=args.max_ongoing_requests,
            ray_actor_options={"num_cpus": max(0.01, round(args.num_cpus * share, 2))},
        ).bind(args.model_dir, list(group), nxt, args.max_batch_size, args.batch_wait_timeout_s)
    ingress_cpus = max(0.25, round(args.num_cpus * shares[0], 2)) if grouping.ingress else 0.25
    return Ingress.options(max_ongoing_requests=args.max_ongoing_requests,
                           ray_actor_options={"num_cpus": ingress_cpus}).bind(
        args.model_dir, nxt, args.max_batch_size, args.batch_wait_timeout_s, args.limits, args.control,
        list(grouping.ingress))


def baseline_app(args: AppArgs) -> serve.Application:
    """Application builder: the plain backbone in one ``Baseline`` deployment."""
    args = _args(args)
    load_config(args.model_dir)
    return Baseline.options(max_ongoing_requests=args.max_ongoing_requests,
                            ray_actor_options={"num_cpus": args.num_cpus}).bind(
        args.model_dir, args.max_batch_size, args.batch_wait_timeout_s, args.limits)

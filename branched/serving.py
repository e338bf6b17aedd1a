"""What both servers do with a batch of requests, without knowing either server.

:class:`Predictor` loads a model directory for serving (BN folded, channels-last), turns request
bytes into tensors, and answers a batch in which every request may carry its own routing
parameters. A bad request gets its own error and never spoils the others in its batch. The
TorchServe handler calls :meth:`Predictor.answer_batch` whole; Ray Serve's ingress calls
:meth:`Predictor.prepare` and its stage deployments call ``model.step`` on the prepared tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from .artifact import load_model
from .body import Body, image_from_body
from .errors import ImageError, RequestError
from .model import BranchedModel
from .preprocess import ImageLimits, Preprocessor
from .routing import resolve_thresholds, thresholds_from_params

__all__ = ["Prepared", "Predictor", "extract_image"]


@dataclass
class Prepared:
    """One request ready for the model: its image tensor ``[3, S, S]`` and thresholds ``[K-1]``."""

    image: torch.Tensor
    thresholds: torch.Tensor


def extract_image(body: Body, content_type: str = "") -> bytes:
    """The image bytes of a request body: raw, multipart form or JSON ``{"image": "<base64>"}``.

    Args:
        body: the body as bytes (a ``str`` or already-decoded JSON value is accepted too).
        content_type: the request's ``Content-Type`` header ('' when absent: raw image bytes).

    Raises:
        RequestError: a malformed JSON or multipart body, or one without an image (400).
    """
    try:
        return image_from_body(body, content_type)
    except ImageError as exc:
        raise RequestError(str(exc)) from None


class Predictor:
    """A model directory loaded for serving.

    Args:
        model_dir: directory written by ``branched build`` / :func:`branched.artifact.save_model`.
        baseline: serve the plain backbone (no exits) from the same weights, for comparisons.
        limits: request size and image dimension limits.
        optimize: fold BN and use channels-last (:meth:`BranchedModel.optimize_for_inference`).
    """

    def __init__(self, model_dir: str, baseline: bool = False, limits: ImageLimits = ImageLimits(),
                 optimize: bool = True) -> None:
        model = load_model(model_dir)
        if baseline:
            model = model.without_exits()
        self.model: BranchedModel = model.optimize_for_inference() if optimize else model
        self.config = self.model.config
        self.preprocessor = Preprocessor.for_config(self.config, limits)
        self.default_thresholds = resolve_thresholds(None, self.config.thresholds)

    def prepare(self, data: bytes, params: Optional[Mapping[str, Any]] = None,
                default: Optional[torch.Tensor] = None) -> Prepared:
        """Decode one request's image and routing parameters.

        ``default``: thresholds for a request that names none (a load controller's operating point);
        None: ``default_thresholds``. The request's own ``thresholds`` / ``threshold`` / ``budget`` win.

        Raises:
            RequestError: bad image bytes (413 for an oversized body) or bad routing parameters.
        """
        try:
            thresholds = thresholds_from_params(params or {}, self.config)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if len(data or b"") > self.preprocessor.limits.max_bytes:
            raise RequestError(f"body is {len(data)} bytes; the limit is {self.preprocessor.limits.max_bytes}", 413)
        try:
            image = self.preprocessor.from_bytes(data)
        except ImageError as exc:
            raise RequestError(str(exc)) from None
        if thresholds is None:
            thresholds = self.default_thresholds if default is None else default
        return Prepared(image, thresholds)

    @torch.inference_mode()
    def predict(self, prepared: Sequence[Prepared]) -> list[dict[str, Any]]:
        """Answers for already-prepared requests, in order (one routed forward for the batch)."""
        if not prepared:
            return []
        x = torch.stack([p.image for p in prepared])
        thresholds = torch.stack([p.thresholds for p in prepared])
        return self.model.routed_forward(x, thresholds).answers(self.config.class_names)

    def answer_batch(self, requests: Sequence[tuple[bytes, Mapping[str, Any]]],
                     default: Optional[torch.Tensor] = None) -> list[Any]:
        """Answer every request of a batch: a dict, or a :class:`RequestError` for a bad one.
        ``default`` as in :meth:`prepare`."""
        results: list[Any] = [None] * len(requests)
        good: list[int] = []
        prepared: list[Prepared] = []
        for i, (data, params) in enumerate(requests):
            try:
                prepared.append(self.prepare(data, params, default))
                good.append(i)
            except RequestError as exc:
                results[i] = exc
        for i, answer in zip(good, self.predict(prepared)):
            results[i] = answer
        return results

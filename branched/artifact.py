"""One self-describing model directory: ``config.json`` + ``weights.pt``.

``config.json`` holds the :class:`~branched.model.ModelConfig` (backbone, input size,
normalisation, class names, exit placement and kind, thresholds, policy, FLOPs per stage, LC-Net
gates, calibration report); ``weights.pt`` is the model's ``state_dict``, read back with
``torch.load(weights_only=True)``, so loading never unpickles arbitrary objects.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from .config import ModelConfig
from .errors import ArtifactError
from .model import BranchedModel

__all__ = ["FORMAT", "CONFIG_FILE", "WEIGHTS_FILE", "save_model", "load_config", "load_model"]

FORMAT = "branched-model/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


def save_model(model: BranchedModel, directory: str, extra_files: dict[str, Any] | None = None) -> str:
    """Write ``model`` to ``directory`` (created if needed); returns the directory.

    Args:
        model: the model to save; its ``config`` is written as JSON.
        directory: target directory.
        extra_files: optional ``{name: json-serialisable}`` written beside the config.
    """
    os.makedirs(directory, exist_ok=True)
    config = {"format": FORMAT, **model.config.to_dict()}
    tmp = os.path.join(directory, CONFIG_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
    torch.save(model.state_dict(), os.path.join(directory, WEIGHTS_FILE))
    os.replace(tmp, os.path.join(directory, CONFIG_FILE))  # config last: a half-written dir has none
    for name, payload in (extra_files or {}).items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(payload, f, indent=2)
    return directory


def load_config(directory: str) -> ModelConfig:
    """Read and validate ``config.json`` of a model directory.

    Raises:
        ArtifactError: the directory or its config is missing, unreadable or foreign.
    """
    if not os.path.isdir(directory):
        raise ArtifactError(f"model directory {directory!r} does not exist; build one with `branched build --out DIR`")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ArtifactError(f"{directory!r} is not a branched model directory: no {CONFIG_FILE}")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path!r} is not valid JSON ({exc}); the model directory is damaged") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ArtifactError(f"{path!r} is not a {FORMAT} config (format: {found!r})")
    raw.pop("format")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"{path!r} has an invalid model config: {exc}") from None


def load_model(directory: str, map_location: str | torch.device = "cpu") -> BranchedModel:
    """Rebuild a :class:`BranchedModel` from a directory written by :func:`save_model`, in eval mode.

    Raises:
        ArtifactError: missing, damaged, truncated or foreign files, or weights that do not fit.
    """
    config = load_config(directory)
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ArtifactError(f"{directory!r} has no {WEIGHTS_FILE}; the model directory is incomplete")
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle of foreign objects, ...
        raise ArtifactError(f"cannot read {weights!r} as weights-only tensors: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise ArtifactError(f"{weights!r} holds a {type(state).__name__}, expected a state_dict")
    try:
        model = BranchedModel.from_config(config)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"weights in {directory!r} do not fit its config: {str(exc).splitlines()[0]}") from None
    return model.eval()

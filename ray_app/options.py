"""Ray Serve's own settings that decide what a request costs on CPU, as named profiles.

Serve reads most of these from environment variables when ``ray.serve`` is first imported, in the
driver and in every Ray process it starts; so a profile must be applied (:func:`apply`) before Ray
starts. ``python -m ray_app.server`` and ``branched ray-plan --calibrate`` apply one; with
``serve run`` / ``ray start``, export :func:`env` yourself (``branched ray-plan --print-env``).

Profiles (README "Ray Serve" / "Where Ray's CPU goes" has the measured figures):

* ``ray-default``: Serve as it ships: HTTP proxy actor -> ingress replica, access log on.
* ``quiet``: the access log off and Serve's log level WARNING (per-request log records cost CPU).
* ``direct``: ``quiet`` + direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``): each ingress replica
  serves HTTP itself on its own port (30000 and up, on the HTTP host), so a request skips the proxy
  process; the proxy stays up on the head node for the usual port.
* ``tuned`` (the default): ``direct`` + ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (user code and the handle
  router on the replica's main event loop, gRPC between deployments, buffered request logs, no log
  to stderr), a slower metrics export, and calls between deployments of up to 1 GiB (gRPC's 4 MB
  default is one batch of 224-px survivor features).
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["PROFILES", "DEFAULT_PROFILE", "env", "logging_config", "apply", "direct_ingress"]

DEFAULT_PROFILE = "tuned"

_QUIET = {"enable_access_log": False, "log_level": "WARNING"}

#: name -> (environment variables, Serve logging_config)
PROFILES: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "ray-default": ({}, {}),
    "quiet": ({}, _QUIET),
    "direct": ({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}, _QUIET),
    # gRPC between deployments caps a call at 4 MB by default; one 224-px ResNet-50 sample's survivor
    # features are 3.2 MB, so a batch of them needs far more (a call carries one batch's survivors).
    "tuned": ({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
               "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
               "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(1024 ** 3)}, _QUIET),
}


def _check(profile: str) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown Ray Serve profile {profile!r}; use one of {', '.join(PROFILES)}")


def env(profile: str = DEFAULT_PROFILE) -> dict[str, str]:
    """The environment variables of ``profile``."""
    _check(profile)
    return dict(PROFILES[profile][0])


def logging_config(profile: str = DEFAULT_PROFILE) -> dict[str, Any]:
    """Serve's ``logging_config`` of ``profile`` (``serve.start(logging_config=...)``)."""
    _check(profile)
    return dict(PROFILES[profile][1])


def apply(profile: str = DEFAULT_PROFILE, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Set ``profile``'s environment (and ``extra``) in this process, before Ray or ``ray.serve`` is imported.

    Raises:
        RuntimeError: ``ray.serve`` is already imported here (it has read its settings; start a new process).
    """
    import sys

    variables = {**env(profile), **(extra or {})}
    if "ray.serve" in sys.modules and any(os.environ.get(k) != v for k, v in variables.items()):
        raise RuntimeError("ray.serve was imported before the Ray Serve profile was applied; apply it first, "
                           "in a fresh process")
    os.environ.update(variables)
    return variables


def direct_ingress(variables: dict[str, str]) -> bool:
    """Whether these settings make every ingress replica serve HTTP on its own port."""
    return any(variables.get(k) == "1" for k in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED",
                                                 "RAY_SERVE_ENABLE_HA_PROXY"))

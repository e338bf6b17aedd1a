"""Ray Serve adapter: the staged early-exit app, the baseline app, and the replica planner.

``ray_app.app`` holds the Ingress, the Baseline and the application builders and ``ray_app.stages``
the stage deployments (both import Ray); ``ray_app.grouping``, ``ray_app.costmodel`` and
``ray_app.planner`` are pure arithmetic; ``ray_app.calibrate`` measures a machine for the planner;
``ray_app.options`` names Serve's settings; ``ray_app.cli`` adds ``branched ray-plan``.
"""
import sys as _sys

__all__: list[str] = []

if "ray.serve._private.replica" in _sys.modules:  # inside a Serve replica only: never imports Ray elsewhere
    from .loopback import keep_replica_grpc_on_loopback

    keep_replica_grpc_on_loopback()

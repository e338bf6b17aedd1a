"""Ray Serve adapter: the staged early-exit app, the baseline app, and the replica planner.

``ray_app.app`` holds the deployments and application builders (imports Ray); ``ray_app.planner``
is pure arithmetic; ``ray_app.cli`` adds ``branched ray-plan``.
"""
import sys as _sys

__all__: list[str] = []

if "ray.serve._private.replica" in _sys.modules:  # inside a Serve replica only: never imports Ray elsewhere
    from .loopback import keep_replica_grpc_on_loopback

    keep_replica_grpc_on_loopback()

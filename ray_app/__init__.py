"""Ray Serve adapter: the staged early-exit app, the baseline app, and the replica planner.

``ray_app.app`` holds the deployments and application builders (imports Ray); ``ray_app.planner``
is pure arithmetic; ``ray_app.cli`` adds ``branched ray-plan``.
"""
__all__: list[str] = []

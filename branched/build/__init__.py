"""Offline only: everything that turns data and a backbone into a model directory.

The inference core (``branched/`` outside this package) never imports from here, and ``.mar``
archives do not carry it. Entry point: :func:`branched.build.pipeline.run_build` with a
:class:`~branched.build.settings.BuildSettings` (``branched build`` on the command line).
"""

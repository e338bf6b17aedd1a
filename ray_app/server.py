"""Serve both Ray Serve apps (staged + baseline) of one model on a private local Ray, until stopped.

``python -m ray_app.server --model-dir models/demo --port 8000`` applies a Ray Serve profile
(:mod:`ray_app.options`; ``tuned`` by default: direct ingress), starts a local Ray of its own (no
dashboard, capped object store), runs ``staged_app`` at ``/`` and ``baseline_app`` at ``/baseline``
on 127.0.0.1, and serves until SIGINT/SIGTERM, then shuts Serve and Ray down. The staged app's
grouping is ``--grouping`` (``auto``: measure this machine and let the planner choose, as ``branched
ray-plan --calibrate`` does), or the apps come from a Serve config (``--config plan.yaml``).

Once both apps answer it prints, and writes to ``--ready-file``, where each app is served: with
direct ingress, each app's own replica port (no proxy on the way); else the proxy's port. The
load-test harness starts it as a child process (:class:`loadtests.launchers.RayServe`).

Private: every Ray port (GCS, raylet, object manager, workers, agents, dashboard, HTTP) listens on
127.0.0.1 only. Ray binds its gRPC servers to loopback only when the node's address is exactly
127.0.0.1, and it replaces a node address of 127.0.0.1 by the machine's own address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's switch for "no multi-node cluster") is set before Ray is
imported; :func:`private_local_ray` does both. ``address="local"`` never joins another cluster, so a
``ray_current_cluster`` file left by a killed head cannot make it wait.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any, Optional

from .options import DEFAULT_PROFILE, PROFILES, apply, direct_ingress, logging_config

__all__ = ["main", "app_urls", "private_local_ray", "LOOPBACK_ENV"]


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env takes NAME=VALUE, got {text!r}")
    return key, value


def app_urls(port: int, direct: bool) -> dict[str, str]:
    """Base URL of each running app (the route prefix included): each ingress replica's own port with
    direct ingress (the first replica's; put a load balancer in front of several), else the proxy's."""
    from ray.serve.context import _get_global_client  # what `serve status` reads, with the target ports

    details = _get_global_client().get_serve_details()
    urls = {}
    for name, app in details.get("applications", {}).items():
        prefix = (app.get("route_prefix") or "/").rstrip("/")
        urls[name] = f"http://127.0.0.1:{port}{prefix}"
    if direct:
        for group in details.get("target_groups", []):
            targets = group.get("targets") or []
            if group.get("protocol") == "HTTP" and targets and group.get("app_name") in urls:
                prefix = (group.get("route_prefix") or "/").rstrip("/")
                urls[group["app_name"]] = f"http://127.0.0.1:{targets[0]['port']}{prefix}"
    return urls


def _auto_grouping(model_dir: str, num_cpus: float, batch: int, batch_wait_s: Optional[float] = None
                   ) -> tuple[str, dict[str, Any]]:
    """Calibrate on this machine and let the planner choose the grouping; prints its reasoning."""
    from branched.artifact import load_config

    from .calibrate import calibrate
    from .costmodel import choose_grouping, describe
    from .planner import calibrated_exit_rates, reach_probabilities

    config = load_config(model_dir)
    rates = calibrated_exit_rates(config) or [0.0] * len(config.exits) + [1.0]
    reach = reach_probabilities(rates)
    cal = calibrate(model_dir, batch, threads=max(1, int(num_cpus)), batch_wait_s=batch_wait_s)
    best, costs = choose_grouping(reach, cal)
    lines = describe(best, costs, reach, cal)
    print("\n".join(["[ray-plan] " + line for line in lines]), flush=True)
    return str(best.grouping), {"exit_rates": rates, "calibration": cal.to_dict(), "reasoning": lines}


def _deploy_config(path: str, port: int) -> None:
    """Deploy a Serve config file (``serve run`` / ``branched ray-plan`` format) the way ``serve run`` does."""
    import yaml
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    with open(path) as f:
        doc = yaml.safe_load(f)
    doc["http_options"] = {**(doc.get("http_options") or {}), "host": "127.0.0.1", "port": port}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(doc))


def _wait_running(names: list[str], timeout_s: float = 600) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if set(names) <= set(apps) and all(apps[n].status == "RUNNING" for n in names):
            return
        failed = {n: apps[n].message for n in names if n in apps and apps[n].status == "DEPLOY_FAILED"}
        if failed:
            raise RuntimeError(f"deploy failed: {failed}")
        time.sleep(0.5)
    raise RuntimeError(f"apps {names} not running after {timeout_s:.0f}s")


#: Set before Ray is imported, so that Ray keeps the node address 127.0.0.1 (and so binds to loopback only).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def private_local_ray(num_cpus: float, object_store_mb: int) -> str:
    """Start a fresh single-node Ray whose ports all listen on 127.0.0.1; returns the node's address.

    Raises:
        RuntimeError: Ray was imported before with another setting, so its node would listen on every
            interface (the message names the fix).
    """
    os.environ.update(LOOPBACK_ENV)  # inherited by the raylet, GCS and every worker
    import ray
    from ray._private import ray_constants

    if ray_constants.ENABLE_RAY_CLUSTER:
        raise RuntimeError("Ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set, so it would listen "
                           "on every interface; set it in the environment (or start `python -m ray_app.server`)")
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=object_store_mb * 1024 ** 2, log_to_driver=False)
    return ray.util.get_node_ip_address()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_app.server", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-cpus", type=float, default=float(len(os.sched_getaffinity(0))))
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--object-store-mb", type=int, default=256)
    p.add_argument("--profile", default=DEFAULT_PROFILE, choices=list(PROFILES), help="Ray Serve settings (ray_app/options.py)")
    p.add_argument("--env", type=_env_pair, action="append", default=[], help="extra NAME=VALUE for Ray (repeatable)")
    p.add_argument("--grouping", default="auto", help="auto (measure, then plan), ingress, per-stage or e.g. '0|1,2'")
    p.add_argument("--config", help="deploy this Serve config (e.g. from `branched ray-plan`) instead")
    p.add_argument("--ready-file", help="write the apps' URLs, grouping and plan here as JSON once they answer")
    p.add_argument("--staged-args", type=json.loads, default={},
                   help='more staged-app args as JSON, e.g. \'{"slo_p95_ms": 200, "max_drop": 0.02}\'')
    args = p.parse_args(argv)

    # A new HTTP proxy gets 5 s to report ready by default; on a small, busy machine importing it takes longer.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    # A direct-ingress replica drains for 30 s by default before it stops, so that a load balancer in front can
    # notice; this server's clients talk to it directly, so Ctrl-C would wait 30 s for nothing (and serve.shutdown
    # gives up on the controller at 30 s). Requests in flight still finish (graceful_shutdown_timeout_s).
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    variables = apply(args.profile, dict(args.env))  # before Ray or ray.serve is imported
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    # A fresh cluster of our own, never one that happens to run on this host, on loopback only.
    # Logical CPUs are scheduling tokens; the process affinity confines the physical cores. Enough
    # tokens for the staged app (num_cpus split by work), the baseline (num_cpus) and the probes.
    private_local_ray(2 * args.num_cpus + 2, args.object_store_mb)

    import ray
    from ray import serve

    from .app import baseline_app, staged_app

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=logging_config(args.profile))
        plan: dict[str, Any] = {}
        if args.config:
            _deploy_config(args.config, args.port)
            grouping = "from " + args.config
        else:
            grouping = args.grouping
            if grouping == "auto":
                grouping, plan = _auto_grouping(args.model_dir, args.num_cpus, args.max_batch_size,
                                                args.batch_wait_timeout_s)
            common = {"model_dir": args.model_dir, "max_batch_size": args.max_batch_size,
                      "batch_wait_timeout_s": args.batch_wait_timeout_s}
            # The staged app's processes share the CPUs by work; the baseline replica may use them all.
            serve.run(staged_app({**common, "num_cpus": args.num_cpus, "grouping": grouping, **args.staged_args}),
                      name="staged",
                      route_prefix="/")
            serve.run(baseline_app({**common, "num_cpus": args.num_cpus}), name="baseline", route_prefix="/baseline")
        _wait_running(["staged", "baseline"])
        urls = app_urls(args.port, direct_ingress(variables))
        ready = {"urls": urls, "proxy": f"http://127.0.0.1:{args.port}", "profile": args.profile, "env": variables,
                 "grouping": grouping, "plan": plan}
        if args.ready_file:
            with open(args.ready_file + ".tmp", "w") as f:
                json.dump(ready, f, indent=1)
            os.replace(args.ready_file + ".tmp", args.ready_file)
        print(f"serving on {urls} (grouping {grouping}, profile {args.profile})", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

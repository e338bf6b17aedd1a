"""Serve both Ray Serve apps (staged + baseline) of one model on a private local Ray, until stopped.

``python -m ray_app.server --model-dir models/demo --port 8000`` starts a local Ray of its own (no
dashboard, capped object store), runs ``staged_app`` at ``/`` and ``baseline_app`` at ``/baseline``
on 127.0.0.1, and serves until SIGINT/SIGTERM, then shuts Serve and Ray down. The load-test harness
starts it as a child process (:class:`loadtests.launchers.RayServe`).

Private: every Ray port (GCS, raylet, object manager, workers, agents, dashboard, HTTP) listens on
127.0.0.1 only. Ray binds its gRPC servers to loopback only when the node's address is exactly
127.0.0.1, and it replaces a node address of 127.0.0.1 by the machine's own address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (Ray's switch for "no multi-node cluster") is set before Ray is
imported; :func:`private_local_ray` does both. ``address="local"`` never joins another cluster, so a
``ray_current_cluster`` file left by a killed head cannot make it wait.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional

__all__ = ["main", "private_local_ray", "LOOPBACK_ENV"]

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
    args = p.parse_args(argv)

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    # A fresh cluster of our own, never one that happens to run on this host, on loopback only.
    # Logical CPUs are scheduling tokens; the process affinity confines the physical cores. Enough
    # tokens for the stages (num_cpus split by work), the ingress and the baseline replica.
    private_local_ray(max(4.0, args.num_cpus + 2), args.object_store_mb)

    import ray
    from ray import serve

    from .app import baseline_app, staged_app

    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        common = {"model_dir": args.model_dir, "max_batch_size": args.max_batch_size,
                  "batch_wait_timeout_s": args.batch_wait_timeout_s}
        # The stages share the CPUs by work (the app's own split); the baseline replica may use them all.
        serve.run(staged_app({**common, "num_cpus": args.num_cpus}), name="staged", route_prefix="/")
        serve.run(baseline_app({**common, "num_cpus": min(1.0, args.num_cpus)}), name="baseline",
                  route_prefix="/baseline")
        print(f"serving on http://127.0.0.1:{args.port} (POST /predict, POST /baseline/predict)", flush=True)
        while not stop:
            time.sleep(0.5)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

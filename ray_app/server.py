"""Serve both Ray Serve apps (staged + baseline) of one model on a private local Ray, until stopped.

``python -m ray_app.server --model-dir models/demo --port 8000`` starts a local Ray of its own (no
dashboard, capped object store), runs ``staged_app`` at ``/`` and ``baseline_app`` at ``/baseline``
on 127.0.0.1, and serves until SIGINT/SIGTERM, then shuts Serve and Ray down. The load-test harness
starts it as a child process (:class:`loadtests.launchers.RayServe`).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Optional

__all__ = ["main"]


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_app.server", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-cpus", type=float, default=float(len(os.sched_getaffinity(0))))
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--object-store-mb", type=int, default=256)
    p.add_argument("--staged-args", type=json.loads, default={},
                   help='more staged-app args as JSON, e.g. \'{"slo_p95_ms": 200, "max_drop": 0.02}\'')
    args = p.parse_args(argv)

    # A new HTTP proxy gets 5 s to report ready by default; on a small, busy machine importing it takes longer.
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    import ray
    from ray import serve

    from .app import baseline_app, staged_app

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    # address="local": always a fresh cluster of our own, never one that happens to run on this host.
    # Logical CPUs are scheduling tokens; the process affinity confines the physical cores. Enough
    # tokens for the stages (num_cpus split by work), the ingress and the baseline replica.
    ray.init(address="local", num_cpus=max(4.0, args.num_cpus + 2), object_store_memory=args.object_store_mb * 1024 ** 2,
             include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        common = {"model_dir": args.model_dir, "max_batch_size": args.max_batch_size,
                  "batch_wait_timeout_s": args.batch_wait_timeout_s}
        # The stages share the CPUs by work (the app's own split); the baseline replica may use them all.
        serve.run(staged_app({**common, "num_cpus": args.num_cpus, **args.staged_args}), name="staged",
                  route_prefix="/")
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

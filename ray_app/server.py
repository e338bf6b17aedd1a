"""Run both Ray Serve apps (staged + baseline) as one process tree on chosen CPUs, and stop it cleanly.

``python -m ray_app.server --model-dir models/demo --port 8000`` starts a local Ray (no dashboard,
capped object store), runs ``staged_app`` at ``/`` and ``baseline_app`` at ``/baseline`` on
127.0.0.1, and serves until SIGINT/SIGTERM. :class:`RayServe` starts that as a child process in its
own session, pinned to given CPUs (the load-test runner gives the server its own cores), waits
until both apps answer, and kills the whole group on exit.
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import requests

__all__ = ["RayServe", "main"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "PNG")
    return buf.getvalue()


class RayServe:
    """The staged and baseline apps of ``model_dir`` in a child process.

    Args:
        model_dir: model directory for both apps.
        cpus: CPUs the process tree may use (affinity); None: all. Ray is told as many logical CPUs.
        port: HTTP port on 127.0.0.1 (default: a free one).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings of every stage and the baseline.
        log_path: where the child's output goes (default: a file in the temp dir).
    """

    def __init__(self, model_dir: str, cpus: Optional[set[int]] = None, port: Optional[int] = None,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, log_path: Optional[str] = None) -> None:
        self.model_dir = os.path.abspath(model_dir)
        self.cpus = cpus
        self.port = port or _free_port()
        self.batch = (max_batch_size, batch_wait_timeout_s)
        self.log_path = log_path or os.path.join("/tmp", f"branched-ray-{self.port}.log")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300.0) -> "RayServe":
        """Start and wait until both apps answer a probe image.

        Raises:
            RuntimeError: the apps did not come up in time (the log tail is in the message).
        """
        from branched.artifact import load_config

        probe = _probe_png(load_config(self.model_dir).input_size)
        n_cpus = len(self.cpus) if self.cpus else len(os.sched_getaffinity(0))
        cmd = [sys.executable, "-m", "ray_app.server", "--model-dir", self.model_dir, "--port", str(self.port),
               "--num-cpus", str(n_cpus), "--max-batch-size", str(self.batch[0]),
               "--batch-wait-timeout-s", str(self.batch[1])]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if all(requests.post(self.url + path, data=probe, timeout=10).status_code == 200
                       for path in ("/predict", "/baseline/predict")):
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"Ray Serve did not get ready in {timeout:.0f}s:\n{tail}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGINT (graceful ``serve.shutdown``), then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            os.killpg(pgid, signal.SIGINT)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None

    def __enter__(self) -> "RayServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ray_app.server", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-cpus", type=float, default=float(len(os.sched_getaffinity(0))))
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    p.add_argument("--object-store-mb", type=int, default=256)
    args = p.parse_args(argv)

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

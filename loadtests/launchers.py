"""Start and stop real servers for tests and load runs: TorchServe and Ray Serve on loopback, free ports, no leftovers.

Used by the tests and by the load-test harness (:mod:`loadtests.harness`). Both launchers start the
server in a session of its own (``start_new_session``), so its whole process tree can be found
(:mod:`loadtests.procs`) and killed.

:class:`TorchServe`: the instance runs from the repository's ``config.properties`` with only the addresses, model store
and metrics config path replaced, so the tests exercise the shipped configuration. Each instance
gets its own ``TMPDIR``/``TEMP`` (TorchServe keeps its pid file, unpacked archives and worker sockets
there), so it never collides with another TorchServe on the same machine, and it runs in its own
process group, which :meth:`TorchServe.stop` kills after ``torchserve --stop`` as a last resort.

:class:`RayServe`: ``python -m ray_app.server`` (both apps on a private local Ray) as a child process,
pinned to given CPUs, ready when both apps answer a probe image.
"""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Collection, Mapping, Optional, Sequence

import requests

__all__ = ["TorchServe", "RayServe", "free_port", "free_ports", "wait_for", "REPO_ROOT"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # config.properties lives here
TORCHSERVE = os.path.join(os.path.dirname(sys.executable), "torchserve")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int, exclude: Collection[int] = ()) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free right now, none in ``exclude``.

    The sockets stay bound until all ``n`` are chosen: one port at a time, the OS may hand out the same port
    twice (a `ray start` with two components on one port refuses to start).
    """
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
        return ports
    finally:
        for s in sockets:
            s.close()


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, poll: float = 0.3) -> Any:
    """Poll ``condition`` until it returns something truthy, and return that; None at ``timeout``.

    An exception from ``condition`` counts as "not yet" (a server mid-restart may refuse the question).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # noqa: BLE001 - ask again
            value = None
        if value or time.monotonic() > deadline:
            return value or None
        time.sleep(poll)


def _properties(path: str) -> dict[str, str]:
    props: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, value = line.split("=", 1)
                props[key.strip()] = value.strip()
    return props


class TorchServe:
    """One TorchServe process tree serving ``models`` (``{name: file.mar}``) from ``model_store``.

    Args:
        model_store: directory holding the ``.mar`` files.
        workdir: private directory for config, logs, temp files and the server's stdout.
        models: model name -> archive file name, loaded at start.
        config: the ``config.properties`` to start from (default: the repository's).
        cpus: CPUs the whole process tree (frontend and workers) may use; None: all.
    """

    def __init__(self, model_store: str, workdir: str, models: Mapping[str, str],
                 config: str = os.path.join(REPO_ROOT, "config.properties"),
                 cpus: Optional[set[int]] = None) -> None:
        # TorchServe runs in ``workdir``: relative paths would resolve against it.
        self.model_store, self.workdir = os.path.abspath(model_store), os.path.abspath(workdir)
        self.models, self.cpus = dict(models), cpus
        self.props = _properties(config)
        self.ports = {k: free_port() for k in ("inference", "management", "metrics", "grpc_inf", "grpc_mgmt")}
        self.tmp = os.path.join(workdir, "tmp")
        self.logs = os.path.join(workdir, "logs")
        self.pgid: Optional[int] = None

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['inference']}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['management']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def _env(self) -> dict[str, str]:
        return {**os.environ, "TMPDIR": self.tmp, "TEMP": self.tmp,
                "LOG_LOCATION": self.logs, "METRICS_LOCATION": self.logs}

    def _write_config(self) -> str:
        props = dict(self.props)
        metrics_config = props.get("metrics_config")
        if metrics_config and not os.path.isabs(metrics_config):
            props["metrics_config"] = os.path.join(REPO_ROOT, metrics_config)  # relative to the repo root
        props.update({
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_port": str(self.ports["grpc_inf"]),
            "grpc_management_port": str(self.ports["grpc_mgmt"]),
            "model_store": self.model_store,
            # Worker sockets are named TEMP/.ts.sock.PORT; a private TEMP already keeps them apart.
            "initial_worker_port": str(20000 + os.getpid() % 20000),
        })
        path = os.path.join(self.workdir, "config.properties")
        with open(path, "w") as f:
            f.writelines(f"{k}={v}\n" for k, v in props.items())
        return path

    def start(self, timeout: float = 240.0) -> "TorchServe":
        """Start and wait until every model has a READY worker.

        Raises:
            RuntimeError: TorchServe did not come up in time (the log tail is in the message).
        """
        os.makedirs(self.tmp, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        cmd = [TORCHSERVE, "--start", "--ts-config", self._write_config(), "--model-store", self.model_store,
               "--models", *[f"{n}={m}" for n, m in self.models.items()], "--ncs"]
        with open(os.path.join(self.workdir, "stdout.log"), "ab") as out:
            # A new session: the launcher's pid is the group id the JVM and its Python workers inherit.
            launcher = subprocess.Popen(cmd, cwd=self.workdir, env=self._env(), stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=self._pin if self.cpus else None)
        self.pgid = launcher.pid
        if launcher.wait(timeout=60) != 0:
            with open(os.path.join(self.workdir, "stdout.log"), errors="replace") as f:
                raise RuntimeError(f"torchserve --start failed: {f.read()[-2000:].strip()}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ready(name) for name in self.models):
                return self
            time.sleep(0.5)
        raise RuntimeError(f"TorchServe did not get ready in {timeout:.0f}s:\n{self.log_tail()}")

    def _pin(self) -> None:
        os.sched_setaffinity(0, self.cpus)  # inherited by the JVM and every Python worker

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def auth(self, api: str = "management") -> dict[str, str]:
        """The ``Authorization`` header for ``api`` (``inference`` / ``management``) when token
        authorization is on (TorchServe writes ``key_file.json`` where it starts); else no header."""
        try:
            with open(os.path.join(self.workdir, "key_file.json")) as f:
                return {"Authorization": f"Bearer {json.load(f)[api]['key']}"}
        except (OSError, ValueError, KeyError):
            return {}

    def _ready(self, name: str) -> bool:
        try:
            r = requests.get(f"{self.management_url}/models/{name}", headers=self.auth(), timeout=2)
            workers = r.json()[0]["workers"] if r.ok else []
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return False
        return bool(workers) and all(w.get("status") == "READY" for w in workers)

    def workers(self, name: str) -> list[dict]:
        """The management API's worker list for model ``name``."""
        r = requests.get(f"{self.management_url}/models/{name}", headers=self.auth(), timeout=5)
        r.raise_for_status()
        return r.json()[0]["workers"]

    def log_tail(self, lines: int = 40) -> str:
        text = []
        for name in ("ts_log.log", "model_log.log"):
            path = os.path.join(self.logs, name)
            if os.path.isfile(path):
                with open(path, errors="replace") as f:
                    text.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(text)

    def stop(self) -> None:
        """``torchserve --stop`` for this instance, then kill whatever is left in its process group."""
        try:
            subprocess.run([TORCHSERVE, "--stop"], cwd=self.workdir, env=self._env(), timeout=60,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired):
            pass
        if self.pgid is None:
            return
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _group_alive(self.pgid):
            time.sleep(0.3)
        if _group_alive(self.pgid):
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.pgid = None


def _probe_png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "PNG")
    return buf.getvalue()


class RayServe:
    """The staged and baseline apps of ``model_dir`` in a child process (``python -m ray_app.server``).

    Args:
        model_dir: model directory for both apps.
        cpus: CPUs the process tree may use (affinity); None: all. Ray is told as many logical CPUs.
        port: HTTP port of Serve's proxy on 127.0.0.1 (default: a free one).
        max_batch_size, batch_wait_timeout_s: ``@serve.batch`` settings of every stage and the baseline.
        log_path: where the child's output goes (default: a file in the temp dir).
        staged_args: more args of the staged app, e.g. the load controller's ``slo_p95_ms`` and ``max_drop``.
        profile: Ray Serve settings (:mod:`ray_app.options`; ``tuned``: direct ingress).
        grouping: the staged app's grouping (``auto``: the planner measures this machine and chooses).
        env: extra environment variables for Ray (``NAME=VALUE`` strings).

    Attributes:
        urls: once started, each app's base URL (``staged``, ``baseline``): with direct ingress its
            replica's own port, else the proxy's.
        ready: what the server reported once both apps answered (urls, grouping, the planner's record).
    """

    def __init__(self, model_dir: str, cpus: Optional[set[int]] = None, port: Optional[int] = None,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.01, log_path: Optional[str] = None,
                 staged_args: Optional[Mapping[str, Any]] = None, profile: str = "tuned", grouping: str = "auto",
                 env: Sequence[str] = ()) -> None:
        self.model_dir = os.path.abspath(model_dir)
        self.cpus = cpus
        self.port = port or free_port()
        self.batch = (max_batch_size, batch_wait_timeout_s)
        self.log_path = log_path or os.path.join("/tmp", f"branched-ray-{self.port}.log")
        self.ready_path = self.log_path + ".ready.json"
        self.profile, self.grouping, self.env = profile, grouping, list(env)
        self.proc: Optional[subprocess.Popen] = None
        self.staged_args = dict(staged_args or {})
        self.ready: dict[str, Any] = {}
        self.urls: dict[str, str] = {}

    @property
    def url(self) -> str:
        """The proxy's URL (both apps, by route prefix)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 420.0) -> "RayServe":
        """Start and wait until both apps answer a probe image at their URLs.

        Raises:
            RuntimeError: the apps did not come up in time (the log tail is in the message).
        """
        from branched.artifact import load_config

        probe = _probe_png(load_config(self.model_dir).input_size)
        n_cpus = len(self.cpus) if self.cpus else len(os.sched_getaffinity(0))
        cmd = [sys.executable, "-m", "ray_app.server", "--model-dir", self.model_dir, "--port", str(self.port),
               "--num-cpus", str(n_cpus), "--max-batch-size", str(self.batch[0]),
               "--batch-wait-timeout-s", str(self.batch[1]), "--profile", self.profile, "--grouping", self.grouping,
               "--ready-file", self.ready_path, "--staged-args", json.dumps(self.staged_args),
               *[a for e in self.env for a in ("--env", e)]]
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        if os.path.exists(self.ready_path):
            os.remove(self.ready_path)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         cwd=REPO_ROOT, preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus))
                                         if self.cpus else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self._answers(probe):
                return self
            time.sleep(1.0)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"Ray Serve did not get ready in {timeout:.0f}s:\n{tail}")

    def _answers(self, probe: bytes) -> bool:
        try:
            with open(self.ready_path) as f:
                ready = json.load(f)
        except (OSError, ValueError):
            return False
        urls = ready["urls"]
        try:
            if all(requests.post(urls[app] + "/predict", data=probe, timeout=10).status_code == 200
                   for app in ("staged", "baseline")):
                self.ready, self.urls = ready, urls
                return True
        except requests.RequestException:
            pass
        return False

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGINT to the server alone (graceful ``serve.shutdown``), then SIGKILL whatever is left of the group.

        Not SIGINT to the whole group: Ray's own processes would stop under ``serve.shutdown``, which then waits
        30 s for a controller that is gone.
        """
        if self.proc is None:
            return
        pgid = self.proc.pid
        try:
            self.proc.send_signal(signal.SIGINT)
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


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

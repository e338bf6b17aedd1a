"""A multi-node Ray cluster on one machine, started with ``ray start``: for tests and the node-fault run.

Every node is its own ``ray start`` process tree (GCS on the head, a raylet, an object store, agents and
workers) in a session of its own, with its own temp dir, free ports, loopback address (head 127.0.0.2,
workers 127.0.0.3, ...; Linux routes all of 127.0.0.0/8 to the loopback device, so no traffic leaves the
machine), one custom resource ``node_NAME`` and one label ``branched-node=NAME`` (``a`` for the head,
``b``, ``c``, ... for workers), so a Serve config can pin a deployment to a node (``ray-plan --pin``).

Why not all on 127.0.0.1: ``ray start`` replaces the address 127.0.0.1 by the machine's own address, both
as ``--node-ip-address`` and in a worker's ``--address`` (Ray issue 59110), so a worker cannot join a
head that listens on loopback only. A node whose address is not exactly 127.0.0.1 listens on every
interface, as on a real cluster; the single-node runs (``python -m ray_app.server``) stay on 127.0.0.1.

Token authentication is on (Ray's default for ``ray start``), with a token of this cluster's own in its
work folder; the ``serve`` CLI and the dashboard's REST API get it too. Workers get the repository on
``PYTHONPATH``, so replicas import this checkout's ``ray_app``.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import psutil
import requests

from .launchers import REPO_ROOT, free_ports, wait_for

__all__ = ["RayNode", "LocalCluster", "node_processes", "RAY", "SERVE"]

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SERVE = os.path.join(os.path.dirname(sys.executable), "serve")


def node_processes(pgid: int) -> list[psutil.Process]:
    """The processes of one ``ray start`` tree: its process group, plus every descendant (Ray's workers
    start sessions of their own but stay children of their raylet)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                found[proc.pid] = proc
        except (ProcessLookupError, psutil.Error):
            continue
    for proc in list(found.values()):
        try:
            found.update((c.pid, c) for c in proc.children(recursive=True))
        except psutil.Error:
            continue
    return list(found.values())


class RayNode:
    """One node started with ``ray start`` (the head, or a worker joining ``head_address``).

    Args:
        name: ``a`` (head), ``b``, ...: gives the custom resource ``node_NAME`` and label ``branched-node=NAME``.
        ip: the node's address (a loopback address other than 127.0.0.1; see the module doc).
        workdir: private folder: temp dir (sessions, logs, sockets), ``ray start`` output.
        env: environment of every process of the node (token, ``PYTHONPATH``).
        cpus: logical CPUs (``--num-cpus``); object_store_mb: the object store's size.
        head_address: the GCS ``IP:PORT`` to join; None starts a head.
        affinity: CPUs the node's processes may run on (inherited by all of them); None: all.
    """

    def __init__(self, name: str, ip: str, workdir: str, env: dict[str, str], cpus: int = 2,
                 object_store_mb: int = 80, head_address: Optional[str] = None,
                 affinity: Optional[set[int]] = None, temp_dir: Optional[str] = None) -> None:
        self.name, self.ip, self.env, self.cpus = name, ip, env, cpus
        self.object_store_mb, self.head_address, self.affinity = object_store_mb, head_address, affinity
        # Unix sockets live under the temp dir: keep the path short (108 bytes at most).
        self.temp_dir = temp_dir or tempfile.mkdtemp(prefix=f"rn{name}-", dir="/tmp")
        self.log_path = os.path.join(workdir, f"ray-start-{name}.log")
        self.port, self.dashboard_port = free_ports(2) if head_address is None else (None, None)
        self.pgid: Optional[int] = None

    @property
    def is_head(self) -> bool:
        return self.head_address is None

    @property
    def address(self) -> str:
        """The head's GCS address, ``IP:PORT``."""
        return f"{self.ip}:{self.port}" if self.is_head else str(self.head_address)

    def command(self) -> list[str]:
        """The ``ray start`` command line of this node."""
        cmd = [RAY, "start", "--node-ip-address", self.ip, "--temp-dir", self.temp_dir, "--num-cpus", str(self.cpus),
               "--object-store-memory", str(self.object_store_mb * 2 ** 20),
               "--resources", json.dumps({f"node_{self.name}": 1}), "--labels", f"branched-node={self.name}",
               "--disable-usage-stats", "--min-worker-port", "0", "--max-worker-port", "0"]
        # Never Ray's fixed defaults, which another Ray may hold; distinct, and not the head's own two ports.
        ports = iter(free_ports(7, exclude={self.port, self.dashboard_port}))
        for flag in ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                     "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"):
            cmd += [flag, str(next(ports))]
        if self.is_head:
            cmd += ["--head", "--port", str(self.port), "--ray-client-server-port", str(next(ports)),
                    "--include-dashboard", "true", "--dashboard-host", self.ip,
                    "--dashboard-port", str(self.dashboard_port)]
        else:
            cmd += ["--address", str(self.head_address)]
        return cmd

    def start(self, timeout: float = 180.0) -> "RayNode":
        """Run ``ray start`` (it returns once the node is up; its processes stay in its process group).

        Raises:
            RuntimeError: ``ray start`` failed or took too long (its output's tail is in the message).
        """
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.temp_dir,
                                    start_new_session=True,
                                    preexec_fn=(lambda: os.sched_setaffinity(0, self.affinity)) if self.affinity else None)
        self.pgid = proc.pid
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        if code != 0:
            tail = self.log_tail()
            self.kill()
            raise RuntimeError(f"`ray start` of node {self.name} ({self.ip}) "
                               f"{'timed out' if code is None else f'exited {code}'}:\n{tail}")
        return self

    def processes(self) -> list[psutil.Process]:
        """This node's live processes (empty once it is stopped)."""
        return node_processes(self.pgid) if self.pgid is not None else []

    def raylet_pid(self) -> Optional[int]:
        """The pid of this node's raylet, or None."""
        for proc in self.processes():
            try:
                if proc.name() == "raylet":
                    return proc.pid
            except psutil.Error:
                continue
        return None

    def kill(self) -> list[int]:
        """SIGKILL every process of the node at once (as a machine that loses power); returns their pids."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """A head and ``workers`` worker nodes on this machine, each started with ``ray start``.

    Args:
        workers: worker nodes besides the head (named ``b``, ``c``, ...).
        cpus: logical CPUs per node; object_store_mb: object store per node.
        workdir: folder for the token and ``ray start`` output (default: a new temp folder).
        affinity: CPUs all the cluster's processes may run on (the load generator keeps the others).
        first_ip: the head's address; workers take the next ones.
        gcs_storage: a folder for the head's GCS state (Ray's embedded RocksDB storage, alpha), so a head
            started again on the same address reloads the cluster (GCS fault tolerance without Redis);
            None: the GCS keeps its state in memory, and a restarted head is a new cluster.
    """

    def __init__(self, workers: int = 1, cpus: int = 2, object_store_mb: int = 80, workdir: Optional[str] = None,
                 affinity: Optional[set[int]] = None, first_ip: str = "127.0.0.2",
                 gcs_storage: Optional[str] = None) -> None:
        self.workdir = workdir or tempfile.mkdtemp(prefix="branched-cluster-")
        os.makedirs(self.workdir, exist_ok=True)
        self.token = secrets.token_hex(32)
        self.token_path = os.path.join(self.workdir, "auth_token")
        with open(os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.token)
        path = os.environ.get("PYTHONPATH", "")
        self.env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")},
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path, "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": REPO_ROOT + (os.pathsep + path if path else "")}
        base, last = first_ip.rsplit(".", 1)
        head_env = dict(self.env)
        if gcs_storage:
            os.makedirs(gcs_storage, exist_ok=True)
            head_env.update(RAY_gcs_storage="rocksdb", RAY_gcs_storage_path=gcs_storage)
        self.head = RayNode("a", first_ip, self.workdir, head_env, cpus, object_store_mb, affinity=affinity)
        self.workers = [RayNode(chr(ord("b") + i), f"{base}.{int(last) + 1 + i}", self.workdir, self.env, cpus,
                                object_store_mb, self.head.address, affinity) for i in range(workers)]

    @property
    def nodes(self) -> list[RayNode]:
        return [self.head, *self.workers]

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{self.head.dashboard_port}"

    def node(self, name: str) -> RayNode:
        """The node called ``name`` (``a`` = the head)."""
        return next(n for n in self.nodes if n.name == name)

    def start(self) -> "LocalCluster":
        """Start the head, then the workers; wait until the cluster counts them all.

        Raises:
            RuntimeError: a node did not start or join (with its ``ray start`` output).
        """
        try:
            for node in self.nodes:
                node.start()
            if not wait_for(lambda: len(self.alive_nodes()) == len(self.nodes), 60):
                raise RuntimeError(f"only {self.alive_nodes()} of {len(self.nodes)} nodes joined the cluster")
        except BaseException:
            self.stop()
            raise
        return self

    def restart_node(self, name: str, attempts: int = 2) -> RayNode:
        """Start node ``name`` again after it was killed (a worker rejoins the head; fresh temp dir and ports).

        The node keeps its temp dir, as a machine's ``/tmp/ray`` would (a GCS that reloads its state keeps
        the old session's name, and the new raylet looks for its agents' files under it). A head comes back
        on the same GCS and dashboard ports. ``ray start`` gives a node 30 s to register
        with the GCS; a GCS that reloads its state first waits for the old head's health checks to fail,
        which on a busy machine can take longer, so a failed start is tried again (``attempts``).
        """
        old = self.node(name)
        if old.processes():
            raise RuntimeError(f"node {name} is still running; kill it first")
        for attempt in range(attempts):
            new = RayNode(old.name, old.ip, self.workdir, old.env, old.cpus, old.object_store_mb, old.head_address,
                          old.affinity, old.temp_dir)
            if new.is_head:
                new.port, new.dashboard_port = old.port, old.dashboard_port  # the same address as before
                # `ray start --head` refuses to start when the temp dir's ray_current_cluster names its address
                # and some local process carries that --gcs-address: on one machine, the worker's raylet does.
                # On the head's own machine no such process is left, so the file would not matter there.
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(new.temp_dir, "ray_current_cluster"))
            try:
                new.start()
                break
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
        if new.is_head:
            self.head = new
        else:
            self.workers[self.workers.index(old)] = new
        return new

    def stop(self) -> None:
        """Kill every process of every node (workers first) and remove their temp dirs."""
        import shutil

        for node in reversed(self.nodes):
            node.kill()
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ------------------------------------------------------------------------------ the dashboard's REST API
    def rest(self, path: str, timeout: float = 10.0) -> Any:
        """GET a dashboard REST path (``/api/serve/applications/``, ``/nodes?view=summary``) as JSON."""
        r = requests.get(self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"},
                         timeout=timeout)
        r.raise_for_status()
        return r.json()

    def alive_nodes(self) -> list[str]:
        """The names of the nodes the cluster counts as alive (by address)."""
        by_ip = {n.ip: n.name for n in self.nodes}
        nodes = self.rest("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return sorted(by_ip.get(n["node_ip"], n["node_ip"]) for n in nodes if n["state"] == "ALIVE")

    def serve_cli(self, *args: str, timeout: float = 120.0) -> str:
        """Run ``serve ARGS -a DASHBOARD`` with this cluster's token; returns its output.

        Raises:
            RuntimeError: the command failed (its output is in the message).
        """
        proc = subprocess.run([SERVE, *args, "-a", self.dashboard_url], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=REPO_ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"serve {' '.join(args)} failed: {(proc.stdout + proc.stderr)[-2000:]}")
        return proc.stdout

    def applications(self) -> dict[str, Any]:
        """Serve's view of its applications (``GET /api/serve/applications/``)."""
        return self.rest("/api/serve/applications/").get("applications") or {}

    def deploy(self, config_path: str, timeout: float = 300.0) -> None:
        """``serve deploy CONFIG`` and wait until every application of the config is RUNNING.

        Raises:
            RuntimeError: an application failed to deploy (Serve's message) or is not running in time.
        """
        import yaml

        with open(config_path) as f:
            names = {a["name"] for a in yaml.safe_load(f)["applications"]}
        started = time.time()
        self.serve_cli("deploy", config_path)

        def running() -> bool:
            apps = self.applications()
            failed = {n: apps[n].get("message") for n in names if apps.get(n, {}).get("status") == "DEPLOY_FAILED"}
            if failed:
                raise RuntimeError(f"deploy of {config_path} failed: {failed}")
            # the new config's deploy time, not a previous RUNNING state
            return all(apps.get(n, {}).get("status") == "RUNNING" and
                       apps[n].get("last_deployed_time_s", 0) >= started - 1 for n in names)

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if running():
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{sorted(names)} not RUNNING after {timeout:.0f}s: {self.placement()}")

    def placement(self, app: str = "staged") -> dict[str, list[dict[str, Any]]]:
        """Where ``app``'s replicas run: ``{deployment: [{node, pid, state, actor_id}, ...]}``."""
        by_ip = {n.ip: n.name for n in self.nodes}
        deployments = self.applications().get(app, {}).get("deployments", {})
        return {name: [{"node": by_ip.get(r.get("node_ip"), r.get("node_ip")), "pid": r.get("pid"),
                        "state": r.get("state"), "actor_id": r.get("actor_id")} for r in d.get("replicas", [])]
                for name, d in sorted(deployments.items())}

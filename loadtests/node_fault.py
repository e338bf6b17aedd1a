"""Node fault run: the staged app on a two-node Ray cluster on this machine, one node lost under load.

``branched node-fault --model-dir models/demo --duration 90s --kill-at 20 --out reports/node-fault``
starts a head (``a``) and a worker (``b``) with ``ray start`` (:class:`loadtests.cluster.LocalCluster`),
writes the staged app's plan with ``branched ray-plan`` (the ingress and the even stages pinned to the head,
the odd stages on the worker, so every hop between stages crosses nodes), deploys it with ``serve deploy``,
runs Locust with every answer checked against its image's own answer (:mod:`loadtests.harness`), and at
``--kill-at`` seconds SIGKILLs every process of one node at once:

* ``--victim worker``: the worker node (its raylet, agents and replicas). ``--placement soft`` (default)
  writes the worker's stages with ``--prefer`` (label, falls back to other nodes): Serve re-places them on
  the head. ``--placement hard`` writes them with ``--pin`` (custom resource): they wait for a node with
  ``node_b``, which ``--rejoin-after`` starts again.
* ``--victim head``: the head node (GCS, dashboard, Serve controller, HTTP proxy). ``--rejoin-after`` starts
  it again on the same address. Without GCS fault tolerance that is a new, empty cluster; ``--gcs-ft``
  starts the head with Ray's embedded RocksDB GCS storage (alpha; no Redis), so the restarted GCS reloads
  the cluster's state.

The report (``fault.json``, ``fault_timeline.csv``, ``fault.png``, as ``branched fault`` writes them) adds
where every replica ran before and after, when the cluster declared the node dead, when the lost
deployments were running again (``replaced_s``) and on which node, and whether the applications survived.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from typing import Any, Optional

import requests

from branched.artifact import load_config
from branched.errors import UsageError

from .answers import recovery
from .cluster import LocalCluster
from .fault import load_with_fault, print_summary, read_fault_run, write_report
from .harness import Target, add_load_arguments, make_pool, run_command, say, split_cpus
from .launchers import free_port

__all__ = ["node_fault", "NodeKiller", "plan_for", "register"]


class NodeKiller(threading.Thread):
    """Waits ``kill_at`` seconds, kills node ``victim``, optionally starts it again, and watches Serve
    until the lost deployments run again.

    Attributes:
        before, after: placement (:meth:`LocalCluster.placement`) just before the kill and once recovered.
        t_kill: when (epoch s); victims: the killed pids; raylet: the raylet's pid.
        dead_s: when the cluster stopped counting the node as alive; rejoined_s: when it was started again;
        replaced_s: when every lost deployment had a RUNNING replica again (None if never); apps_after:
        the applications Serve knew after the restart (head victim); others_lost_s: when another node's
        raylet exited (a worker gives up on a head that does not come back as the same cluster).
    """

    def __init__(self, cluster: LocalCluster, victim: str, kill_at: float, rejoin_after: Optional[float] = None,
                 timeout: float = 300.0) -> None:
        super().__init__(daemon=True)
        self.cluster, self.victim, self.kill_at, self.rejoin_after = cluster, victim, kill_at, rejoin_after
        self.timeout = timeout
        self.before: dict[str, Any] = {}
        self.after: dict[str, Any] = {}
        self.victims: list[int] = []
        self.raylet: Optional[int] = None
        self.t_kill: Optional[float] = None
        self.dead_s: Optional[float] = None
        self.rejoined_s: Optional[float] = None
        self.replaced_s: Optional[float] = None
        self.apps_after: Optional[list[str]] = None
        self.others_lost_s: dict[str, float] = {}
        self.error = ""

    def lost(self) -> list[str]:
        """The deployments that had a replica on the victim before the kill."""
        return sorted(d for d, reps in self.before.items() if any(r["node"] == self.victim for r in reps))

    def run(self) -> None:
        try:
            time.sleep(self.kill_at)
            self.before = self.cluster.placement()
            node = self.cluster.node(self.victim)
            self.raylet = node.raylet_pid()
            self.t_kill = time.time()
            self.victims = node.kill()
            say(f"killed node {self.victim} ({node.ip}): raylet {self.raylet} and {len(self.victims) - 1} other processes")
            self._watch()
        except Exception as exc:  # noqa: BLE001 - reported, never raised in the load's thread
            self.error = f"{type(exc).__name__}: {exc}"

    def _watch(self) -> None:
        lost = self.lost()
        assert self.t_kill is not None
        while (now := time.time() - self.t_kill) < self.timeout:
            if self.rejoin_after is not None and self.rejoined_s is None and now >= self.rejoin_after:
                say(f"starting node {self.victim} again")
                self.cluster.restart_node(self.victim)
                self.rejoined_s = round(time.time() - self.t_kill, 3)
            for other in self.cluster.nodes:  # a node whose raylet gave up on the cluster
                if other.name != self.victim and other.name not in self.others_lost_s and other.raylet_pid() is None:
                    self.others_lost_s[other.name] = round(now, 3)
            try:
                alive = self.cluster.alive_nodes()
                placement = self.cluster.placement()
                apps = sorted(self.cluster.applications())
            except (requests.RequestException, KeyError, ValueError):  # the head (and its dashboard) is down
                time.sleep(0.5)
                continue
            if self.dead_s is None and self.victim not in alive:
                self.dead_s = round(now, 3)
            if self.rejoined_s is not None:
                self.apps_after = apps  # the last word once the node is back
            running = {d: [r for r in placement.get(d, []) if r["state"] == "RUNNING" and r["pid"] not in self.victims]
                       for d in lost}
            if lost and all(running.values()) and (self.victim != self.cluster.head.name or self.rejoined_s is not None):
                self.replaced_s, self.after = round(time.time() - self.t_kill, 3), placement
                return
            time.sleep(0.5)
        self.after = self._placement_or_empty()

    def _placement_or_empty(self) -> dict[str, Any]:
        try:
            return self.cluster.placement()
        except (requests.RequestException, KeyError, ValueError):
            return {}


def plan_for(cluster: LocalCluster, model_dir: str, out_path: str, port: int, cpus: float, placement: str = "soft",
             max_batch_size: int = 8) -> str:
    """Write the staged app's plan with ``branched ray-plan``: ingress and even stages pinned to the head (``node_a``),
    odd stages on the worker (``--prefer branched-node=b`` when ``placement`` is soft, ``--pin node_b`` when hard).

    Raises:
        RuntimeError: ``ray-plan`` refused or failed (its message says why).
    """
    stages = len(load_config(model_dir).exits) + 1
    on_a = ["Ingress"] + [f"Stage{k}" for k in range(0, stages, 2)]
    on_b = [f"Stage{k}" for k in range(1, stages, 2)]
    cmd = [sys.executable, "-m", "branched.cli", "ray-plan", os.path.abspath(model_dir), "--cpus", f"{cpus:g}",
           "--ingress-cpus", "0.5", "--apps", "staged", "--max-batch-size", str(max_batch_size),
           "--host", cluster.head.ip, "--port", str(port), "--proxy-location", "HeadOnly",
           "--address", cluster.dashboard_url, "--out", out_path]
    pins = [f"{d}=node_a" for d in on_a] + ([f"{d}=node_b" for d in on_b] if placement == "hard" else [])
    cmd += ["--pin", ",".join(pins)]
    if on_b and placement == "soft":
        cmd += ["--prefer", ",".join(f"{d}=branched-node=b" for d in on_b)]
    proc = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"ray-plan failed: {proc.stderr.strip()[-1000:]}")
    say(proc.stdout.strip().splitlines()[-2] if proc.stdout.strip() else "plan written")
    return out_path


def node_fault(model_dir: str, out_dir: str, users: int = 8, duration: str = "90s", kill_at: float = 20.0,
               victim: str = "worker", placement: str = "soft", rejoin_after: Optional[float] = None,
               gcs_ft: bool = False, pool_size: int = 200, server_cpus: Optional[int] = None,
               batch_size: int = 8, node_cpus: int = 4) -> dict:
    """Run the node fault and write its report; returns the report dict.

    Args:
        model_dir: a model directory (``branched build``) with at least two stages.
        out_dir: where the report, the plan, the cluster's logs and Locust's files go.
        kill_at: seconds after Locust starts to kill the node.
        victim: ``"worker"`` (node b) or ``"head"`` (node a).
        placement: ``"soft"`` (the worker's stages may move) or ``"hard"`` (pinned to node_b).
        rejoin_after: seconds after the kill to start the node again (None: never).
        gcs_ft: start the head with embedded RocksDB GCS storage, so a restarted head keeps the cluster.
        users, duration, pool_size, server_cpus, batch_size: as ``branched loadtest``.
        node_cpus: logical CPUs of each node (scheduling tokens; the processes share the server's cores).
    """
    config = load_config(model_dir)
    if not config.exits:
        raise ValueError(f"{model_dir} has one stage; the node fault needs stages on two nodes")
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(model_dir, out_dir, pool_size, variants=["early_exit"])
    server_set, load_set = split_cpus(server_cpus)
    cluster = LocalCluster(workers=1, cpus=node_cpus, workdir=os.path.join(os.path.abspath(out_dir), "cluster"),
                           affinity=server_set,
                           gcs_storage=os.path.join(os.path.abspath(out_dir), "cluster", "gcs") if gcs_ft else None)
    name = {"worker": "b", "head": "a"}[victim]
    port = free_port()
    with cluster:
        say(f"cluster up: head {cluster.head.ip}, worker {cluster.workers[0].ip} (CPUs {sorted(server_set)})")
        plan = plan_for(cluster, model_dir, os.path.join(out_dir, "plan.yaml"), port, node_cpus, placement, batch_size)
        cluster.deploy(plan)
        target = Target("ray-cluster", f"http://{cluster.head.ip}:{port}", {"early_exit": "/predict"},
                        cluster.head.pgid or 0, cluster, load_set, server_set)
        # watch until the load is over (and a little longer), not past it
        killer = NodeKiller(cluster, name, kill_at, rejoin_after, timeout=max(60.0, _seconds(duration) - kill_at + 30))
        run, after = load_with_fault(target, pool, out_dir, users, duration, killer, killer.timeout)
    result, tally, rows = read_fault_run(run, killer)
    lost = killer.lost()
    first = min((int(d[5:]) for d in lost if d.startswith("Stage")), default=0)
    rec = recovery(rows, killer.t_kill, min_exit=first)
    moved = {d: sorted({r["node"] for r in killer.after.get(d, []) if r["state"] == "RUNNING"}) for d in lost}
    report = {
        "server": "ray-cluster", "model": config.backbone, "model_dir": model_dir, "users": users, "duration": duration,
        "kill_at_s": kill_at, "killed": f"node {name} ({victim}: raylet {killer.raylet})", "killed_pids": killer.victims,
        "victim": victim, "placement": placement, "gcs_ft": gcs_ft, "rejoin_after_s": rejoin_after,
        "pool_size": len(pool.images), "server_cpus": sorted(server_set), "load_cpus": sorted(load_set),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "requests": result.requests, "answers": result.answers, "failures": result.failures,
        "logged_requests": len(rows), "mismatches": int(tally.get("mismatches", 0)),
        "borderline_answers": int(tally.get("borderline", 0)), **rec,
        "placement_before": killer.before, "placement_after": killer.after, "lost_deployments": lost,
        "replaced_on": moved, "node_dead_s": killer.dead_s, "rejoined_s": killer.rejoined_s,
        "replaced_s": killer.replaced_s, "apps_after_restart": killer.apps_after,
        "other_nodes_lost_s": killer.others_lost_s, "killer_error": killer.error,
        "probe_after": after,
        "recovered": killer.replaced_s is not None and rec["answers_back_s"] is not None and not after["errors"]
        and not after["wrong"],
    }
    write_report(report, rows, killer.t_kill, out_dir)
    return report


def _seconds(duration: str) -> float:
    """Locust's run time (``90s``, ``2m``, ``1h30m``, or plain seconds) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", duration.strip())
    if not parts or "".join(n + u for n, u in parts) != duration.strip():
        raise ValueError(f"--duration {duration!r}: use e.g. 90s, 2m or 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)


def _summary(report: dict) -> None:
    print_summary(report)
    print(f"  {report['placement']} placement; lost {report['lost_deployments']}; node counted dead after "
          f"{report['node_dead_s']} s; started again after {report['rejoined_s']} s; running again on "
          f"{report['replaced_on']}" + (f"; apps after the restart: {report['apps_after_restart']}; other nodes "
                                        f"lost: {report['other_nodes_lost_s']}" if report["victim"] == "head" else ""))


def _run(args: argparse.Namespace) -> None:
    if args.server != "ray":
        raise UsageError("node-fault runs the Ray Serve staged app on a Ray cluster; drop --server (TorchServe: "
                         "branched fault --server torchserve)")
    report, out = run_command(args, "node fault run", lambda out: node_fault(
        args.model_dir, out, args.users, args.duration, args.kill_at, args.victim, args.placement, args.rejoin_after,
        args.gcs_ft, args.pool_size, args.server_cpus, args.batch_size, args.node_cpus), _summary,
        os.path.join("reports", "node-fault"), "fault.json")
    if not report["recovered"] or report["mismatches"]:
        print(f"node fault: the app did not recover by itself after {report['killed']} was lost "
              f"(lost {report['lost_deployments']}, running again after {report['replaced_s']} s, answers back after "
              f"{report['answers_back_s']} s, mismatches {report['mismatches']}); see {out}/fault.json", file=sys.stderr)
        sys.exit(1)


def register(subparsers) -> None:
    """``branched node-fault``."""
    p = subparsers.add_parser("node-fault", help="kill a whole node of a two-node Ray cluster on this machine "
                                                 "mid-load; report failures, re-placement and recovery")
    add_load_arguments(p, "90s", "reports/node-fault")
    p.set_defaults(server="ray")
    p.add_argument("--kill-at", type=float, default=20.0, help="seconds into the load to kill (default 20)")
    p.add_argument("--victim", choices=["worker", "head"], default="worker", help="the node to kill (default worker)")
    p.add_argument("--placement", choices=["soft", "hard"], default="soft",
                   help="the worker's stages: soft = preferred there, may move (default); hard = pinned there")
    p.add_argument("--rejoin-after", type=float, help="seconds after the kill to start the node again (default never)")
    p.add_argument("--gcs-ft", action="store_true", help="head with embedded RocksDB GCS storage (Ray's alpha GCS "
                                                          "fault tolerance without Redis)")
    p.add_argument("--node-cpus", type=int, default=4, help="logical CPUs per node (default 4)")
    p.set_defaults(func=_run)

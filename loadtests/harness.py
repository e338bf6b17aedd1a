"""What every load run shares (``branched loadtest``, ``soak``, ``fault``): the options, the request pool
with each image's own expected answer, the CPU split, the server start and the Locust run.

Core split on a small machine: the server under test gets its own CPUs and Locust (one gevent
process, FastHttpUser) gets the rest, by CPU affinity (``os.sched_setaffinity``; child processes
inherit it), so the load generator never steals the server's cores. With 2 cores: server on CPU 1,
Locust on CPU 0. The servers start through :mod:`loadtests.launchers`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import requests

from branched.artifact import load_config
from branched.build.datasets import load_split
from branched.errors import UsageError

from .answers import write_expected
from .launchers import RayServe, TorchServe

__all__ = ["SERVERS", "VARIANTS", "MODEL", "add_load_arguments", "ray_options", "run_command", "write_pool", "Pool", "make_pool",
           "split_cpus", "pinned", "Target", "serve", "warm_up", "run_locust", "drive", "say"]

SERVERS = ("torchserve", "ray")
#: The two models a comparison serves: the early-exit model and its plain backbone (same weights).
VARIANTS = ("early_exit", "baseline")
#: The TorchServe model name of the early-exit archive (the baseline is ``MODEL-baseline``).
MODEL = "model"

LOCUSTFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "locustfile.py")


def add_load_arguments(p: argparse.ArgumentParser, duration: str, out_default: str, ray_grouping: str = "auto") -> None:
    """The options every load command shares (``branched loadtest``, ``soak``, ``fault``)."""
    p.add_argument("--server", choices=SERVERS, default="torchserve")
    p.add_argument("--model-dir", default="models/demo")
    p.add_argument("--out", help=f"report folder (default: {out_default})")
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--duration", default=duration, help=f"Locust run time (default {duration})")
    p.add_argument("--pool-size", type=int, default=200, help="test-split images to send (default 200)")
    p.add_argument("--server-cpus", type=int, help="CPUs for the server (default: all but one)")
    p.add_argument("--batch-size", type=int, default=8, help="server-side batch size (default 8)")
    p.add_argument("--max-batch-delay", type=int, default=10, help="server-side batch wait in ms (default 10)")
    p.add_argument("--ray-profile", default="tuned", help="Ray Serve settings: tuned (direct ingress; default), direct, "
                   "quiet or ray-default (ray_app/options.py)")
    p.add_argument("--ray-grouping", default=ray_grouping, help="the staged app's grouping: auto (the planner measures "
                   f"this machine), ingress, per-stage or e.g. '0|1,2' (default {ray_grouping})")
    p.add_argument("--ray-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for Ray")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def ray_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Ray Serve launcher options of a load command's arguments."""
    return {"profile": args.ray_profile, "grouping": args.ray_grouping, "env": list(args.ray_env)}


def run_command(args: argparse.Namespace, what: str, run: Callable[[str], dict], summary: Callable[[dict], None],
                out_default: str, report_file: str) -> tuple[dict, str]:
    """Run one load command into ``args.out`` (or ``out_default``) and print its report (JSON with ``--json``).

    A server that did not start or a Locust that did not run becomes one line: ``WHAT on SERVER failed: why``.

    Returns:
        The report and the folder it was written to.
    """
    out = args.out or out_default
    try:
        report = run(out)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{what} on {args.server} failed: {exc}") from None
    if args.json:
        print(json.dumps(report))
    else:
        summary(report)
        print(f"  report: {os.path.join(out, report_file)}")
    return report, out


def write_pool(out_dir: str, dataset: str, size: int, root: Optional[str] = None, seed: int = 0) -> str:
    """Write ``size`` test-split images (a seeded random sample, so the class mix is the split's) as PNG files
    plus ``labels.json``; returns ``out_dir``."""
    data = load_split(dataset, "test", root=root, seed=seed).sample(size, seed)
    os.makedirs(out_dir, exist_ok=True)
    labels = {}
    for i in range(min(size, len(data))):
        name = f"{i:05d}.png"
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data.image_bytes(i))
        labels[name] = int(data.labels[i])
    with open(os.path.join(out_dir, "labels.json"), "w") as f:
        json.dump(labels, f)
    return out_dir


@dataclass
class Pool:
    """The request pool folder, its images in file order, and each variant's expected-answers JSON."""

    folder: str
    images: list[bytes]
    expected: dict[str, str]


def make_pool(model_dir: str, out_dir: str, size: int, variants: Sequence[str] = VARIANTS) -> Pool:
    """Write ``size`` test-split images of the model's dataset and each image's own answer, per variant.

    Every image is answered offline, in batches, by the core (``expected_VARIANT.json``); the
    locustfile fails any served answer that is not its own request's.
    """
    config = load_config(model_dir)
    dataset = config.meta.get("dataset")
    if not dataset:
        raise ValueError(f"{model_dir} does not record its dataset; build it with `branched build`")
    folder = write_pool(os.path.join(out_dir, "pool"), dataset, size, config.meta.get("data_root"),
                        int(config.meta.get("split_seed", 0)))
    images = []
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".png")):
        with open(os.path.join(folder, name), "rb") as f:
            images.append(f.read())
    say(f"expected answers of {len(images)} pool images")
    expected = {v: write_expected(model_dir, folder, os.path.join(out_dir, f"expected_{v}.json"), v == "baseline")
                for v in variants}
    return Pool(folder, images, expected)


def split_cpus(server_cpus: Optional[int] = None) -> tuple[set[int], set[int]]:
    """(server CPUs, load-generator CPUs) from the CPUs this process may use.

    The load generator keeps one CPU; the server gets ``server_cpus`` (default: all the others).
    On a single-CPU machine both share it.
    """
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) == 1:
        return set(cpus), set(cpus)
    n = min(server_cpus or len(cpus) - 1, len(cpus) - 1)
    return set(cpus[-n:]), {cpus[0]}


def pinned(cpus: set[int]) -> Callable[[], None]:
    """A ``preexec_fn`` that pins the child process (and all it starts) to ``cpus``."""
    def pin() -> None:
        os.sched_setaffinity(0, cpus)
    return pin


@dataclass
class Target:
    """A running server: ``host + paths[variant]`` answers each variant; ``sid`` is its session id."""

    server: str
    host: str
    paths: dict[str, str]
    sid: int
    handle: Any  # launchers.TorchServe or launchers.RayServe
    load_cpus: set[int] = field(default_factory=set)
    server_cpus: set[int] = field(default_factory=set)
    hosts: dict[str, str] = field(default_factory=dict)  # a variant served elsewhere than ``host`` (Ray's direct ingress)

    @property
    def path(self) -> str:
        """The early-exit model's path."""
        return self.paths["early_exit"]

    def host_of(self, variant: str) -> str:
        """Where ``variant`` is served (``host`` unless it has its own)."""
        return self.hosts.get(variant, self.host)


@contextlib.contextmanager
def serve(server: str, model_dir: str, out_dir: str, server_cpus: Optional[int] = None, batch_size: int = 8,
          max_batch_delay: int = 10, baseline: bool = True, ray: Optional[dict[str, Any]] = None,
          control: Optional[dict] = None) -> Iterator[Target]:
    """Start ``server`` with the early-exit model (and its baseline) on its own CPUs; stop it on exit.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        model_dir: the model directory.
        out_dir: run folder (TorchServe archives go to ``out_dir/archives``).
        server_cpus: CPUs for the server (default: all but one, which Locust gets).
        batch_size, max_batch_delay: server-side batching (TorchServe batchSize/maxBatchDelay ms;
            Ray Serve @serve.batch max_batch_size/batch_wait_timeout_s).
        baseline: also serve the plain backbone (TorchServe: ``MODEL-baseline.mar``; Ray Serve always
            runs the baseline app at ``/baseline``).
        ray: Ray Serve launcher options (``profile``, ``grouping``, ``env``; :class:`loadtests.launchers.RayServe`).
        control: the early-exit model's load controller, ``{"slo_p95_ms", "max_drop", "controller"}``
            (TorchServe: model-config.yaml; Ray Serve: the staged app's args); None: off.
    """
    if server not in SERVERS:
        raise ValueError(f"--server must be one of {SERVERS}, got {server!r}")
    server_set, load_set = split_cpus(server_cpus)
    if server == "torchserve":
        from handlers.archive import ArchiveSettings, build_archives

        store = os.path.join(out_dir, "archives")
        say(f"archiving {model_dir} -> {store}/{MODEL}.mar" + (f" and {MODEL}-baseline.mar" if baseline else ""))
        build_archives(model_dir, store, MODEL, ArchiveSettings(batch_size=batch_size, max_batch_delay=max_batch_delay,
                                                                workers=1, **(control or {})), baseline=baseline)
        models = {MODEL: f"{MODEL}.mar", **({f"{MODEL}-baseline": f"{MODEL}-baseline.mar"} if baseline else {})}
        workdir = tempfile.mkdtemp(prefix="branched-ts-")
        say(f"starting TorchServe on CPUs {sorted(server_set)} (logs in {workdir}/logs)")
        try:
            with TorchServe(store, workdir, models, cpus=server_set) as ts:
                paths = {"early_exit": f"/predictions/{MODEL}", "baseline": f"/predictions/{MODEL}-baseline"}
                yield Target(server, ts.inference_url, paths, ts.pgid, ts, load_set, server_set)
        finally:
            # The handler's log (controller moves and state) beside the report, as Ray's server log is.
            log = os.path.join(workdir, "logs", "model_log.log")
            if os.path.exists(log):
                shutil.copyfile(log, os.path.join(out_dir, "torchserve_model_log.log"))
        say("TorchServe stopped")
    else:
        options = {k: v for k, v in (ray or {}).items() if v is not None}
        say(f"starting Ray Serve on CPUs {sorted(server_set)} ({', '.join(f'{k} {v}' for k, v in options.items())}; "
            f"log in {os.path.join(out_dir, 'ray_server.log')})")
        with RayServe(model_dir, cpus=server_set, max_batch_size=batch_size, batch_wait_timeout_s=max_batch_delay / 1000.0,
                      log_path=os.path.join(os.path.abspath(out_dir), "ray_server.log"), staged_args=control,
                      **options) as rs:
            origins = {v: _split_url(rs.urls[app]) for v, app in (("early_exit", "staged"), ("baseline", "baseline"))}
            say(f"Ray Serve apps at {rs.urls} (grouping {rs.ready.get('grouping')})")
            yield Target(server, origins["early_exit"][0], {v: o[1] + "/predict" for v, o in origins.items()},
                         rs.proc.pid, rs, load_set, server_set, {v: o[0] for v, o in origins.items()})
        say("Ray Serve stopped")


def _split_url(url: str) -> tuple[str, str]:
    """``http://host:port/prefix`` -> (``http://host:port``, ``/prefix``)."""
    scheme, _, rest = url.partition("://")
    host, slash, prefix = rest.partition("/")
    return f"{scheme}://{host}", (slash + prefix).rstrip("/")


def warm_up(url: str, images: Sequence[bytes], rounds: int = 2, timeout: float = 60.0) -> None:
    """Send every image ``rounds`` times, so lazy initialisation and first batches are out of the way.

    Raises:
        RuntimeError: the server answers with an error (its message is included).
    """
    for _ in range(rounds):
        for image in images:
            r = requests.post(url, data=image, headers={"Content-Type": "image/png"}, timeout=timeout)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request to {url} failed: HTTP {r.status_code} {r.text[:300]}")


def run_locust(host: str, predict_path: str, pool: str, out_prefix: str, users: int, duration: str,
               cpus: set[int], query: str = "", extra: Sequence[str] = (), shape: str = "") -> str:
    """Run Locust headless against ``host``; returns the tally JSON path (see the locustfile).

    Writes Locust's own ``<prefix>_stats.csv``, ``_stats_history.csv``, ``_failures.csv`` and an
    HTML report ``<prefix>.html``. ``extra``: more locustfile options, e.g. ``["--expected", FILE]``.
    ``shape``: a Locust file with a load shape (e.g. ``loadtests/stepshape.py``; its options go in ``extra``).
    """
    tally = f"{out_prefix}_answers.json"
    locust = os.path.join(os.path.dirname(sys.executable), "locust")
    cmd = [locust, "-f", LOCUSTFILE + (f",{shape}" if shape else ""), "--headless", "--host", host, "-u", str(users), "-r", str(users),
           "-t", duration, "--csv", out_prefix, "--csv-full-history", "--html", f"{out_prefix}.html",
           "--only-summary", "--stop-timeout", "10", "--loglevel", "WARNING",
           "--pool", pool, "--predict-path", predict_path, "--answers-out", tally]
    if query:
        cmd += ["--query", query]
    cmd += list(extra)
    started = time.monotonic()
    # The locustfile imports the loadtests package it sits in (not another checkout's).
    root = os.path.dirname(os.path.dirname(LOCUSTFILE))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, preexec_fn=pinned(cpus), capture_output=True, text=True, env=env)
    # Locust exits 1 when any request failed; the report counts failures, so only a crash is an error.
    if not os.path.isfile(tally) or not os.path.isfile(f"{out_prefix}_stats.csv"):
        raise RuntimeError(f"locust did not finish (exit {proc.returncode} after {time.monotonic() - started:.0f}s):\n"
                           f"{proc.stderr[-2000:]}")
    return tally


def drive(target: Target, pool: Pool, out_dir: str, users: int, duration: str, variant: str = "early_exit",
          prefix: str = "locust", log_requests: bool = False, on_start: Optional[Callable[[], None]] = None) -> dict:
    """Warm up one variant, then run Locust headless against it with every answer checked.

    Args:
        variant: ``"early_exit"`` or ``"baseline"``.
        prefix: file prefix of Locust's CSV/HTML in ``out_dir``.
        log_requests: also write one CSV row per request (``PREFIX_requests.csv``; soak and fault read it).
        on_start: called right before Locust starts (the soak starts its memory sampler, the fault
            run its killer).

    Returns:
        ``{"tally": path, "log": path or None, "prefix": path prefix of Locust's CSV/HTML}``.
    """
    path, host = target.paths[variant], target.host_of(variant)
    say(f"warming up {variant} at {host}{path}")
    warm_up(host + path, pool.images[:32])
    out_prefix = os.path.join(out_dir, prefix)
    log = f"{out_prefix}_requests.csv" if log_requests else None
    say(f"locust: {users} users for {duration} against {variant} (load generator on CPUs {sorted(target.load_cpus)})")
    if on_start is not None:
        on_start()
    extra = ["--expected", pool.expected[variant], *(["--answers-log", log] if log else [])]
    tally = run_locust(host, path, pool.folder, out_prefix, users, duration, target.load_cpus, extra=extra)
    return {"tally": tally, "log": log, "prefix": out_prefix}


def say(message: str) -> None:
    print(f"[loadtest] {message}", file=sys.stderr, flush=True)

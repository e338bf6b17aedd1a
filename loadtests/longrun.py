"""What the soak and the fault run share: one server with the early-exit model, a pool with each image's
expected answer, and a Locust run that logs every request.

The server is started the way ``branched loadtest`` starts it (same archive settings, CPU split and
pinning; :mod:`loadtests.runner`), but with the early-exit model only on TorchServe, and the server
object is kept so its processes can be watched (:mod:`loadtests.procs`) or killed.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from branched.artifact import load_config

from .answers import write_expected
from .runner import SERVERS, run_locust, split_cpus, warm_up, write_pool

__all__ = ["SERVERS", "Target", "Pool", "make_pool", "serve_model", "drive", "say"]

MODEL = "model"  # the TorchServe model name


@dataclass
class Target:
    """A running server: ``host + path`` answers the early-exit model; ``sid`` is its session id."""

    server: str
    host: str
    path: str
    sid: int
    handle: Any  # handlers.server.TorchServe or ray_app.server.RayServe
    load_cpus: set[int] = field(default_factory=set)
    server_cpus: set[int] = field(default_factory=set)


@dataclass
class Pool:
    """The request pool folder, its images in file order and the expected-answers JSON."""

    folder: str
    images: list[bytes]
    expected: str


def make_pool(model_dir: str, out_dir: str, size: int) -> Pool:
    """Write ``size`` test-split images of the model's dataset and each one's answer alone."""
    config = load_config(model_dir)
    dataset = config.meta.get("dataset")
    if not dataset:
        raise ValueError(f"{model_dir} does not record its dataset; build it with `branched build`")
    folder = write_pool(os.path.join(out_dir, "pool"), dataset, size, config.meta.get("data_root"),
                        int(config.meta.get("split_seed", 0)))
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    images = []
    for name in names:
        with open(os.path.join(folder, name), "rb") as f:
            images.append(f.read())
    say(f"expected answers of {len(names)} pool images, one at a time")
    expected = write_expected(model_dir, folder, os.path.join(out_dir, "expected.json"))
    return Pool(folder, images, expected)


@contextlib.contextmanager
def serve_model(server: str, model_dir: str, out_dir: str, server_cpus: Optional[int] = None,
                batch_size: int = 8, max_batch_delay: int = 10) -> Iterator[Target]:
    """Start ``server`` with the early-exit model of ``model_dir`` on its own CPUs; stop it on exit.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        model_dir: the model directory.
        out_dir: run folder (TorchServe archives go to ``out_dir/archives``).
        server_cpus: CPUs for the server (default: all but one, which Locust gets).
        batch_size, max_batch_delay: server-side batching, as in ``branched loadtest``.
    """
    if server not in SERVERS:
        raise ValueError(f"--server must be one of {SERVERS}, got {server!r}")
    server_set, load_set = split_cpus(server_cpus)
    if server == "torchserve":
        from handlers.archive import ArchiveSettings, build_archives
        from handlers.server import TorchServe

        store = os.path.join(out_dir, "archives")
        say(f"archiving {model_dir} -> {store}/{MODEL}.mar")
        build_archives(model_dir, store, MODEL, ArchiveSettings(batch_size=batch_size, max_batch_delay=max_batch_delay,
                                                                workers=1), baseline=False)
        workdir = tempfile.mkdtemp(prefix="branched-ts-")
        say(f"starting TorchServe on CPUs {sorted(server_set)} (logs in {workdir}/logs)")
        with TorchServe(store, workdir, {MODEL: f"{MODEL}.mar"}, cpus=server_set) as ts:
            yield Target(server, ts.inference_url, f"/predictions/{MODEL}", ts.pgid, ts, load_set, server_set)
        say("TorchServe stopped")
    else:
        from ray_app.server import RayServe

        say(f"starting Ray Serve on CPUs {sorted(server_set)}")
        with RayServe(model_dir, cpus=server_set, max_batch_size=batch_size,
                      batch_wait_timeout_s=max_batch_delay / 1000.0) as rs:
            yield Target(server, rs.url, "/predict", rs.proc.pid, rs, load_set, server_set)
        say("Ray Serve stopped")


def drive(target: Target, pool: Pool, out_dir: str, users: int, duration: str, prefix: str = "locust",
          on_start: Optional[Callable[[], None]] = None) -> dict:
    """Warm up, then run Locust headless with answer checking and the per-request log.

    Args:
        on_start: called right before Locust starts (the soak starts its memory sampler, the fault
            run its killer).

    Returns:
        ``{"tally": path, "log": path, "prefix": path prefix of Locust's CSV/HTML}``.
    """
    say(f"warming up {target.host}{target.path}")
    warm_up(target.host + target.path, pool.images[:32])
    out_prefix = os.path.join(out_dir, prefix)
    log = f"{out_prefix}_requests.csv"
    say(f"locust: {users} users for {duration} (load generator on CPUs {sorted(target.load_cpus)})")
    if on_start is not None:
        on_start()
    tally = run_locust(target.host, target.path, pool.folder, out_prefix, users, duration, target.load_cpus,
                       extra=["--expected", pool.expected, "--answers-log", log])
    return {"tally": tally, "log": log, "prefix": out_prefix}


def say(message: str) -> None:
    print(f"[longrun] {message}", file=sys.stderr, flush=True)

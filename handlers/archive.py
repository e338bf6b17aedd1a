"""``branched archive``: a model directory -> ``NAME.mar`` and ``NAME-baseline.mar`` for TorchServe.

Each archive is made by torch-model-archiver and carries the handler (``branched_handler.py``), the
``branched`` inference core (so the archive loads offline with no pip step; the offline build package
``branched/build`` and the command line are left out), the model directory under
``model/`` and a ``model-config.yaml`` with TorchServe's batching and worker settings. The baseline
archive holds the same files; its ``handler: {baseline: true}`` makes the handler serve the plain
backbone from the same weights, through the same code path.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Optional

import yaml

import branched

__all__ = ["ArchiveSettings", "build_archive", "build_archives", "check_controller", "register", "HANDLER_FILE",
           "NOT_SHIPPED"]

#: The handler module that goes into every archive.
HANDLER_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "branched_handler.py")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")  # what TorchServe accepts as a model name


@dataclass
class ArchiveSettings:
    """What goes into ``model-config.yaml``.

    Args:
        batch_size: most requests TorchServe puts in one batch.
        max_batch_delay: milliseconds TorchServe waits to fill a batch.
        workers: worker processes (min = max: a fixed pool).
        response_timeout: seconds before TorchServe gives up on a batch.
        threads: torch threads per worker (0: the machine's cores divided by the workers).
        max_bytes: largest encoded image accepted, in bytes (TorchServe's ``max_request_size`` in
            config.properties caps the whole body before the handler sees it).
        max_pixels: largest width x height accepted, read from the image header before decoding.
        min_side: smallest width or height accepted.
        The three limits default to :class:`branched.preprocess.ImageLimits`' (10 MiB, 4096 x 4096, 8).
        slo_p95_ms, max_drop: turn on the load controller (:mod:`branched.controller`) in the early-exit
            archive: hold this p95 latency, never past this accuracy drop against the backbone.
        controller: the controller's tuning (:class:`branched.controller.ControllerSettings` fields).
    """

    batch_size: int = 8
    max_batch_delay: int = 10
    workers: int = 1
    response_timeout: int = 120
    threads: int = 0
    # None: the handler's default, branched.preprocess.ImageLimits (not imported here: it needs torch).
    max_bytes: Optional[int] = None
    max_pixels: Optional[int] = None
    min_side: Optional[int] = None
    slo_p95_ms: Optional[float] = None
    max_drop: Optional[float] = None
    controller: Optional[dict] = None

    def model_config(self, baseline: bool) -> dict:
        control = {} if baseline or self.slo_p95_ms is None else {
            "slo_p95_ms": self.slo_p95_ms, "max_drop": self.max_drop, **({"controller": self.controller}
                                                                        if self.controller else {})}
        return {
            "minWorkers": self.workers,
            "maxWorkers": self.workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay,
            "responseTimeout": self.response_timeout,
            "deviceType": "cpu",
            "handler": {"baseline": baseline, "threads": self.threads,
                        **{k: v for k, v in (("max_bytes", self.max_bytes), ("max_pixels", self.max_pixels),
                                             ("min_side", self.min_side)) if v is not None}, **control},
        }


def build_archive(model_dir: str, out_dir: str, name: str, baseline: bool = False,
                  settings: ArchiveSettings = ArchiveSettings(), version: str = "1.0", check: bool = True) -> str:
    """Write ``out_dir/NAME.mar`` (replacing an existing one); returns its path.

    Args:
        model_dir: a model directory (``branched build`` / :func:`branched.artifact.save_model`).
        out_dir: the model store to write into (created if needed).
        name: model name, as TorchServe will register it.
        baseline: serve the plain backbone instead of the early-exit model.
        settings: batching, workers and handler settings for ``model-config.yaml``.
        version: archive version string.
        check: load the model first, so that a broken directory fails here and not in TorchServe.

    Raises:
        ValueError: a name TorchServe would refuse.
        branched.artifact.ArtifactError: ``model_dir`` is not a loadable model directory.
    """
    from model_archiver import ModelArchiver, ModelArchiverConfig

    from branched.artifact import CONFIG_FILE, WEIGHTS_FILE, load_model  # torch: only when archiving

    _check_name(name)
    if check:
        model = load_model(model_dir)  # fail here, with a clear message, rather than in a TorchServe worker
        if settings.slo_p95_ms is not None and not baseline:
            check_controller(model.config, settings)
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="branched-archive-") as tmp:
        stage = os.path.join(tmp, "extra")
        _copy_package(os.path.join(stage, "branched"))
        os.makedirs(os.path.join(stage, "model"))
        for fname in (CONFIG_FILE, WEIGHTS_FILE):
            shutil.copy2(os.path.join(model_dir, fname), os.path.join(stage, "model", fname))
        config_file = os.path.join(tmp, "model-config.yaml")
        with open(config_file, "w") as f:
            yaml.safe_dump(settings.model_config(baseline), f, sort_keys=False)
        config = ModelArchiverConfig(
            model_name=name, handler=HANDLER_FILE, version=version,
            extra_files=stage,  # a directory: its entries (branched/, model/) land at the archive root
            export_path=os.path.abspath(out_dir), config_file=config_file, force=True)
        # The archiver stages files in gettempdir()/NAME; a private temp dir keeps two builds apart.
        saved, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            ModelArchiver.generate_model_archive(config)
        finally:
            tempfile.tempdir = saved
    return os.path.join(out_dir, f"{name}.mar")


def check_controller(config, settings: ArchiveSettings) -> None:
    """Refuse controller settings the model cannot honour, with the fix (what the worker would refuse later).

    Raises:
        branched.controller.ControllerError: no calibration curve, a bad or unusable ``max_drop``, bad tuning.
    """
    from branched.controller import ControllerSettings, OperatingPointController

    if settings.max_drop is None:
        raise ValueError("--slo-p95-ms needs --max-drop: the largest accuracy drop against the backbone the load "
                         "controller may trade for latency, e.g. --max-drop 0.02")
    values = {"slo_p95_ms": settings.slo_p95_ms, "max_drop": settings.max_drop,
              "batch_size": settings.batch_size, "batch_delay_ms": settings.max_batch_delay, **(settings.controller or {})}
    OperatingPointController(config, ControllerSettings.from_mapping(values))


def build_archives(model_dir: str, out_dir: str, name: Optional[str] = None,
                   settings: ArchiveSettings = ArchiveSettings(), baseline: bool = True) -> list[str]:
    """``NAME.mar`` and (unless ``baseline=False``) ``NAME-baseline.mar``; NAME defaults to the directory's name."""
    name = name or os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    _check_name(name)
    paths = [build_archive(model_dir, out_dir, name, False, settings)]
    if baseline:
        paths.append(build_archive(model_dir, out_dir, f"{name}-baseline", True, settings, check=False))
    return paths


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise ValueError(f"model name {name!r} is not valid for TorchServe: use letters, digits, '_', '-', '.'")


#: What a worker never needs: the offline build package and the command line.
NOT_SHIPPED = ("build", "cli.py")


def _copy_package(dest: str) -> None:
    """The ``branched`` inference core's Python files (no caches, no build code), as imported right now."""
    src = os.path.dirname(os.path.abspath(branched.__file__))
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *NOT_SHIPPED))


def _cmd_archive(args: argparse.Namespace) -> None:
    settings = ArchiveSettings(batch_size=args.batch_size, max_batch_delay=args.max_batch_delay,
                               workers=args.workers, response_timeout=args.response_timeout,
                               threads=args.threads, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
                               min_side=args.min_side, slo_p95_ms=args.slo_p95_ms, max_drop=args.max_drop)
    if args.max_drop is not None and args.slo_p95_ms is None:
        raise ValueError("--max-drop is the load controller's accuracy floor: give --slo-p95-ms too")
    for path in build_archives(args.model_dir, args.out, args.name, settings, baseline=not args.no_baseline):
        print(path)


def _count(minimum: int):
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _positive(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def register(subparsers) -> None:
    """Add ``branched archive`` to the ``branched`` command (entry point ``branched.commands``)."""
    p = subparsers.add_parser("archive", help="package a model directory as TorchServe .mar archives")
    p.add_argument("model_dir")
    p.add_argument("--out", default="archives", help="model store to write to (default: archives)")
    p.add_argument("--name", help="model name (default: the model directory's name)")
    d = ArchiveSettings()
    p.add_argument("--batch-size", type=_count(1), default=d.batch_size, help=f"TorchServe batchSize (default {d.batch_size})")
    p.add_argument("--max-batch-delay", type=_count(0), default=d.max_batch_delay,
                   help=f"TorchServe maxBatchDelay in ms (default {d.max_batch_delay})")
    p.add_argument("--workers", type=_count(1), default=d.workers, help=f"worker processes (default {d.workers})")
    p.add_argument("--response-timeout", type=_count(1), default=d.response_timeout,
                   help=f"seconds (default {d.response_timeout})")
    p.add_argument("--threads", type=_count(0), default=d.threads, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--max-bytes", type=_count(1), help="largest image accepted, in bytes (default 10 MiB; more "
                   "also needs a larger max_request_size in config.properties)")
    p.add_argument("--max-pixels", type=_count(1),
                   help="largest width x height accepted, checked on the header (default 4096 x 4096)")
    p.add_argument("--min-side", type=_count(1), help="smallest width or height accepted (default 8)")
    p.add_argument("--slo-p95-ms", type=_positive, help="turn on the load controller: hold this p95 latency (ms) "
                   "by moving to cheaper calibrated points under load (needs --max-drop)")
    p.add_argument("--max-drop", type=_positive, help="the controller's accuracy floor: largest accuracy drop "
                   "against the backbone it may serve, e.g. 0.02 (2 points)")
    p.add_argument("--no-baseline", action="store_true", help="skip NAME-baseline.mar")
    p.set_defaults(func=_cmd_archive)

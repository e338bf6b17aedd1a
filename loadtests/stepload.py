"""Step-load test (``branched loadtest --shape step``): fixed thresholds against the load controller under
0.5x, 1x, 2x, 1x, 0.5x of the capacity measured at the calibrated point.

One server (TorchServe or Ray Serve) runs the early-exit model with the controller on
(``--slo-p95-ms``, ``--max-drop``). The runner:

1. writes the request pool with each image's answer at every point of the controller's ladder (an answer
   served at any of them passes the locustfile's own-answer check; the pool labels give served accuracy);
2. measures capacity: a closed loop of ``capacity_users`` for ``capacity_s`` with every request carrying the
   calibrated thresholds (a request's own thresholds win over the controller), and again at the ladder's
   floor (what the controller can buy at most);
3. runs the step shape (``loadtests/stepshape.py``: ``users`` paced users) twice: **fixed**, every request
   carrying the calibrated thresholds (the server as without a controller), then **controller**, requests
   naming none, after the controller is back at its calibrated point; every request is stamped with
   ``X-Request-Start`` (the TorchServe handler then reports measured latencies; the Ray ingress measures its own);
4. samples the server's operating point every 0.5 s (TorchServe: the ``BranchedOperatingPoint`` metrics;
   Ray Serve: ``GET /controller``) and writes the per-step report (:mod:`loadtests.stepreport`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import requests

from branched.artifact import load_config
from branched.controller import ControllerSettings, operating_points

from .answers import read_log, write_expected_points
from .harness import VARIANTS, make_pool, ray_options, run_locust, say, serve, warm_up
from .report import read_run
from .stepreport import series, step_rows, verdicts, write_step_report

__all__ = ["StepSettings", "step_load", "add_step_arguments", "run_step", "print_step_summary"]

SHAPEFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stepshape.py")
ARMS = ("fixed", "controller")


@dataclass
class StepSettings:
    """What the step-load test asks of the controller, and how it loads the server.

    Args:
        slo_p95_ms: the p95 latency target (ms) the controller holds.
        max_drop: its accuracy floor (largest drop against the backbone, 0.02 = 2 points).
        multiples: the steps, as multiples of the measured capacity.
        step_s: seconds per step.
        capacity_s: seconds of each closed-loop capacity run.
        capacity_users: users of the capacity runs (default 4 x the server batch size).
        users: paced users of the step runs (default: 8 x peak rate x target, at least ``capacity_users``, so
            each user's mean period at the peak is 8x the target and the offered load is open-loop until
            latencies reach it).
        settle_s: seconds left out at the start of each step for the report's settled p95 (default window_s x 2).
        controller: the controller's tuning (``branched.controller.ControllerSettings`` fields).
    """

    slo_p95_ms: float
    max_drop: float
    multiples: tuple = (0.5, 1.0, 2.0, 1.0, 0.5)
    step_s: float = 20.0
    capacity_s: float = 10.0
    capacity_users: Optional[int] = None
    users: Optional[int] = None
    settle_s: Optional[float] = None
    controller: dict = field(default_factory=dict)


def _thresholds_header(thresholds) -> list[str]:
    """Locustfile options sending ``thresholds`` as a header (both servers read routing headers)."""
    return ["--header", "thresholds=" + ",".join("inf" if not math.isfinite(t) else repr(float(t)) for t in thresholds)]


def ladder_expected(model_dir: str, pool_folder: str, out_dir: str, ladder) -> tuple[str, list[float]]:
    """``expected_ladder.json`` (each pool image's answers at every ladder point) and each point's pool accuracy."""
    with open(os.path.join(pool_folder, "labels.json")) as f:
        labels = json.load(f)
    merged: dict[str, list] = {}
    accuracy = []
    paths = write_expected_points(model_dir, pool_folder, [(os.path.join(out_dir, f"expected_point{p.index}.json"),
                                                            p.thresholds) for p in ladder])
    for path in paths:
        with open(path) as f:
            answers = json.load(f)
        for name, answer in answers.items():
            merged.setdefault(name, []).append(answer)
        accuracy.append(sum(answers[n]["class_index"] == int(labels[n]) for n in answers) / len(answers))
    path = os.path.join(out_dir, "expected_ladder.json")
    with open(path, "w") as f:
        json.dump(merged, f)
    return path, accuracy


def point_reader(target) -> Callable[[], Optional[tuple[int, float, float]]]:
    """A function returning the server's operating point now, ``(index, cost, expected drop)``, or None."""
    if target.server == "ray":
        def ray() -> Optional[tuple[int, float, float]]:
            s = requests.get(target.host + "/controller", timeout=5).json()
            return (int(s["index"]), float(s["cost_fraction"]), float(s["expected_drop"])) if s.get("on") else None
        return ray
    names = ("BranchedOperatingPoint", "BranchedOperatingCost", "BranchedExpectedDrop")

    def torchserve() -> Optional[tuple[int, float, float]]:
        text = requests.get(target.handle.metrics_url, timeout=5).text
        got = {m.group(1): float(m.group(2)) for m in re.finditer(rf"^({'|'.join(names)})\{{[^}}]*\}}\s+(\S+)$",
                                                                 text, re.M)}
        return (int(got[names[0]]), got[names[1]], got[names[2]]) if all(n in got for n in names) else None
    return torchserve


class Sampler(threading.Thread):
    """Reads the operating point every ``period`` seconds into ``samples`` until :meth:`stop`."""

    def __init__(self, read: Callable[[], Optional[tuple]], period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.read, self.period, self.samples, self._stop_event = read, period, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                p = self.read()
                if p is not None:
                    self.samples.append((time.time(), *p))
            except (requests.RequestException, ValueError, KeyError):
                pass
            self._stop_event.wait(self.period)

    def stop(self) -> list[tuple]:
        self._stop_event.set()
        self.join(timeout=10)
        return self.samples


def settle(url: str, images: list[bytes], read: Callable[[], Optional[tuple]], timeout: float = 90.0,
           quiet_s: float = 0.0) -> float:
    """Send one request every 50 ms (no thresholds) until the controller is at its calibrated point, then ``quiet_s``
    more seconds there; seconds taken until it got there.

    The fixed-thresholds arm runs the same server, whose controller still reacts to the load (its point is just not
    used); ``quiet_s`` of calm at the calibrated point (``4 x hold_s`` and a margin) lets it forget the hold that arm's
    moves doubled, so the controller arm starts as a fresh server would.

    Raises:
        RuntimeError: still away from it after ``timeout`` (the last point read is in the message).
    """
    start, last, i, reached = time.monotonic(), None, 0, None
    while time.monotonic() - start < timeout + quiet_s:
        requests.post(url, data=images[i % len(images)], headers={"Content-Type": "image/png"}, timeout=60)
        i += 1
        if i % 10 == 0:
            last = read()
            if last is not None and last[0] == 0:
                reached = time.monotonic() - start if reached is None else reached
                if time.monotonic() - start - reached >= quiet_s:
                    return reached
            elif reached is not None:
                reached = None  # moved away again: wait for it to come back
        if reached is None and time.monotonic() - start >= timeout:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the controller did not come back to its calibrated point within {timeout:.0f}s at a "
                       f"trickle of 20 requests/s (last point read: {last})")


def step_load(server: str, model_dir: str, out_dir: str, settings: StepSettings, pool_size: int = 200,
              server_cpus: Optional[int] = None, batch_size: int = 8, max_batch_delay: int = 10,
              ray: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Run the step-load test and write its report; returns the report dict.

    Args:
        server: ``"torchserve"`` or ``"ray"``.
        model_dir: a model directory with a calibration curve (``branched build``).
        out_dir: where the report, the pool and Locust's files go.
        settings: target, floor, steps and load.
        pool_size, server_cpus, batch_size, max_batch_delay: as for ``branched loadtest``.
        ray: Ray Serve launcher options (``profile``, ``grouping``, ``env``), as for ``branched loadtest``.

    Raises:
        branched.controller.ControllerError: settings the model's curve cannot honour (with the fix).
        RuntimeError: a server or Locust that did not run, or a controller that did not settle.
    """
    config = load_config(model_dir)
    ladder = operating_points(config, settings.max_drop)
    os.makedirs(out_dir, exist_ok=True)
    pool = make_pool(model_dir, out_dir, pool_size, VARIANTS)
    say(f"answers of the pool at each of the {len(ladder)} ladder points")
    expected, point_accuracy = ladder_expected(model_dir, pool.folder, out_dir, ladder)
    with open(pool.expected["baseline"]) as f, open(os.path.join(pool.folder, "labels.json")) as g:
        base, labels = json.load(f), json.load(g)
    backbone_correct = {n: base[n]["class_index"] == int(labels[n]) for n in base}
    backbone_accuracy = sum(backbone_correct.values()) / len(backbone_correct)
    control = {"slo_p95_ms": settings.slo_p95_ms, "max_drop": settings.max_drop, "controller": settings.controller}
    cap_users = settings.capacity_users or 4 * batch_size
    calibrated, floor = _thresholds_header(ladder[0].thresholds), _thresholds_header(ladder[-1].thresholds)
    own_cpus = os.sched_getaffinity(0)
    with serve(server, model_dir, out_dir, server_cpus, batch_size, max_batch_delay, baseline=False, ray=ray,
               control=control) as target:
        os.sched_setaffinity(0, target.load_cpus)  # the runner's sampler stays off the server's CPUs
        try:
            url = target.host + target.path
            warm_up(url, pool.images[:32])
            capacity = {}
            for name, own in (("calibrated", calibrated), ("floor", floor)):
                say(f"capacity at the {name} point: {cap_users} users, closed loop, {settings.capacity_s:g}s")
                tally = run_locust(target.host, target.path, pool.folder, os.path.join(out_dir, f"capacity_{name}"),
                                   cap_users, f"{settings.capacity_s:g}s", target.load_cpus,
                                   extra=["--expected", expected, *own])
                capacity[name] = read_run(tally).rps
            peak = max(settings.multiples) * capacity["calibrated"]
            users = settings.users or max(cap_users, math.ceil(8 * peak * settings.slo_p95_ms / 1e3))
            steps = [(settings.step_s, m) for m in settings.multiples]
            read = point_reader(target)
            arms, samples, logs = {}, {}, {}
            for arm in ARMS:
                if arm == "controller":
                    quiet = 4 * float(settings.controller.get("hold_s", ControllerSettings.hold_s)) + 2
                    say(f"back to the calibrated point in {settle(url, pool.images, read, quiet_s=quiet):.1f}s "
                        f"(then {quiet:g}s there)")
                say(f"step load, {arm}: {', '.join(f'{m:g}x' for m in settings.multiples)} of "
                    f"{capacity['calibrated']:.1f} req/s, {settings.step_s:g}s each, {users} paced users")
                prefix = os.path.join(out_dir, f"step_{arm}")
                sampler = Sampler(read)
                sampler.start()
                try:
                    run_locust(target.host, target.path, pool.folder, prefix, users,
                               f"{settings.step_s * len(steps) + 30:g}s", target.load_cpus,
                               shape=SHAPEFILE,
                               extra=[*(calibrated if arm == "fixed" else []), "--stamp", "--expected", expected,
                                      "--answers-log", f"{prefix}_requests.csv",
                                      "--steps", ",".join(f"{s:g}:{m:g}" for s, m in steps),
                                      "--capacity", f"{capacity['calibrated']:.4f}", "--step-users", str(users),
                                      "--steps-out", f"{prefix}_steps.json"])
                finally:
                    samples[arm] = sampler.stop()
                with open(f"{prefix}_steps.json") as f:
                    t0 = json.load(f)["t0"]
                logs[arm] = (read_log(f"{prefix}_requests.csv"), t0)
        finally:
            os.sched_setaffinity(0, own_cpus)
    settle_s = settings.settle_s if settings.settle_s is not None else 2 * settings.controller.get("window_s", 2.0)
    for arm in ARMS:
        rows, t0 = logs[arm]
        arms[arm] = step_rows(rows, t0, steps, capacity["calibrated"], samples[arm], settle_s, backbone_correct)
    floor_accuracy = backbone_accuracy - settings.max_drop
    report = {
        "server": server, "model": config.backbone, "model_dir": model_dir, "slo_p95_ms": settings.slo_p95_ms,
        "max_drop": settings.max_drop, "settings": asdict(settings), "ray": ray if server == "ray" else None,
        "users": users, "capacity_users": cap_users,
        "batch_size": batch_size, "max_batch_delay_ms": max_batch_delay, "pool_size": len(pool.images),
        "server_cpus": sorted(target.server_cpus), "load_cpus": sorted(target.load_cpus),
        "capacity_rps": capacity["calibrated"], "capacity_floor_rps": capacity["floor"],
        "capacity_ratio": capacity["floor"] / capacity["calibrated"] if capacity["calibrated"] else float("nan"),
        # Under load batches are full: a target under this (+ the batch delay) cannot hold even at the 1x step.
        "full_batch_ms": 1e3 * batch_size / capacity["calibrated"] if capacity["calibrated"] else float("nan"),
        "ladder": [{"index": p.index, "cost_fraction": p.cost_fraction, "expected_drop": p.drop,
                    "pool_accuracy": a} for p, a in zip(ladder, point_accuracy)],
        "pool_backbone_accuracy": backbone_accuracy, "settle_s": settle_s,
        "arms": arms, "verdicts": verdicts(arms, settings.slo_p95_ms, floor_accuracy,
                                           capacity["floor"] / capacity["calibrated"] if capacity["calibrated"]
                                           else None, max_drop=settings.max_drop),
        "series": {arm: series(logs[arm][0], logs[arm][1], logs[arm][1] + settings.step_s * len(steps))
                   for arm in ARMS},
        "points": {arm: [(t - logs[arm][1], i, c, d) for t, i, c, d in samples[arm]] for arm in ARMS},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    say("report: " + ", ".join(write_step_report(report, out_dir)))
    return report


def print_step_summary(report: dict[str, Any]) -> None:
    """The per-step table of both arms and the verdicts."""
    print(f"\n{report['server']}: {report['model']}, step load at {report['capacity_rps']:.1f} req/s capacity "
          f"(floor {report['capacity_floor_rps']:.1f}, {report['capacity_ratio']:.2f}x), target p95 "
          f"{report['slo_p95_ms']:g} ms, max drop {report['max_drop']:g}, {report['users']} users; a full batch at "
          f"the calibrated point takes {report['full_batch_ms']:.0f} ms")
    print(f"  {'arm':<10} {'step':>4} {'offered':>8} {'answered':>8} {'p95 ms':>8} {'settled':>8} {'fail':>5} "
          f"{'accuracy':>8} {'drop':>6} {'cost':>6} {'point':>9}")
    for arm, steps in report["arms"].items():
        for s in steps:
            point = "-" if s["point_mean"] is None else f"{s['point_mean']:.1f}/{s['point_last']}"
            print(f"  {arm:<10} {s['multiple']:>3g}x {s['offered_rps']:>8.1f} {s['throughput_rps']:>8.1f} "
                  f"{s['p95_ms']:>8.0f} {s['p95_settled_ms']:>8.0f} {s['failures']:>5} {s['accuracy']:>8.4f} "
                  f"{s.get('drop', float('nan')):>6.3f} {s['cost_fraction']:>6.3f} {point:>9}")
    print("  " + json.dumps(report["verdicts"]))


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    """``branched loadtest --shape step`` options."""
    p.add_argument("--shape", choices=("compare", "step"), default="compare",
                   help="compare: early-exit against the baseline (default); step: fixed thresholds against the "
                        "load controller under 0.5x, 1x, 2x, 1x, 0.5x of the measured capacity")
    p.add_argument("--slo-p95-ms", type=float, help="step: the controller's p95 latency target (ms)")
    p.add_argument("--max-drop", type=float, help="step: the controller's accuracy floor, e.g. 0.02")
    p.add_argument("--step-s", type=float, default=20.0, help="step: seconds per step (default 20)")
    p.add_argument("--capacity-s", type=float, default=10.0, help="step: seconds per capacity run (default 10)")
    p.add_argument("--step-users", type=int, help="step: paced users (default 8 x peak rate x target)")
    p.add_argument("--peak", type=float, default=2.0,
                   help="step: the middle step's multiple of the measured capacity (default 2: 0.5x, 1x, 2x, 1x, "
                        "0.5x); the controller can hold it only up to the floor's capacity, which the report states")


def run_step(args: argparse.Namespace, out: str) -> dict[str, Any]:
    """``branched loadtest --shape step`` (the options of :func:`add_step_arguments` and the shared ones).

    Raises:
        ValueError: ``--slo-p95-ms`` or ``--max-drop`` missing.
    """
    if args.slo_p95_ms is None or args.max_drop is None:
        raise ValueError("--shape step needs --slo-p95-ms and --max-drop (the controller's target and floor)")
    if not args.peak > 1.0:
        raise ValueError(f"--peak is the overload step's multiple of the capacity and must be above 1, got {args.peak}")
    settings = StepSettings(args.slo_p95_ms, args.max_drop, multiples=(0.5, 1.0, args.peak, 1.0, 0.5),
                            step_s=args.step_s, capacity_s=args.capacity_s, users=args.step_users)
    return step_load(args.server, args.model_dir, out, settings, args.pool_size, args.server_cpus, args.batch_size,
                     args.max_batch_delay, ray_options(args))

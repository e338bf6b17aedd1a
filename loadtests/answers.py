"""Each pool image's own answer (computed offline), and what a run's per-request log says over time.

:func:`write_expected` answers every pool image, in batches as a server does, through the same
:class:`branched.serving.Predictor` the servers use, so the locustfile (``--expected``) can check that every
200 answer belongs to its own request. :func:`read_log` reads the locustfile's ``--answers-log``; :func:`per_window` gives latency
percentiles and throughput per minute, :func:`recovery` what a fault did to the answer stream.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from branched.routing import exit_score, resolve_thresholds
from branched.errors import RequestError
from branched.serving import Predictor, Prepared

__all__ = ["write_expected", "write_expected_points", "LogRow", "read_log", "percentile", "per_window", "recovery", "BORDERLINE"]

# A score this close to its threshold may route either way between a batch and a single sample
# (float noise is ~1e-7); such an image's answer is accepted on either route and counted apart.
BORDERLINE = 1e-5


def write_expected(model_dir: str, pool_dir: str, out_path: str, baseline: bool = False,
                   thresholds: Optional[Sequence[float]] = None) -> str:
    """Write ``{image file: {class_index, exit, confidence, borderline}}`` for every PNG of ``pool_dir``.

    Args:
        model_dir: the served model directory (same thresholds as the server's defaults).
        pool_dir: the request pool (``loadtests.harness.write_pool``).
        out_path: the JSON file to write; returned.
        baseline: answers of the plain backbone (the servers' baseline endpoints).
        thresholds: the early exits' thresholds to answer at (default: the model's own), e.g. an operating
            point of the load controller.
    """
    return write_expected_points(model_dir, pool_dir, [(out_path, thresholds)], baseline)[0]


@torch.inference_mode()
def write_expected_points(model_dir: str, pool_dir: str, points: Sequence[tuple[str, Optional[Sequence[float]]]],
                          baseline: bool = False, batch_size: int = 64) -> list[str]:
    """:func:`write_expected` at several thresholds (``(out_path, thresholds)`` each) from one decode of the pool.

    The pool is answered in batches, as a server batches requests: a batch answers as its samples do alone but
    for float noise (~1e-7), and an image whose score lies within :data:`BORDERLINE` of a threshold it reached is
    marked ``borderline`` (either route is accepted for it). Every exit's score comes from one full pass.

    Raises:
        ValueError: a pool image the model rejects.
    """
    predictor = Predictor(model_dir, baseline=baseline)
    names = sorted(n for n in os.listdir(pool_dir) if n.endswith(".png"))
    images = []
    for name in names:
        with open(os.path.join(pool_dir, name), "rb") as f:
            data = f.read()
        try:
            images.append(predictor.prepare(data).image)
        except RequestError as exc:
            raise ValueError(f"pool image {name} is rejected by the model: {exc}") from None
    x = torch.stack(images) if images else torch.empty(0)
    model, policy = predictor.model, predictor.config.policy
    side_exits = len(predictor.default_thresholds)
    scores = torch.cat([torch.stack([exit_score(o, policy) for o in model(b)[:side_exits]], dim=1)
                        for b in x.split(batch_size)]) if side_exits and images else None
    paths = []
    for out_path, thresholds in points:
        thr = predictor.default_thresholds if thresholds is None else \
            resolve_thresholds(list(thresholds), predictor.config.thresholds)
        answers = [a for b in x.split(batch_size)
                   for a in predictor.predict([Prepared(image, thr) for image in b])]
        expected = {}
        for i, (name, answer) in enumerate(zip(names, answers)):
            expected[name] = {"class_index": answer["class_index"], "exit": answer["exit"],
                              "confidence": answer["confidence"],
                              "borderline": scores is not None and _borderline(scores[i], thr, answer["exit"])}
        with open(out_path, "w") as f:
            json.dump(expected, f, indent=1)
        paths.append(out_path)
    return paths


def _borderline(scores: torch.Tensor, thresholds: torch.Tensor, exit_taken: int) -> bool:
    """Whether a score of an exit the image reached lies within :data:`BORDERLINE` of its threshold."""
    for k in range(min(exit_taken + 1, len(thresholds))):
        t = float(thresholds[k])
        if math.isfinite(t) and abs(float(scores[k]) - t) < BORDERLINE:
            return True
    return False


@dataclass
class LogRow:
    """One request of the locustfile's ``--answers-log`` (times in seconds since the epoch)."""

    start: float
    end: float
    image: str
    ok: bool
    mismatch: bool
    exit: Optional[int]
    latency_ms: float
    error: str
    correct: Optional[bool] = None  # the answer's class against the pool label (logs that record it)
    cost_fraction: Optional[float] = None


def read_log(path: str) -> list[LogRow]:
    """The rows of an ``--answers-log`` CSV, by end time."""
    with open(path, newline="") as f:
        rows = [LogRow(float(r["start"]), float(r["end"]), r["image"], r["ok"] == "1", r["mismatch"] == "1",
                       int(r["exit"]) if r["exit"] not in ("", None) else None, float(r["latency_ms"]), r["error"],
                       None if r.get("correct") in ("", None) else r["correct"] == "1",
                       None if r.get("cost_fraction") in ("", None) else float(r["cost_fraction"]))
                for r in csv.DictReader(f)]
    return sorted(rows, key=lambda r: r.end)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def per_window(rows: Sequence[LogRow], t0: float, window_s: float = 60.0) -> list[dict]:
    """Requests, failures, answers per second and latency percentiles (ms) per window of end times.

    Args:
        rows: the run's log.
        t0: the run's start (window 0 begins here).
        window_s: window length in seconds; a last partial window is reported with its own length.
    """
    if not rows:
        return []
    t_end = max(r.end for r in rows)
    n = max(1, math.ceil((t_end - t0) / window_s))
    buckets: list[list[LogRow]] = [[] for _ in range(n)]
    for r in rows:  # by end time; stragglers before t0 (warm-up) or at t_end go to the edge windows
        buckets[min(n - 1, max(0, int((r.end - t0) // window_s)))].append(r)
    out = []
    for i, inside in enumerate(buckets):
        span = max(min(window_s, t_end - t0 - i * window_s), 1e-9)
        lat = [r.latency_ms for r in inside if r.ok]
        out.append({"window": i, "start_s": round(i * window_s, 1), "seconds": round(span, 1),
                    "requests": len(inside), "failures": sum(not r.ok for r in inside),
                    "mismatches": sum(r.mismatch for r in inside), "rps": len(lat) / span,
                    **{f"p{q}": percentile(lat, q / 100) for q in (50, 95, 99)}})
    return out


def recovery(rows: Sequence[LogRow], t_kill: float, min_exit: int = 0) -> dict:
    """What a fault at ``t_kill`` did to the answer stream.

    Args:
        rows: the run's log.
        t_kill: when the process was killed (epoch seconds).
        min_exit: only answers with ``exit >= min_exit`` show the killed part works (a killed Ray stage
            ``k`` is not needed by samples that exit before it).

    Returns:
        ``failed_before``/``failed_after`` (requests that ended in failure before/after the kill),
        ``last_failure_s`` (after the kill), ``answers_back_s`` (from the kill to the first good answer
        through the killed part that ends after the last failure; None if none came), ``longest_gap_s``
        (the longest time after the kill without such an answer), the first and last error texts.
    """
    deep = [r for r in rows if r.ok and (r.exit is None or r.exit >= min_exit)]
    failed_after = [r for r in rows if not r.ok and r.end >= t_kill]
    last_failure = max((r.end for r in failed_after), default=t_kill)
    back = next((r.end for r in deep if r.end > last_failure), None)
    times = [t_kill] + [r.end for r in deep if r.end > t_kill]
    run_end = max((r.end for r in rows), default=t_kill)
    gaps = [b - a for a, b in zip(times, times[1:])] + ([run_end - times[-1]] if back is None else [])
    errors = sorted({r.error for r in failed_after})
    return {"failed_before": sum(not r.ok and r.end < t_kill for r in rows), "failed_after": len(failed_after),
            "mismatches": sum(r.mismatch for r in rows),
            "last_failure_s": round(last_failure - t_kill, 3) if failed_after else None,
            "answers_back_s": None if back is None else round(back - t_kill, 3),
            "longest_gap_s": round(max(gaps, default=0.0), 3), "errors": errors[:5]}

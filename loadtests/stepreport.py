"""The step-load report: per step and per arm (fixed thresholds, load controller), from the locustfile's
per-request log and the server's operating point sampled during the run; JSON, CSV and a PNG.

A request belongs to the step in which it was sent (its latency is what a request arriving then gets);
throughput counts the answers that came back within the step. ``p95_settled_ms`` leaves out the first
``settle_s`` of each step (the controller's reaction time and the queue built before it); the verdicts
use the whole step.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

from .answers import LogRow, percentile

__all__ = ["step_rows", "series", "verdicts", "write_step_report"]

#: What one sample of the server's operating point holds: (epoch seconds, ladder index, cost, expected drop).
Sample = tuple[float, int, float, float]


def _bounds(t0: float, steps: Sequence[tuple[float, float]]) -> list[tuple[float, float, float]]:
    out, t = [], t0
    for seconds, multiple in steps:
        out.append((t, t + seconds, multiple))
        t += seconds
    return out


def step_rows(rows: Sequence[LogRow], t0: float, steps: Sequence[tuple[float, float]], capacity: float,
              points: Sequence[Sample], settle_s: float,
              backbone_correct: Optional[Mapping[str, bool]] = None) -> list[dict[str, Any]]:
    """One dict per step: requests, failures, offered and answered rates, latency percentiles (ms), served
    accuracy and cost, and the operating point the server reported (mean, max and last index; time share
    at the calibrated point). With ``backbone_correct``, also the plain backbone's accuracy on the same
    answered requests and the drop against it (``drop``): a paired comparison, free of the noise of which pool
    images a step happened to draw (a few hundred draws move accuracy itself by 2 points).

    Args:
        rows: the locustfile's ``--answers-log`` of one arm (``loadtests.answers.read_log``).
        t0: epoch seconds of the first step's start (the shape's ``--steps-out``).
        steps: ``(seconds, multiple of capacity)`` per step.
        capacity: requests/s the multiples refer to.
        points: the server's operating point, sampled during the run.
        settle_s: seconds left out at the start of each step for ``p95_settled_ms``.
        backbone_correct: per pool image name, whether the plain backbone answers it right.
    """
    out = []
    for i, (lo, hi, multiple) in enumerate(_bounds(t0, steps)):
        sent = [r for r in rows if lo <= r.start < hi]
        ok = [r for r in sent if r.ok]
        lat = [r.latency_ms for r in ok]
        settled = [r.latency_ms for r in ok if r.start >= lo + settle_s]
        correct = [r.correct for r in ok if r.correct is not None]
        costs = [r.cost_fraction for r in ok if r.cost_fraction is not None]
        inside = [p for p in points if lo <= p[0] < hi]
        span = hi - lo
        paired = [(r.correct, backbone_correct[r.image]) for r in ok
                  if r.correct is not None and backbone_correct is not None and r.image in backbone_correct]
        backbone = sum(b for _, b in paired) / len(paired) if paired else float("nan")
        out.append({
            "step": i, "multiple": multiple, "start_s": round(lo - t0, 3), "seconds": round(span, 3),
            "target_rps": multiple * capacity, "offered_rps": len(sent) / span,
            "throughput_rps": sum(1 for r in rows if r.ok and lo <= r.end < hi) / span,
            "requests": len(sent), "answers": len(ok), "failures": len(sent) - len(ok),
            "mismatches": sum(r.mismatch for r in sent),
            **{f"p{q}_ms": percentile(lat, q / 100) for q in (50, 95, 99)},
            "p95_settled_ms": percentile(settled, 0.95),
            "accuracy": sum(correct) / len(correct) if correct else float("nan"),
            "cost_fraction": sum(costs) / len(costs) if costs else float("nan"),
            "backbone_accuracy": backbone,
            "drop": backbone - sum(c for c, _ in paired) / len(paired) if paired else float("nan"),
            "point_mean": _mean([p[1] for p in inside]), "point_max": max((p[1] for p in inside), default=None),
            "point_last": inside[-1][1] if inside else None,
            "at_calibrated": _mean([float(p[1] == 0) for p in inside]),
            "expected_drop_mean": _mean([p[3] for p in inside]),
        })
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def series(rows: Sequence[LogRow], t0: float, end: float, bin_s: float = 1.0) -> dict[str, list[float]]:
    """Per ``bin_s`` from ``t0``: sent and answered requests/s, and the p95 latency (ms) of those sent."""
    n = max(1, math.ceil((end - t0) / bin_s))
    sent: list[list[float]] = [[] for _ in range(n)]
    answered = [0] * n
    for r in rows:
        i = int((r.start - t0) // bin_s)
        if 0 <= i < n:
            sent[i].append(r.latency_ms if r.ok else math.nan)
        j = int((r.end - t0) // bin_s)
        if r.ok and 0 <= j < n:
            answered[j] += 1
    return {"t": [(i + 0.5) * bin_s for i in range(n)], "sent_rps": [len(b) / bin_s for b in sent],
            "answered_rps": [a / bin_s for a in answered],
            "p95_ms": [percentile([v for v in b if v == v], 0.95) for b in sent]}


def verdicts(arms: dict[str, list[dict[str, Any]]], slo_ms: float, floor_accuracy: float,
             capacity_ratio: Optional[float] = None, max_drop: Optional[float] = None) -> dict[str, Any]:
    """The issue's checks, on the highest step: fixed thresholds miss the target, the controller holds it
    within +10% with served accuracy within the floor and no failure in either arm; and the controller
    is at the calibrated point at the end of every lowest step.

    "Within the floor": with ``max_drop`` and steps that carry a paired ``drop`` (:func:`step_rows` with
    ``backbone_correct``), every step's drop against the backbone on its own requests is at most ``max_drop``;
    otherwise every step's accuracy is at least ``floor_accuracy`` (the pool's backbone accuracy - max_drop).

    ``peak_within_floor_capacity`` says whether the peak could be held at all: when the floor's measured
    capacity (``capacity_ratio`` x the calibrated point's) is below the peak load, no operating point within
    ``max_drop`` serves it and a queue grows whatever the controller does."""
    fixed, ctl = arms["fixed"], arms["controller"]
    peak = max(range(len(ctl)), key=lambda i: ctl[i]["multiple"])
    lowest = min(s["multiple"] for s in ctl)
    paired = max_drop is not None and all(not math.isnan(s.get("drop", math.nan)) for s in ctl if s["answers"])
    return {
        "peak_step": peak, "slo_p95_ms": slo_ms, "floor_accuracy": floor_accuracy,
        "peak_multiple": ctl[peak]["multiple"], "floor_capacity_ratio": capacity_ratio,
        "peak_within_floor_capacity": None if capacity_ratio is None else ctl[peak]["multiple"] <= capacity_ratio,
        "fixed_p95_ms_at_peak": fixed[peak]["p95_ms"], "controller_p95_ms_at_peak": ctl[peak]["p95_ms"],
        "fixed_misses_target": fixed[peak]["p95_ms"] > slo_ms,
        "controller_holds_target": ctl[peak]["p95_ms"] <= 1.1 * slo_ms,
        "controller_accuracy_at_peak": ctl[peak]["accuracy"],
        "accuracy_within_floor": all(s["drop"] <= max_drop + 1e-12 for s in ctl if s["answers"]) if paired
        else all(s["accuracy"] >= floor_accuracy for s in ctl if s["answers"]),
        "controller_max_drop": max((s["drop"] for s in ctl if s["answers"]), default=None) if paired else None,
        "failures": {k: sum(s["failures"] for s in v) for k, v in arms.items()},
        "back_at_calibrated": all(s["point_last"] == 0 for s in ctl if s["multiple"] == lowest),
    }


def write_step_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """Write ``report.json``, ``report.csv`` (one row per arm and step) and ``report.png`` (load, p95 and the
    operating point over time) into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("report.json", "report.csv", "report.png")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2, default=lambda v: None)
    keys = ("multiple", "target_rps", "offered_rps", "throughput_rps", "requests", "failures", "p50_ms", "p95_ms",
            "p99_ms", "p95_settled_ms", "accuracy", "backbone_accuracy", "drop", "cost_fraction", "point_mean", "point_max", "point_last",
            "at_calibrated")
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arm", "step", *keys])
        for arm, steps in report["arms"].items():
            for s in steps:
                w.writerow([arm, s["step"], *[_fmt(s[k]) for k in keys]])
    _plot(report, paths[2], plt)
    return paths


def _fmt(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else v


def _plot(report: dict[str, Any], path: str, plt) -> None:
    fig, axes = plt.subplots(3, 1, figsize=(10, 8.5), sharex=True)
    colors = {"fixed": "#c44", "controller": "#2a7"}
    slo, cap = report["slo_p95_ms"], report["capacity_rps"]
    for arm, data in report["series"].items():
        axes[0].plot(data["t"], data["answered_rps"], color=colors[arm], label=f"{arm}: answered")
        axes[1].plot(data["t"], data["p95_ms"], color=colors[arm], label=f"{arm}: p95 of requests sent")
    first = next(iter(report["series"].values()))
    axes[0].plot(first["t"], first["sent_rps"], color="#888", ls=":", label="sent (controller arm)")
    axes[0].axhline(cap, color="#444", lw=0.8, ls="--", label=f"capacity at the calibrated point {cap:.0f}/s")
    axes[0].axhline(report["capacity_floor_rps"], color="#2a7", lw=0.8, ls="--",
                    label=f"capacity at the floor {report['capacity_floor_rps']:.0f}/s")
    axes[0].set_ylabel("requests/s")
    axes[0].legend(fontsize=7, loc="lower center")
    axes[1].axhline(slo, color="#444", lw=0.8, ls="--", label=f"target {slo:g} ms")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("p95 latency (ms, per second)")
    axes[1].legend(fontsize=7, loc="lower center")
    pts = report["points"]["controller"]
    if pts:
        axes[2].step([p[0] for p in pts], [p[1] for p in pts], where="post", color="#2a7", label="ladder index")
        ax = axes[2].twinx()
        ax.step([p[0] for p in pts], [p[2] for p in pts], where="post", color="#27a", alpha=0.6)
        ax.set_ylabel("point cost fraction", color="#27a")
    axes[2].set_ylabel("operating point (0 = calibrated)")
    axes[2].set_xlabel("seconds since the first step")
    t = 0.0
    for step in report["arms"]["controller"]:
        for ax in axes:
            ax.axvline(t, color="#bbb", lw=0.6)
        axes[0].text(t + 0.3, axes[0].get_ylim()[1] * 0.93, f"{step['multiple']:g}x", fontsize=8)
        t += step["seconds"]
    v = report["verdicts"]
    fig.suptitle(f"{report['server']}: {report['model']} step load, target p95 {slo:g} ms, max drop "
                 f"{report['max_drop']:g}\npeak p95 fixed {v['fixed_p95_ms_at_peak']:.0f} ms, controller "
                 f"{v['controller_p95_ms_at_peak']:.0f} ms; floor capacity {report['capacity_ratio']:.2f}x",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

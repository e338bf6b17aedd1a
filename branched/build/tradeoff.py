"""The accuracy / cost trade-off of a threshold sweep, written as CSV and as a PNG plot."""
from __future__ import annotations

import csv
import os
from typing import Optional, Sequence

from .calibrate import Calibration

__all__ = ["write_tradeoff_csv", "plot_tradeoff"]


def write_tradeoff_csv(path: str, cal: Calibration, test_points: Optional[Sequence[dict]] = None) -> str:
    """One row per threshold vector of the calibration path (cost falling), with calibration and
    test figures, the Learn-then-Test p-value, whether it was certified, and which row was chosen.

    Args:
        path: CSV file to write.
        cal: the :class:`~branched.build.calibrate.Calibration`.
        test_points: :meth:`ExitRecords.point` of each path entry on the test split, if measured.
    """
    k1 = len(cal.path[0]) if cal.path else 0
    header = ["point"] + [f"threshold_{k}" for k in range(k1)] + [
        "calib_cost_fraction", "calib_accuracy", "calib_drop", "calib_risk", "certify_errors", "certify_helps", "p_value",
        "certified", "test_cost_fraction", "test_accuracy", "test_drop", "chosen"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for j, thr in enumerate(cal.path):
            c, s = cal.calib_points[j], cal.certify_points[j]
            t = test_points[j] if test_points else None
            p = cal.p_values[j]
            w.writerow([j, *[f"{v:.6g}" for v in thr],
                        f"{c['cost_fraction']:.6f}", f"{c['accuracy']:.6f}", f"{c['drop']:.6f}", f"{c['risk']:.6f}",
                        s["errors"], s.get("helps", ""), "" if p is None else f"{p:.6g}", int(cal.certified[j]),
                        "" if t is None else f"{t['cost_fraction']:.6f}", "" if t is None else f"{t['accuracy']:.6f}",
                        "" if t is None else f"{t['drop']:.6f}", int(j == cal.chosen)])
    return path


def plot_tradeoff(path: str, cal: Calibration, test_points: Optional[Sequence[dict]] = None,
                  title: str = "") -> str:
    """Accuracy against cost fraction over the threshold sweep, with the chosen point and the backbone.

    Args:
        path: PNG file to write.
        cal: the :class:`~branched.build.calibrate.Calibration`.
        test_points: the same sweep measured on the test split (drawn dashed), if available.
        title: plot title.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=120)
    xs = [p["cost_fraction"] for p in cal.calib_points]
    ax.plot(xs, [p["accuracy"] for p in cal.calib_points], "-", color="tab:blue", lw=1.4,
            label="threshold sweep (calibration)")
    cert = [j for j, ok in enumerate(cal.certified) if ok]
    if any(cal.p_values) and cert:
        ax.plot([xs[j] for j in cert], [cal.calib_points[j]["accuracy"] for j in cert], ".", color="tab:green",
                ms=4, label="certified by Learn-then-Test")
    ch = cal.calib_points[cal.chosen]
    ax.plot([ch["cost_fraction"]], [ch["accuracy"]], "*", color="tab:red", ms=14, label="chosen (calibration)")
    backbone_acc = ch["backbone_accuracy"]
    ax.plot([1.0], [backbone_acc], "X", color="black", ms=10, label="backbone (calibration)")
    if test_points:
        ax.plot([p["cost_fraction"] for p in test_points], [p["accuracy"] for p in test_points], "--",
                color="tab:orange", lw=1.2, label="threshold sweep (test)")
        tc = test_points[cal.chosen]
        ax.plot([tc["cost_fraction"]], [tc["accuracy"]], "*", mfc="none", mec="tab:red", ms=14,
                label="chosen (test)")
        ax.plot([1.0], [tc["backbone_accuracy"]], "X", mfc="none", mec="black", ms=10, label="backbone (test)")
    budget = cal.report["budget"]
    if "max_drop" in budget:
        ax.axhline(backbone_acc - budget["max_drop"], color="grey", ls=":", lw=1,
                   label=f"backbone - {budget['max_drop']:g} (calibration)")
    if "max_cost" in budget:
        ax.axvline(budget["max_cost"], color="grey", ls=":", lw=1, label=f"cost budget {budget['max_cost']:g}")
    accs = [p["accuracy"] for p in cal.calib_points] + ([p["accuracy"] for p in test_points] if test_points else [])
    low = min(accs)
    ax.set_ylim(max(0.0, min(low, backbone_acc - 0.05) - 0.01), min(1.0, max(accs + [backbone_acc]) + 0.01))
    ax.set_xlabel("expected cost (fraction of backbone FLOPs)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "accuracy vs. cost")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

"""Turn two Locust runs (early-exit and baseline) into the comparison report: JSON, CSV and a PNG."""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["RunResult", "read_run", "comparison", "write_report"]


@dataclass
class RunResult:
    """One Locust run against one server.

    Attributes:
        requests, failures: Locust's aggregated counts.
        rps: requests per second over the run.
        p50, p95, p99: latency percentiles in ms.
        answers, correct, cost_fraction_sum, exits: the locustfile's tally of valid answers.
    """

    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    answers: int
    correct: int
    cost_fraction_sum: float
    exits: dict[str, int]

    @property
    def accuracy(self) -> float:
        return self.correct / self.answers if self.answers else 0.0

    @property
    def cost_fraction(self) -> float:
        return self.cost_fraction_sum / self.answers if self.answers else 0.0


def read_run(tally_path: str) -> RunResult:
    """Read the locustfile's tally JSON: Locust's final aggregate stats and the answers' tally."""
    with open(tally_path) as f:
        tally = json.load(f)
    st = tally["stats"]
    if not st["requests"]:
        raise ValueError(f"{tally_path}: Locust sent no request; is the server answering?")
    return RunResult(int(st["requests"]), int(st["failures"]), float(st["rps"]), float(st["p50"]),
                     float(st["p95"]), float(st["p99"]), int(tally["answers"]), int(tally["correct"]),
                     float(tally["cost_fraction_sum"]), {str(k): int(v) for k, v in tally["exits"].items()})


def comparison(early: RunResult, baseline: RunResult, num_exits: int, meta: dict[str, Any]) -> dict[str, Any]:
    """The report's numbers; ``gain`` is early-exit rps / baseline rps, beside the ideal from served costs."""
    ideal = 1.0 / early.cost_fraction if early.cost_fraction else float("nan")
    gain = early.rps / baseline.rps if baseline.rps else float("nan")
    exit_rates = [early.exits.get(str(k), 0) / early.answers if early.answers else 0.0 for k in range(num_exits)]
    return {
        **meta,
        "baseline_rps": baseline.rps, "early_exit_rps": early.rps, "gain": gain,
        "ideal_speedup": ideal, "gain_over_ideal": gain / ideal if ideal == ideal else float("nan"),
        "served_cost_fraction": early.cost_fraction,
        "baseline_accuracy": baseline.accuracy, "early_exit_accuracy": early.accuracy,
        "accuracy_drop": baseline.accuracy - early.accuracy,
        "failures": early.failures + baseline.failures,
        "requests": {"early_exit": early.requests, "baseline": baseline.requests},
        "answers": {"early_exit": early.answers, "baseline": baseline.answers},
        "exit_rates": exit_rates,
        "early_exit_latency_ms": {"p50": early.p50, "p95": early.p95, "p99": early.p99},
        "baseline_latency_ms": {"p50": baseline.p50, "p95": baseline.p95, "p99": baseline.p99},
    }


def write_report(report: dict[str, Any], out_dir: str) -> list[str]:
    """Write ``report.json``, ``report.csv`` and ``report.png`` into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n) for n in ("report.json", "report.csv", "report.png")]
    with open(paths[0], "w") as f:
        json.dump(report, f, indent=2)
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "rps", "accuracy", "p50_ms", "p95_ms", "p99_ms", "requests", "answers"])
        for key, name in (("early_exit", "early-exit"), ("baseline", "baseline")):
            lat = report[f"{key}_latency_ms"]
            w.writerow([name, f"{report[f'{key}_rps']:.2f}", f"{report[f'{key}_accuracy']:.4f}",
                        lat["p50"], lat["p95"], lat["p99"], report["requests"][key], report["answers"][key]])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = ["baseline", "early-exit"]
    axes[0].bar(names, [report["baseline_rps"], report["early_exit_rps"]], color=["#888", "#2a7"])
    axes[0].set_title(f"throughput (req/s): gain {report['gain']:.2f}x, ideal {report['ideal_speedup']:.2f}x")
    quantiles = ("p50", "p95", "p99")
    for offset, key, name, color in ((-0.2, "baseline", "baseline", "#888"), (0.2, "early_exit", "early-exit", "#2a7")):
        axes[1].bar([i + offset for i in range(3)], [report[f"{key}_latency_ms"][q] for q in quantiles],
                    width=0.4, color=color, label=name)
    axes[1].set_xticks(range(3), quantiles)
    axes[1].set_title("latency (ms)")
    axes[1].legend()
    axes[2].bar([str(k) for k in range(len(report["exit_rates"]))], report["exit_rates"], color="#2a7")
    axes[2].set_title("served exit mix (last = backbone head)")
    axes[2].set_xlabel("exit")
    fig.suptitle(f"{report.get('server', '')}: {report.get('model', '')}  accuracy "
                 f"{report['early_exit_accuracy']:.3f} (baseline {report['baseline_accuracy']:.3f})")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths

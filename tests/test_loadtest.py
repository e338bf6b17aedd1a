"""The comparison runner against real servers, briefly: the report's numbers must add up."""
import json
import os

import pytest

from loadtests.compare import compare
from ray_app.grouping import Grouping

from helpers import save_mnist_model

pytestmark = pytest.mark.server  # starts a real server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_mnist_model(str(tmp_path_factory.mktemp("lt_model")), 32)


@pytest.mark.parametrize("server", ["torchserve", "ray"])
def test_comparison_report_is_consistent(server, model_dir, tmp_path):
    out = str(tmp_path / server)
    report = compare(server, model_dir, out, users=2, duration="6s", pool_size=24)
    for name in ("report.json", "report.csv", "report.png", "locust_early_exit.html", "locust_baseline.html",
                 "locust_early_exit_stats.csv", "locust_baseline_stats_history.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "report.json"))) == json.loads(json.dumps(report))
    assert report["failures"] == 0
    for variant in ("early_exit", "baseline"):
        assert report["answers"][variant] == report["requests"][variant] > 0
    assert report["gain"] == pytest.approx(report["early_exit_rps"] / report["baseline_rps"])
    assert sum(report["exit_rates"]) == pytest.approx(1.0)
    assert len(report["exit_rates"]) == 3
    assert 0 < report["served_cost_fraction"] < 1.1
    assert report["ideal_speedup"] == pytest.approx(1 / report["served_cost_fraction"])
    for key in ("baseline_accuracy", "early_exit_accuracy"):
        assert 0.0 <= report[key] <= 1.0
    for lat in (report["early_exit_latency_ms"], report["baseline_latency_ms"]):
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    # what serving costs beyond the model: CPU per request by process, the model's own compute, the bound
    cpu, compute = report["cpu_ms_per_request"], report["compute_ms"]
    roles = {"torchserve": ({"frontend", "workers"}, {"frontend", "workers"}),
             "ray": ({"replica staged/Ingress"}, {"replica baseline/Baseline"})}[server]
    for variant, busy in zip(("early_exit", "baseline"), roles):
        assert busy <= set(cpu[variant]) and all(cpu[variant][r] > 0 for r in busy), cpu[variant]
        assert cpu[variant]["total"] == pytest.approx(sum(v for k, v in cpu[variant].items() if k != "total"), abs=0.01)
    assert compute["routed"] > 0 and compute["backbone"] > 0  # which is faster is for benchmarks, not tests
    overhead = cpu["baseline"]["total"] - compute["backbone"]
    assert report["overhead_ms"] == pytest.approx(max(0.0, overhead), abs=0.01)
    o = report["overhead_ms"]
    assert report["serving_bound"] == pytest.approx((o + compute["backbone"]) / (o + compute["routed"]))
    assert report["serving_bound"] <= report["ideal_speedup"] * 1.5  # a measured bound, beside the FLOPs ideal
    if server == "ray":  # the planner measured this machine and chose; direct ingress: the apps' own ports
        ray = report["ray"]
        Grouping.parse(ray["grouping"], 3)
        assert "chosen:" in " ".join(ray["plan"]["reasoning"]) and ray["plan"]["calibration"]["call_s"] > 0
        assert ray["profile"] == "tuned" and not ray["urls"]["staged"].startswith(ray["proxy"])

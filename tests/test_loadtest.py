"""The comparison runner against real servers, briefly: the report's numbers must add up."""
import json
import os

import pytest

from loadtests.compare import compare

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

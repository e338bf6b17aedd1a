"""Soak and fault runs (``branched soak`` / ``branched fault``) on a real TorchServe, briefly: the reports
must add up, answers must be their own request's, and a killed worker must be replaced by the server."""
import csv
import json
import os

import psutil
import pytest

from loadtests.answers import LogRow, per_window, recovery
from loadtests.checks import check_answer
from loadtests.fault import fault
from loadtests.soak import soak

from helpers import save_mnist_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_mnist_model(str(tmp_path_factory.mktemp("soak_model")), 16)


@pytest.mark.server
def test_fault_run_torchserve_worker_killed_and_replaced(model_dir, tmp_path):
    out = str(tmp_path / "fault")
    report = fault("torchserve", model_dir, out, users=4, duration="12s", kill_at=4, pool_size=24)
    assert json.load(open(os.path.join(out, "fault.json"))) == json.loads(json.dumps(report))
    assert os.path.isfile(os.path.join(out, "fault.png"))
    assert report["killed_pids"] and not any(psutil.pid_exists(p) for p in report["killed_pids"])
    assert report["recovered"] and report["replaced_s"] > 0 and report["answers_back_s"] > 0
    assert report["probe_after"] == {"sent": 24, "errors": 0, "wrong": 0}
    # every request is logged once; answered + failed = sent; failures only after the kill; none misrouted
    assert report["logged_requests"] == report["requests"] == report["answers"] + report["failures"]
    assert report["failed_before"] == 0 and report["failed_after"] == report["failures"]
    assert report["mismatches"] == 0
    with open(os.path.join(out, "fault_timeline.csv")) as f:
        timeline = list(csv.DictReader(f))
    assert sum(int(t["answers"]) for t in timeline) == report["answers"]
    assert sum(int(t["failures"]) for t in timeline) == report["failures"]
    # answers stop while the only worker is down: the longest gap covers the restart
    assert report["longest_gap_s"] >= report["answers_back_s"] - (report["last_failure_s"] or 0.0) > 0


@pytest.mark.server
def test_soak_run_torchserve_report_adds_up(model_dir, tmp_path):
    out = str(tmp_path / "soak")
    report = soak("torchserve", model_dir, out, users=4, duration="8s", pool_size=24, rss_interval=2, window_s=3)
    for name in ("soak.json", "soak_minutes.csv", "soak_rss.csv", "soak.png", "locust.html",
                 "locust_stats_history.csv", "locust_requests.csv"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert report["failures"] == 0 and report["mismatches"] == 0
    assert report["answers"] == report["requests"] == report["logged_requests"] > 0
    assert sum(w["requests"] for w in report["windows"]) == report["requests"]
    assert len(report["windows"]) >= 2  # 8 s in 3 s windows; a busy machine starts Locust late
    for w in report["windows"]:
        assert 0 < w["p50"] <= w["p95"] <= w["p99"]
    lo, hi = report["p95_range_ms"]
    assert lo == min(w["p95"] for w in report["windows"]) and hi == max(w["p95"] for w in report["windows"])
    assert set(report["rss"]) == {"frontend", "workers"}
    for r in report["rss"].values():
        assert r["processes_start"] == r["processes_end"] == 1
        assert 0 < r["start_mib"] <= r["max_mib"] and r["end_mib"] <= r["max_mib"]
        assert r["growth"] == pytest.approx(r["end_mib"] / r["start_mib"] - 1, abs=1e-4)


def test_another_requests_answer_is_caught():
    own = {"class_index": 3, "exit": 1, "confidence": 0.91234, "borderline": False}
    assert check_answer({"class_index": 3, "exit": 1, "confidence": 0.9123401}, own) == ""
    assert check_answer({"class_index": 3, "exit": 1, "confidence": 0.95}, own)  # same route, other image
    assert check_answer({"class_index": 3, "exit": 2, "confidence": 0.91234}, own)
    assert check_answer({"class_index": 3, "exit": 2, "confidence": 0.91234}, {**own, "borderline": True}) \
        == "borderline"


def test_recovery_and_windows_from_a_request_log():
    def row(end, ok=True, exit=0):
        return LogRow(end - 0.01, end, "x.png", ok, False, exit if ok else None, 10.0 * end, "" if ok else "HTTP 507")

    rows = [row(0.5), row(1.0, exit=1), row(2.1, ok=False), row(2.2, exit=0), row(2.3, ok=False), row(5.0, exit=1),
            row(5.5, exit=1)]
    rec = recovery(rows, t_kill=2.0, min_exit=1)
    assert rec["failed_before"] == 0 and rec["failed_after"] == 2
    assert rec["last_failure_s"] == pytest.approx(0.3) and rec["answers_back_s"] == pytest.approx(3.0)
    assert rec["longest_gap_s"] == pytest.approx(3.0)  # the exit-0 answer at 2.2 does not count for stage 1
    assert rec["errors"] == ["HTTP 507"]
    windows = per_window(rows, t0=0.0, window_s=2.0)
    assert [w["requests"] for w in windows] == [2, 3, 2]
    assert [w["failures"] for w in windows] == [0, 2, 0]
    assert windows[0]["rps"] == pytest.approx(1.0) and windows[2]["seconds"] == pytest.approx(1.5)

"""The step-load test (``branched loadtest --shape step``): its step arithmetic, and a short run against a real
TorchServe with the load controller on (about 2 minutes): the report must add up. Timings are not asserted."""
import csv
import json
import math
import os
import random

import pytest

from loadtests.answers import LogRow
from loadtests.stepreport import step_rows, verdicts
from loadtests.stepspec import next_send, parse_steps

from helpers import save_ladder_model


def test_steps_parse_and_refuse_with_the_fix():
    assert parse_steps("20:0.5, 20:1,10:2") == [(20.0, 0.5), (20.0, 1.0), (10.0, 2.0)]
    for bad in ("", "20", "20:x", "0:1", "20:-1"):
        with pytest.raises(ValueError, match="--steps"):
            parse_steps(bad)


def test_users_send_poisson_arrivals_at_each_step_rate():
    """50 users, capacity 100/s, 10 s at 0.5x then 10 s at 2x: about 500 then 2000 requests."""
    rng, counts = random.Random(0), [0, 0, 0]
    for _ in range(50):
        t = 0.0
        while (t := next_send([(10, 0.5), (10, 2.0)], 100.0, 50, t, rng)) is not None:
            counts[int(t // 10)] += 1
    assert counts[2] == 0 and abs(counts[0] - 500) < 4 * 500 ** 0.5 and abs(counts[1] - 2000) < 4 * 2000 ** 0.5


def test_a_request_belongs_to_the_step_it_was_sent_in():
    """Two 10 s steps from t0 = 100: latency percentiles and accuracy by send time, throughput by answer time,
    the operating point by sample time."""
    rows = [LogRow(100 + i * 0.5, 100 + i * 0.5 + lat / 1e3, "x.png", ok, False, 0, lat, "" if ok else "boom",
                   correct, 0.5)
            for i, (lat, ok, correct) in enumerate([(10.0, True, True)] * 19 + [(9000.0, True, False)]
                                                   + [(20.0, True, True)] * 19 + [(30.0, False, None)])]
    points = [(100.0 + t, 0 if t < 12 else 2, 1.0, 0.0) for t in range(20)]
    first, second = step_rows(rows, 100.0, [(10, 1.0), (10, 2.0)], 50.0, points, settle_s=2.0)
    assert math.isnan(first["drop"])  # no backbone answers given: no paired drop
    assert (first["requests"], first["answers"], first["failures"]) == (20, 20, 0)
    assert (second["requests"], second["answers"], second["failures"]) == (20, 19, 1)
    assert first["p95_ms"] == 10.0 and first["p99_ms"] == 9000.0 and second["p95_ms"] == 20.0
    assert first["accuracy"] == pytest.approx(19 / 20) and second["accuracy"] == 1.0
    assert first["throughput_rps"] == pytest.approx(1.9)  # the 9 s answer came back in the second step
    assert second["throughput_rps"] == pytest.approx(2.0)
    assert (first["target_rps"], second["target_rps"]) == (50.0, 100.0)
    assert (first["point_last"], second["point_last"], first["at_calibrated"]) == (0, 2, 1.0)
    assert second["point_mean"] == pytest.approx(1.6)


def test_verdicts_say_whether_the_floor_could_hold_the_peak():
    def step(multiple, p95, point, accuracy=0.95):
        return {"multiple": multiple, "p95_ms": p95, "accuracy": accuracy, "answers": 10, "failures": 0,
                "point_last": point}
    arms = {"fixed": [step(0.5, 40, 0), step(2.0, 900, 0), step(0.5, 45, 0)],
            "controller": [step(0.5, 40, 0), step(2.0, 105, 3), step(0.5, 41, 0)]}
    v = verdicts(arms, 100.0, 0.9, capacity_ratio=1.6)
    assert v["fixed_misses_target"] and v["controller_holds_target"] and v["back_at_calibrated"]
    assert v["peak_multiple"] == 2.0 and v["peak_within_floor_capacity"] is False  # 2x > the floor's 1.6x
    assert verdicts(arms, 100.0, 0.9, capacity_ratio=2.5)["peak_within_floor_capacity"] is True
    arms["controller"][2]["point_last"] = 1
    assert not verdicts(arms, 100.0, 0.9)["back_at_calibrated"]


def test_the_floor_is_judged_on_each_steps_own_requests_against_the_backbone():
    """A step that drew hard images has low accuracy although the model lost nothing on them: judged paired
    (the backbone's answers to the same requests), it is within the floor; a step that lost 3 points is not."""
    images = [f"{i}.png" for i in range(100)]
    backbone = {name: i < 70 for i, name in enumerate(images)}  # the backbone is right on 70 of the 100
    rows = []
    for i, name in enumerate(images):  # step 1 (t 100-110): same answers as the backbone; 70% right
        rows.append(LogRow(100 + i * 0.1, 100.05 + i * 0.1, name, True, False, 0, 5.0, "", backbone[name], 0.5))
    for i, name in enumerate(images):  # step 2 (t 110-120): three of the backbone's right answers turned wrong
        rows.append(LogRow(110 + i * 0.1, 110.05 + i * 0.1, name, True, False, 0, 5.0, "", backbone[name] and i >= 3,
                           0.4))
    first, second = step_rows(rows, 100.0, [(10, 1.0), (10, 2.0)], 10.0, [], 1.0, backbone)
    assert first["backbone_accuracy"] == pytest.approx(0.7) and first["drop"] == pytest.approx(0.0)
    assert second["drop"] == pytest.approx(0.03)
    arms = {"fixed": [first, second], "controller": [first, second]}
    assert verdicts(arms, 100.0, 0.9, max_drop=0.05)["accuracy_within_floor"]  # paired: 0 and 3 points
    assert not verdicts(arms, 100.0, 0.9)["accuracy_within_floor"]  # unpaired: 0.70 < 0.9
    assert not verdicts(arms, 100.0, 0.9, max_drop=0.02)["accuracy_within_floor"]
    assert verdicts(arms, 100.0, 0.9, max_drop=0.05)["controller_max_drop"] == pytest.approx(0.03)


@pytest.mark.server
def test_step_load_on_torchserve_adds_up(tmp_path):
    """Real TorchServe (controller on), real Locust: 2 s per step, capacity runs of 2 s. Every request of the
    log is in exactly one step's count; no failure and no answer that is not its own image's (at some point of
    the ladder); the fixed arm is served at the calibrated point only (the backbone: exit 2); the
    controller's points stay on the ladder; served accuracy agrees with the pool labels; all files written."""
    from loadtests.stepload import StepSettings, step_load

    model_dir = save_ladder_model(str(tmp_path / "m"), size=16)
    out = str(tmp_path / "out")
    # A target far above this model's batch time (so the controller is back at its calibrated point at a
    # trickle, whatever the machine's load) and a few users: the test checks the arithmetic, not the timing.
    settings = StepSettings(slo_p95_ms=1000.0, max_drop=0.05, step_s=2.0, capacity_s=2.0, users=32)
    report = step_load("torchserve", model_dir, out, settings, pool_size=24, batch_size=8, max_batch_delay=10)

    for name in ("report.json", "report.csv", "report.png", "step_fixed_requests.csv",
                 "step_controller_requests.csv", "capacity_calibrated_stats.csv", "expected_ladder.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert report["capacity_rps"] > 0 and report["capacity_floor_rps"] > 0
    assert report["capacity_ratio"] == pytest.approx(report["capacity_floor_rps"] / report["capacity_rps"])
    assert [p["cost_fraction"] for p in report["ladder"]] == [1.0, 0.6, 0.3]
    for name, exit_k in (("calibrated", "2"), ("floor", "0")):  # the capacity runs' own thresholds won
        with open(os.path.join(out, f"capacity_{name}_answers.json")) as f:
            assert set(json.load(f)["exits"]) == {exit_k}, name
    with open(os.path.join(out, "pool", "labels.json")) as f:
        labels = json.load(f)
    for arm in ("fixed", "controller"):
        steps = report["arms"][arm]
        assert [s["multiple"] for s in steps] == [0.5, 1.0, 2.0, 1.0, 0.5]
        with open(os.path.join(out, f"step_{arm}_steps.json")) as f:
            t0 = json.load(f)["t0"]
        with open(os.path.join(out, f"step_{arm}_requests.csv"), newline="") as f:
            log = list(csv.DictReader(f))
        sent = [r for r in log if t0 <= float(r["start"]) < t0 + 10.0]
        assert sent and sum(s["requests"] for s in steps) == len(sent)
        assert sum(s["answers"] + s["failures"] for s in steps) == len(sent)
        assert report["verdicts"]["failures"][arm] == 0 and all(r["mismatch"] == "0" for r in log)
        ok = [r for r in sent if r["ok"] == "1"]
        assert all(r["correct"] == str(int(int(r["class_index"]) == labels[r["image"]])) for r in ok)
        correct = sum(r["correct"] == "1" for r in ok) / len(ok)
        weighted = sum(s["accuracy"] * s["answers"] for s in steps if s["answers"]) / len(ok)
        assert weighted == pytest.approx(correct)
        points = report["points"][arm]
        assert points and {p[1] for p in points} <= {0, 1, 2}
        # Paced users never send faster than their step asks (a user past its last arrival once sent every second)
        for s in steps:
            assert s["offered_rps"] <= 1.35 * s["target_rps"] + 3, (arm, s["step"], s["offered_rps"], s["target_rps"])
    fixed = [r for r in csv.DictReader(open(os.path.join(out, "step_fixed_requests.csv")))]
    assert {r["exit"] for r in fixed if r["ok"] == "1"} == {"2"}
    costs = {round(s["cost_fraction"], 6) for s in report["arms"]["fixed"] if s["answers"]}
    assert len(costs) == 1 and min(costs) >= 1.0, costs  # the whole backbone for every answer
    v = report["verdicts"]
    assert set(v) >= {"fixed_misses_target", "controller_holds_target", "accuracy_within_floor", "back_at_calibrated"}
    assert v["floor_accuracy"] == pytest.approx(report["pool_backbone_accuracy"] - 0.05) and report["users"] == 32
    assert not math.isnan(v["controller_p95_ms_at_peak"])

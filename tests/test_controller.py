"""The load controller (branched.controller): a ladder from the calibration curve, a simulated batching
server on a simulated clock (monotone in load, hysteresis, floor, step load), the per-request override
through Predictor, and (tests named ``test_torchserve_*``, ~2 min) the handler on a real TorchServe."""
import io
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from branched.controller import (ControllerError, ControllerSettings, OperatingPointController, drop_upper_bound,
                                 operating_points)
from helpers import metric, metrics, save_ladder_model, wait_for

# A synthetic calibration: cost falls and drop rises along the Pareto curve; the calibrated point is index 3.
COSTS = [1.0, 0.8, 0.6, 0.5, 0.4, 0.33, 0.27, 0.22, 0.18, 0.15, 0.12]
DROPS = [0.0, 0.001, 0.003, 0.005, 0.008, 0.012, 0.016, 0.02, 0.026, 0.035, 0.05]
BACKBONE = 0.95
HOME = 3


def fake_config(home: int = HOME, **calibration) -> SimpleNamespace:
    curve = [{"thresholds": [1 - c, 1 - c], "cost_fraction": c, "accuracy": BACKBONE - d, "drop": d,
              "risk": d + 0.002} for c, d in zip(COSTS, DROPS)]
    curve[0]["thresholds"] = [math.inf, math.inf]
    h = curve[home]
    cal = {"curve": curve, "thresholds": h["thresholds"], "cost_fraction": h["cost_fraction"],
           "accuracy": h["accuracy"], "backbone_accuracy": BACKBONE, "drop": h["drop"], "risk": h["risk"],
           "samples": 4000, "guarantee": {"delta": 0.1, "certify_samples": 2800, "tested_points": 100,
                                          "drop_bound": 0.01}, **calibration}
    return SimpleNamespace(meta={"calibration": cal}, thresholds=list(h["thresholds"]))


class Clock:
    """A simulated monotonic clock: the simulator sets ``t``."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Server:
    """A TorchServe-like worker on a simulated clock: a FIFO queue, batches of up to ``batch`` requests
    formed as TorchServe does (take what is queued; if fewer than ``batch``, wait up to ``delay`` for more),
    batch time ``a + b (v + u c)`` (+ ``noise``) plus ``gap`` outside the handler. With a controller, the
    point is updated at each batch start and the batch is reported at its end, as the handler does."""

    def __init__(self, controller=None, batch=8, delay=0.010, a=0.002, v=0.0001, u=0.006, gap=0.001, noise=0.05,
                 seed=0, latencies=False, burst=1) -> None:
        self.c, self.batch, self.delay, self.a, self.v, self.u, self.gap = controller, batch, delay, a, v, u, gap
        self.noise, self.rng, self.latencies, self.burst = noise, random.Random(seed), latencies, burst
        self.clock = controller.clock if controller else Clock()
        self.points = controller.points if controller else operating_points(fake_config(), 0.04)

    def capacity(self, cost: float) -> float:
        """Requests/s at full batches and cost fraction ``cost``."""
        return self.batch / (self.gap + self.a + self.batch * (self.v + self.u * cost))

    def run(self, steps: list[tuple[float, float]], start: float = 0.0) -> list[dict]:
        """``steps``: (seconds, arrival rate) from time ``start``; Poisson arrivals (in groups of ``burst`` at one
        instant). One record per request: arrival, latency, point index and its expected drop (the point it was
        served at)."""
        arrivals, t0 = [], start
        for seconds, rate in steps:
            t = t0
            while True:
                t += self.rng.expovariate(rate / self.burst)
                if t >= t0 + seconds:
                    break
                arrivals += [t] * self.burst
            t0 += seconds
        out, free, i, n = [], 0.0, 0, len(arrivals)
        while i < n:
            begin = max(free, arrivals[i])
            last = i + self.batch - 1
            if last < n and arrivals[last] <= begin:
                start = begin
            else:
                start = min(begin + self.delay, arrivals[last] if last < n else math.inf)
            j = i
            while j < n and j - i < self.batch and arrivals[j] <= start:
                j += 1
            start += self.gap
            self.clock.t = start
            point = self.c.update() if self.c else self.points[0]
            cost = max(0.01, point.cost_fraction * (1 + self.rng.gauss(0, 0.1)))
            seconds = (self.a + (j - i) * (self.v + self.u * cost)) * (1 + self.rng.gauss(0, self.noise))
            end = start + seconds
            self.clock.t = end
            if self.c:
                self.c.observe_batch(j - i, seconds, cost)
                if self.latencies:
                    self.c.observe_latencies(end - arrivals[k] for k in range(i, j))
            out += [{"arrival": arrivals[k], "latency": end - arrivals[k], "index": point.index,
                     "drop": point.drop} for k in range(i, j)]
            i, free = j, end
        return out


def controller(slo_ms=100.0, max_drop=0.04, **kw) -> OperatingPointController:
    settings = ControllerSettings(slo_p95_ms=slo_ms, max_drop=max_drop, batch_size=8, batch_delay_ms=10, **kw)
    return OperatingPointController(fake_config(), settings, clock=Clock())


def p95(records: list[dict], lo: float, hi: float) -> float:
    return float(np.percentile([r["latency"] for r in records if lo <= r["arrival"] < hi], 95))


def served_index(records: list[dict], lo: float, hi: float) -> float:
    return float(np.median([r["index"] for r in records if lo <= r["arrival"] < hi]))


# -- the ladder -----------------------------------------------------------------------------------------

def test_ladder_starts_at_the_calibrated_point_and_stops_at_the_floor():
    points = operating_points(fake_config(), 0.03)
    assert points[0].thresholds == (0.5, 0.5) and points[0].cost_fraction == 0.5 and points[0].drop == 0.005
    assert [p.cost_fraction for p in points] == COSTS[HOME:9]  # 0.026 <= 0.03 < 0.035
    assert all(p.drop <= 0.03 for p in points) and [p.index for p in points] == list(range(len(points)))
    # A max_drop beyond the whole curve clamps to the cheapest point.
    assert operating_points(fake_config(), 0.5)[-1].cost_fraction == COSTS[-1]


def test_max_drop_out_of_reach_is_refused_with_the_fix():
    with pytest.raises(ControllerError, match=r"next cheaper point's expected drop is 0\.00800; use max_drop >= 0\.0080"):
        operating_points(fake_config(), 0.006)
    with pytest.raises(ControllerError, match=r"below the calibrated point's own expected drop 0\.0050"):
        operating_points(fake_config(), 0.004)
    with pytest.raises(ControllerError, match=r"in \(0, 1\)"):
        operating_points(fake_config(), 2)
    with pytest.raises(ControllerError, match="already the cheapest"):
        operating_points(fake_config(home=len(COSTS) - 1), 0.5)


def test_model_without_curve_gets_a_clear_error():
    for meta in ({}, {"calibration": {}}, {"calibration": {"curve": []}}):
        with pytest.raises(ControllerError, match="no calibration curve.*branched build"):
            OperatingPointController(SimpleNamespace(meta=meta, thresholds=[0.5, 0.5]),
                                     ControllerSettings(slo_p95_ms=100, max_drop=0.02))


def test_thresholds_off_the_curve_are_refused():
    config = fake_config()
    config.thresholds = [0.42, 0.42]
    with pytest.raises(ControllerError, match="not its calibrated point nor on its calibration curve"):
        operating_points(config, 0.03)


def test_certified_basis_uses_a_valid_conservative_bound():
    measured, certified = operating_points(fake_config(), 0.04), operating_points(fake_config(), 0.04, "certified")
    assert len(certified) < len(measured)
    for p in certified[1:]:
        assert p.drop < p.drop_bound <= 0.04
    # Clopper-Pearson: 0 errors of n at alpha -> 1 - alpha^(1/n); monotone in the error count.
    assert drop_upper_bound(0, 1000, 0.05) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)
    assert drop_upper_bound(5, 1000, 0.05) < drop_upper_bound(6, 1000, 0.05) < 1


def test_settings_from_a_config_section():
    s = ControllerSettings.from_mapping({"slo_p95_ms": "150", "max_drop": 0.02, "hold_s": 1, "batch_size": "8"})
    assert (s.slo_p95_ms, s.max_drop, s.hold_s, s.batch_size) == (150.0, 0.02, 1.0, 8)
    with pytest.raises(ControllerError, match="unknown controller setting.*hold"):
        ControllerSettings.from_mapping({"slo_p95_ms": 1, "max_drop": 0.02, "hold": 1})
    with pytest.raises(ControllerError, match="needs max_drop"):
        ControllerSettings.from_mapping({"slo_p95_ms": 100})
    with pytest.raises(ControllerError, match="low < high"):
        ControllerSettings(slo_p95_ms=100, max_drop=0.02, low=0.95)


# -- behaviour on a simulated server ---------------------------------------------------------------------

def test_calibrated_point_until_it_can_predict_and_at_low_load():
    c = controller()
    assert c.update() == c.points[0]  # nothing observed yet: the calibrated point
    records = Server(c).run([(30, 100.0)])
    assert {r["index"] for r in records} == {0} and c.moves == {"down": 0, "up": 0}


def test_monotone_in_load_and_steady_at_every_load():
    """Settled point never more accurate at a higher steady load; after 10 s, at most one move."""
    home = Server(controller()).capacity(COSTS[HOME])
    settled = []
    for factor in np.linspace(0.3, 3.0, 13):
        c = controller()
        records = Server(c, seed=int(factor * 100)).run([(10, factor * home), (30, factor * home)])
        late = [r["index"] for r in records if r["arrival"] >= 10]
        settled.append(float(np.median(late)))
        assert sum(a != b for a, b in zip(late, late[1:])) <= 1, (factor, c.moves)  # settled after 10 s
        assert max(r["drop"] for r in records) <= 0.04
    assert settled == sorted(settled), settled
    assert settled[0] == 0 and settled[-1] == len(controller().points) - 1


def test_hysteresis_no_oscillation_at_a_boundary():
    """Steady load set where the predicted p95 at point j sits exactly on the move-down threshold, for the
    first three points: over two simulated minutes with noisy service times, after a 20 s start-up the
    served point changes at most once, and the controller moves back up at most once in all."""
    learned = controller()
    Server(learned).run([(20, 200.0)])  # learn the service model
    target = learned.settings.high * learned.settings.slo_p95_ms / 1e3
    for j in range(3):
        lo, hi = 10.0, 2000.0  # the arrival rate where point j's predicted p95 equals high x target
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if learned.predicted_p95(j, mid) < target else (lo, mid)
        for seed in range(2):
            c = controller()
            records = Server(c, seed=seed, noise=0.1).run([(120, lo)])
            indices = [r["index"] for r in records if r["arrival"] > 20]
            assert sum(a != b for a, b in zip(indices, indices[1:])) <= 1, (j, seed, c.moves)
            assert c.moves["up"] <= 1, (j, seed, c.moves)


def test_step_load_holds_the_target_where_fixed_thresholds_miss_it():
    """0.5x, 1x, 2x, 1x, 0.5x of the load the calibrated point holds; 20 s each (simulated)."""
    slo = 0.100
    home = Server(controller()).capacity(COSTS[HOME])
    unit = 0.8 * home  # "1x": the calibrated point still holds the target there
    steps = [(20, f * unit) for f in (0.5, 1, 2, 1, 0.5)]
    c = controller()
    adaptive, fixed = Server(c).run(steps), Server(None).run(steps)
    t2 = (40, 60)
    assert p95(fixed, *t2) > 3 * slo  # the queue grows without bound at 2x
    assert p95(adaptive, *t2) <= 1.1 * slo, p95(adaptive, *t2)
    assert p95(adaptive, 0, 20) <= slo and p95(fixed, 0, 20) <= slo
    assert max(r["drop"] for r in adaptive) <= 0.04
    assert served_index(adaptive, *t2) > 0
    assert served_index(adaptive, 0, 20) == 0 and served_index(adaptive, 85, 100) == 0  # back at the calibrated point


def test_state_says_what_the_move_back_rule_predicts_while_away_from_the_calibrated_point():
    """While it waits to move back, state() carries the predicted p95 of every more accurate point at the load
    plus headroom (what the handler logs every few seconds), so a point held too long can be explained."""
    c = controller()
    home = Server(controller()).capacity(COSTS[HOME])
    Server(c).run([(20, 2 * home), (1.0, 0.3 * home)])
    state = c.state()
    assert state["index"] > 0
    back = state["move_back_p95_ms"]
    assert len(back) == state["index"] and all(v > 0 for v in back)
    assert back == sorted(back, reverse=True)  # dearer points are predicted slower at the same load


def test_a_doubled_hold_is_forgotten_after_a_quiet_spell_at_the_calibrated_point():
    """Oscillation doubles the hold (up to 8x, 24 s here). Back at the calibrated point and quiet for 4 base holds
    (12 s), the controller starts afresh: it had kept 24 s for 96 s, longer than a load step."""
    c = controller()
    home = Server(controller()).capacity(COSTS[HOME])
    Server(c).run([(20, 2 * home)])
    assert c.index > 0
    c._hold = 8 * c.settings.hold_s  # what two quick reversals leave behind
    Server(c).run([(50, 0.3 * home)], start=20.0)
    state = c.state()
    assert state["index"] == 0 and state["hold_s"] == c.settings.hold_s, state


def test_one_reversal_doubles_the_hold_once_however_many_moves_the_way_down_takes():
    """Load drops (the controller moves back up), then climbs in steps within the hold: the way down takes many
    moves, but it is one reversal, so the hold doubles once (a cascade had taken it to 8x, 24 s, in one step)."""
    for seed in range(3):
        c = controller()
        home = Server(controller()).capacity(COSTS[HOME])
        Server(c, seed=seed).run([(20, 2 * home), (4.5, 0.3 * home), (0.7, 0.9 * home), (0.7, 1.3 * home),
                                  (0.7, 1.8 * home), (2, 2.4 * home)])
        assert c.moves["up"] == 1 and c.moves["down"] >= 3, c.moves
        assert c.state()["hold_s"] == 2 * c.settings.hold_s, (seed, c.state()["hold_s"])


def test_never_past_the_floor_however_high_the_load():
    c = controller(max_drop=0.02)
    records = Server(c).run([(20, 5000.0)])
    assert c.index == len(c.points) - 1 and c.current.drop <= 0.02
    assert max(r["drop"] for r in records) <= 0.02 and max(r["index"] for r in records) == len(c.points) - 1


def test_observed_latencies_push_further_when_the_model_is_wrong():
    """Requests arrive in bursts of 20 (the prediction assumes Poisson arrivals, so it under-estimates the
    queueing): alone the controller misses the target; with measured latencies (X-Request-Start in
    TorchServe) it steps to cheaper points until the target holds."""
    for seed in range(2):
        blind, seeing = controller(), controller()
        a = Server(blind, burst=20, seed=seed).run([(40, 150.0)])
        b = Server(seeing, burst=20, latencies=True, seed=seed).run([(40, 150.0)])
        assert p95(a, 20, 40) > 0.1 >= p95(b, 20, 40), (seed, p95(a, 20, 40), p95(b, 20, 40))
        assert served_index(b, 20, 40) > served_index(a, 20, 40)
        assert seeing.state()["observed_p95_ms"] is not None and max(r["drop"] for r in b) <= 0.04


def test_a_reactive_move_scales_the_prediction_by_its_measured_error():
    """Latencies the model cannot see (a proxy in front adds 0.5 s to every request) on a lightly loaded server:
    the prediction says the calibrated point holds, the observed p95 is 5x the target. The controller corrects
    every point's prediction by observed / predicted and goes to the point that would then hold (here the floor)
    in one move, instead of one point per half window while a queue would grow."""
    c, rng, moves = controller(slo_ms=100.0), random.Random(0), []
    for i in range(400):  # a batch of 1-4 requests every 40 ms, for 16 s: about 12% busy
        c.clock.t = i * 0.04
        before = c.index
        c.update()
        if c.index != before:
            moves.append((before, c.index, c.state()["predicted_p95_ms"]))
        n = rng.randint(1, 4)
        c.clock.t += 0.002 + 0.001 * n
        c.observe_batch(n, 0.002 + 0.001 * n, c.current.cost_fraction)
        c.observe_latencies([0.5] * n)
    assert not c.state()["saturated"] and c.state()["observed_p95_ms"] == pytest.approx(500)
    assert moves and moves[0][0] == 0 and moves[0][1] == len(c.points) - 1, moves  # one move, to the floor
    assert len(moves) == 1 and max(p.drop for p in c.points) <= 0.04  # never past the floor, and no way back


def test_per_request_thresholds_win_over_the_controller(tmp_path):
    """Through Predictor: the controller's point is only the default of requests that name none."""
    from branched.serving import Predictor

    predictor = Predictor(save_ladder_model(str(tmp_path / "m")))
    c = OperatingPointController(predictor.config, ControllerSettings(slo_p95_ms=50, max_drop=0.05, batch_size=4),
                                 clock=Clock())
    for k in range(6):  # batches far slower than the target: the controller goes to the floor
        c.clock.t = k * 0.2
        c.observe_batch(4, 0.2, 1.0)
    assert c.update().index == 2 and c.thresholds == [0.0, 0.0]
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    body = buf.getvalue()
    default = torch.tensor(c.thresholds)
    answers = predictor.answer_batch([(body, {}), (body, {"thresholds": "inf,inf"}), (body, {"budget": "0.6"}),
                                      (body, {"threshold": "0"})], default)
    assert [a["exit"] for a in answers] == [0, 2, 1, 0]
    assert predictor.answer_batch([(body, {})])[0]["exit"] == 2  # no default: the calibrated thresholds


# -- TorchServe: the handler runs the controller (a real server on loopback, ~2 min) ------------------------

TS_NAME = "tsctl"
TS_SLO_MS = 250.0


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _branched(*args: str):
    """The ``branched`` command of this checkout (``python -m`` from the repository root, whatever checkout the
    environment's ``branched`` script was installed from)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-m", "branched.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=root)


@pytest.fixture(scope="module")
def ts_store(tmp_path_factory) -> str:
    """The archives, made by the ``branched archive`` command with the controller's two options."""
    model_dir = save_ladder_model(str(tmp_path_factory.mktemp("ctl") / TS_NAME))
    out = str(tmp_path_factory.mktemp("ctlstore"))
    proc = _branched("archive", model_dir, "--out", out, "--batch-size", "8", "--max-batch-delay", "20",
                     "--threads", "1", "--slo-p95-ms", str(TS_SLO_MS), "--max-drop", "0.05")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def ts_server(ts_store, tmp_path_factory):
    from loadtests.launchers import TorchServe
    ts = TorchServe(ts_store, str(tmp_path_factory.mktemp("ctlts")), {TS_NAME: f"{TS_NAME}.mar"})
    try:
        ts.start()
        yield ts
    finally:
        ts.stop()


@pytest.mark.server
def test_torchserve_archive_writes_and_checks_the_controller_settings(ts_store, tmp_path):
    import os
    import zipfile

    import yaml
    with zipfile.ZipFile(os.path.join(ts_store, f"{TS_NAME}.mar")) as z:
        handler = yaml.safe_load(z.read("model-config.yaml"))["handler"]
    assert (handler["slo_p95_ms"], handler["max_drop"]) == (TS_SLO_MS, 0.05)
    with zipfile.ZipFile(os.path.join(ts_store, f"{TS_NAME}-baseline.mar")) as z:
        assert "slo_p95_ms" not in yaml.safe_load(z.read("model-config.yaml"))["handler"]
    plain = save_ladder_model(str(tmp_path / "plain"), calibrated=False)
    calibrated = save_ladder_model(str(tmp_path / "cal"))
    for args, message in ((["--slo-p95-ms", "100", "--max-drop", "0.02", plain], "no calibration curve"),
                          (["--slo-p95-ms", "100", "--max-drop", "0.005", calibrated], "use max_drop >= 0.0100"),
                          (["--slo-p95-ms", "100", calibrated], "needs --max-drop"),
                          (["--max-drop", "0.02", calibrated], "give --slo-p95-ms too"),
                          (["--slo-p95-ms", "0", "--max-drop", "0.02", calibrated], "must be > 0")):
        proc = _branched("archive", *args[:-1], args[-1], "--out", str(tmp_path / "out"))
        assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], (args, proc.stderr)
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


@pytest.mark.server
def test_torchserve_burst_moves_to_a_cheaper_point_and_back(ts_server):
    """Low load: answers come from the calibrated point (the backbone, exit 2). A burst of 24 closed-loop
    clients saturates the worker: the controller moves down (answers without thresholds leave at exit 0/1,
    the metrics say so), while answers with their own thresholds keep them (exit 2). After the burst the
    next answers come from the calibrated point again and the metrics show the move back."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import requests
    url = f"{ts_server.inference_url}/predictions/{TS_NAME}"
    bodies = [_png(i) for i in range(8)]

    def ask(i: int, own: bool) -> tuple[float, bool, int]:
        headers = {"X-Request-Start": f"t={time.time():.6f}"}
        if own:
            headers["thresholds"] = "inf,inf"
        r = requests.post(url, data=bodies[i % len(bodies)], headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        return time.monotonic(), own, r.json()["exit"]

    for i in range(6):  # low load: the calibrated point, and a service model to predict from
        assert ask(i, False)[2] == 2
    before = metrics(ts_server.metrics_url)
    assert metric(before, "BranchedOperatingPoint") == 0.0

    stop = time.monotonic() + 12.0
    answers: list = []
    lock = threading.Lock()

    def client(c: int) -> None:
        i = 0
        while time.monotonic() < stop:
            got = ask(c + i, own=(c % 3 == 0))
            with lock:
                answers.append(got)
            i += 1

    with ThreadPoolExecutor(24) as pool:
        list(pool.map(client, range(24)))
    own = [e for _, o, e in answers if o]
    assert own and set(own) == {2}, "a request's own thresholds must win over the controller"
    # How soon the controller reacts depends on the machine, so look at the second half of the burst only:
    # by then the load estimate (window_s 2) has long seen the queue, and most default answers leave early.
    half = stop - 6.0
    late = [e for t, o, e in answers if not o and t >= half]
    assert late and sum(e < 2 for e in late) > len(late) / 2, late

    def moved():
        m = metrics(ts_server.metrics_url)
        return m if metric(m, "BranchedPointMoves", Direction="down") >= 1 else None

    during = wait_for(moved)
    assert during is not None, metrics(ts_server.metrics_url)
    time.sleep(5.0)  # longer than window_s (2) + hold_s (3): the load estimate has fallen, the hold has passed
    after = [ask(i, False)[2] for i in range(4)]
    assert after == [2, 2, 2, 2], after

    def back():
        m = metrics(ts_server.metrics_url)
        return m if metric(m, "BranchedPointMoves", Direction="up") >= 1 and metric(m, "BranchedOperatingPoint") == 0 \
            else None

    final = wait_for(back)
    assert final is not None, metrics(ts_server.metrics_url)
    assert metric(final, "BranchedOperatingCost") == pytest.approx(1.0)
    assert metric(final, "BranchedExpectedDrop") == pytest.approx(0.0)
    assert metric(final, "BranchedPredictedP95") > 0

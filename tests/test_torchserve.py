"""The TorchServe plugin against a real TorchServe on loopback.

A small model directory is built here with the core API, archived with ``branched archive`` (the
entry point a user runs), and served by one TorchServe per module from the repository's
``config.properties``. Answers are checked against :class:`branched.serving.Predictor` in this
process: the same code path the handler runs, on the same image bytes and thresholds.
"""
import base64
import io
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
import yaml
from PIL import Image

from branched.artifact import save_model
from branched.build.datasets import load_split
from branched.preprocess import Preprocessor
from branched.routing import exit_score
from branched.serving import Predictor

from handlers.archive import build_archives
from loadtests.launchers import TorchServe
from helpers import make_model, metric, metrics, readme_curls, run_curl, wait_for

pytestmark = [pytest.mark.server, pytest.mark.timeout(500)]  # starts a real server

NAME = "tstiny"
BASELINE = f"{NAME}-baseline"
BRANCHED = os.path.join(os.path.dirname(sys.executable), "branched")
# Routing settings a client may send; "budget" picks thresholds from the calibration curve below.
PARAMS = [{}, {"threshold": "0"}, {"thresholds": "inf,inf"}, {"thresholds": "inf,0"}, {"budget": "0.65"}]


# -- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def images() -> list[bytes]:
    """Real encoded images: MNIST digits as PNG and JPEG, and colour noise as PNG."""
    digits = load_split("mnist5k", "test")
    out = [digits.image_bytes(i) for i in range(14)] + [digits.image_bytes(i, "JPEG") for i in range(14, 20)]
    rng = np.random.default_rng(0)
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def _split_threshold(scores: torch.Tensor) -> float:
    """A threshold between two neighbouring scores near the median, where the gap is widest.

    A wide gap keeps exits stable against float noise between batch compositions.
    """
    s = scores.sort().values
    n = len(s)
    lo, hi = n // 4, 3 * n // 4
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    j = int(gaps.argmax()) + lo
    assert float(gaps.max()) > 1e-4, "scores too close together to place a stable threshold"
    return float(s[j] + s[j + 1]) / 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, images) -> str:
    """cifar_resnet20 with two untrained exits; thresholds split the test images across all three exits."""
    model = make_model("cifar_resnet20", 32)
    x = torch.stack([Preprocessor.for_config(model.config).from_bytes(b) for b in images])
    with torch.no_grad():
        outs = model(x)
    t0, t1 = (_split_threshold(exit_score(o, model.config.policy)) for o in outs[:-1])
    model.config.thresholds = [t0, t1]
    model.config.meta["calibration"] = {"curve": [
        {"thresholds": [0.0, 0.0], "cost_fraction": 0.3, "accuracy": 0.5},
        {"thresholds": [t0, 0.0], "cost_fraction": 0.6, "accuracy": 0.6},
        {"thresholds": [float("inf"), float("inf")], "cost_fraction": 1.0, "accuracy": 0.7}]}
    d = str(tmp_path_factory.mktemp("model") / NAME)
    save_model(model, d)
    return d


@pytest.fixture(scope="module")
def store(model_dir, tmp_path_factory) -> str:
    """Archives built by the ``branched archive`` command, as a user builds them."""
    out = str(tmp_path_factory.mktemp("store"))
    proc = subprocess.run([BRANCHED, "archive", model_dir, "--out", out, "--batch-size", "8",
                           "--max-batch-delay", "50", "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [os.path.join(out, f"{NAME}.mar"), os.path.join(out, f"{BASELINE}.mar")]
    return out


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):
    ts = TorchServe(store, str(tmp_path_factory.mktemp("ts")), {NAME: f"{NAME}.mar", BASELINE: f"{BASELINE}.mar"})
    try:
        ts.start()
        yield ts
    finally:
        ts.stop()  # also when start() failed half-way


@pytest.fixture(scope="module")
def reference(model_dir) -> Predictor:
    return Predictor(model_dir)


# -- helpers -------------------------------------------------------------------------------------

def predict(ts: TorchServe, body: bytes, params: dict, model: str = NAME, **kw) -> requests.Response:
    """POST to /predictions/MODEL with routing params as headers (TorchServe drops its query string)."""
    return requests.post(f"{ts.inference_url}/predictions/{model}", data=body, headers={**params, **kw},
                         timeout=60)


def assert_same(answer: dict, expected: dict) -> None:
    assert set(answer) >= {"class_index", "label", "confidence", "exit", "cost_fraction"}
    assert (answer["exit"], answer["class_index"], answer["label"]) == \
        (expected["exit"], expected["class_index"], expected["label"])
    assert answer["cost_fraction"] == pytest.approx(expected["cost_fraction"], rel=1e-9)
    assert answer["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)


def concurrently(calls: list) -> list:
    """Run the callables at the same moment, so that TorchServe batches them."""
    barrier = threading.Barrier(len(calls))

    def run(call):
        barrier.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# -- tests ---------------------------------------------------------------------------------------

def test_archives_carry_handler_core_model_and_config(store):
    for name, baseline in ((NAME, False), (BASELINE, True)):
        with zipfile.ZipFile(os.path.join(store, f"{name}.mar")) as z:
            files = set(z.namelist())
            assert {"branched_handler.py", "branched/serving.py", "branched/model.py", "branched/lcnet/blocks.py",
                    "model/config.json", "model/weights.pt", "model-config.yaml", "MAR-INF/MANIFEST.json"} <= files
            # The inference core only: no training or calibration code, no command line.
            assert not [f for f in files if f.startswith("branched/build/") or f == "branched/cli.py"]
            manifest = json.loads(z.read("MAR-INF/MANIFEST.json"))
            config = yaml.safe_load(z.read("model-config.yaml"))
        assert manifest["model"]["modelName"] == name and manifest["model"]["handler"] == "branched_handler.py"
        assert manifest["model"]["configFile"] == "model-config.yaml"
        assert (config["batchSize"], config["maxBatchDelay"], config["minWorkers"], config["maxWorkers"]) == (8, 50, 1, 1)
        assert config["responseTimeout"] > 0 and config["handler"]["baseline"] is baseline


def test_archive_command_errors(model_dir, tmp_path):
    proc = subprocess.run([BRANCHED, "archive", "/no/such/model", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(ValueError, match="not valid for TorchServe"):
        build_archives(model_dir, str(tmp_path), name="bad name")
    assert not os.listdir(tmp_path)


def test_worker_runs_the_archived_core(server):
    """The worker imports ``branched`` from the unpacked archive, not from this checkout."""
    log = open(os.path.join(server.logs, "model_log.log"), errors="replace").read()
    found = re.findall(r"branched handler: (early-exit model|baseline) from \S+ \(branched package at (\S+)\)", log)
    assert {kind for kind, _ in found} == {"early-exit model", "baseline"}
    for _, package in found:
        assert package.startswith(os.path.realpath(server.tmp)) or package.startswith(server.tmp), package


def test_single_requests_match_core(server, images, reference):
    exits = set()
    for body in images:
        r = predict(server, body, {})
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("application/json")
        expected = reference.answer_batch([(body, {})])[0]
        assert_same(r.json(), expected)
        exits.add(r.json()["exit"])
    assert exits == {0, 1, 2}  # the model's own thresholds spread these images over every exit


def test_body_styles_and_query_parameters(server, images, reference):
    """Raw bytes, a multipart form, JSON base64; routing params as headers, form fields or the invoke query."""
    body = images[3]
    for params in PARAMS:
        expected = reference.answer_batch([(body, params)])[0]
        url = f"{server.inference_url}/predictions/{NAME}"
        answers = [
            requests.post(url, files={"data": ("digit.png", body, "image/png")}, data=params, timeout=60),
            requests.post(url, json={"image": base64.b64encode(body).decode()}, headers=params, timeout=60),
            requests.post(f"{server.inference_url}/models/{NAME}/invoke", params=params, data=body,
                          headers={"Content-Type": "image/png"}, timeout=60),
        ]
        for r in answers:
            assert r.status_code == 200, r.text
            assert_same(r.json(), expected)


def test_per_request_thresholds_change_exits(server, images, reference):
    body = images[0]
    got = {json.dumps(p): predict(server, body, p).json() for p in PARAMS}
    assert got['{"threshold": "0"}']["exit"] == 0
    assert got['{"thresholds": "inf,0"}']["exit"] == 1
    assert got['{"thresholds": "inf,inf"}']["exit"] == 2
    assert got['{"thresholds": "inf,inf"}']["cost_fraction"] > got['{"threshold": "0"}']["cost_fraction"]
    for p in PARAMS:
        assert_same(got[json.dumps(p)], reference.answer_batch([(body, p)])[0])


def test_concurrent_requests_are_batched_and_routed_per_request(server, images, reference):
    before = metrics(server.metrics_url)
    calls, expected = [], []
    for i, body in enumerate(images[:24]):
        params = PARAMS[i % len(PARAMS)]
        calls.append(lambda b=body, p=params: predict(server, b, p))
        expected.append(reference.answer_batch([(body, params)])[0])
    for _ in range(2):
        responses = concurrently(calls)
        for r, e in zip(responses, expected):
            assert r.status_code == 200, r.text
            assert_same(r.json(), e)

    def batched():
        after = metrics(server.metrics_url)
        n = sum(metric(after, "BranchedExitRequests", ModelName=NAME, Exit=str(k))
                - metric(before, "BranchedExitRequests", ModelName=NAME, Exit=str(k)) for k in range(3))
        batches = metric(after, "BranchedBatches", ModelName=NAME) - metric(before, "BranchedBatches", ModelName=NAME)
        return (n, batches) if n == 2 * len(calls) else None

    counts = wait_for(batched)
    assert counts is not None, "the exit counters did not count every request"
    n, batches = counts
    assert batches < n, f"{n} concurrent requests were answered in {batches} batches: no batching happened"


def test_metrics_endpoint_counts_exits_cost_and_bad_requests(server, images):
    before = metrics(server.metrics_url)
    answers = [predict(server, body, {}).json() for body in images[:8]]
    assert predict(server, b"", {}).status_code == 400
    tally = {k: sum(a["exit"] == k for a in answers) for k in range(3)}
    cost = sum(a["cost_fraction"] for a in answers)

    def counted():
        after = metrics(server.metrics_url)
        delta = {k: metric(after, "BranchedExitRequests", ModelName=NAME, Exit=str(k))
                 - metric(before, "BranchedExitRequests", ModelName=NAME, Exit=str(k)) for k in range(3)}
        bad = (metric(after, "BranchedBadRequests", ModelName=NAME, Status="400")
               - metric(before, "BranchedBadRequests", ModelName=NAME, Status="400"))
        return after if delta == tally and bad == 1 else None

    after = wait_for(counted)
    assert after is not None, f"exit counters never reached {tally}: {metrics(server.metrics_url)}"
    cost_sum = metric(after, "BranchedCostFractionSum", ModelName=NAME) - metric(before, "BranchedCostFractionSum",
                                                                                  ModelName=NAME)
    assert cost_sum == pytest.approx(cost, rel=1e-6)
    assert 0 < metric(after, "BranchedCostFraction", ModelName=NAME) <= 1.2
    assert metric(after, "ts_inference_requests_total", model_name=NAME) > 0  # TorchServe's own metrics too


def test_baseline_serves_the_same_backbone_without_exits(server, images, model_dir):
    reference = Predictor(model_dir, baseline=True)
    for body in images[:6]:
        r = predict(server, body, {}, model=BASELINE)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["exit"] == 0 and answer["cost_fraction"] == pytest.approx(1.0)
        assert_same(answer, reference.answer_batch([(body, {})])[0])
        # Same weights as the early-exit model's last exit (the backbone head).
        full = predict(server, body, {"thresholds": "inf,inf"}).json()
        assert full["class_index"] == answer["class_index"]
        assert full["confidence"] == pytest.approx(answer["confidence"], abs=1e-4)


def test_the_readmes_curl_commands_answer(server, images, tmp_path):
    """Every README curl line for /predictions/demo and /models/demo/invoke, run as written (address and name swapped)."""
    (tmp_path / "digit.png").write_bytes(images[0])
    commands = readme_curls("127.0.0.1:8080/predictions/demo", "127.0.0.1:8080/models/demo/invoke")
    assert len(commands) >= 7, commands  # the walk-through, the request table and the threshold examples
    swap = {"http://127.0.0.1:8080": server.inference_url, "/predictions/demo ": f"/predictions/{NAME} ",
            "/models/demo/": f"/models/{NAME}/"}
    for command in commands:
        answer = run_curl(command, str(tmp_path), swap)
        assert {"class_index", "label", "confidence", "exit", "cost_fraction"} <= set(answer), (command, answer)

"""Bad input and batch alignment against a real TorchServe and a real Ray Serve (issue #8).

One small model is served by both servers for the whole module (started side by side, stopped in
teardown). Every case of the bad-input corpus (``tests/bad_requests.py``) goes to both; then both
must still answer a good request, TorchServe from the same worker process. The alignment test fires
many concurrent requests, each with its own image and thresholds (and a few bad ones among them), and
checks every answer against what the core answers for that request alone.

TorchServe runs with non-default limits (``branched archive --max-pixels ... --min-side ...``) to
show that the archive's settings reach the handler; Ray Serve runs with the defaults.
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlencode, urlsplit

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from branched.artifact import save_model
from branched.preprocess import ImageLimits
from branched.routing import exit_score
from branched.serving import Predictor
from loadtests.launchers import REPO_ROOT, RayServe, TorchServe

from bad_requests import CASES, SERVERS, Case, digit, jpeg, png
from helpers import make_model, metric, metrics, wait_for

pytestmark = [pytest.mark.server, pytest.mark.timeout(600)]  # starts a real server

NAME = "reliability"
BRANCHED = os.path.join(os.path.dirname(sys.executable), "branched")
#: TorchServe's limits, set through `branched archive` (non-default on purpose); Ray uses ImageLimits().
TS_LIMITS = ImageLimits(max_pixels=2_000_000, min_side=10)
LIMITS = {"torchserve": TS_LIMITS, "ray": ImageLimits()}
N_ALIGN = 72  # concurrent good requests in the alignment test
GAP = 2e-4  # a threshold stays at least this far from every score (batch vs single float noise is ~1e-6)


# -- model and servers ---------------------------------------------------------------------------

def _images() -> list[bytes]:
    """Distinct images: MNIST digits (PNG and JPEG) and colour noise."""
    out = [png(Image.fromarray(digit(i))) for i in range(48)] + [jpeg(Image.fromarray(digit(i))) for i in range(48, 56)]
    rng = np.random.default_rng(1)
    out += [png(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))) for _ in range(N_ALIGN - len(out))]
    return out


def _safe_thresholds(scores: torch.Tensor, count: int) -> list[float]:
    """Up to ``count`` thresholds between neighbouring scores, each at least ``GAP`` from every score,
    spread over the score range (so they send different shares of the samples on)."""
    s = scores.double().sort().values
    mids = [float(s[j] + s[j + 1]) / 2 for j in range(len(s) - 1) if float(s[j + 1] - s[j]) > 2 * GAP]
    assert len(mids) >= count, f"scores too close together for {count} stable thresholds: {s.tolist()}"
    picks = np.linspace(0, len(mids) - 1, count).round().astype(int)
    return [mids[i] for i in sorted(set(picks.tolist()))]


@dataclass
class Served:
    """The module's model: its directory, its candidate thresholds per early exit, and the images."""

    model_dir: str
    candidates: list[list[float]]
    images: list[bytes]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Served:
    """cifar_resnet20 at 16 px with two untrained exits; thresholds and a calibration curve placed in
    gaps between the images' scores."""
    model = make_model("cifar_resnet20", 16)
    d = str(tmp_path_factory.mktemp("model") / NAME)
    save_model(model, d)
    images = _images()
    pre = Predictor(d).preprocessor
    with torch.no_grad():
        outs = model(torch.stack([pre.from_bytes(b) for b in images]))
    candidates = [_safe_thresholds(exit_score(o, model.config.policy), 6) for o in outs[:-1]]
    model.config.thresholds = [c[len(c) // 2] for c in candidates]
    model.config.meta["calibration"] = {"curve": [
        {"thresholds": [candidates[0][0], candidates[1][0]], "cost_fraction": 0.3, "accuracy": 0.5},
        {"thresholds": [candidates[0][-1], candidates[1][-1]], "cost_fraction": 0.6, "accuracy": 0.6},
        {"thresholds": [float("inf"), float("inf")], "cost_fraction": 1.0, "accuracy": 0.7}]}
    save_model(model, d)
    return Served(d, candidates, images)


@pytest.fixture(scope="module")
def reference(served):
    """The core in this process, one request at a time: ``(body, params) -> answer dict``."""
    predictor = Predictor(served.model_dir)
    return lambda body, params=None: predictor.answer_batch([(body, params or {})])[0]


@pytest.fixture(scope="module")
def store(served, tmp_path_factory) -> str:
    """The model archived by `branched archive` with TorchServe's limits (TS_LIMITS)."""
    store = str(tmp_path_factory.mktemp("store"))
    proc = subprocess.run([BRANCHED, "archive", served.model_dir, "--out", store, "--no-baseline", "--batch-size", "8",
                           "--max-batch-delay", "20", "--threads", "1", "--max-pixels", str(TS_LIMITS.max_pixels),
                           "--min-side", str(TS_LIMITS.min_side)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return store


@pytest.fixture(scope="module")
def servers(served, store, tmp_path_factory):
    """``{"torchserve": (TorchServe, predict URL), "ray": (RayServe, predict URL)}``, started side by side."""
    ts = TorchServe(store, str(tmp_path_factory.mktemp("ts")), {NAME: f"{NAME}.mar"})
    # The default Ray Serve profile (direct ingress: the staged app's Ingress replica serves HTTP on its own port),
    # stage 0 in the Ingress and stages 1-2 in one deployment: bad input meets the Ingress, good requests cross a hop.
    ray = RayServe(served.model_dir, max_batch_size=8, batch_wait_timeout_s=0.02,
                   log_path=str(tmp_path_factory.mktemp("ray") / "ray.log"), grouping="0|1,2")
    try:
        with ThreadPoolExecutor(2) as pool:  # both start mostly waiting (JVM, Ray cluster): overlap them
            for f in [pool.submit(ts.start), pool.submit(ray.start)]:
                f.result()
        yield {"torchserve": (ts, f"{ts.inference_url}/predictions/{NAME}"), "ray": (ray, f"{ray.urls['staged']}/predict")}
    finally:
        ts.stop()
        ray.stop()


@pytest.fixture(scope="module")
def ts_worker_pids(servers) -> list[int]:
    """TorchServe's worker PIDs before the corpus: a crashed worker would come back with another PID."""
    return [w["pid"] for w in servers["torchserve"][0].workers(NAME)]


# -- HTTP ----------------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> dict:
        return json.loads(self.body)


def post(url: str, body: bytes, headers: Optional[dict] = None, timeout: float = 120) -> Reply:
    """POST ``body``; a server that answers early (413) and closes while the body is still going up
    still has its answer read."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.putrequest("POST", u.path + (f"?{u.query}" if u.query else ""))
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            view = memoryview(body)
            for i in range(0, len(body), 1 << 20):
                conn.send(view[i:i + (1 << 20)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server refused the body before reading it; its answer is waiting
        r = conn.getresponse()
        return Reply(r.status, r.read(), r.getheader("Content-Type") or "")
    finally:
        conn.close()


def assert_same(answer: dict, expected: dict) -> None:
    """Same class, exit and cost; confidence up to float noise between batch compositions."""
    assert (answer["class_index"], answer["exit"]) == (expected["class_index"], expected["exit"])
    assert answer["cost_fraction"] == pytest.approx(expected["cost_fraction"], rel=1e-9)
    assert answer["confidence"] == pytest.approx(expected["confidence"], abs=1e-4)


def check(case: Case, server: str, reply: Reply, reference, body: bytes) -> None:
    """``reply`` is what the corpus says ``server`` must answer to ``case``."""
    status, message = case.expect(server, LIMITS[server])
    assert reply.status == status, f"{case.name}: {reply.status} {reply.body[:300]!r}"
    if status == 200:
        expected = reference(case.same_as() if case.same_as else body)
        assert_same(reply.json(), expected)
    elif message is not None:
        assert reply.content_type.startswith("application/json"), reply.content_type
        assert reply.json()["status"] == status
        assert message in reply.json()["error"], reply.json()["error"]
    # message None: the server's own refusal (TorchServe's frontend for an oversized body): status only


# -- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("server", SERVERS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus(servers, ts_worker_pids, reference, server, case):
    body = case.body(LIMITS[server])
    check(case, server, post(servers[server][1], body, case.headers), reference, body)


@pytest.mark.parametrize("server", SERVERS)
def test_server_keeps_serving_after_the_corpus(servers, ts_worker_pids, reference, served, server):
    handle, url = servers[server]
    for body in served.images[:3]:
        reply = post(url, body)
        assert reply.status == 200, reply.body
        assert_same(reply.json(), reference(body))
    if server == "torchserve":
        workers = handle.workers(NAME)
        assert [w["pid"] for w in workers] == ts_worker_pids, "a TorchServe worker restarted during the corpus"
        assert all(w["status"] == "READY" for w in workers)
    else:
        assert handle.proc is not None and handle.proc.poll() is None, "the Ray Serve process died"


def _routing(served: Served, i: int) -> dict[str, str]:
    """Request ``i``'s own routing parameters: a different threshold pair (or budget, or none) each time."""
    c0, c1 = served.candidates
    choice = i % 8
    if choice == 6:
        return {}  # the model's own thresholds
    if choice == 7:
        return {"budget": "0.65"}  # -> the curve's second point
    return {"thresholds": f"{c0[(i // 8 + choice) % len(c0)]!r},{c1[(i // 3) % len(c1)]!r}"}


@pytest.mark.parametrize("server", SERVERS)
def test_concurrent_answers_are_each_requests_own(servers, reference, served, server):
    """N_ALIGN good requests with their own images and thresholds, plus bad ones, all at once."""
    handle, url = servers[server]
    jobs = []  # (body, headers, query params, expected answer or Case)
    for i, body in enumerate(served.images[:N_ALIGN]):
        params = _routing(served, i)
        # TorchServe reads routing parameters from headers; Ray from the query string or headers.
        query = params if server == "ray" and i % 2 else {}
        jobs.append((body, {} if query else params, query, reference(body, params)))
    bad = [c for c in CASES if c.status != 200 and len(c.body(LIMITS[server])) < 1_000_000][::3]  # every kind
    for k, case in enumerate(bad):
        jobs.insert(7 * k + 3, (case.body(LIMITS[server]), case.headers, {}, case))
    exits = {e["exit"] for *_, e in jobs if isinstance(e, dict)}
    assert exits == {0, 1, 2}, f"the requests should reach every exit: {exits}"
    barrier = threading.Barrier(len(jobs))

    def send(job):
        body, headers, query, _ = job
        barrier.wait()  # all at once, so that the servers batch them
        return post(url + (f"?{urlencode(query)}" if query else ""), body, headers)

    before = metrics(handle.metrics_url) if server == "torchserve" else None
    with ThreadPoolExecutor(len(jobs)) as pool:
        replies = list(pool.map(send, jobs))
    for (body, _, _, expected), reply in zip(jobs, replies):
        if isinstance(expected, Case):
            check(expected, server, reply, reference, body)
        else:
            assert reply.status == 200, reply.body
            assert_same(reply.json(), expected)
    if server == "torchserve":  # the point of the test: requests shared batches (the handler's counters)
        def counted():
            after = metrics(handle.metrics_url)
            delta = {k: metric(after, k, ModelName=NAME) - metric(before, k, ModelName=NAME)
                     for k in ("BranchedExitRequests", "BranchedBatches")}
            return delta if delta["BranchedExitRequests"] >= N_ALIGN else None

        delta = wait_for(counted)
        assert delta is not None, "the exit counters did not count every request"
        assert delta["BranchedBatches"] < len(jobs) / 2, f"{len(jobs)} requests in {delta['BranchedBatches']} batches"


def test_torchserve_for_a_shared_host_token_auth_on_model_api_off(store, served, reference, tmp_path):
    """The README's shared-host setting: config.properties with token authorization turned on."""
    with open(os.path.join(REPO_ROOT, "config.properties")) as f:
        text = f.read()
    assert "disable_token_authorization=true" in text and "enable_model_api=false" in text
    config = tmp_path / "config.properties"
    config.write_text(text.replace("disable_token_authorization=true", "disable_token_authorization=false"))
    ts = TorchServe(store, str(tmp_path / "ts"), {NAME: f"{NAME}.mar"}, config=str(config))
    try:
        ts.start()
        url, body = f"{ts.inference_url}/predictions/{NAME}", served.images[0]
        key_file = tmp_path / "ts" / "key_file.json"
        assert set(json.loads(key_file.read_text())) >= {"inference", "management"}
        assert key_file.stat().st_mode & 0o077 == 0, "the key file should be readable by its owner only"
        for headers in ({}, {"Authorization": "Bearer not-the-key"}, ts.auth("management")):
            refused = post(url, body, headers)
            assert refused.status == 400, (refused.status, refused.body)  # TorchServe 0.12's InvalidKeyException
            assert b"Token Authorization failed" in refused.body, refused.body
        answered = post(url, body, ts.auth("inference"))
        assert answered.status == 200, answered.body
        assert_same(answered.json(), reference(body))
        # Model API off: even with the management key, registering or deleting a model is refused.
        manage = ts.auth("management")
        assert requests.get(f"{ts.management_url}/models/{NAME}", headers=manage, timeout=30).status_code == 200
        register = requests.post(f"{ts.management_url}/models", params={"url": f"{NAME}.mar"}, headers=manage, timeout=30)
        delete = requests.delete(f"{ts.management_url}/models/{NAME}", headers=manage, timeout=30)
        for r in (register, delete):
            assert r.status_code == 405 and "MethodNotAllowedException" in r.text, (r.status_code, r.text)
        assert post(url, body, ts.auth("inference")).status == 200, "the model survived the delete attempt"
        assert requests.get(f"{ts.management_url}/models", timeout=30).status_code != 200  # no key: refused
    finally:
        ts.stop()

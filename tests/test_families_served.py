"""A ViT and a MobileNet answer through a real TorchServe and a real Ray Serve, with no per-family code.

Two models with random weights: ``cifar_vit_micro`` (torchvision's ``VisionTransformer``, 4 layers of
width 32, 32 px, mlp exits on tokens) and ``mobilenet_v3_small`` (as torchvision builds it, at its
native 224 px, conv exits). BN statistics come from the test images, and each model's thresholds
sit in the widest gap of its exit scores, so the images spread over every exit. Both models are
archived with ``handlers.archive`` (what ``branched archive`` runs) and served by ONE TorchServe;
then both staged apps run side by side in ONE Ray Serve (stage 0 in the Ingress, stages 1-2 in a
deployment of their own, so survivors' tokens and maps cross a process boundary). Every answer to
real PNG bytes, sent concurrently so that the servers batch them, equals ``Predictor``'s for the
same bytes: class, exit, cost_fraction, confidence.
"""
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import yaml
from torch import nn

from branched.artifact import save_model
from branched.preprocess import Preprocessor
from branched.routing import exit_score
from branched.serving import Predictor
from handlers.archive import ArchiveSettings, build_archives
from loadtests.launchers import REPO_ROOT, TorchServe

from helpers import free_port, make_model, png

pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]  # starts TorchServe, then Ray Serve

#: served name -> (registry name, input side)
MODELS = {"vitmicro": ("cifar_vit_micro", 32), "mnv3small": ("mobilenet_v3_small", 224)}
N_IMAGES = 16


def widest_gap(scores: torch.Tensor) -> float:
    """A threshold in the widest gap between neighbouring scores of the middle half: stable against the
    float noise between batch compositions."""
    s = scores.sort().values
    lo, hi = len(s) // 4, max(len(s) // 4 + 1, 3 * len(s) // 4)
    gaps = s[lo + 1:hi + 1] - s[lo:hi]
    j = int(gaps.argmax()) + lo
    assert float(gaps.max()) > 1e-4, f"exit scores too close to place a stable threshold: {s.tolist()}"
    return float(s[j] + s[j + 1]) / 2


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [png(i) for i in range(N_IMAGES)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, images) -> dict[str, str]:
    """Served name -> model directory; thresholds spread the images over all three exits."""
    out = {}
    for served, (name, size) in MODELS.items():
        model = make_model(name, size)
        x = torch.stack([Preprocessor.for_config(model.config).from_bytes(b) for b in images])
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:  # BN statistics of these images: random deep nets otherwise score every input alike
            m.reset_running_stats()
            m.momentum = None
        with torch.no_grad():
            model.train()
            model(x)
            model.eval()
            outs = model(x)
        s0, s1 = (exit_score(o, model.config.policy) for o in outs[:-1])
        t0 = widest_gap(s0)
        model.config.thresholds = [t0, widest_gap(s1[s0 < t0])]
        out[served] = save_model(model, str(tmp_path_factory.mktemp("models") / served))
    return out


@pytest.fixture(scope="module")
def expected(model_dirs, images) -> dict[str, list[dict]]:
    """What the core answers in this process for each image, one request at a time."""
    out = {}
    for served, directory in model_dirs.items():
        predictor = Predictor(directory)
        out[served] = [predictor.answer_batch([(b, {})])[0] for b in images]
        assert {a["exit"] for a in out[served]} == {0, 1, 2}, f"{served}: the images should reach every exit"
    return out


def answers(url: str, images: list[bytes]) -> list[requests.Response]:
    """POST every image at once (the server batches them)."""
    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(lambda b: requests.post(url, data=b, timeout=120), images))


def assert_same(responses: list[requests.Response], expected: list[dict], where: str) -> None:
    for i, (r, e) in enumerate(zip(responses, expected)):
        assert r.status_code == 200, f"{where} image {i}: {r.text}"
        a = r.json()
        assert (a["class_index"], a["label"], a["exit"]) == (e["class_index"], e["label"], e["exit"]), (where, i, a, e)
        assert a["cost_fraction"] == pytest.approx(e["cost_fraction"], rel=1e-6), (where, i)
        assert a["confidence"] == pytest.approx(e["confidence"], abs=1e-4), (where, i)


def test_torchserve_serves_a_vit_and_a_mobilenet(model_dirs, expected, images, tmp_path):
    store = str(tmp_path / "store")
    settings = ArchiveSettings(batch_size=8, max_batch_delay=50, threads=1)
    for served, directory in model_dirs.items():
        assert build_archives(directory, store, served, settings, baseline=False) == \
            [os.path.join(store, f"{served}.mar")]
    ts = TorchServe(store, str(tmp_path / "ts"), {served: f"{served}.mar" for served in MODELS})
    try:
        ts.start(timeout=480)
        for served in MODELS:
            responses = answers(f"{ts.inference_url}/predictions/{served}", images)
            assert_same(responses, expected[served], f"TorchServe {served}")
    finally:
        ts.stop()


def test_ray_serve_serves_a_vit_and_a_mobilenet(model_dirs, expected, images):
    with warnings.catch_warnings():  # Ray's own pydantic deprecation warnings, at import time
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

    with open(os.path.join(REPO_ROOT, "ray_app", "config.yaml")) as f:
        staged = next(a for a in yaml.safe_load(f)["applications"] if a["name"] == "staged")
    apps = [{**staged, "name": served, "route_prefix": f"/{served}",
             "args": {**staged["args"], "model_dir": directory, "grouping": "0|1,2", "num_cpus": 0.5,
                      "batch_wait_timeout_s": 0.05}}
            for served, directory in model_dirs.items()]
    port = free_port()
    ray.init(address="local", num_cpus=8, object_store_memory=80 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": apps}))
        deadline = time.monotonic() + 600
        while True:
            status = serve.status().applications
            if all(served in status and status[served].status == "RUNNING" for served in MODELS):
                break
            failed = {s: status[s].message for s in MODELS if s in status and status[s].status == "DEPLOY_FAILED"}
            assert not failed, failed
            assert time.monotonic() < deadline, f"apps not running after 600 s: {status}"
            time.sleep(0.5)
        for served in MODELS:
            responses = answers(f"http://127.0.0.1:{port}/{served}/predict", images)
            assert_same(responses, expected[served], f"Ray Serve {served}")
    finally:
        serve.shutdown()
        ray.shutdown()

"""Ray Serve adapter: real Ray, ray_app/config.yaml's two apps on loopback, real PNG bytes.

The staged app must answer what the core's routed forward answers in-process (``Predictor``, the
TorchServe handler's code path), a stage must see only the previous stage's survivors, bad
requests get a 4xx without harming the others, and thresholds move per request and app-wide at
run time. The planner's arithmetic and the config it writes are checked without a cluster.
"""
import base64
import copy
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
import yaml

with warnings.catch_warnings():  # Ray's own pydantic deprecation warnings, at import time
    warnings.simplefilter("ignore", DeprecationWarning)
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

from branched.artifact import load_config, save_model
from branched.cli import main as cli_main
from branched.routing import exit_score
from branched.serving import Predictor
from ray_app.grouping import Grouping
from ray_app.planner import pack_fractions, plan_cpus, plan_gpus, stage_flops, work_shares

from helpers import between, free_port, make_model, png, readme_curls, run_curl

pytestmark = pytest.mark.server  # starts a real server

N_IMAGES = 24
CONFIG_YAML = "ray_app/config.yaml"
STAGES = 3




@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """cifar_resnet20 with 2 untrained exits; thresholds at the score medians so exits spread."""
    model = make_model("cifar_resnet20", 32, n_exits=STAGES - 1)
    d = str(tmp_path_factory.mktemp("ray_model"))
    save_model(model, d)
    pre = Predictor(d).preprocessor
    x = torch.stack([pre.from_bytes(png(i)) for i in range(N_IMAGES)])
    with torch.no_grad():
        outs = model(x)
    model.config.thresholds = [between(exit_score(o, model.config.policy)) for o in outs[:-1]]
    model.config.meta["calibration"] = {"exit_rates": [0.5, 0.3, 0.2]}
    save_model(model, d)
    return d


@pytest.fixture(scope="module")
def reference(model_dir):
    """The core in-process (the TorchServe handler's path), one request at a time."""
    predictor = Predictor(model_dir)
    return lambda data, params=None: predictor.predict([predictor.prepare(data, params or {})])[0]


def config_for(model_dir: str, ingress_user_config=None, stage0_user_config=None) -> dict:
    """ray_app/config.yaml with model_dir pointed at the test model (what a user edits)."""
    with open(CONFIG_YAML) as f:
        cfg = yaml.safe_load(f)
    for app in cfg["applications"]:
        app["args"].update(model_dir=model_dir, batch_wait_timeout_s=0.05)
        if app["name"] == "staged":
            if ingress_user_config is not None:
                next(d for d in app["deployments"] if d["name"] == "Ingress")["user_config"] = ingress_user_config
            if stage0_user_config is not None:
                app["deployments"].append({"name": "Stage0", "user_config": stage0_user_config})
    return cfg


def deploy(cfg: dict, timeout_s: float = 480) -> None:
    """Apply a Serve config the way `serve run CONFIG` / `serve deploy CONFIG` do, and wait until RUNNING."""
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg))
    names = {a["name"] for a in cfg["applications"]}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if names <= set(apps) and all(apps[n].status == "RUNNING" for n in names):
            return
        if any(apps[n].status == "DEPLOY_FAILED" for n in names if n in apps):
            raise AssertionError({n: apps[n].message for n in names if n in apps})
        time.sleep(0.5)
    raise TimeoutError(f"apps not running after {timeout_s}s: {serve.status().applications}")


#: Besides the config's per-stage app ("|0|1|2"): stage 0 in the Ingress with the rest in one deployment, and every
#: stage in the Ingress, each as an app of its own at /g{i}. With the per-stage app they cover every part a grouping
#: is made of (an Ingress that hosts none, some or all stages; one- and multi-stage deployments; hand-offs from the
#: Ingress and between deployments). test_grouping.py holds every grouping's chain of runs to the core in process.
GROUPINGS = ["0|1,2", "0,1,2"]


@pytest.fixture(scope="module")
def server(model_dir):
    port = free_port()
    ray.init(address="local", num_cpus=8, object_store_memory=80 * 1024 ** 2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = config_for(model_dir)
        staged = next(a for a in cfg["applications"] if a["name"] == "staged")
        for i, grouping in enumerate(GROUPINGS):
            cfg["applications"].append({**copy.deepcopy(staged), "name": f"g{i}", "route_prefix": f"/g{i}",
                                        "args": {**staged["args"], "grouping": grouping, "num_cpus": 0.1}})
        deploy(cfg)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def stage_stats(app: str = "staged", grouping: str = "per-stage") -> list[dict]:
    """Per stage, the counters of the replica that hosts it (the Ingress or a StageGroup)."""
    g = Grouping.parse(grouping, STAGES)
    names = (["Ingress"] if g.ingress else []) + g.names
    stats = [s for name in names
             for s in serve.get_deployment_handle(name, app_name=app).stats.remote().result()["stages"]]
    return sorted(stats, key=lambda s: s["stage"])


def send_concurrently(url: str, images: list[bytes]) -> list[requests.Response]:
    """POST every image at once, in the three body encodings TorchServe accepts."""
    def send(i: int) -> requests.Response:
        b = images[i]
        if i % 3 == 0:
            return post(url, b, headers={"Content-Type": "image/png"})
        if i % 3 == 1:
            return requests.post(url, files={"data": ("x.png", b, "image/png")}, timeout=120)
        return requests.post(url, json={"image": base64.b64encode(b).decode()}, timeout=120)

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(send, range(len(images))))


def post(url: str, data: bytes, params=None, headers=None) -> requests.Response:
    return requests.post(url, data=data, params=params, headers=headers, timeout=120)


def assert_same(answer: dict, expected: dict) -> None:
    assert set(answer) == set(expected)
    assert (answer["exit"], answer["class_index"], answer["label"]) == \
        (expected["exit"], expected["class_index"], expected["label"])
    for key in ("confidence", "cost_fraction", "exit_score"):
        assert answer[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-5), key


@pytest.mark.parametrize("app", ["staged", *[f"g{i}" for i in range(len(GROUPINGS))]])
def test_every_grouping_answers_as_the_core_and_stages_see_only_survivors(server, reference, app):
    grouping = "per-stage" if app == "staged" else GROUPINGS[int(app[1:])]
    images = [png(i) for i in range(N_IMAGES)]
    expected = [reference(b) for b in images]
    exits = [e["exit"] for e in expected]
    assert set(exits) == set(range(STAGES)), f"thresholds should spread images over all exits: {exits}"
    prefix = "" if app == "staged" else f"/{app}"
    before = stage_stats(app, grouping)
    responses = send_concurrently(f"{server}{prefix}/predict", images)
    after = stage_stats(app, grouping)
    for r, e in zip(responses, expected):
        assert r.status_code == 200, r.text
        assert_same(r.json(), e)
    received = [a["samples"] - b["samples"] for a, b in zip(after, before)]
    assert received == [sum(e >= k for e in exits) for k in range(STAGES)], f"{grouping}: a stage sees only survivors"
    assert [a["exited"] - b["exited"] for a, b in zip(after, before)] == [exits.count(k) for k in range(STAGES)]
    forwarded = [a["forwarded"] - b["forwarded"] for a, b in zip(after, before)]
    assert forwarded[:-1] == received[1:] and forwarded[-1] == 0
    assert after[0]["max_batch"] > 1, "concurrent requests should share a stage-0 batch"


def test_baseline_app_is_the_plain_backbone(server, model_dir):
    plain = Predictor(model_dir, baseline=True)
    for i in range(4):
        r = post(f"{server}/baseline/predict", png(i))
        assert r.status_code == 200, r.text
        assert_same(r.json(), plain.predict([plain.prepare(png(i), {})])[0])
        assert r.json()["exit"] == 0 and r.json()["cost_fraction"] == pytest.approx(1.0)
        staged = post(f"{server}/predict", png(i), params={"thresholds": "inf,inf"}).json()
        assert staged["exit"] == STAGES - 1 and staged["class_index"] == r.json()["class_index"]


def test_bad_inputs_get_4xx_and_do_not_harm_others(server, reference):
    bad = [(b"", None, None), (b"not an image", None, None), (png(1), {"threshold": "abc"}, None),
           (png(1), {"thresholds": "0.5"}, None), (png(1), {"budget": "0.5"}, None),
           (png(1), {"threshold": "0.2", "budget": "0.5"}, None), (png(1), None, {"X-Threshold": "7"}),
           (b"{not json", None, {"Content-Type": "application/json"}),
           (b"--x\r\n\r\n", None, {"Content-Type": "multipart/form-data"})]
    good = [png(100 + i) for i in range(8)]
    with ThreadPoolExecutor(len(bad) + len(good) + 1) as pool:
        bad_f = [pool.submit(post, f"{server}/predict", *b) for b in bad]
        bad_f.append(pool.submit(post, f"{server}/baseline/predict", b"junk"))
        good_f = [pool.submit(post, f"{server}/predict", b) for b in good]
        for f in bad_f:
            r = f.result()
            assert r.status_code == 400, r.text
            assert r.json()["status"] == 400 and len(r.json()["error"]) > 10
        for f, b in zip(good_f, good):
            assert f.result().status_code == 200, f.result().text
            assert_same(f.result().json(), reference(b))
    assert requests.get(f"{server}/predict", timeout=30).status_code == 405
    assert requests.post(f"{server}/nothing-here", data=b"x", timeout=30).status_code == 404


def test_per_request_thresholds_change_exits(server, reference):
    cases = [({"threshold": "0"}, None, 0), ({"thresholds": "inf,0"}, None, 1), ({"thresholds": "inf,inf"}, None, 2),
             (None, {"X-Threshold": "0"}, 0), (None, {"thresholds": "inf,0"}, 1)]
    for i, (params, headers, exit_k) in enumerate(cases):
        b = png(200 + i)
        r = post(f"{server}/predict", b, params, headers)
        assert r.status_code == 200, r.text
        assert r.json()["exit"] == exit_k
        same = params or {k.lower().removeprefix("x-"): v for k, v in headers.items()}
        assert_same(r.json(), reference(b, same))


def test_user_config_reconfigures_the_live_app_without_restarts(server, model_dir, reference):
    images = [png(300 + i) for i in range(8)]
    before = stage_stats()
    try:
        deploy(config_for(model_dir, {"thresholds": "inf,0"}, {"max_batch_size": 1}))
        assert requests.get(f"{server}/thresholds", timeout=30).json() == {"thresholds": ["inf", 0.0]}
        with ThreadPoolExecutor(len(images)) as pool:
            answers = [r.json() for r in pool.map(lambda b: post(f"{server}/predict", b), images)]
        assert [a["exit"] for a in answers] == [1] * len(images)
        assert post(f"{server}/predict", images[0], {"threshold": "0"}).json()["exit"] == 0, "the request wins"
        after = stage_stats()
        # reconfigure, not a restart: the stages kept their counters; stage 0 now runs one sample per batch
        assert after[0]["samples"] - before[0]["samples"] == len(images) + 1
        assert after[0]["batches"] - before[0]["batches"] == len(images) + 1
        assert after[1]["samples"] - before[1]["samples"] == len(images)
    finally:
        deploy(config_for(model_dir, {}, {"max_batch_size": 32}))
    assert requests.get(f"{server}/thresholds", timeout=30).json()["thresholds"] != ["inf", 0.0]
    for b in images[:4]:
        assert_same(post(f"{server}/predict", b).json(), reference(b))


# ------------------------------------------------------------------------------------------ planner
def test_planner_arithmetic():
    flops, rates = [30, 20, 10], [0.5, 0.3, 0.2]
    reach, shares = work_shares(flops, rates)
    assert reach == pytest.approx([1.0, 0.5, 0.2])
    work = [1.0 * 30, 0.5 * 20, 0.2 * 10]
    assert shares == pytest.approx([w / sum(work) for w in work])
    for gpus in (1, 2, 4, 8):
        plans = plan_gpus(flops, rates, gpus)
        per_replica = [p.num_gpus for p in plans for _ in range(p.replicas)]
        assert pack_fractions(per_replica, gpus) is not None and sum(per_replica) <= gpus + 1e-9
        totals = [p.replicas * p.num_gpus for p in plans]
        assert sum(totals) >= 0.8 * gpus, "the plan should use most of the GPUs"
        for t, s in zip(totals, shares):
            assert t == pytest.approx(s * sum(totals), abs=0.08 * gpus + 0.02)
    plans = plan_cpus(flops, rates, 11)  # 1 each + 8 by largest remainder of [5.71, 1.90, 0.38]
    assert [p.replicas for p in plans] == [7, 3, 1] and all(p.num_cpus == 1 for p in plans)
    fractional = plan_cpus(flops, rates, 2)
    assert [p.replicas for p in fractional] == [1, 1, 1]
    assert [p.num_cpus for p in fractional] == pytest.approx([2 * s for s in shares], abs=0.011)
    assert pack_fractions([0.7, 0.7, 0.6], 2) is None and pack_fractions([0.6, 0.4, 0.5, 0.5], 2) is not None
    with pytest.raises(ValueError, match="sum to 1"):
        work_shares(flops, [0.5, 0.5, 0.5])


def test_plan_command_writes_a_deployable_config(model_dir, tmp_path, capsys):
    out = tmp_path / "plan.yaml"
    assert cli_main(["ray-plan", model_dir, "--gpus", "2", "--out", str(out)]) == 0
    assert "the model's calibration" in capsys.readouterr().out
    cfg = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(cfg)
    staged = next(a for a in cfg["applications"] if a["name"] == "staged")
    names = [d["name"] for d in staged["deployments"]]
    assert names == ["Ingress"] + [f"Stage{k}" for k in range(STAGES)]
    gpus = [d["ray_actor_options"]["num_gpus"] * d["num_replicas"] for d in staged["deployments"][1:]]
    assert gpus[0] > gpus[1] > gpus[2] and sum(gpus) <= 2
    assert all(d["max_ongoing_requests"] >= staged["args"]["max_batch_size"] for d in staged["deployments"])
    baseline = next(a for a in cfg["applications"] if a["name"] == "baseline")["deployments"][0]
    assert baseline["num_replicas"] == 2 and baseline["ray_actor_options"]["num_gpus"] == 1
    assert cli_main(["ray-plan", model_dir, "--cpus", "6", "--exit-rates", "0.1,0.1,0.8", "--out", str(out)]) == 0
    stages = yaml.safe_load(out.read_text())["applications"][0]["deployments"][1:]
    expected = plan_cpus(stage_flops(load_config(model_dir)), [0.1, 0.1, 0.8], 6 - 1)  # less the ingress's CPU
    assert [d["num_replicas"] for d in stages] == [p.replicas for p in expected] and sum(p.replicas for p in expected) == 5
    for argv, msg in [(["--gpus", "1", "--exit-rates", "0.5,0.5"], "3 exits"), ([], "exactly one of"),
                      (["--cpus", "4", "--exit-rates", "0.5,0.6,0.1"], "sum to 1")]:
        assert cli_main(["ray-plan", model_dir, *argv]) == 2
        assert msg in capsys.readouterr().err


def test_the_readmes_curl_commands_answer(server, tmp_path):
    """Every README curl line for the local Ray Serve apps, run as written (address swapped)."""
    (tmp_path / "digit.png").write_bytes(png(0))
    commands = readme_curls("127.0.0.1:8000/predict", "127.0.0.1:8000/baseline/predict")
    assert len(commands) >= 3, commands
    for command in commands:
        answer = run_curl(command, str(tmp_path), {"http://127.0.0.1:8000": server})
        assert {"class_index", "label", "confidence", "exit", "cost_fraction"} <= set(answer), (command, answer)


def test_plan_command_calibrates_this_machine(model_dir, tmp_path):
    """`ray-plan --calibrate` in a process of its own (it starts a private Ray): measurements, reasons, a plan."""
    import subprocess
    import sys

    out = tmp_path / "plan.yaml"
    proc = subprocess.run([sys.executable, "-m", "branched.cli", "ray-plan", model_dir, "--cpus", "2", "--calibrate",
                           "--max-batch-size", "4", "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "a hop costs" in proc.stdout and "chosen:" in proc.stdout and "frees" in proc.stdout, proc.stdout
    cfg = yaml.safe_load(out.read_text())
    ServeDeploySchema.model_validate(cfg)
    staged = cfg["applications"][0]
    cal = staged["args"]["plan"]["calibration"]
    assert cal["call_s"] > 0 and cal["batch_size"] == 4 and len(cal["step_seconds"]) == STAGES
    assert sorted(int(b) for b in cal["step_seconds"][0]) == [1, 2, 4]
    g = Grouping.parse(staged["args"]["grouping"], STAGES)
    assert [d["name"] for d in staged["deployments"]] == ["Ingress", *g.names]
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED=1" in out.read_text().splitlines()[1]

"""The staged app past one machine, and Ray kept private on one.

A real two-node Ray cluster on this machine (a head and a worker, each started with ``ray start`` on its own
loopback address, with its own object store and custom resource; :class:`loadtests.cluster.LocalCluster`)
serves the staged app from a config ``branched ray-plan`` writes, with stage 1 pinned to the worker and
stages 0 and 2 to the head, so every sample that does not exit at 0 crosses the object store twice. Answers,
exits and costs must equal the core's (``Predictor``), and ``serve deploy`` of a changed ``user_config``
must reconfigure the replicas on both nodes without restarting them. ``ray-plan`` must refuse a plan the
cluster cannot place. A local run (``python -m ray_app.server`` and the README's ``serve run``) must listen
on loopback only, and must start fresh beside a ``ray_current_cluster`` file left by a killed head.
"""
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import yaml

from branched.build.datasets import load_split
from branched.cli import main as cli_main
from branched.serving import Predictor
from loadtests.cluster import LocalCluster, node_processes
from loadtests.launchers import RayServe, free_ports
from loadtests.procs import session_processes
from ray_app.placement import demand_totals, place_deployments, unplaceable

from helpers import README, free_port, save_mnist_model, wait_for

N_IMAGES = 24
PINS = "Ingress=node_a,Stage0=node_a,Stage1=node_b,Stage2=node_a"
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
#: The README's one-machine command (tests/test_ray_cluster.py runs it; the README must keep it).
SERVE_RUN = "serve run --address local ray_app/config.yaml"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """cifar_resnet20 at 16 px, 2 untrained exits, thresholds that spread the first 24 test digits over 3 exits."""
    return save_mnist_model(str(tmp_path_factory.mktemp("cluster_model")), 16)


@pytest.fixture(scope="module")
def images():
    data = load_split("mnist5k", "test")
    return [data.image_bytes(i) for i in range(N_IMAGES)]


def plan(model_dir: str, out: str, *extra: str) -> int:
    """``branched ray-plan`` for the staged app (exit rates given, so nothing is evaluated)."""
    return cli_main(["ray-plan", model_dir, "--apps", "staged", "--exit-rates", "0.5,0.3,0.2", "--out", out, *extra])


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    """Head ``a`` (127.0.0.2) and worker ``b`` (127.0.0.3), 2 logical CPUs each; the staged app deployed with
    ``serve deploy`` from ray-plan's config, Stage1 pinned to the worker. Yields ``(cluster, url, plan path)``.
    This process gets the cluster's token (as a user's shell would), so ray-plan can ask the cluster."""
    work = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(workers=1, cpus=2, workdir=str(work / "nodes"))
    saved = os.environ.get("RAY_AUTH_TOKEN_PATH")
    os.environ["RAY_AUTH_TOKEN_PATH"] = c.token_path
    try:
        c.start()
        port = free_port()
        path = str(work / "plan.yaml")
        assert plan(model_dir, path, "--cpus", "2", "--ingress-cpus", "0.5", "--max-batch-size", "8",
                    "--host", c.head.ip, "--port", str(port), "--proxy-location", "HeadOnly", "--pin", PINS,
                    "--address", c.dashboard_url) == 0
        c.deploy(path)
        yield c, f"http://{c.head.ip}:{port}", path
    finally:
        c.stop()
        if saved is None:
            os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        else:
            os.environ["RAY_AUTH_TOKEN_PATH"] = saved


def same(answer: dict, expected: dict) -> bool:
    return (answer["exit"], answer["class_index"]) == (expected["exit"], expected["class_index"]) and \
        abs(answer["confidence"] - expected["confidence"]) < 1e-4 and \
        abs(answer["cost_fraction"] - expected["cost_fraction"]) < 1e-6


def post_all(url: str, images: list[bytes], params=None) -> list[dict]:
    with ThreadPoolExecutor(len(images)) as pool:
        responses = list(pool.map(lambda b: requests.post(f"{url}/predict", data=b, params=params, timeout=120),
                                  images))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


def test_free_ports_are_distinct_and_skip_the_excluded():
    # A node's `ray start` takes seven ports at once; one port given twice stops it ("used by other components").
    taken = set(free_ports(2))
    ports = free_ports(50, exclude=taken)
    assert len(set(ports)) == 50 and not taken & set(ports)


@pytest.mark.server
def test_stages_on_two_nodes_answer_as_the_core(cluster, model_dir, images):
    c, url, _ = cluster
    where = {d: [r["node"] for r in reps] for d, reps in c.placement().items()}
    assert where == {"Ingress": ["a"], "Stage0": ["a"], "Stage1": ["b"], "Stage2": ["a"]}
    assert c.alive_nodes() == ["a", "b"]
    predictor = Predictor(model_dir)
    expected = [predictor.answer_batch([(b, {})])[0] for b in images]
    assert {e["exit"] for e in expected} == {0, 1, 2}, "the thresholds should spread the images over all exits"
    answers = post_all(url, images)
    wrong = [(i, a, e) for i, (a, e) in enumerate(zip(answers, expected)) if not same(a, e)]
    assert not wrong, wrong
    # samples past exit 0 went head -> worker (Stage1) and, past exit 1, back to the head (Stage2)
    assert sum(a["exit"] >= 1 for a in answers) >= 4 and sum(a["exit"] == 2 for a in answers) >= 2


@pytest.mark.server
def test_serve_deploy_of_a_changed_user_config_reconfigures_both_nodes_live(cluster, model_dir, images, tmp_path):
    c, url, path = cluster
    before = {d: [r["actor_id"] for r in reps] for d, reps in c.placement().items()}
    with open(path) as f:
        doc = yaml.safe_load(f)
    changed = copy.deepcopy(doc)
    deployments = {d["name"]: d for d in changed["applications"][0]["deployments"]}
    deployments["Ingress"]["user_config"] = {"thresholds": "inf,0"}  # everything leaves at exit 1, on the worker
    deployments["Stage1"]["user_config"] = {"max_batch_size": 2}
    changed_path, restore_path = str(tmp_path / "changed.yaml"), str(tmp_path / "restore.yaml")
    with open(changed_path, "w") as f:
        yaml.safe_dump(changed, f, sort_keys=False)
    # Leaving user_config out of a later deploy keeps the last one: going back takes {} (the calibrated thresholds).
    deployments["Ingress"]["user_config"], deployments["Stage1"]["user_config"] = {}, {"max_batch_size": 8}
    with open(restore_path, "w") as f:
        yaml.safe_dump(changed, f, sort_keys=False)
    try:
        c.deploy(changed_path)
        assert requests.get(f"{url}/thresholds", timeout=30).json() == {"thresholds": ["inf", 0.0]}
        predictor = Predictor(model_dir)
        answers = post_all(url, images[:8])
        assert [a["exit"] for a in answers] == [1] * 8
        for a, b in zip(answers, images[:8]):
            assert same(a, predictor.answer_batch([(b, {"thresholds": "inf,0"})])[0])
        assert requests.post(f"{url}/predict", data=images[0], params={"threshold": "0"}, timeout=60).json()["exit"] == 0
        after = {d: [r["actor_id"] for r in reps] for d, reps in c.placement().items()}
        assert after == before, "a user_config change must reconfigure the replicas, not restart them"
    finally:
        c.deploy(restore_path)
    assert requests.get(f"{url}/thresholds", timeout=30).json()["thresholds"] != ["inf", 0.0]


@pytest.mark.server
def test_ray_plan_refuses_a_plan_the_cluster_cannot_place(cluster, model_dir, tmp_path, capsys):
    c, _, _ = cluster
    out = str(tmp_path / "p.yaml")
    assert plan(model_dir, out, "--cpus", "2", "--address", c.dashboard_url) == 0
    assert "fits the cluster" in capsys.readouterr().out and os.path.isfile(out)
    both = ["ray-plan", model_dir, "--cpus", "4", "--exit-rates", "0.5,0.3,0.2", "--out", str(tmp_path / "both.yaml"),
            "--address", c.dashboard_url]
    assert cli_main(both) == 2
    err = capsys.readouterr().err
    assert "cannot place" in err and "--apps staged" in err and "--cpus 2" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "both.yaml")
    assert plan(model_dir, out, "--cpus", "2", "--pin", "Stage1=node_z", "--address", c.dashboard_url) == 2
    assert "node_z" in capsys.readouterr().err


def test_ray_plan_prints_totals_and_warns_without_a_cluster(model_dir, tmp_path, capsys):
    out = str(tmp_path / "p.yaml")
    nobody = f"http://127.0.0.1:{free_port()}"
    argv = ["ray-plan", model_dir, "--cpus", "2", "--exit-rates", "0.5,0.3,0.2", "--out", out, "--address", nobody]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    # the ingress's CPU + the stages' fractions (rounded down to 0.01) + the baseline's two 1-CPU replicas
    total, staged, baseline = map(float, re.search(r"plan asks for ([\d.]+) CPUs, 0 GPUs in all: staged ([\d.]+) CPUs, "
                                                   r"baseline ([\d.]+) CPUs", text).groups())
    assert staged == pytest.approx(2, abs=0.05) and baseline == 2 and total == pytest.approx(staged + baseline)
    assert f"no Ray cluster answered at {nobody}" in text
    assert re.search(r"warning: both apps together ask for [\d.]+ CPUs, more than --cpus 2: .*--apps staged.*--cpus 1",
                     text)
    assert cli_main([*argv[:-2], "--address", nobody, "--apps", "staged", "--pin", "Stage1=node_b",
                     "--prefer", "Stage2=branched-node=b", "--proxy-location", "HeadOnly"]) == 0
    assert "warning" not in capsys.readouterr().out
    doc = yaml.safe_load(open(out))
    options = {d["name"]: d["ray_actor_options"] for d in doc["applications"][0]["deployments"]}
    assert doc["proxy_location"] == "HeadOnly" and options["Stage1"]["resources"] == {"node_b": 0.01}
    assert options["Stage2"]["label_selector"] == {"branched-node": "b"}
    assert options["Stage2"]["fallback_strategy"] == [{"label_selector": {"branched-node": "!b"}}]
    assert cli_main([*argv, "--pin", "Stage7=node_b"]) == 2 and "no deployment 'Stage7'" in capsys.readouterr().err


def test_a_plan_is_placed_replica_by_replica_on_nodes():
    doc = {"applications": [
        {"name": "staged", "deployments": [
            {"name": "Ingress", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}},
            {"name": "Stage0", "num_replicas": 2, "ray_actor_options": {"num_cpus": 1.5, "num_gpus": 0.5}},
            {"name": "Stage1", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5, "resources": {"node_b": 0.01}}}]},
        {"name": "baseline", "deployments": [{"name": "Baseline", "num_replicas": 2, "ray_actor_options": {}}]}]}
    assert demand_totals(doc) == {"staged": {"CPU": 4.5, "GPU": 1.0, "node_b": 0.01}, "baseline": {"CPU": 2.0}}
    a, b = {"CPU": 4, "GPU": 1, "node_a": 1}, {"CPU": 4, "GPU": 1, "node_b": 1}
    assert unplaceable(doc, [a, b]) == []
    assert unplaceable(doc, [a, {"CPU": 4, "GPU": 1}]) == ["staged/Stage1 {CPU: 0.5, node_b: 0.01}"]
    # 6.5 CPUs fit 8 in sum, but each Stage0 replica needs 1.5 CPUs and half a GPU on one node
    assert unplaceable(doc, [{"CPU": 2, "GPU": 1}, {"CPU": 6, "node_b": 1}]) == ["staged/Stage0 {CPU: 1.5, GPU: 0.5}"]
    assert len(unplaceable(doc, [{"CPU": 2, "GPU": 1, "node_b": 1}])) == 4  # one Stage0 and Stage1 fit
    place_deployments(doc, {"Stage0": "node_a"}, {"Stage1": ("zone", "b")}, "HeadOnly")
    assert doc["applications"][0]["deployments"][1]["ray_actor_options"]["resources"] == {"node_a": 0.01}
    assert doc["proxy_location"] == "HeadOnly"
    with pytest.raises(ValueError, match="no deployment 'Stage9'"):
        place_deployments(doc, {"Stage9": "node_a"})


# ------------------------------------------------------------------------------------- one machine, private
def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """``(address, port, process name)`` of every listening TCP socket of ``pids``."""
    found = []
    for conn in psutil.net_connections("inet"):
        if conn.status == psutil.CONN_LISTEN and conn.pid in pids:
            try:
                found.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
            except psutil.Error:
                continue
    return found


@pytest.fixture
def stale_tmpdir():
    """A Ray temp root (``RAY_TMPDIR``) whose ``ray/ray_current_cluster`` names a head that is gone, as a killed
    head leaves it. Short, under /tmp: Ray's unix sockets live below it (107 bytes at most)."""
    root = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    os.makedirs(os.path.join(root, "ray"))
    with open(os.path.join(root, "ray", "ray_current_cluster"), "w") as f:
        f.write(f"127.0.0.1:{free_port()}")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def tree(pgid: int) -> set[int]:
    return {p.pid for p in node_processes(pgid)} | {p.pid for p in session_processes(pgid)}


@pytest.mark.server
def test_the_local_server_listens_on_loopback_only_and_ignores_a_stale_cluster(model_dir, tmp_path, monkeypatch,
                                                                                 stale_tmpdir):
    monkeypatch.setenv("RAY_TMPDIR", stale_tmpdir)
    with RayServe(model_dir, log_path=str(tmp_path / "server.log")) as rs:  # starts despite the stale file
        sockets = listening(tree(rs.proc.pid))
    names = {name for _, _, name in sockets}
    assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in n for n in names), sockets
    assert not [s for s in sockets if s[0] not in LOOPBACK], f"listening beyond loopback: {sockets}"


@pytest.mark.server
def test_the_readmes_serve_run_is_private_and_ignores_a_stale_cluster(model_dir, tmp_path, stale_tmpdir):
    readme = open(README).read()
    assert SERVE_RUN in readme and "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0" in readme
    with open("ray_app/config.yaml") as f:
        config = f.read().replace("models/demo", model_dir)
    port = free_port()
    config = config.replace("port: 8000", f"port: {port}")
    (tmp_path / "ray_app").mkdir()
    (tmp_path / "ray_app" / "config.yaml").write_text(config)
    env = {**os.environ, "RAY_TMPDIR": stale_tmpdir, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(["bash", "-c", "exec " + SERVE_RUN], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # both apps answer (a body that is no image gets their 400) or serve run has stopped
        up = wait_for(lambda: proc.poll() is not None or all(
            requests.post(f"http://127.0.0.1:{port}{path}", data=b"x", timeout=5).status_code == 400
            for path in ("/predict", "/baseline/predict")), timeout=400, poll=2)
        assert up and proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        sockets = listening(tree(proc.pid))
    finally:
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C stops serve run's Ray, as the README says
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for p in node_processes(proc.pid) + session_processes(proc.pid):
            try:
                p.kill()
            except psutil.Error:
                pass
    names = {n for _, _, n in sockets}
    assert {"gcs_server", "raylet"} <= names and any("ServeReplica" in n for n in names), sockets
    assert not [s for s in sockets if s[0] not in LOOPBACK], f"listening beyond loopback: {sockets}"

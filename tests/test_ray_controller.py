"""The load controller at the Ray Serve ingress (ray_app/control.py).

Without a server: what a front end that sees no batches reports (``observe_work``) moves the controller down
under overload and back, and the Ingress's ``user_config`` refuses what it cannot honour. On a real local Ray
(about 2 minutes, ``server`` marker): a burst moves the point down and back, requests with their own
thresholds keep them, the point is exported as Ray metrics, and ``user_config`` retunes or turns the
controller off on the live replicas.
"""
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from branched.artifact import load_config
from branched.controller import ControllerError, ControllerSettings, OperatingPointController

from helpers import free_port, png, save_ladder_model, wait_for

SLO_MS = 400.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_front_end_reports_move_down_under_overload_and_back(tmp_path):
    """A pipeline whose bottleneck spends 2 ms + 8 ms x cost per request (capacity 100/s at the calibrated
    point, 227/s at the floor), reported every 0.5 s as answers and busy time, with arrivals counted."""
    config = load_config(save_ladder_model(str(tmp_path / "m")))
    clock = Clock()
    c = OperatingPointController(config, ControllerSettings(slo_p95_ms=300, max_drop=0.05, batch_size=8,
                                                            batch_delay_ms=10), clock=clock)
    backlog, seen = 0.0, []
    for rate, seconds in ((50.0, 20), (160.0, 20), (50.0, 30)):
        for _ in range(int(seconds / 0.5)):
            tau = 0.002 + 0.008 * c.current.cost_fraction
            arrived = rate * 0.5
            done = min(backlog + arrived, 0.5 / tau)
            backlog += arrived - done
            for k in range(int(arrived)):  # one at a time, spread over the interval, as an ingress counts them
                c.observe_arrivals(1, clock.t + (k + 0.5) * 0.5 / arrived)
            clock.t += 0.5
            c.observe_work(int(done), done * tau, c.current.cost_fraction)
            seen.append((rate, c.update().index))
    assert c.overhead == 0.0  # nothing taken for a per-batch gap
    low, high, back = seen[:40], seen[40:80], seen[80:]
    assert {i for _, i in low} == {0}
    assert high[-1][1] == 2 and max(i for _, i in high[:4]) >= 1  # the floor: only it holds 160/s
    assert back[-1][1] == 0 and c.moves["up"] >= 1
    assert c.state()["arrival_rate"] == pytest.approx(50.0, rel=0.1)


def test_ingress_user_config_is_checked_with_the_fix(tmp_path):
    from ray_app.control import IngressControl

    config = load_config(save_ladder_model(str(tmp_path / "m")))
    control = IngressControl(config, {"slo_p95_ms": SLO_MS, "max_drop": 0.05}, 8, 10.0, None)
    assert control.state()["on"] and control.default().tolist() == [float("inf")] * 2
    with pytest.raises(ValueError, match="drop thresholds/threshold/budget, or turn the controller off"):
        control.reconfigure({"threshold": 0.5})
    with pytest.raises(ValueError, match="known: thresholds, threshold, budget, slo_p95_ms"):
        control.reconfigure({"slo": 100})
    with pytest.raises(ControllerError, match="use max_drop >= 0.0100"):
        control.reconfigure({"max_drop": 0.005})
    assert control.state()["settings"]["max_drop"] == 0.05  # a refused change keeps the running controller
    assert control.reconfigure({"slo_p95_ms": None, "threshold": 0.5}).tolist() == [0.5, 0.5]
    assert control.default() is None and not control.state()["on"]
    with pytest.raises(ControllerError, match="give slo_p95_ms too"):
        IngressControl(config, None, 8, 10.0, None).reconfigure({"max_drop": 0.05})
    assert control.reconfigure({}) is None and control.state()["settings"]["slo_p95_ms"] == SLO_MS


# -- a real local Ray ----------------------------------------------------------------------------------------

def _config(model_dir: str, user_config=None) -> dict:
    app = {"name": "staged", "route_prefix": "/", "import_path": "ray_app.app:staged_app",
           "args": {"model_dir": model_dir, "max_batch_size": 8, "batch_wait_timeout_s": 0.01, "num_cpus": 1.0,
                    "slo_p95_ms": SLO_MS, "max_drop": 0.05, "controller": {"hold_s": 2.0}},
           "deployments": [{"name": "Ingress", "user_config": user_config or {}}]}
    return {"applications": [app]}


def _deploy(cfg: dict, timeout_s: float = 240) -> None:
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get("staged")
        if app is not None and app.status == "RUNNING":
            return
        assert app is None or app.status != "DEPLOY_FAILED", app.message
        time.sleep(0.5)
    raise TimeoutError(f"staged app not running after {timeout_s}s: {serve.status().applications}")


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import ray
        from ray import serve
    model_dir = save_ladder_model(str(tmp_path_factory.mktemp("rayctl") / "m"))
    port, metrics_port = free_port(), free_port()
    ray.init(address="local", num_cpus=4, object_store_memory=80 * 1024 ** 2, include_dashboard=False,
             log_to_driver=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        _deploy(_config(model_dir))
        yield {"url": f"http://127.0.0.1:{port}", "metrics": f"http://127.0.0.1:{metrics_port}/metrics",
               "model_dir": model_dir}
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(url: str, i: int, own: bool = False, headers=None) -> int:
    h = {"Content-Type": "image/png", **({"thresholds": "inf,inf"} if own else {}), **(headers or {})}
    r = requests.post(f"{url}/predict", data=png(i % 8), headers=h, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["exit"]


def _state(url: str) -> dict:
    return requests.get(f"{url}/controller", timeout=30).json()


@pytest.mark.server
def test_ray_burst_moves_the_point_down_and_back_and_own_thresholds_win(ray_server):
    url = ray_server["url"]
    state = _state(url)
    assert state["on"] and state["index"] == 0 and state["points"] == 3 and state["settings"]["slo_p95_ms"] == SLO_MS
    assert [_ask(url, i) for i in range(6)] == [2] * 6  # the calibrated point is the backbone

    stop, answers = time.monotonic() + 12.0, []

    def client(c: int) -> None:
        i = 0
        while time.monotonic() < stop:
            answers.append((c % 3 == 0, _ask(url, c + i, own=c % 3 == 0)))
            i += 1

    with ThreadPoolExecutor(48) as pool:
        list(pool.map(client, range(48)))
    own = [e for o, e in answers if o]
    default = [e for o, e in answers if not o]
    assert own and set(own) == {2}, "a request's own thresholds must win over the controller"
    assert min(default) < 2, f"a burst of 48 clients should move the point down: {sorted(set(default))}"
    assert _state(url)["moves_down"] >= 1

    def back() -> bool:  # a trickle: one request at a time
        _ask(url, 0)
        return _state(url)["index"] == 0

    assert wait_for(back, timeout=60, poll=0.2), _state(url)
    assert _state(url)["moves_up"] >= 1 and _ask(url, 1) == 2

    def exported():
        text = requests.get(ray_server["metrics"], timeout=10).text
        return text if "ray_branched_operating_point" in text and 'direction="down"' in text else None

    text = wait_for(exported, timeout=60, poll=2.0)
    assert text is not None, "the controller's metrics should reach Ray's metrics endpoint"
    assert "ray_branched_operating_cost" in text and "ray_branched_point_moves" in text


@pytest.mark.server
def test_ray_user_config_retunes_and_turns_off_the_live_controller(ray_server):
    from ray import serve

    url, model_dir = ray_server["url"], ray_server["model_dir"]
    replicas = serve.get_deployment_handle("Stage0", app_name="staged").stats.remote().result()["replica"]
    _deploy(_config(model_dir, {"slo_p95_ms": 5000, "controller": {"hold_s": 1.0}}))
    state = _state(url)
    assert state["on"] and state["settings"]["slo_p95_ms"] == 5000 and state["settings"]["hold_s"] == 1.0
    assert state["settings"]["max_drop"] == 0.05  # the app args' value where user_config names none
    _deploy(_config(model_dir, {"slo_p95_ms": None, "threshold": 0}))
    assert _state(url)["on"] is False and _ask(url, 3) == 0  # off: the app-wide thresholds are the default
    assert _ask(url, 3, own=True) == 2
    _deploy(_config(model_dir, {}))
    assert _state(url)["settings"]["slo_p95_ms"] == SLO_MS and _ask(url, 4) == 2
    stage0 = serve.get_deployment_handle("Stage0", app_name="staged").stats.remote().result()
    assert stage0["replica"] == replicas, "a user_config change must not restart the stages"
    assert stage0["busy_s"] > 0 and stage0["next"] == "Stage1"

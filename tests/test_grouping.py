"""Stage grouping without a server: runs of stages answer as the core's routed forward does, and the
planner's choice of grouping on fixed measurements.

The Ray Serve app hands samples from process to process exactly as :func:`chain` does here (the
survivors' features, threshold rows and FLOPs so far, moved to the CPU between runs); the server
tests in ``test_ray_serve.py`` hold the deployed app to the same answers.
"""
import functools

import pytest
import torch
import yaml

from branched.artifact import load_model, save_model
from branched.serving import Predictor
from branched.stages import run_stages
from ray_app.costmodel import Calibration, boundaries, choose_grouping, describe, grouping_cost
from ray_app.grouping import Grouping
from ray_app.planner import plan_groups, reach_probabilities, serve_config

from helpers import make_model, median_thresholds, png

STAGES = 4  # three exits + the backbone head
N = 24


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = make_model("cifar_resnet20", 32, n_exits=STAGES - 1)
    d = str(tmp_path_factory.mktemp("grouped"))
    save_model(model, d)
    pre = Predictor(d).preprocessor
    x = torch.stack([pre.from_bytes(png(i)) for i in range(N)])
    model.config.thresholds = median_thresholds(model, x)
    save_model(model, d)
    return d


@pytest.fixture(scope="module")
def batch(model_dir):
    """A batch of prepared requests (some with their own thresholds) and each one's answer alone, from the core."""
    predictor = Predictor(model_dir)
    own = {0: {"thresholds": "inf,0,inf"}, 1: {"thresholds": "inf,inf,inf"}}  # exit 1; the backbone head
    prepared = [predictor.prepare(png(i), own.get(i % 6, {})) for i in range(N)]
    expected = [predictor.predict([p])[0] for p in prepared]  # one at a time: the TorchServe handler's path
    assert {e["exit"] for e in expected} == set(range(STAGES)), "the batch should spread over every exit"
    return torch.stack([p.image for p in prepared]), torch.stack([p.thresholds for p in prepared]), expected


@functools.lru_cache(maxsize=None)
def replica(model_dir: str, run: tuple[int, ...]):
    """A model cut down to ``run``, as the replica hosting it holds it."""
    return load_model(model_dir).keep_stages(run).optimize_for_inference()


def chain(model_dir: str, grouping: Grouping, x: torch.Tensor, thresholds: torch.Tensor) -> list[dict]:
    """What the staged app does with one batch: each run of stages in its own model copy, survivors handed on."""
    answers: list = [None] * len(x)
    positions = torch.arange(len(x))
    features, rows, flops = x, thresholds, None
    for run in (grouping.ingress, *grouping.groups):
        if not run or not len(positions):
            continue
        out = run_stages(replica(model_dir, run), run, features, rows, flops)
        for i, a in zip(positions.tolist(), out.answers):
            if a is not None:
                answers[i] = a
        positions = positions[out.survivors]
        features, rows, flops = out.features.cpu(), out.thresholds.cpu(), out.flops.cpu()
    return answers


@pytest.mark.parametrize("grouping", [str(g) for g in Grouping.all(STAGES)])
def test_every_grouping_answers_as_the_core(model_dir, batch, grouping):
    x, rows, expected = batch
    got = chain(model_dir, Grouping.parse(grouping, STAGES), x, rows)
    for a, e in zip(got, expected):
        assert (a["exit"], a["class_index"], a["label"]) == (e["exit"], e["class_index"], e["label"])
        for key in ("confidence", "cost_fraction", "exit_score"):
            assert a[key] == pytest.approx(e[key], rel=1e-4, abs=1e-5), key


def test_run_stages_counts_and_hands_on_survivors(model_dir):
    model = load_model(model_dir).keep_stages([1, 2]).optimize_for_inference()
    full = load_model(model_dir).optimize_for_inference()
    x = torch.stack([Predictor(model_dir).preprocessor.from_bytes(png(i)) for i in range(8)])
    rows = torch.zeros(8, STAGES - 1)
    rows[:, 0] = float("inf")  # nobody leaves at exit 0: all reach stage 1
    rows[:4, 1] = float("inf")  # the first four go past exit 1
    rows[:, 2] = float("inf")
    first = run_stages(full, [0], x, rows)
    assert first.counts == [(8, 0)] and first.survivors.tolist() == list(range(8))
    out = run_stages(model, [1, 2], first.features, first.thresholds, first.flops)
    assert out.counts == [(8, 4), (4, 0)]
    assert out.survivors.tolist() == [0, 1, 2, 3] and len(out.features) == 4
    assert [a is None for a in out.answers] == [True] * 4 + [False] * 4
    assert all(a["exit"] == 1 for a in out.answers[4:])
    with pytest.raises(ValueError, match="consecutive stages"):
        run_stages(model, [1, 3], first.features, first.thresholds)
    with pytest.raises(ValueError, match="one threshold row per sample"):
        run_stages(model, [1], first.features, first.thresholds[:3])


def test_grouping_text_names_and_enumeration():
    assert len(list(Grouping.all(STAGES))) == 2 ** STAGES
    assert len(list(Grouping.all(STAGES, ingress_may_host=False))) == 2 ** (STAGES - 1)
    g = Grouping.parse("0|1,2|3", STAGES)
    assert (g.ingress, g.groups, g.names, g.cuts) == ((0,), ((1, 2), (3,)), ["Stage1-2", "Stage3"], (1, 3))
    assert str(Grouping.parse("per-stage", STAGES)) == "|0|1|2|3" and str(Grouping.parse("ingress", STAGES)) == "0,1,2,3"
    assert Grouping.parse([[], [0, 1], [2, 3]], STAGES) == Grouping.from_cuts(STAGES, {0, 2})
    for bad in ("0|2,1|3", "0||1,2,3", "0,1", "a|b", "0|1|2|3|4"):
        with pytest.raises(ValueError, match="once each, in order"):
            Grouping.parse(bad, STAGES)


def calibration(batch_time: list[dict[int, float]], call_ms: float, sample_ms: float = 0.0) -> Calibration:
    return Calibration(8, batch_time, [3072, 4096, 4096, 2048], call_ms / 1e3, sample_ms / 1e3, 1e-10)


REACH = reach_probabilities([0.6, 0.2, 0.1, 0.1])
#: a CPU: the time of a batch grows with the samples in it (ms per sample about the same at any size)
CPU = [{1: 1e-3, 8: 7.5e-3}, {1: 1e-3, 8: 7.5e-3}, {1: 1e-3, 8: 7.5e-3}, {1: 1e-3, 8: 7.5e-3}]
#: a GPU: a batch takes about as long as one sample
GPU = [{1: 2e-3, 8: 2.2e-3}, {1: 2e-3, 8: 2.2e-3}, {1: 2e-3, 8: 2.2e-3}, {1: 2e-3, 8: 2.2e-3}]


def test_planner_keeps_stages_together_where_the_hop_costs_more_than_it_frees():
    best, costs = choose_grouping(REACH, calibration(CPU, call_ms=3.0))
    assert str(best.grouping) == "0,1,2,3", "on a CPU nothing is freed: every stage in the Ingress, no hop"
    assert [round(c.total, 12) for c in costs] == sorted(round(c.total, 12) for c in costs)
    lines = describe(best, costs, REACH, calibration(CPU, call_ms=3.0))
    assert sum("-> kept together" in line for line in lines) == STAGES


def test_planner_splits_where_small_batches_waste_more_than_a_hop():
    best, _ = choose_grouping(REACH, calibration(GPU, call_ms=0.05))
    assert str(best.grouping) == "0|1|2|3", "cheap hops, batch-bound stages: each later stage gets full batches"
    best, _ = choose_grouping(REACH, calibration(GPU, call_ms=0.05), ingress_may_host=False)
    assert str(best.grouping) == "|0|1|2|3"
    # an expensive hop: splitting off the rarely reached stages frees less than the hop costs
    cal = calibration(GPU, call_ms=2.0)
    best, _ = choose_grouping(REACH, cal)
    split = grouping_cost(Grouping.parse("0|1|2|3", STAGES), REACH, cal)
    assert best.total < split.total and len(best.grouping.groups) < 3
    for b in boundaries(best, REACH, cal):
        assert b["split"] == (b["freed_s"] > b["hop_s"]), b  # split exactly where it frees more than the hop costs


def test_later_deployments_get_full_batches_only_if_the_wait_collects_them():
    """The same batch-bound stages and cheap hops: with a batch wait shorter than an upstream batch, a later
    deployment gets the survivors of one upstream call, no fuller than in the Ingress, so splitting frees
    nothing and every stage stays in the Ingress; a wait that spans many upstream batches fills them again."""
    short = calibration(GPU, call_ms=0.05)
    short.batch_wait_s = 0.0005  # the Ingress's batch takes 2.2 ms
    best, _ = choose_grouping(REACH, short)
    assert str(best.grouping) == "0,1,2,3"
    split = grouping_cost(Grouping.parse("0|1|2|3", STAGES), REACH, short)
    together = grouping_cost(Grouping.parse("0,1,2,3", STAGES), REACH, short)
    assert sum(split.compute) == pytest.approx(sum(together.compute))  # the same batches, so the same compute
    long = calibration(GPU, call_ms=0.05)
    long.batch_wait_s = 1.0
    assert str(choose_grouping(REACH, long)[0].grouping) == "0|1|2|3"
    again = Calibration.from_dict(yaml.safe_load(yaml.safe_dump(short.to_dict())))
    assert again.batch_wait_s == 0.0005


def test_grouping_cost_arithmetic():
    cal = calibration(CPU, call_ms=4.0, sample_ms=0.1)
    c = grouping_cost(Grouping.parse("0|1,2,3", STAGES), REACH, cal)
    b = 8
    per = [cal.per_sample(k, max(1.0, b * REACH[k] / REACH[1 if k else 0])) for k in range(STAGES)]
    assert c.compute[0] == pytest.approx(per[0])
    assert c.compute[1] == pytest.approx(sum(REACH[k] * per[k] for k in (1, 2, 3)))
    assert c.hops == pytest.approx([REACH[0] / b * 4e-3 + REACH[1] * (1e-4 + 4096 * 1e-10)])
    assert cal.per_sample(0, 4) == pytest.approx((1e-3 + (7.5e-3 - 1e-3) * 3 / 7) / 4)
    again = Calibration.from_dict(yaml.safe_load(yaml.safe_dump(cal.to_dict())))
    assert again.per_sample(2, 5) == cal.per_sample(2, 5)


def test_plan_for_a_grouping_writes_a_deployable_config(model_dir):
    from ray.serve.schema import ServeDeploySchema

    rates = [0.6, 0.2, 0.1, 0.1]
    flops = [10, 10, 10, 10]
    for text, budget in (("0|1,2|3", {"cpus": 6}), ("|0|1,2,3", {"gpus": 2}), ("0,1,2,3", {"cpus": 1})):
        g = Grouping.parse(text, STAGES)
        plans = plan_groups(g, flops, rates, **budget)
        doc = serve_config(model_dir, plans, record={"note": "x"})
        ServeDeploySchema.model_validate(doc)
        staged = doc["applications"][0]
        assert staged["args"]["grouping"] == text and staged["args"]["plan"] == {"note": "x"}
        assert [d["name"] for d in staged["deployments"]] == ["Ingress", *g.names]
        if "gpus" in budget:
            assert sum(d["num_replicas"] * d["ray_actor_options"].get("num_gpus", 0)
                       for d in staged["deployments"]) <= 2
        else:
            assert sum(d["num_replicas"] * d["ray_actor_options"]["num_cpus"]
                       for d in staged["deployments"]) <= budget["cpus"] + 1e-9
    with pytest.raises(ValueError, match="cannot host stages"):
        plan_groups(Grouping.parse("0|1,2,3", STAGES), flops, rates, gpus=2)


def test_plan_command_chooses_from_a_saved_calibration(model_dir, tmp_path, capsys):
    from branched.cli import main as cli_main

    saved = tmp_path / "measured.yaml"
    rates = "0.6,0.2,0.1,0.1"
    for batch_time, call_ms in ((CPU, 3.0), (GPU, 0.05)):
        cal = calibration(batch_time, call_ms)
        saved.write_text(yaml.safe_dump({"calibration": cal.to_dict()}))
        out = tmp_path / "plan.yaml"
        assert cli_main(["ray-plan", model_dir, "--cpus", "4", "--exit-rates", rates, "--calibration", str(saved),
                         "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        best, _ = choose_grouping(REACH, cal)
        staged = yaml.safe_load(out.read_text())["applications"][0]
        assert staged["args"]["grouping"] == str(best.grouping) and f"chosen: {best.grouping}" in printed
        assert "frees" in printed and "the hop costs" in printed
        assert Calibration.from_dict(staged["args"]["plan"]["calibration"]).per_sample(1, 3) == cal.per_sample(1, 3)
        # the written plan's calibration can be planned from again
        assert cli_main(["ray-plan", model_dir, "--cpus", "4", "--exit-rates", rates, "--calibration", str(out)]) == 0
        assert f"chosen: {best.grouping}" in capsys.readouterr().err
    assert cli_main(["ray-plan", model_dir, "--cpus", "4", "--exit-rates", rates, "--grouping", "0|2,1,3"]) == 2
    assert "once each, in order" in capsys.readouterr().err

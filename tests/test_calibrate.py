"""Calibration: routing from records, budgets on synthetic scores, and the guarantee's bookkeeping."""
import math

import numpy as np
import pytest
import torch

from branched.backbones import build_backbone
from branched.build.calibrate import calibrate, threshold_path
from branched.build.records import ExitRecords, collect_records
from branched.build.guarantee import (binomial_cdf, binomial_upper_bound, crc_last_valid, ltt_certify, p_value,
                                      samples_needed)
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel
from branched.routing import thresholds_for_budget

COSTS = np.array([0.3, 0.6, 1.05])  # leaving at side exit 0, side exit 1, the backbone head


def synthetic(n: int, seed: int) -> ExitRecords:
    """Two side exits whose score predicts whether they are right; the backbone is right 95% of the time.

    A sample's difficulty ``u`` drives everything: side exits are right when ``u`` is small enough and
    score higher for smaller ``u``, so thresholds trade cost for accuracy as on a real model.
    """
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    labels = rng.integers(0, 10, n)
    wrong = lambda y: (y + 1 + rng.integers(0, 9, n)) % 10  # noqa: E731 - a class other than y
    right0 = rng.random(n) > np.clip(u * 1.2 - 0.1, 0, 1)
    right1 = rng.random(n) > np.clip(u * 0.6 - 0.1, 0, 1)
    right2 = rng.random(n) < 0.95
    preds = np.stack([np.where(r, labels, wrong(labels)) for r in (right0, right1, right2)], 1)
    scores = np.stack([np.clip(1 - u + rng.normal(0, 0.1, n), 0, 1), np.clip(1 - 0.7 * u + rng.normal(0, 0.1, n), 0, 1)], 1)
    return ExitRecords(scores, preds, np.tile(COSTS, (n, 1)), labels)


def test_binomial_cdf_matches_the_direct_sum():
    for k, n, p in [(0, 10, 0.1), (3, 50, 0.05), (12, 200, 0.07), (49, 50, 0.9)]:
        direct = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
        assert binomial_cdf(k, n, p) == pytest.approx(direct, rel=1e-9)
    assert binomial_cdf(-1, 10, 0.5) == 0.0 and binomial_cdf(10, 10, 0.5) == 1.0


def test_p_values_are_monotone_and_hoeffding_bentkus_is_more_conservative():
    ps = [p_value(k, 700, 0.01) for k in range(12)]
    assert ps == sorted(ps) and ps[0] == pytest.approx(0.99 ** 700)
    for k in range(12):
        assert p_value(k, 700, 0.01, "hoeffding_bentkus") >= ps[k] * (1 - 1e-12)
    with pytest.raises(ValueError, match="p-value method"):
        p_value(1, 10, 0.1, "magic")


def test_ltt_fixed_sequence_stops_at_the_first_failure_and_bonferroni_divides_delta():
    ps = [0.01, 0.05, 0.2, 0.01]
    assert ltt_certify(ps, 0.1, "fixed_sequence") == [True, True, False, False]
    assert ltt_certify(ps, 0.1, "bonferroni") == [True, False, False, True]  # delta / 4 = 0.025


def test_upper_bound_is_the_clopper_pearson_point():
    ub = binomial_upper_bound(3, 500, 0.1)
    assert ub > 3 / 500
    assert binomial_cdf(3, 500, ub) == pytest.approx(0.1, abs=1e-6)
    assert binomial_upper_bound(0, 500, 0.1) == pytest.approx(1 - 0.1 ** (1 / 500), rel=1e-6)


def test_path_starts_at_the_backbone_and_cost_never_rises():
    rec = synthetic(600, 1)
    path = threshold_path(rec, levels=20)
    assert all(math.isinf(t) for t in path[0]) and all(t == 0 for t in path[-1])
    costs = [rec.point(t)["cost_fraction"] for t in path]
    assert costs[0] == pytest.approx(COSTS[-1]) and costs[-1] == pytest.approx(COSTS[0])
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
    assert rec.point(path[0])["risk"] == 0.0  # every exit off: the backbone's own answers


def test_accuracy_budget_is_met_and_the_bookkeeping_is_consistent():
    rec = synthetic(2000, 2)
    cal = calibrate(rec, max_drop=0.03, delta=0.1, seed=0)
    r = cal.report
    assert r["status"] == "met" and r["budget_met"]
    assert r["cost_fraction"] < 0.9 * COSTS[-1], "an early-exit point should be certified on easy synthetic data"
    # Fixed sequence: the certified entries form a prefix; each has p <= delta; the next one does not.
    cert = cal.certified
    first_fail = cert.index(False) if False in cert else len(cert)
    assert all(cert[:first_fail]) and not any(cert[first_fail:])
    assert all(p <= 0.1 for p in cal.p_values[1:first_fail])
    if first_fail < len(cert):
        assert cal.p_values[first_fail] > 0.1
    assert cert[cal.chosen]
    chosen_cost = cal.calib_points[cal.chosen]["cost_fraction"]
    assert all(chosen_cost <= cal.calib_points[j]["cost_fraction"] + 1e-12 for j in range(first_fail))
    assert r["guarantee"]["certified_points"] == first_fail - 1
    assert r["guarantee"]["drop_bound"] == 0.03 and "<= 0.0300" in r["guarantee"]["statement"]
    assert r["exit_rates"] == cal.calib_points[cal.chosen]["exit_rates"] and sum(r["exit_rates"]) == pytest.approx(1)


def test_the_guarantee_holds_on_fresh_data_at_the_promised_rate():
    population = synthetic(200_000, 99)
    delta, eps, trials, violations = 0.2, 0.02, 40, 0
    for t in range(trials):
        cal = calibrate(synthetic(800, 1000 + t), max_drop=eps, delta=delta, seed=t)
        violations += population.point(cal.thresholds)["risk"] > eps
    # At most delta in expectation; 40 trials give slack for chance (P(Bin(40, 0.2) > 14) < 0.01).
    assert violations <= 14


def test_compute_budget_picks_the_most_accurate_affordable_point():
    rec = synthetic(1500, 3)
    cal = calibrate(rec, max_cost=0.6, delta=0.1)
    assert cal.report["status"] == "met" and cal.report["cost_fraction"] <= 0.6
    affordable = [p["accuracy"] for p in cal.calib_points if p["cost_fraction"] <= 0.6]
    assert cal.report["accuracy"] == max(affordable)
    bound = cal.report["guarantee"]["drop_bound"]
    assert cal.certify_points[cal.chosen]["risk"] <= bound < 1


def test_unreachable_compute_budget_is_said():
    cal = calibrate(synthetic(800, 4), max_cost=0.1)
    assert cal.report["status"] == "unreachable" and not cal.report["budget_met"]
    assert "unreachable" in cal.report["message"] and cal.report["cost_fraction"] == pytest.approx(COSTS[0])


def test_both_budgets_or_bad_settings_are_refused():
    rec = synthetic(100, 5)
    with pytest.raises(ValueError, match="one budget"):
        calibrate(rec, max_drop=0.01, max_cost=0.5)
    with pytest.raises(ValueError, match="max_drop"):
        calibrate(rec, max_drop=2)
    with pytest.raises(ValueError, match="too few"):
        calibrate(synthetic(3, 5), max_drop=0.1)


def test_stored_curve_serves_budget_requests():
    rec = synthetic(1500, 6)
    cal = calibrate(rec, max_drop=0.02)
    config = ModelConfig(backbone="cifar_resnet20", num_classes=10, exits=[{"after": "layer1.0"}, {"after": "layer2.0"}],
                         meta={"calibration": cal.report})
    curve = cal.report["curve"]
    assert len(curve) <= 64 and all({"thresholds", "cost_fraction", "accuracy"} <= set(p) for p in curve)
    accs = [p["accuracy"] for p in curve]
    assert accs == sorted(accs), "the stored curve is a Pareto front, cheapest first"
    thr = thresholds_for_budget(config, 0.7)
    assert rec.point(thr)["cost_fraction"] <= 0.7 + 1e-9


def test_records_reproduce_the_routed_forward():
    torch.manual_seed(0)
    bb = build_backbone("cifar_resnet20", 10)
    for m in bb.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    cfg = ModelConfig(backbone="cifar_resnet20", num_classes=10, input_size=16, exits=place_exits(bb, 16, 2))
    model = BranchedModel(cfg, bb).eval()
    x, y = torch.randn(40, 3, 16, 16), torch.randint(0, 10, (40,))
    rec = collect_records(model, x, y)
    path = threshold_path(rec, levels=10)
    thr = path[len(path) // 2]
    out = model.routed_forward(x, thr)
    exits = rec.route(thr)
    assert len(set(exits.tolist())) > 1
    assert exits.tolist() == out.exit_index.tolist()
    assert rec.preds[np.arange(40), exits].tolist() == out.class_index.tolist()
    np.testing.assert_allclose(rec.sample_costs(exits, thr), out.cost_fraction.numpy(), rtol=1e-12)


def test_an_exit_whose_head_never_pays_stays_off_and_costs_nothing():
    """Heads are charged only when their exit is on; switching an exit on must save cost."""
    rec = synthetic(3000, 3)
    useless = ExitRecords(rec.scores.copy(), rec.preds, COSTS[None, :].repeat(len(rec), 0) - [0.0, 0.05, 0.1],
                          rec.labels, head_costs=np.array([0.0, 0.9, 0.05]))  # exit 1's head costs more than it saves
    useless.scores[:, 1] = 0.0  # and it never is sure of anything
    path = threshold_path(useless, levels=20)
    assert all(math.isinf(t[1]) for t in path), "an exit that cannot pay for its head is never switched on"
    costs = [useless.point(t)["cost_fraction"] for t in path]
    assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:]))
    assert useless.point([math.inf, math.inf])["cost_fraction"] == pytest.approx(1.0)  # all off: no head paid


def test_conformal_risk_control_certifies_in_expectation_and_closer_to_the_empirical_point():
    rec = synthetic(4000, 4)
    ltt = calibrate(rec, max_drop=0.02, delta=0.1)
    crc = calibrate(rec, max_drop=0.02, guarantee="crc")
    assert crc.report["guarantee"]["kind"] == "crc" and "in expectation" in crc.report["guarantee"]["statement"]
    assert crc.report["cost_fraction"] <= ltt.report["cost_fraction"] + 1e-12
    n = crc.report["guarantee"]["certify_samples"]
    assert crc.report["guarantee"]["adjusted_risk"] <= 0.02
    # The rule itself, on a hand-made family: monotone envelope, then n/(n+1) mean + 1/(n+1) <= epsilon.
    losses = np.zeros((99, 4))
    losses[:2, 2] = 1  # two losses at setting 2; one of them goes away at setting 3 but the envelope keeps it
    losses[0, 3] = 1
    last, adjusted = crc_last_valid(losses, 0.025)
    assert last == 1 and adjusted[2] == pytest.approx(99 / 100 * 2 / 99 + 1 / 100)
    assert adjusted[3] == adjusted[2]
    with pytest.raises(ValueError, match="accuracy budget"):
        calibrate(rec, max_cost=0.5, guarantee="crc")
    assert n > 0


def test_samples_needed_is_where_the_test_starts_to_pass():
    n = samples_needed(0.005, 0.01, 0.1)
    assert n is not None and p_value(int(0.005 * n), n, 0.01) <= 0.1
    assert p_value(int(0.005 * (n // 2)), n // 2, 0.01) > 0.1
    assert samples_needed(0.012, 0.01, 0.1) is None  # above the budget: no amount of data certifies it
    assert samples_needed(0.008, 0.01, 0.1) > n  # closer to the budget needs more

def test_net_drop_bound_is_two_clopper_pearson_bounds_and_its_p_value_matches_it():
    from branched.build.guarantee import binomial_lower_bound, net_drop_p_value, net_drop_upper_bound
    n, harms, helps = 2800, 41, 32
    assert binomial_lower_bound(helps, n, 0.05) == pytest.approx(1 - binomial_upper_bound(n - helps, n, 0.05), abs=1e-9)
    bound = net_drop_upper_bound(harms, helps, n, 0.1)
    assert bound == pytest.approx(binomial_upper_bound(harms, n, 0.05) - binomial_lower_bound(helps, n, 0.05), abs=1e-9)
    assert harms / n - helps / n < bound < binomial_upper_bound(harms, n, 0.1)  # tighter than harm alone here
    for eps in (0.008, 0.0106, 0.012):  # p <= delta exactly when the bound at delta is within epsilon
        assert (net_drop_p_value(harms, helps, n, eps) <= 0.1) == (bound <= eps)
    assert net_drop_p_value(60, 20, n, 0.01) == 1.0


def test_net_drop_test_keeps_its_level_at_the_null_boundary():
    """Drop exactly epsilon (harm 3%, help 2%): the level-delta test rejects at most delta of the time."""
    from branched.build.guarantee import net_drop_upper_bound
    rng = np.random.default_rng(7)
    n, eps, delta, trials = 1500, 0.01, 0.2, 400
    counts = rng.multinomial(n, [0.03, 0.02, 0.95], size=trials)
    rejections = sum(net_drop_upper_bound(int(h), int(g), n, delta) <= eps for h, g, _ in counts)
    assert rejections <= trials * delta  # the union bound is conservative: well under delta in practice


def test_net_loss_certifies_the_drop_and_a_cheaper_point_when_exits_fix_backbone_errors():
    rec = synthetic(4000, 5)
    harm = calibrate(rec, max_drop=0.02, delta=0.1)
    net = calibrate(rec, max_drop=0.02, delta=0.1, loss="net", p_value_method="clopper_pearson_pair")
    g = net.report["guarantee"]
    assert g["loss_name"] == "net" and "Clopper-Pearson" in g["loss"] and g["p_value"] == "clopper_pearson_pair"
    assert net.report["cost_fraction"] < harm.report["cost_fraction"]
    assert net.report["drop"] < net.report["risk"]  # the exits fix some of the backbone's errors
    population = synthetic(200_000, 98)
    assert population.point(net.thresholds)["drop"] <= 0.02  # the promise is about the drop, and it holds
    with pytest.raises(ValueError, match="Learn-then-Test"):
        calibrate(rec, max_drop=0.02, loss="net", guarantee="crc")
    with pytest.raises(ValueError, match="loss must be"):
        calibrate(rec, max_drop=0.02, loss="mean")
    spent = calibrate(rec, max_cost=0.5, loss="net")  # a compute budget states a bound on the drop itself
    assert 0 <= spent.report["guarantee"]["drop_bound"] < 1


@pytest.mark.parametrize("harm,help_", [(0.03, 0.02), (0.10, 0.09), (0.01, 0.0)])
def test_paired_drop_test_keeps_its_level_at_the_null_boundary(harm, help_):
    """Drop exactly epsilon, at little and at much disagreement: the paired test rejects at most delta of the time."""
    from branched.build.guarantee import paired_drop_p_value
    rng = np.random.default_rng(11)
    n, eps, delta, trials = 1500, 0.01, 0.2, 300
    counts = rng.multinomial(n, [harm, help_, 1 - harm - help_], size=trials)
    rejections = sum(paired_drop_p_value(int(h), int(g), n, eps, delta / 100) <= delta for h, g, _ in counts)
    assert rejections <= trials * delta


def test_paired_drop_test_is_tighter_than_two_clopper_pearson_bounds_and_its_bound_matches_its_p_value():
    from branched.build.guarantee import (net_drop_p_value, net_drop_upper_bound, paired_drop_p_value,
                                          paired_drop_upper_bound)
    n, harms, helps = 2800, 60, 45
    paired, pair = paired_drop_upper_bound(harms, helps, n, 0.1), net_drop_upper_bound(harms, helps, n, 0.1)
    assert (harms - helps) / n < paired < pair  # ~1.10 pt against ~1.41 pt here
    assert paired_drop_p_value(harms, helps, n, 0.012, 0.001) <= 0.1 < net_drop_p_value(harms, helps, n, 0.012)
    for eps in (paired - 0.0005, paired + 0.0005):  # p <= delta exactly when the bound at delta is within epsilon
        assert (paired_drop_p_value(harms, helps, n, eps, 0.001) <= 0.1) == (paired <= eps)
    assert paired_drop_p_value(60, 20, n, 0.01) == 1.0  # observed drop above epsilon
    assert samples_needed(0.012, 0.01, 0.1, help_rate=0.008) < samples_needed(0.012, 0.01, 0.1, "clopper_pearson_pair",
                                                                              help_rate=0.008)


def test_net_loss_defaults_to_the_paired_test_and_certifies_at_least_as_cheap_a_point():
    rec = synthetic(4000, 5)
    pair = calibrate(rec, max_drop=0.02, loss="net", p_value_method="clopper_pearson_pair")
    paired = calibrate(rec, max_drop=0.02, loss="net")
    g = paired.report["guarantee"]
    assert g["p_value"] == "paired" and "paired difference" in g["loss"]
    assert paired.report["cost_fraction"] <= pair.report["cost_fraction"]
    assert sum(paired.certified) >= sum(pair.certified)
    population = synthetic(200_000, 98).point(paired.thresholds)
    # The population is a sample too: its drop carries a standard error of sqrt(disagreement share / 200,000).
    disagree = population["risk"] + (population["risk"] - population["drop"])
    assert population["drop"] <= 0.02 + 3 * math.sqrt(disagree / 200_000)
    with pytest.raises(ValueError, match="the net loss takes p-value paired or clopper_pearson_pair"):
        calibrate(rec, max_drop=0.02, loss="net", p_value_method="binomial")
    with pytest.raises(ValueError, match="the harm loss takes p-value"):
        calibrate(rec, max_drop=0.02, p_value_method="paired")


def test_samples_needed_for_the_net_drop():
    n = samples_needed(0.012, 0.01, 0.1, help_rate=0.008)  # drop 0.4 pt: certifiable with enough data
    assert n is not None and n > samples_needed(0.004, 0.01, 0.1)  # harm 0.4 pt alone is easier: no help noise
    assert samples_needed(0.03, 0.01, 0.1, help_rate=0.015) is None  # drop 1.5 pt: never


def test_path_ordered_by_measured_head_costs_leaves_a_slow_head_off_and_reports_flops():
    """An exit whose head is cheap in FLOPs but slow in wall-clock (pooling, scoring and gathering that FLOPs
    miss): ordered by the measured costs, calibration leaves it off; the reported costs stay the FLOPs ones."""
    rec = synthetic(3000, 6)
    rec = ExitRecords(rec.scores, rec.preds, rec.costs, rec.labels, None, np.array([0.01, 0.01, 0.0]))
    by_flops = calibrate(rec, max_drop=0.03)
    slow = np.array([0.01, 0.6, 0.0])  # exit 1's head would cost more than it could ever save
    by_time = calibrate(rec, max_drop=0.03, path_head_costs=slow)
    assert math.isfinite(by_flops.thresholds[1]) and math.isinf(by_time.thresholds[1])
    assert all(math.isinf(t[1]) for t in by_time.path)  # never switched on along the path
    point = rec.point(by_time.thresholds)
    assert by_time.report["cost_fraction"] == pytest.approx(point["cost_fraction"])  # FLOPs, with exit 1 off
    with pytest.raises(ValueError, match="head costs"):
        calibrate(rec, max_drop=0.03, path_head_costs=np.array([0.1, 0.1]))


def test_an_exit_that_stops_paying_for_its_head_switches_off_again_when_heads_are_measured():
    """Exit 1 is sure and right on the easy half, so it is switched on early; exit 0 (noisier) then takes those
    samples bit by bit, until exit 1's slow head costs more than the few it lets out save. With switch-off moves
    (what measured head costs enable) the path turns it off and is cheaper at every risk level it reaches."""
    rng = np.random.default_rng(0)
    n = 2000
    u = rng.random(n)
    labels = rng.integers(0, 10, n)
    easy, wrong = u < 0.5, (labels + 1) % 10
    preds = np.stack([np.where(easy, labels, wrong), np.where(easy, labels, wrong),
                      np.where(rng.random(n) < 0.95, labels, wrong)], 1)
    scores = np.stack([np.clip(1 - u + rng.normal(0, 0.3, n), 0, 1), np.where(easy, 1 - u, 0.2 * (1 - u))], 1)
    rec = ExitRecords(scores, preds, np.tile([0.3, 0.6, 1.0], (n, 1)), labels, None, np.array([0.01, 0.15, 0.0]))
    paths = {so: threshold_path(rec, levels=20, switch_off=so) for so in (False, True)}
    on = [math.isfinite(t[1]) for t in paths[True]]
    assert any(on) and not on[-1], "exit 1 was on along the path and is off at its end"
    assert math.isfinite(paths[False][-1][1]), "without switch-off moves it stays on"
    for path in paths.values():
        costs = [rec.point(t)["cost_fraction"] for t in path]
        assert all(b <= a + 1e-12 for a, b in zip(costs, costs[1:])), "cost never rises along the path"
    cheapest = {so: [min(p["cost_fraction"] for p in map(rec.point, path) if p["risk"] <= r) for r in (0.02, 0.05, 0.1)]
                for so, path in paths.items()}
    assert all(a < b for a, b in zip(cheapest[True], cheapest[False])), cheapest


def test_measured_head_costs_are_shares_of_the_backbone_time():
    from branched.build.steps import measured_head_costs
    from helpers import make_model
    model = make_model("cifar_resnet20", 16, n_exits=2)
    shares = measured_head_costs(model, torch.randn(32, 3, 16, 16), batch_size=32, rounds=3)
    assert shares.shape == (model.num_exits,) and (shares[:-1] > 0).all() and (shares[:-1] < 1).all()
    assert shares[-1] == pytest.approx(model.cost.exit_flops[-1] / model.cost.backbone_flops)

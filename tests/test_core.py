"""Correctness of the core: blocks reproduce torchvision, routing is per-sample, cost is counted."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from branched.backbones import build_backbone
from branched.cost import count_flops
from branched.exits import ExitSpec
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel
from branched.routing import exit_score, resolve_thresholds
from helpers import assert_optimizing_keeps_answers, between, make_model, median_thresholds

# One member of each family, at the smallest input that keeps its shapes meaningful.
FAMILIES = [("cifar_resnet20", 32), ("resnet18", 64), ("cifar_vgg11_bn", 32), ("cifar_densenet121", 32)]


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def family(request):
    name, size = request.param
    return make_model(name, size), size


def test_blocks_reproduce_the_torchvision_forward(family):
    model, size = family
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.backbone_forward(x), model.source(x))


def test_batch_answers_equal_single_answers(family):
    model, size = family
    x = torch.randn(12, 3, size, size)
    thr = median_thresholds(model, x)
    batch = model.routed_forward(x, thr)
    assert len(set(batch.exit_index.tolist())) > 1, "thresholds should spread samples over exits"
    for i in range(len(x)):
        alone = model.routed_forward(x[i:i + 1], thr)
        assert alone.exit_index.item() == batch.exit_index[i].item()
        assert alone.class_index.item() == batch.class_index[i].item()
        torch.testing.assert_close(alone.logits[0], batch.logits[i], rtol=1e-4, atol=1e-4)
        assert alone.flops.item() == batch.flops[i].item()


def test_unreachable_thresholds_give_the_backbone_at_exactly_its_cost(family):
    """Every exit off: the plain backbone's answers, no side head runs, cost exactly 1.000."""
    model, size = family
    x = torch.randn(5, 3, size, size)
    heads = []
    hooks = [ex.register_forward_hook(lambda *a, k=k: heads.append(k)) for k, ex in enumerate(model.exits[:-1])]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = model.routed_forward(x, [math.inf] * (model.num_exits - 1))
    finally:
        for h in hooks:
            h.remove()
    assert (out.exit_index == model.num_exits - 1).all()
    torch.testing.assert_close(out.logits, model.backbone_forward(x))
    assert heads == [], "an exit that is off must not run its head"
    assert torch.equal(out.cost_fraction, torch.ones(5, dtype=torch.float64))
    assert counter.get_total_flops() == 5 * model.cost.backbone_flops


def test_all_exit_at_zero_later_segments_do_no_work(family):
    model, size = family
    calls = []
    hooks = [seg.register_forward_hook(lambda *a, k=k: calls.append(k)) for k, seg in enumerate(model.segments)]
    x = torch.randn(4, 3, size, size)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = model.routed_forward(x, [0.0] * (model.num_exits - 1))
    finally:
        for h in hooks:
            h.remove()
    assert (out.exit_index == 0).all()
    assert calls == [0]
    assert counter.get_total_flops() == 4 * model.cost.exit_cost(0)
    torch.testing.assert_close(out.cost_fraction, torch.full((4,), model.cost.exit_cost_fractions()[0],
                                                             dtype=torch.float64))


def test_cost_table_matches_the_flop_counter(family):
    model, size = family
    x = torch.zeros(1, 3, size, size)
    with torch.no_grad():
        whole = count_flops(torch.nn.Sequential(*[m for seg in model.segments for m in seg.blocks],
                                                model.exits[-1]), x)
    assert model.cost.backbone_flops == whole
    fractions = model.cost.exit_cost_fractions()
    assert fractions == sorted(fractions) and fractions[0] < 1 < fractions[-1]


def test_routed_cost_is_what_the_counter_sees():
    model = make_model("cifar_resnet20", 32, n_exits=3)
    x = torch.randn(16, 3, 32, 32)
    thr = median_thresholds(model, x)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model.routed_forward(x, thr)
    assert counter.get_total_flops() == int(out.flops.sum())


def test_optimized_model_keeps_answers():
    assert_optimizing_keeps_answers(make_model("cifar_resnet20", 32, n_exits=3), torch.randn(16, 3, 32, 32))


@pytest.mark.parametrize("policy", ["confidence", "max_softmax", "entropy"])
def test_policies_score_in_unit_interval_and_route(policy):
    model = make_model("cifar_resnet20", 32)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        scores = [exit_score(o, policy) for o in model(x)]
    for s in scores:
        assert s.shape == (8,) and bool(((s >= 0) & (s <= 1)).all())
    thr = [between(scores[0]), 0.0]
    out = model.routed_forward(x, thr, policy=policy)
    assert torch.equal(out.exit_index == 0, scores[0] >= thr[0])


def test_linear_exits_route_too():
    model = make_model("cifar_resnet20", 32, kind="linear")
    out = model.routed_forward(torch.randn(4, 3, 32, 32), [0.0, 0.0])
    assert (out.exit_index == 0).all()


@pytest.mark.parametrize("bad", [[0.5], [0.5, float("nan")], [1.5, 0.2], [-0.1, 0.2]])
def test_bad_thresholds_are_rejected(bad):
    with pytest.raises(ValueError, match="threshold"):
        resolve_thresholds(bad, [0.5, 0.5])


def test_frozen_backbone_keeps_weights_and_bn_statistics():
    model = make_model("cifar_resnet20", 32).freeze_backbone()
    model.train()
    before = {k: v.clone() for k, v in model.segments.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.exits[-1].state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    outs = model(torch.randn(8, 3, 32, 32))
    sum(o.logits.sum() + (o.confidence.sum() if o.confidence is not None else 0) for o in outs).backward()
    opt.step()
    for k, v in model.segments.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in model.exits[-1].state_dict().items():
        assert torch.equal(v, head_before[k]), k
    assert model.exits[0].training and not model.segments[0].training
    assert any(p.grad is not None for p in model.exits[0].parameters())


@pytest.mark.parametrize("spacing", ["even", "pareto"])
def test_exit_placement_by_flops_share(spacing):
    bb = build_backbone("cifar_resnet56", 10)
    specs = place_exits(bb, 32, 3, spacing=spacing)
    idx = [bb.block_names.index(s.after) for s in specs]
    assert idx == sorted(set(idx)) and len(idx) == 3
    model = BranchedModel(ModelConfig(backbone="cifar_resnet56", num_classes=10, exits=specs), bb)
    seg_share = [sum(model.cost.segment_flops[:k + 1]) / sum(model.cost.segment_flops) for k in range(3)]
    targets = [(i / 4) ** (2 if spacing == "pareto" else 1) for i in (1, 2, 3)]
    for share, target in zip(seg_share, targets):
        assert abs(share - target) < 0.08


def test_exits_by_name_and_bad_names():
    bb = build_backbone("cifar_resnet20", 10)
    model = BranchedModel(ModelConfig(backbone="cifar_resnet20", num_classes=10,
                                      exits=[ExitSpec("layer1.2"), ExitSpec("layer2.2")]), bb)
    assert [s.names[-1] for s in model.segments[:2]] == ["layer1.2", "layer2.2"]
    with pytest.raises(ValueError, match="no such block"):
        BranchedModel(ModelConfig(backbone="cifar_resnet20", num_classes=10, exits=[ExitSpec("layer9.9")]),
                      build_backbone("cifar_resnet20", 10))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("alexnet", 10)


def test_baseline_shares_weights_and_answers():
    model = make_model("cifar_resnet20", 32)
    baseline = model.without_exits()
    x = torch.randn(4, 3, 32, 32)
    assert baseline.num_exits == 1
    torch.testing.assert_close(baseline.routed_forward(x).logits, model.backbone_forward(x))
    assert baseline.cost.backbone_flops == model.cost.backbone_flops
    assert baseline.segments[0].blocks[0] is model.segments[0].blocks[0]


def test_per_sample_thresholds_route_each_sample_by_its_own_row():
    model = make_model("cifar_resnet20", 32)
    x = torch.randn(6, 3, 32, 32)
    rows = torch.tensor([[0.0, 0.0], [math.inf, math.inf], [math.inf, 0.0]] * 2)
    out = model.routed_forward(x, rows)
    assert out.exit_index.tolist() == [0, 2, 1] * 2
    for i in range(6):
        alone = model.routed_forward(x[i:i + 1], rows[i])
        assert alone.exit_index.item() == out.exit_index[i].item()
        torch.testing.assert_close(alone.logits[0], out.logits[i], rtol=1e-4, atol=1e-4)
        assert alone.flops.item() == out.flops[i].item(), "a sample's cost must not depend on its batch"
    # a sample whose own row switches exit 0 off is not charged its head, whatever its batch mates ask
    assert out.flops[1].item() == model.cost.backbone_flops
    assert out.flops[2].item() == pytest.approx(model.cost.exit_cost(1) - model.exit_flops[0])


def test_dropping_exits_that_are_off_changes_no_answer_and_no_cost():
    model = make_model("cifar_resnet20", 32, n_exits=3)
    x = torch.randn(12, 3, 32, 32)
    thr = median_thresholds(model, x)
    off_middle = model.routed_forward(x, [thr[0], math.inf, thr[2]])
    trimmed = model.with_exits([0, 2])
    out = trimmed.routed_forward(x, [thr[0], thr[2]])
    assert trimmed.num_exits == 3 and len(trimmed.segments) == 3
    assert torch.equal(out.class_index, off_middle.class_index)
    assert out.exit_index.tolist() == [{0: 0, 2: 1, 3: 2}[e] for e in off_middle.exit_index.tolist()]
    assert torch.equal(out.flops, off_middle.flops)
    assert trimmed.exits[0] is model.exits[0], "the trained exits are kept, not re-initialised"
    plain = model.with_exits([])
    torch.testing.assert_close(plain.routed_forward(x).logits, model.backbone_forward(x))
    with pytest.raises(ValueError, match="side exits are 0..2"):
        model.with_exits([3])


def test_sdn_exits_route_round_trip_and_cost_under_one_percent(tmp_path):
    """SDN heads: mixed pooling to cells x cells, batch norm, a hidden layer; forward = head(reduce(x))."""
    from branched.artifact import load_model, save_model

    bb = build_backbone("cifar_resnet20", 10)
    cfg = ModelConfig(backbone="cifar_resnet20", num_classes=10, input_size=32,
                      exits=[ExitSpec(n, "sdn", cells=4, hidden=32) for n in ("layer1.2", "layer2.2")])
    model = BranchedModel(cfg, bb).eval()
    x = torch.randn(8, 3, 32, 32)
    h = model.segments[0](x)
    assert model.exits[0].reduce(h).shape == (8, 2, 16, 4, 4)
    torch.testing.assert_close(model.exits[0](h).logits, model.exits[0].head(model.exits[0].reduce(h)).logits)
    assert all(f < 0.01 * model.cost.backbone_flops for f in model.cost.exit_flops[:-1])
    thr = median_thresholds(model, x)
    out = model.routed_forward(x, thr)
    save_model(model, str(tmp_path / "m"))
    again = load_model(str(tmp_path / "m")).eval().routed_forward(x, thr)
    assert torch.equal(again.exit_index, out.exit_index) and torch.equal(again.class_index, out.class_index)
    served = load_model(str(tmp_path / "m")).optimize_for_inference()
    assert torch.equal(served.routed_forward(x, thr).class_index, out.class_index)

@pytest.mark.parametrize("kind,hidden,size", [("sdn", 32, 16), ("sdn", 0, 16), ("sdn", 8, 6), ("conv", 0, 16),
                                              ("linear", 0, 16), ("mlp", 0, 16)])
def test_folding_an_exit_for_serving_keeps_its_answers_in_fewer_ops(kind, hidden, size):
    """fold_for_inference: one matmul for classifier and confidence; an SDN head's batch norm folded into the
    linear layer after it (trained statistics, not the identity ones) and its pools mixed without a stack."""
    from branched.exits import ExitBranch
    torch.manual_seed(0)
    ex = ExitBranch(12, 5, kind, depth=1, cells=4, hidden=hidden)
    for m in ex.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5), m.bias.data.uniform_(-0.5, 0.5)
    if kind == "sdn":
        ex.pool[0].mix.data.fill_(0.7)
    ex.eval()
    x = torch.randn(7, 12, size, size).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = ex(x)
        with pytest.raises(RuntimeError, match="call .eval"):
            ExitBranch(12, 5, kind).train().fold_for_inference()
        got = ex.fold_for_inference()(x)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.confidence, want.confidence, rtol=1e-5, atol=1e-6)
    assert not hasattr(ex, "classifier") and isinstance(ex.joint, torch.nn.Linear)
    if kind == "sdn":
        assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in ex.modules())
    assert ex.fold_for_inference() is ex  # a second call changes nothing


@pytest.mark.parametrize("shape,channels_last", [((6, 8, 5, 7), True), ((6, 8, 5, 7), False), ((6, 1, 4, 4), True),
                                                 ((6, 9, 16), False)])
def test_take_rows_gathers_like_indexing_and_keeps_the_memory_format(shape, channels_last):
    from branched.model import take_rows
    x = torch.randn(*shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rows = torch.tensor([4, 0, 3])
    got = take_rows(x, rows)
    assert torch.equal(got, x[rows])
    if channels_last:
        assert got.is_contiguous(memory_format=torch.channels_last)
    else:
        assert got.is_contiguous()


@pytest.mark.parametrize("size", [(32, 32), (12, 8), (7, 9)])
def test_sdn_pooled_maps_equal_the_adaptive_pools(size):
    """Fixed windows where the map divides into cells (faster on CPU), adaptive pools elsewhere: the same values."""
    from branched.exits import PooledMaps
    x = torch.randn(3, 5, *size).contiguous(memory_format=torch.channels_last)
    want = torch.stack([torch.nn.functional.adaptive_avg_pool2d(x, 4), torch.nn.functional.adaptive_max_pool2d(x, 4)], 1)
    torch.testing.assert_close(PooledMaps(4)(x), want, rtol=1e-6, atol=1e-7)

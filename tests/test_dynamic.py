"""LC-Net gates: exact when keeping, no work when skipping, scales applied, counted cost, artifact, exits."""
import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck

from branched.artifact import load_model, save_model
from branched.backbones import build_backbone
from branched.lcnet import GatedBlock, gate_settings, gated_blocks
from branched.build.evaluate import bench
from branched.build.lcnet_train import add_gates, train_gates
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel
from branched.preprocess import Preprocessor
from branched.routing import exit_score
from branched.serving import Predictor
from helpers import between

MODES = ["layer", "channel", "both"]
SIZE = 16  # cifar_resnet20 at 16x16 (the demo's input size): every shape is exercised, at a quarter of the work


def plain_model(n_exits: int = 2) -> BranchedModel:
    """cifar_resnet20 with random BN statistics (so BN is not the identity) and untrained exits."""
    bb = build_backbone("cifar_resnet20", 10)
    for m in bb.model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    cfg = ModelConfig(backbone="cifar_resnet20", num_classes=10, input_size=SIZE,
                      exits=place_exits(bb, SIZE, n_exits) if n_exits else [])
    model = BranchedModel(cfg, bb).eval()
    model.__dict__["source"] = bb.model.eval()  # the torchvision model, not a registered submodule
    return model


def force(block: GatedBlock, layer_logit: float = None, channel_logit: float = None,
          layer_scale_logit: float = 0.0, channel_scale_logit: float = 0.0) -> None:
    """Make ``block``'s gate output constants: keep logits and scale logits the same for every input."""
    gate = block.gate
    with torch.no_grad():
        gate.fc2.weight.zero_()
        s = 0
        if gate.layer:
            gate.fc2.bias[0], gate.fc2.bias[1] = layer_logit, layer_scale_logit
            s = 2
        if gate.channels:
            gate.fc2.bias[s:s + gate.channels] = channel_logit
            gate.fc2.bias[s + gate.channels:] = channel_scale_logit


def randomize(model: BranchedModel, spread: float = 1.5) -> None:
    """Input-dependent gates that keep some samples/channels and drop others (every other block mostly skips)."""
    with torch.no_grad():
        for i, b in enumerate(gated_blocks(model)):
            torch.nn.init.normal_(b.gate.fc2.weight, 0.0, spread)
            torch.nn.init.normal_(b.gate.fc2.bias, 0.5, spread)
            if b.gate.layer:
                b.gate.fc2.bias[0] = 1.0 if i % 2 else -1.0


def off(model: BranchedModel) -> list[float]:
    return [math.inf] * (model.num_exits - 1)


@pytest.mark.parametrize("mode", MODES)
def test_gates_that_keep_everything_reproduce_the_backbone_exactly(mode):
    model = plain_model()
    gated = add_gates(model, mode).eval()
    for b in gated_blocks(gated):
        force(b, layer_logit=10.0, channel_logit=10.0)
    x = torch.randn(6, 3, SIZE, SIZE)
    with torch.no_grad():
        reference = model.source(x)
        assert torch.equal(gated(x)[-1].logits, reference)
    out = gated.routed_forward(x, off(gated))
    assert torch.equal(out.logits, reference)
    gate_flops = sum(b.gate.flops for b in gated_blocks(gated))
    full = gated.cost.backbone_flops + gate_flops  # exits that are off run no head
    assert out.flops.tolist() == [float(full)] * 6


def test_a_skipped_block_does_no_work():
    model = plain_model()
    gated = add_gates(model, "both").eval()
    blocks = dict(zip(gated.config.dynamic["blocks"], gated_blocks(gated)))
    target = blocks["layer2.1"]
    for b in gated_blocks(gated):
        force(b, layer_logit=10.0, channel_logit=10.0)
    force(target, layer_logit=-10.0, channel_logit=10.0)
    calls, prev_out, next_in = [], [], []
    hook = target.branch.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    # the next block must receive the skipped block's input, untouched (routed and masked paths)
    prev, nxt = blocks["layer2.0"], blocks["layer2.2"]
    taps = [prev.register_forward_hook(lambda m, a, o: prev_out.append(o)),
            nxt.branch.register_forward_hook(lambda m, a, o: next_in.append(a[0]))]
    x = torch.randn(5, 3, SIZE, SIZE)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            out = gated.routed_forward(x, off(gated))
        with torch.no_grad():
            gated(x)  # masked path (a module call, so the gated blocks' own hooks fire)
    finally:
        for h in [hook, *taps]:
            h.remove()
    assert calls == [5]  # only the masked forward computed it, never the routed one
    assert len(prev_out) == 1 and len(next_in) == 2
    assert torch.equal(next_in[0], prev_out[0]) and torch.equal(next_in[1], prev_out[0])
    block_flops = dict(zip([n for s in model.segments for n in s.names], sum(model.cost.block_flops, [])))
    gate_flops = sum(b.gate.flops for b in gated_blocks(gated))
    expected = model.cost.backbone_flops - block_flops["layer2.1"] + gate_flops  # no head: exits off
    assert counter.get_total_flops() == 5 * expected
    assert out.flops.tolist() == [float(expected)] * 5


@pytest.mark.parametrize("mode", ["layer", "channel"])
def test_learned_scales_are_applied(mode):
    model = plain_model(n_exits=0)
    gated = add_gates(model, mode, blocks=["layer1.1"]).eval()
    (block,) = gated_blocks(gated)
    a = 1.3
    force(block, layer_logit=10.0, channel_logit=10.0, layer_scale_logit=a, channel_scale_logit=a)
    s = 2.0 * torch.sigmoid(torch.tensor(a)).item()
    inner = block.block
    x = torch.relu(torch.randn(4, 16, SIZE, SIZE))
    with torch.no_grad():
        h = torch.relu(inner.bn1(inner.conv1(x)))
        if mode == "channel":
            h = h * s
        r = inner.bn2(inner.conv2(h))
        if mode == "layer":
            r = r * s
        expected = torch.relu(r + x)
        plain = inner(x)
        masked = block(x)
        routed, _ = block.forward_with_cost(x)
    assert not torch.allclose(plain, expected)
    torch.testing.assert_close(masked, expected)
    torch.testing.assert_close(routed, expected)


@pytest.mark.parametrize("mode", MODES)
def test_routed_cost_of_a_gated_model_is_what_the_counter_sees(mode):
    gated = add_gates(plain_model(n_exits=3), mode).eval()
    randomize(gated)
    x = torch.randn(16, 3, SIZE, SIZE)
    with torch.no_grad():
        thr = [between(exit_score(o, gated.config.policy)) for o in gated(x)[:-1]]
    counter = FlopCounterMode(display=False)
    with counter:
        out = gated.routed_forward(x, thr)
    assert counter.get_total_flops() == int(out.flops.sum())
    assert len(set(out.exit_index.tolist())) > 1
    plain = torch.tensor([float(gated.cost.exit_cost(k)) for k in range(gated.num_exits)], dtype=torch.float64)
    assert bool((out.flops < plain[out.exit_index]).any())  # the gates saved work
    # The plain pass's segment times cannot show what gates save inside a segment: bench gives no time ideal.
    timed = bench(gated, x, 8, thr, rounds=1)
    assert timed["time_ideal_speedup"] is None and timed["routing_efficiency"] is None


@pytest.mark.parametrize("mode", MODES)
def test_gates_and_exits_compose_through_routed_forward(mode):
    gated = add_gates(plain_model(n_exits=2), mode).eval()
    randomize(gated)
    x = torch.randn(12, 3, SIZE, SIZE)
    with torch.no_grad():
        outs = gated(x)  # masked reference: every exit on the gated features
    thr = [between(exit_score(o, gated.config.policy)) for o in outs[:-1]]
    routed = gated.routed_forward(x, thr)
    assert len(set(routed.exit_index.tolist())) > 1
    for i in range(len(x)):
        k = int(routed.exit_index[i])
        torch.testing.assert_close(routed.logits[i], outs[k].logits[i], rtol=1e-4, atol=1e-4)
        alone = gated.routed_forward(x[i:i + 1], thr)
        assert alone.exit_index.item() == k
        torch.testing.assert_close(alone.logits[0], routed.logits[i], rtol=1e-4, atol=1e-4)
        if mode == "layer":  # no channel union: a sample costs the same alone and in a batch
            assert alone.flops.item() == routed.flops[i].item()
        else:  # the batch computes the union of its samples' channels: never less than alone
            assert alone.flops.item() <= routed.flops[i].item()


@pytest.mark.parametrize("finetune", [False, True], ids=["shared", "finetune"])
def test_gated_model_round_trips_through_the_artifact(tmp_path, finetune):
    gated = add_gates(plain_model(n_exits=2), "both", finetune=finetune, target_cost=0.5).eval()
    randomize(gated)
    if finetune:  # the gated path's own weights differ from the plain backbone's
        for b in gated_blocks(gated):
            torch.nn.init.normal_(b.block.conv2.weight, 0.0, 0.05)
    save_model(gated, str(tmp_path / "m"))
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.config.dynamic == gated.config.dynamic
    assert len(gated_blocks(loaded)) == len(gated_blocks(gated))
    x = torch.randn(10, 3, SIZE, SIZE)
    assert torch.equal(gated.backbone_forward(x), loaded.backbone_forward(x))
    for thr in (None, off(gated), [0.0, 0.0]):
        a, b = gated.routed_forward(x, thr), loaded.routed_forward(x, thr)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.exit_index, b.exit_index)
        assert torch.equal(a.flops, b.flops)


def test_servers_shared_predictor_answers_a_gated_model_like_the_core(tmp_path):
    """Both servers answer through Predictor (TorchServe whole, Ray Serve via model.step): no gate special case."""
    gated = add_gates(plain_model(n_exits=2), "both").eval()
    randomize(gated)
    save_model(gated, str(tmp_path / "m"))
    images = []
    for seed in range(6):
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(buf.getvalue())
    params = [{}, {"thresholds": "inf,inf"}, {"threshold": "0"}] * 2
    answers = Predictor(str(tmp_path / "m")).answer_batch(list(zip(images, params)))
    pre = Preprocessor.for_config(gated.config)
    x = torch.stack([pre.from_bytes(b) for b in images])
    default = gated.config.thresholds
    rows = torch.tensor([default, off(gated), [0.0, 0.0]] * 2)
    expected = gated.routed_forward(x, rows).answers(gated.config.class_names)  # one batch, as the server's
    for got, want in zip(answers, expected):
        assert got["exit"] == want["exit"] and got["class_index"] == want["class_index"]
        assert got["cost_fraction"] == pytest.approx(want["cost_fraction"], rel=1e-9)
    assert answers[1]["exit"] == 2 and answers[1]["cost_fraction"] < 1.0  # the gates' saving reaches the client
    baseline = Predictor(str(tmp_path / "m"), baseline=True).answer_batch([(images[0], {})])[0]
    assert baseline["exit"] == 0 and baseline["cost_fraction"] == pytest.approx(1.0)


@pytest.mark.parametrize("finetune", [False, True], ids=["shared", "finetune"])
def test_serving_optimisation_keeps_gated_answers_and_baseline_is_the_plain_backbone(finetune):
    model = plain_model(n_exits=2)
    gated = add_gates(model, "both", finetune=finetune).eval()
    randomize(gated)
    if finetune:
        for b in gated_blocks(gated):
            torch.nn.init.normal_(b.block.conv2.weight, 0.0, 0.05)
    x = torch.randn(12, 3, SIZE, SIZE)
    before = gated.routed_forward(x, off(gated))
    with torch.no_grad():
        reference = model.source(x)
    baseline = gated.without_exits()
    assert not gated_blocks(baseline) and baseline.config.dynamic is None
    torch.testing.assert_close(baseline.routed_forward(x).logits, reference)
    gated.optimize_for_inference()
    for b in gated_blocks(gated):  # BN folded into the convs, on the gated and the plain path
        assert not hasattr(b.block, "bn1") and not hasattr(b.ungated, "bn1")
    after = gated.routed_forward(x, off(gated))
    assert torch.equal(before.exit_index, after.exit_index)
    assert torch.equal(before.flops, after.flops)
    torch.testing.assert_close(before.logits, after.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gated.backbone_forward(x), reference, rtol=1e-4, atol=1e-4)


def test_bottleneck_blocks_take_gates_too():
    block = Bottleneck(64, 16).eval()
    gated = GatedBlock(block, layer=True, channel=True, hidden=8).eval()
    torch.nn.init.normal_(gated.gate.fc2.weight, 0.0, 1.5)
    x = torch.relu(torch.randn(8, 64, 8, 8))
    counter = FlopCounterMode(display=False)
    with torch.no_grad():
        masked = gated(x)
        with counter:
            y, flops = gated.forward_with_cost(x)
    torch.testing.assert_close(y, masked, rtol=1e-4, atol=1e-5)
    assert counter.get_total_flops() == int(flops.sum())


@pytest.mark.parametrize("finetune", [False, True], ids=["frozen", "finetune"])
def test_training_meets_the_budget_and_leaves_the_backbone_alone(finetune):
    model = plain_model(n_exits=0)
    gated = add_gates(model, "layer", finetune=finetune).eval()
    backbone = {k: v.clone() for k, v in model.state_dict().items()}
    copies = {k: v.clone() for k, v in gated.state_dict().items() if ".block." in k}
    x = torch.randn(96, 3, SIZE, SIZE)
    with torch.no_grad():
        y = model.source(x).argmax(1)  # labels the backbone gets right: only the cost term must move
    report = train_gates(gated, x, y, target_cost=0.6, epochs=3, batch_size=32, lr=0.1, cost_weight=50.0, distill=0,
                         progress=False)
    assert report["final"]["cost_fraction"] < 0.75
    routed = gated.routed_forward(x)
    assert float(routed.cost_fraction.mean()) < 0.75
    for k, v in model.state_dict().items():  # the plain backbone (the baseline) never changes
        assert torch.equal(v, backbone[k]), k
    with torch.no_grad():
        torch.testing.assert_close(gated.backbone_forward(x), model.source(x))
    tuned = [k for k, v in gated.state_dict().items() if k in copies and not torch.equal(v, copies[k])]
    assert bool(tuned) == finetune and report["finetuned_blocks"] == (7 if finetune else 0)
    assert all(not b.relaxed for b in gated_blocks(gated))


def test_bad_settings_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match="ResNet"):
        gate_settings(build_backbone("cifar_vgg11_bn", 10), "both")
    bb = build_backbone("cifar_resnet20", 10)
    with pytest.raises(ValueError, match="identity shortcut"):
        gate_settings(bb, "layer", blocks=["layer2.0"])
    with pytest.raises(ValueError, match="mode"):
        gate_settings(bb, "filters")
    with pytest.raises(ValueError, match="no LC-Net gates"):
        train_gates(plain_model(n_exits=0), torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long), 0.5)

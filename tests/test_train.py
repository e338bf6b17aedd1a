"""Training: the exit objectives on hand-computable cases, the generic loop, exit post-training."""
import math

import pytest
import torch
import torch.nn.functional as F

from branched.backbones import build_backbone
from branched.exits import ExitOutput
from branched.build.placement import place_exits
from branched.config import ModelConfig
from branched.model import BranchedModel
from branched.build.train import ExitObjective, FitSettings, exit_loss, fit, train_exits

COSTS = torch.tensor([0.3, 1.0])


def two_exits(side_logits, confidence, head_logits):
    return [ExitOutput(torch.tensor([side_logits]), torch.tensor([confidence])),
            ExitOutput(torch.tensor([head_logits]), None)]


def test_pteenet_loss_by_hand():
    # Side exit: p = [.5, .5], h = .5; head: p = [.75, .25]; label 0.
    # Y = .5 * .5 + .5 * .75 = .625; C = .5 * .3 + .5 * 1.0 = .65; loss = -log .625 + .1 * .65.
    outs = two_exits([0.0, 0.0], 0.5, [math.log(3.0), 0.0])
    loss = exit_loss(outs, torch.tensor([0]), COSTS, ExitObjective("pteenet", cost_weight=0.1, ce_weight=0.0))
    assert loss.item() == pytest.approx(-math.log(0.625) + 0.065, rel=1e-6)


def test_pteenet_recursion_over_three_exits_by_hand():
    # Exits 0 and 1 with h = .8 and .5; probabilities of the label 1: .9, .2, .6 (head).
    # Y = .8 * .9 + .2 * (.5 * .2 + .5 * .6) = .8; C = .8 * .2 + .2 * (.5 * .5 + .5 * 1) = .31.
    def two_class(p):
        return [0.0, math.log(p / (1 - p))]
    outs = [ExitOutput(torch.tensor([two_class(0.9)]), torch.tensor([0.8])),
            ExitOutput(torch.tensor([two_class(0.2)]), torch.tensor([0.5])),
            ExitOutput(torch.tensor([two_class(0.6)]), None)]
    loss = exit_loss(outs, torch.tensor([1]), torch.tensor([0.2, 0.5, 1.0]), ExitObjective(cost_weight=1.0, ce_weight=0))
    assert loss.item() == pytest.approx(-math.log(0.8) + 0.31, rel=1e-6)


def test_ce_objective_and_distillation_by_hand():
    # CE of uniform logits is log 2; the confidence .5 against "right" (argmax 0 == label 0) is log 2 too.
    outs = two_exits([0.0, 0.0], 0.5, [math.log(3.0), 0.0])
    loss = exit_loss(outs, torch.tensor([0]), COSTS, ExitObjective("ce"))
    assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    # Full distillation replaces the label by the head's distribution [.75, .25]: the mixture .625 / .375.
    loss = exit_loss(outs, torch.tensor([1]), COSTS, ExitObjective(cost_weight=0.0, ce_weight=0.0, distill=1.0))
    assert loss.item() == pytest.approx(-(0.75 * math.log(0.625) + 0.25 * math.log(0.375)), rel=1e-6)


def test_kd_objective_by_hand():
    """T^2 x cross-entropy of the softened backbone answer, plus the head's "do I agree" term."""
    outs = two_exits([0.0, 0.0], 0.5, [math.log(3.0), 0.0])  # exit: uniform; backbone: [.75, .25] at T = 1
    loss = exit_loss(outs, torch.tensor([1]), COSTS, ExitObjective("kd", distill=1.0, temperature=1.0))
    # CE([.75, .25], [.5, .5]) = log 2; the exit's argmax (0) agrees with the backbone's: BCE(.5, 1) = log 2.
    assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)
    t = 2.0
    teacher = torch.softmax(torch.tensor([math.log(3.0), 0.0]) / t, 0)
    loss = exit_loss(outs, torch.tensor([1]), COSTS, ExitObjective("kd", distill=0.5, temperature=t))
    soft = -(teacher * math.log(0.5)).sum().item() * t * t
    assert loss.item() == pytest.approx(0.5 * soft + 0.5 * math.log(2) + math.log(2), rel=1e-6)


def test_cost_term_pushes_confidence_up_when_exits_are_right():
    logits = torch.tensor([[4.0, 0.0]], requires_grad=False)
    h = torch.tensor([0.5], requires_grad=True)
    outs = [ExitOutput(logits, h), ExitOutput(torch.tensor([[4.0, 0.0]]), None)]
    exit_loss(outs, torch.tensor([0]), COSTS, ExitObjective(cost_weight=1.0, ce_weight=0)).backward()
    assert h.grad.item() < 0  # raising h lowers the loss: same answer, lower cost


def test_bad_objective_settings_are_refused():
    with pytest.raises(ValueError, match="objective"):
        ExitObjective("hinge")
    with pytest.raises(ValueError, match="distill"):
        ExitObjective(distill=1.5)


def test_fit_learns_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    y = (x[:, 0] > 0).long()

    def run():
        torch.manual_seed(0)
        net = torch.nn.Linear(5, 2)
        hist = fit(net, net.parameters(), lambda m, xb, yb: F.cross_entropy(m(xb), yb), (x, y),
                   FitSettings(epochs=5, batch_size=32, lr=0.5, progress=False))
        return net, hist

    net, hist = run()
    assert hist[-1] < 0.5 * hist[0]
    assert (net(x).argmax(1) == y).float().mean() > 0.95
    again, _ = run()
    assert torch.equal(net.weight, again.weight)


@pytest.mark.parametrize("kind", ["conv", "sdn"])
def test_train_exits_leaves_the_backbone_untouched_and_caching_changes_nothing(kind):
    """The cache holds what each exit's weighted part reads: the map, or an SDN head's two small pooled maps."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))

    def build():
        torch.manual_seed(0)
        bb = build_backbone("cifar_resnet20", 4)
        cfg = ModelConfig(backbone="cifar_resnet20", num_classes=4, input_size=8,
                          exits=place_exits(bb, 8, 2, kind=kind, cells=2, hidden=8))
        return BranchedModel(cfg, bb)

    settings = FitSettings(epochs=2, batch_size=32, lr=0.01, optimizer="adamw", progress=False)
    cached, live = build(), build()
    before = {k: v.clone() for k, v in cached.segments.state_dict().items()}
    objective = ExitObjective("kd", distill=1.0, temperature=2.0) if kind == "sdn" else ExitObjective()
    hist = train_exits(cached, x, y, settings, objective)
    train_exits(live, x, y, settings, objective, cache_limit_gb=0.0)  # features recomputed every batch
    for k, v in cached.segments.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    assert len(hist) == 2 and all(math.isfinite(h) for h in hist)
    for a, b in zip(cached.exits[:-1].parameters(), live.exits[:-1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    changed = [not torch.equal(a, b) for a, b in zip(cached.exits[:-1].parameters(), build().exits[:-1].parameters())]
    assert all(changed), "every exit parameter should have been trained"


def test_exit_augmentation_trains_on_the_live_backbone_and_changes_the_exits():
    """With augmentation the features cannot be cached: the frozen backbone runs on every augmented batch."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))

    def trained(augment):
        torch.manual_seed(0)
        bb = build_backbone("cifar_resnet20", 4)
        cfg = ModelConfig(backbone="cifar_resnet20", num_classes=4, input_size=8,
                          exits=place_exits(bb, 8, 2, kind="sdn", cells=2, hidden=8))
        model = BranchedModel(cfg, bb)
        before = {k: v.clone() for k, v in model.segments.state_dict().items()}
        settings = FitSettings(epochs=1, batch_size=32, lr=0.01, optimizer="adamw", progress=False, augment=augment)
        train_exits(model, x, y, settings, ExitObjective("kd", distill=1.0, temperature=2.0))
        assert all(torch.equal(v, before[k]) for k, v in model.segments.state_dict().items())
        return model

    plain, augmented = trained("none"), trained("crop_flip")
    assert any(not torch.equal(a, b) for a, b in zip(plain.exits[:-1].parameters(), augmented.exits[:-1].parameters()))

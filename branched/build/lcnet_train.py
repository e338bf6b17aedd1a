"""Training LC-Net gates to a FLOPs budget.

The gates learn the keep decisions and the scales. The plain backbone never changes (it stays the
baseline, as for the exits): with ``finetune`` gates (:func:`add_gates`) each gated
block trains its own copy of the block's weights together with its gate (BN in training mode);
without, the gated path runs the frozen block as it is. Decisions are relaxed with straight-through binary
Gumbel-softmax (hard 0/1 forward, sigmoid gradient backward; the noise is annealed away so training
ends on the decisions inference takes), and the loss is

    cross-entropy(head logits, labels)
    + distill * T^2 * KL(backbone soft targets || gated soft targets)    (optional)
    + lambda * max(0, mean cost fraction - target_cost)

with the multiplier ``lambda >= 0`` raised by dual ascent while the batch is over budget and
lowered while it is under (``lambda <- max(0, lambda + dual_lr * (cost - target))``), so the
budget is met whatever the scale of the task loss; under budget the term is silent and accuracy
takes back what the budget allows.
where a sample's cost sums every gated block's ``gate + keep * (fixed + per_channel * sum(keep_channel))``
over the sampled (straight-through) decisions (:meth:`branched.lcnet.GatedBlock._expected_flops`) and the static FLOPs of the
ungated blocks and the head, over the plain backbone's FLOPs. Exits are not part of this loss:
train them afterwards, on the gated features.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..backbones import Backbone
from ..config import ModelConfig
from ..lcnet import DEFAULT_HIDDEN, GatedBlock, apply_gates, gate_settings, gated_blocks
from ..model import BranchedModel

__all__ = ["add_gates", "train_gates", "static_flops"]


def add_gates(model, mode: str, hidden: int = DEFAULT_HIDDEN, blocks: Optional[list[str]] = None,
              finetune: bool = True, **extra: Any):
    """A gated copy of a :class:`~branched.model.BranchedModel` that shares its backbone and exits.

    The exits keep their weights; train the gates (:func:`train_gates`)
    and then the exits, which should see gated features.

    Args:
        model: an un-optimised branched model (with or without exits), not yet gated.
        mode, hidden, blocks, finetune, extra: see :func:`gate_settings`.
    """
    pairs = [(n, b) for seg in model.segments for n, b in zip(seg.names, seg.blocks)]
    holder = nn.ModuleList(b for _, b in pairs)
    plain = Backbone(model.config.backbone, pairs, model.exits[-1].head, model.config.num_classes,
                     model.config.input_size, holder)
    settings = gate_settings(plain, mode, hidden, blocks, finetune, **extra)
    config = ModelConfig(**{**model.config.to_dict(), "dynamic": settings})
    gated = BranchedModel(config, apply_gates(plain, settings))
    for new, old in zip(gated.exits[:-1], model.exits[:-1]):
        new.load_state_dict(old.state_dict())
    return gated.train(model.training)


def static_flops(model) -> float:
    """FLOPs per sample of the plain blocks and the backbone head (the part that gates do not change)."""
    total = float(model.cost.exit_flops[-1])
    for seg, flops in zip(model.segments, model.cost.block_flops):
        total += sum(float(f) for b, f in zip(seg.blocks, flops) if not isinstance(b, GatedBlock))
    return total


def _head_logits(model, x: torch.Tensor) -> torch.Tensor:
    for seg in model.segments:
        x = seg(x)
    return model.exits[-1](x).logits


def train_gates(model, train_x: torch.Tensor, train_y: torch.Tensor, target_cost: float, epochs: int = 10,
                batch_size: int = 64, lr: float = 1e-2, cost_weight: float = 1.0, dual_lr: float = 0.5,
                distill: float = 1.0, temperature: float = 4.0, tau: float = 1.0, noise: float = 1.0,
                finetune_lr: float = 1e-3, seed: int = 0, progress: bool = True) -> dict:
    """Train the gates of ``model`` (a gated :class:`~branched.model.BranchedModel`) in place.

    Args:
        model: a model with LC-Net gates (:func:`branched.build.lcnet_train.add_gates` or ``from_config``).
        train_x, train_y: training images (preprocessed) and labels.
        target_cost: FLOPs budget as a fraction of the plain backbone (exits excluded), e.g. 0.5.
        epochs: passes over the training set.
        batch_size: mini-batch size.
        lr: Adam learning rate of the gates.
        cost_weight: initial value of the budget multiplier ``lambda``.
        dual_lr: step of the multiplier's dual ascent per batch (0 keeps ``lambda`` fixed).
        distill: weight of distillation from the plain (ungated) backbone; 0 turns it off.
        temperature: distillation temperature.
        tau: Gumbel-softmax temperature.
        noise: initial scale of the Gumbel noise; it decays linearly to 0 over the first 3/4 of the
            steps, so the last quarter trains (plain straight-through) the deterministic decisions
            that inference takes.
        finetune_lr: Adam learning rate of the gated blocks' own weights (fine-tuned gates only).
        seed: shuffling and Gumbel-noise seed.
        progress: show a tqdm bar.

    Returns:
        A JSON-ready report: settings, the final multiplier, and the last epoch's mean loss, cost
        fraction and accuracy (under relaxed decisions).

    Raises:
        ValueError: a model without gates, or a target outside (0, 1].
    """
    gates = gated_blocks(model)
    if not gates:
        raise ValueError("the model has no LC-Net gates; add them with branched.build.lcnet_train.add_gates first")
    if not 0.0 < target_cost <= 1.0:
        raise ValueError(f"target cost must be a fraction of the backbone's FLOPs in (0, 1], got {target_cost}")
    if len(train_x) != len(train_y) or len(train_x) == 0:
        raise ValueError(f"need as many labels as images (got {len(train_x)} images, {len(train_y)} labels)")
    backbone_flops = float(model.cost.backbone_flops)
    fixed = static_flops(model)
    teacher_logits = None
    if distill > 0:  # the backbone is frozen: its logits are computed once
        model.eval()
        with torch.no_grad():
            teacher_logits = torch.cat([model.backbone_forward(train_x[i:i + 256])
                                        for i in range(0, len(train_x), 256)])
    params = [p for g in gates for p in g.gate.parameters()]
    tuned = [g.block for g in gates if g.finetuned]
    tuned_params = [p for b in tuned for p in b.parameters()]
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    saved_mode = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params + tuned_params:
        p.requires_grad_(True)
    model.eval()  # the plain backbone keeps its BN statistics
    for b in tuned:
        b.train()  # fine-tuned copies adapt their BN statistics to the gated features
    for g in gates:
        g.relaxed, g.tau, g.noise = True, tau, noise
    lam = float(cost_weight)
    groups = [{"params": params, "lr": lr}] + ([{"params": tuned_params, "lr": finetune_lr}] if tuned else [])
    opt = torch.optim.Adam(groups)
    steps = epochs * math.ceil(len(train_x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    history = []
    step = 0
    bar = tqdm(range(epochs), desc="train gates", unit="epoch", disable=not progress)
    try:
        for _ in bar:
            order = torch.randperm(len(train_x), generator=gen)
            sums = {"loss": 0.0, "cost_fraction": 0.0, "accuracy": 0.0}
            for i in range(0, len(order), batch_size):
                for g in gates:
                    g.noise = noise * max(0.0, 1.0 - step / (0.75 * steps))
                step += 1
                idx = order[i:i + batch_size]
                x, y = train_x[idx], train_y[idx]
                logits = _head_logits(model, x)
                loss = F.cross_entropy(logits, y)
                if teacher_logits is not None:
                    loss = loss + distill * temperature ** 2 * F.kl_div(
                        F.log_softmax(logits / temperature, 1), F.softmax(teacher_logits[idx] / temperature, 1),
                        reduction="batchmean")
                cost = (fixed + sum(g.expected_flops for g in gates)) / backbone_flops
                over = cost.mean() - target_cost
                loss = loss + lam * F.relu(over)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                lam = max(0.0, lam + dual_lr * float(over.detach()))
                n = len(idx)
                sums["loss"] += float(loss.detach()) * n
                sums["cost_fraction"] += float(cost.detach().sum())
                sums["accuracy"] += float((logits.argmax(1) == y).sum())
            epoch = {k: v / len(order) for k, v in sums.items()}
            history.append(epoch)
            epoch["multiplier"] = lam
            bar.set_postfix(cost=f"{epoch['cost_fraction']:.3f}", acc=f"{epoch['accuracy']:.3f}", lam=f"{lam:.2f}")
    finally:
        for g in gates:
            g.relaxed, g.expected_flops = False, None
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
        model.train(saved_mode)
    return {"target_cost": target_cost, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "cost_weight": cost_weight, "dual_lr": dual_lr, "distill": distill, "temperature": temperature, "tau": tau,
            "noise": noise,
            "finetune_lr": finetune_lr if tuned else None, "finetuned_blocks": len(tuned), "seed": seed,
            "final": history[-1] if history else None}

"""Training: one generic loop, the backbone recipe, and post-training of exits on a frozen backbone.

:func:`fit` is the single training loop (seeded shuffling, optional per-sample augmentation,
SGD/AdamW with a one-cycle or cosine schedule, tqdm progress). The backbone recipe
(:func:`train_backbone`), exit post-training (:func:`train_exits`) and LC-Net gate training reuse
it by passing their own parameters and loss function.

Exit objectives (:func:`exit_loss`):

* ``"pteenet"`` (default; EENets/PTEENet): the exits' class distributions are mixed recursively from the
  last exit backwards, each weighted by its confidence head ``h_k``::

      Y_{K-1} = p_{K-1},   Y_k = h_k p_k + (1 - h_k) Y_{k+1}
      C_{K-1} = c_{K-1},   C_k = h_k c_k + (1 - h_k) C_{k+1}
      loss    = CE(Y_0, target) + lambda * C_0

  where ``c_k`` is the cost fraction of leaving at exit ``k`` (:meth:`CostTable.exit_cost_fractions`).
  An optional ``ce_weight`` adds per-exit cross-entropy, so an exit whose confidence collapses
  early still learns to classify.
* ``"ce"``: per-exit cross-entropy, with each confidence head fit by binary cross-entropy to
  whether its own exit's prediction is right.

Both accept distillation: the target becomes ``(1 - distill) * one_hot(y) + distill *
softmax(backbone_logits / T)``, the frozen backbone's own predictions.

* ``"kd"``: knowledge distillation per exit, ``distill * T^2 * CE(softmax(b / T), softmax(z / T)) +
  (1 - distill) * CE(y, z)`` for exit logits ``z`` and backbone logits ``b``, with each confidence head fit
  to whether its exit agrees with the backbone. The calibration loss counts disagreements with the backbone
  where it is right, so exits that imitate it leave earlier at the same risk.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from tqdm import tqdm

from ..backbones import Backbone
from ..exits import ExitOutput

__all__ = ["FitSettings", "augmentation", "fit", "train_backbone", "exit_loss", "EXIT_OBJECTIVES",
           "ExitObjective", "exit_features", "train_exits"]

EXIT_OBJECTIVES = ("pteenet", "ce", "kd")
AUGMENTATIONS = ("none", "crop", "crop_flip")
PRECISIONS = ("fp32", "bf16")


@dataclass
class FitSettings:
    """Settings of one :func:`fit` run.

    Args:
        epochs: passes over the data.
        batch_size: samples per step.
        lr: peak learning rate.
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        momentum: SGD momentum.
        weight_decay: L2 / decoupled weight decay.
        schedule: ``"onecycle"``, ``"cosine"`` or ``"constant"``.
        augment: ``"none"``, ``"crop"`` (random crop of a 4-pixel padded image) or ``"crop_flip"``
            (plus horizontal flips); applied to the first tensor of each sample.
        device: ``"cpu"`` or ``"cuda"``.
        seed: seeds initialisation-independent randomness: shuffling and augmentation.
        progress: show a tqdm bar per epoch.
        precision: ``"fp32"``, or ``"bf16"``: bfloat16 autocast with channels-last activations
            (2.2-2.4x faster backbone training on a CPU with AVX-512 BF16; weights stay fp32).
    """

    epochs: int = 1
    batch_size: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    augment: str = "none"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    precision: str = "fp32"

    def to_dict(self) -> dict:
        return asdict(self)


def augmentation(name: str, size: Sequence[int]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A per-sample torchvision transform for ``name`` (see :class:`FitSettings`) at image ``size``, or None.

    Padding is zeros, which after normalisation is the dataset's mean colour.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"augmentation must be one of {', '.join(AUGMENTATIONS)}, got {name!r}")
    if name == "none":
        return None
    steps: list = [v2.RandomCrop(list(size), padding=4)]
    if name == "crop_flip":
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


class _Tensors(Dataset):
    """Aligned tensors, one sample per index; ``transform`` applies to the first tensor only."""

    def __init__(self, tensors: Sequence[torch.Tensor], transform: Optional[Callable] = None) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError("all tensors given to fit() need the same length")
        self.tensors, self.transform = list(tensors), transform

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int):
        items = [t[i] for t in self.tensors]
        if self.transform is not None:
            items[0] = self.transform(items[0])
        return tuple(items)


def _optimizer(params: list[nn.Parameter], s: FitSettings) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, nesterov=s.momentum > 0,
                               weight_decay=s.weight_decay)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {s.optimizer!r}")


def _schedule(opt: torch.optim.Optimizer, s: FitSettings, steps: int):
    if s.schedule == "onecycle" and steps < 8:
        # OneCycleLR needs a few steps per phase; a run this short just anneals.
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if s.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=max(steps, 1), pct_start=0.25)
    if s.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    if s.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    raise ValueError(f"schedule must be 'onecycle', 'cosine' or 'constant', got {s.schedule!r}")


def fit(model: nn.Module, params: Iterable[nn.Parameter], loss_fn: Callable[..., torch.Tensor],
        tensors: Sequence[torch.Tensor], settings: FitSettings, desc: str = "train") -> list[float]:
    """Train ``params`` of ``model`` to minimise ``loss_fn`` over ``tensors``: the one training loop.

    Args:
        model: put in training mode and on ``settings.device`` (a model with a frozen backbone
            keeps it in eval mode itself, see :meth:`BranchedModel.train`).
        params: what the optimiser updates (parameters without ``requires_grad`` are dropped).
        loss_fn: ``loss_fn(model, *batch) -> scalar``; ``batch`` holds one mini-batch of each
            tensor, on the device.
        tensors: aligned tensors with the same first dimension, e.g. ``(images, labels)``.
        settings: see :class:`FitSettings`.
        desc: progress-bar label.

    Returns:
        The mean loss of each epoch.
    """
    if settings.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError(f"{desc}: nothing to train (no parameter requires grad)")
    data = _Tensors(tensors, augmentation(settings.augment, tensors[0].shape[-2:]))
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(data, batch_size=settings.batch_size, shuffle=True, generator=generator,
                        drop_last=len(data) > settings.batch_size)
    opt = _optimizer(params, settings)
    sched = _schedule(opt, settings, settings.epochs * len(loader))
    device = torch.device(settings.device)
    model.to(device).train()
    bf16 = settings.precision == "bf16"
    if bf16:
        model.to(memory_format=torch.channels_last)
    history: list[float] = []
    for epoch in range(settings.epochs):
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{settings.epochs}", unit="batch", leave=False,
                   disable=not settings.progress)
        for batch in bar:
            batch = [t.to(device, non_blocking=True) for t in batch]
            if bf16:
                batch = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model, *batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: the loss became {loss.item()}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(batch[0])
            count += len(batch[0])
            bar.set_postfix(loss=f"{total / count:.4f}")
        history.append(total / max(count, 1))
        if settings.progress:
            tqdm.write(f"{desc} epoch {epoch + 1}/{settings.epochs}: loss {history[-1]:.4f}")
    return history


def train_backbone(backbone: Backbone, x: torch.Tensor, y: torch.Tensor, settings: FitSettings) -> list[float]:
    """Train the whole torchvision model from scratch with cross-entropy (when no weights are given).

    Args:
        backbone: the (untrained) backbone; trained in place, returned to eval mode on the CPU.
        x, y: preprocessed training images and labels.
        settings: the recipe (:class:`FitSettings`).
    """
    torch.manual_seed(settings.seed)

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(xb), yb)

    history = fit(backbone.model, backbone.model.parameters(), loss_fn, (x, y), settings, desc="backbone")
    backbone.model.cpu().eval().to(memory_format=torch.contiguous_format)
    return history


@dataclass
class ExitObjective:
    """What the exits are trained to do.

    Args:
        objective: ``"pteenet"`` or ``"ce"`` (module docstring).
        cost_weight: lambda, the weight of the expected cost term (``"pteenet"`` only).
        ce_weight: weight of an added per-exit cross-entropy (``"pteenet"`` only).
        distill: share of the backbone's soft predictions in the target, in [0, 1].
        temperature: softmax temperature of the backbone's predictions when distilling.
    """

    objective: str = "pteenet"
    cost_weight: float = 0.1
    ce_weight: float = 0.0
    distill: float = 0.0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.objective not in EXIT_OBJECTIVES:
            raise ValueError(f"exit objective must be one of {', '.join(EXIT_OBJECTIVES)}, got {self.objective!r}")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be in [0, 1], got {self.distill}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return asdict(self)


def _soft_target(y: torch.Tensor, teacher: torch.Tensor, obj: ExitObjective) -> torch.Tensor:
    target = F.one_hot(y, teacher.shape[1]).to(teacher.dtype)
    if obj.distill > 0:
        target = (1 - obj.distill) * target + obj.distill * torch.softmax(teacher.detach() / obj.temperature, 1)
    return target


def exit_loss(outputs: Sequence[ExitOutput], y: torch.Tensor, costs: torch.Tensor,
              objective: ExitObjective = ExitObjective()) -> torch.Tensor:
    """The exit-training loss for one batch.

    Args:
        outputs: every exit's output, in order; the last is the (frozen) backbone head.
        y: labels ``[B]``.
        costs: cost fraction of leaving at each exit ``[K]`` (``model.cost.exit_cost_fractions()``).
        objective: see :class:`ExitObjective`.
    """
    target = _soft_target(y, outputs[-1].logits, objective)
    side = outputs[:-1]
    if objective.objective == "kd":
        # Knowledge distillation from the frozen backbone (Hinton et al.): every exit learns the backbone's
        # softened answer, T^2 keeping the gradient scale; the confidence head learns "do I agree with it".
        t = objective.temperature
        teacher = torch.softmax(outputs[-1].logits.detach() / t, 1)
        answer = outputs[-1].logits.argmax(1)
        one_hot = F.one_hot(y, teacher.shape[1]).to(teacher.dtype)
        loss = outputs[-1].logits.new_zeros(())
        for out in side:
            soft = -(teacher * torch.log_softmax(out.logits / t, 1)).sum(1).mean() * t * t
            hard = -(one_hot * torch.log_softmax(out.logits, 1)).sum(1).mean()
            agree = (out.logits.argmax(1) == answer).to(out.confidence.dtype)
            loss = loss + objective.distill * soft + (1 - objective.distill) * hard + F.binary_cross_entropy(
                out.confidence.clamp(1e-6, 1 - 1e-6), agree)
        return loss
    if objective.objective == "ce":
        loss = outputs[-1].logits.new_zeros(())
        for out in side:
            loss = loss - (target * torch.log_softmax(out.logits, 1)).sum(1).mean()
            correct = (out.logits.argmax(1) == y).to(out.confidence.dtype)
            loss = loss + F.binary_cross_entropy(out.confidence.clamp(1e-6, 1 - 1e-6), correct)
        return loss
    costs = costs.to(outputs[-1].logits.device, outputs[-1].logits.dtype)
    mix = torch.softmax(outputs[-1].logits, 1)
    cost = costs[-1].expand(len(y))
    for k in range(len(side) - 1, -1, -1):
        h = side[k].confidence
        mix = h[:, None] * torch.softmax(side[k].logits, 1) + (1 - h[:, None]) * mix
        cost = h * costs[k] + (1 - h) * cost
    loss = -(target * torch.log(mix.clamp_min(1e-12))).sum(1).mean() + objective.cost_weight * cost.mean()
    if objective.ce_weight:
        for out in side:
            loss = loss - objective.ce_weight * (target * torch.log_softmax(out.logits, 1)).sum(1).mean()
    return loss


@torch.no_grad()
def exit_features(model, x: torch.Tensor, batch_size: int = 256, device: str = "cpu",
                  progress: bool = True, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """What each side exit's weighted part reads (``exit.reduce`` of the frozen backbone's features) and the
    backbone's logits, for all of ``x``.

    Args:
        dtype: storage type of the side exits' inputs (bfloat16 halves the memory of a cache).

    Returns:
        ``K`` tensors: the reduced inputs of side exits ``0..K-2`` (in ``dtype``) and the backbone logits ``[N, C]``.
    """
    model.to(device).eval()
    parts: list[list[torch.Tensor]] = [[] for _ in range(model.num_exits)]
    it = range(0, len(x), batch_size)
    for i in tqdm(it, desc="backbone features", unit="batch", leave=False, disable=not progress):
        h = x[i:i + batch_size].to(device)
        for k, seg in enumerate(model.segments):
            h = seg(h)
            last = k == model.num_exits - 1
            parts[k].append((model.exits[k](h).logits if last else model.exits[k].reduce(h).to(dtype)).cpu())
    return [torch.cat(p) for p in parts]


def _side_outputs(model, reduced: Sequence[torch.Tensor], teacher: torch.Tensor) -> list[ExitOutput]:
    return [model.exits[k].head(f.float()) for k, f in enumerate(reduced)] + [ExitOutput(teacher, None)]


def train_exits(model, x: torch.Tensor, y: torch.Tensor, settings: FitSettings,
                objective: ExitObjective = ExitObjective(), cache_limit_gb: float = 4.0) -> list[float]:
    """Post-train the side exits of ``model`` on a frozen backbone (PTEENet).

    When what the exits read for all of ``x`` (their weightless ``reduce`` of the backbone's features: the
    whole map, or an SDN head's small pooled maps) fits in ``cache_limit_gb`` (in float32, else in bfloat16;
    and no augmentation is asked for), it is computed once and the exits train on it;
    otherwise the frozen segments run under ``no_grad`` for every batch. The objective is the same either way.

    Args:
        model: a :class:`~branched.model.BranchedModel`; its backbone is frozen here.
        x, y: preprocessed training images and labels.
        settings: the loop's settings (:class:`FitSettings`).
        objective: see :class:`ExitObjective`.
        cache_limit_gb: memory allowed for cached features.
    """
    model.freeze_backbone()
    torch.manual_seed(settings.seed)
    costs = torch.tensor(model.cost.exit_cost_fractions(), dtype=torch.float32)
    params = [p for ex in model.exits[:-1] for p in ex.parameters()]
    with torch.no_grad():
        probe = x[:1]
        sizes = []
        for seg, ex in zip(model.eval().segments[:-1], model.exits[:-1]):
            probe = seg(probe)
            sizes.append(ex.reduce(probe)[0].numel())
    cache_bytes = 4 * len(x) * sum(sizes)
    if settings.augment == "none" and cache_bytes <= 2 * cache_limit_gb * 2 ** 30:
        dtype = torch.float32 if cache_bytes <= cache_limit_gb * 2 ** 30 else torch.bfloat16
        feats = exit_features(model, x, device=settings.device, progress=settings.progress, dtype=dtype)

        def cached_loss(m, *batch: torch.Tensor) -> torch.Tensor:
            *side, teacher, yb = batch
            return exit_loss(_side_outputs(m, side, teacher), yb, costs, objective)

        history = fit(model, params, cached_loss, (*feats, y), settings, desc="exits")
    else:
        def live_loss(m, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            side = []
            with torch.no_grad():
                h = xb
                for seg, ex in zip(m.segments[:-1], m.exits[:-1]):
                    h = seg(h)
                    side.append(ex.reduce(h))
                teacher = m.exits[-1](m.segments[-1](h)).logits
            return exit_loss(_side_outputs(m, side, teacher), yb, costs, objective)

        history = fit(model, params, live_loss, (x, y), settings, desc="exits")
    model.cpu().eval()
    return history

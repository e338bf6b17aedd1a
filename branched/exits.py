"""Exit branches: small classifiers with a confidence head that attach after a backbone block.

* ``"conv"``: PTEENet's branch, ``depth`` x [conv3x3 -> BN -> ReLU] at the attachment's width,
  global average pool, then a linear classifier and a confidence head (linear -> sigmoid).
  Convolutional feature maps (``"nchw"``) only.
* ``"linear"``: the light BranchyNet variant, global average pool -> linear classifier, with
  the same confidence head on the pooled features.
* ``"sdn"``: SDN's internal classifier (Kaya et al. 2019): a learned mix of max and average pooling
  down to ``cells x cells``, batch norm, optionally one hidden layer (``hidden``), then the
  classifier and confidence head. It keeps where things are in the map, which a global pool throws
  away, for well under 1% of a CIFAR ResNet's FLOPs: accurate early in a network at almost no cost.
  Convolutional feature maps only.
* ``"mlp"``: pool -> LayerNorm -> ``depth`` x [linear -> GELU] -> classifier and confidence head;
  the transformer-style branch, for any layout.

Every kind reads the features in the layout they come in (:data:`FEATURE_LAYOUTS`): conv maps
``[B, C, H, W]``, channels-last maps ``[B, H, W, C]`` (Swin), token sequences ``[B, N, D]``
(ViT) or vectors ``[B, D]``. Pooling is the spatial / token mean (``pool="avg"``) or, for tokens,
the first (class) token (``pool="cls"``). On anything but conv maps, a LayerNorm follows the pool,
as transformers' own heads do. Whatever the layout, an exit returns :class:`ExitOutput`.

Every exit is ``head(reduce(x))``: ``reduce`` has no weights (identity before a conv branch, the
global pool of a ``"linear"`` or ``"mlp"`` branch, the SDN head's two pooled maps), so exit training
can cache its small output instead of the backbone's feature maps.

The backbone's own head is the last exit (:class:`BackboneHeadExit`); it has no confidence head
and, being last, accepts every sample that reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

__all__ = ["ExitOutput", "ExitSpec", "ExitBranch", "BackboneHeadExit", "EXIT_KINDS", "EXIT_POOLS",
           "FEATURE_LAYOUTS", "PooledMaps", "MixedPool", "feature_layout", "feature_width", "default_exit_kind"]

EXIT_KINDS = ("conv", "linear", "sdn", "mlp")
EXIT_POOLS = ("avg", "cls")
FEATURE_LAYOUTS = ("nchw", "nhwc", "tokens", "vector")
_MAP_ONLY = ("conv", "sdn")  # kinds that need conv feature maps [B, C, H, W]


def feature_layout(shape: Sequence[int], map_layout: str = "nchw") -> str:
    """The layout of a feature tensor of ``shape`` (batch first): rank 4 is a map laid out as
    ``map_layout`` says, rank 3 a token sequence, rank 2 a vector."""
    rank = len(shape)
    if rank == 4:
        return map_layout
    if rank in (2, 3):
        return {3: "tokens", 2: "vector"}[rank]
    raise ValueError(f"cannot attach an exit to rank-{rank} features of shape {tuple(shape)}")


def feature_width(shape: Sequence[int], layout: str) -> int:
    """Channels (maps) or embedding width (tokens, vectors) of features of ``shape``."""
    return int(shape[1] if layout == "nchw" else shape[-1])


def default_exit_kind(layout: str) -> str:
    """PTEENet's conv branch on conv maps, the transformer-style ``"mlp"`` branch elsewhere."""
    return "conv" if layout == "nchw" else "mlp"


class ExitOutput(NamedTuple):
    """What an exit returns for a batch: class logits ``[B, C]`` and confidence ``[B]`` (or None)."""

    logits: torch.Tensor
    confidence: Optional[torch.Tensor]


@dataclass(frozen=True)
class ExitSpec:
    """Where an exit attaches and what it is.

    Args:
        after: name of the backbone block the exit reads (e.g. ``"layer1.2"``).
        kind: ``"conv"`` (PTEENet, conv maps only), ``"linear"`` (BranchyNet), ``"sdn"`` (SDN, conv
            maps only) or ``"mlp"`` (transformer-style).
        depth: number of conv-BN-ReLU layers of a ``"conv"`` branch, linear-GELU layers of an ``"mlp"`` one.
        stride: stride of the branch's first conv; 2 (the default) quarters the head's FLOPs,
            which matters because a head's cost is paid by every sample that reaches it.
        cells: side of an ``"sdn"`` head's pooled map.
        hidden: width of an ``"sdn"`` head's hidden layer (0: none, the classifier reads the pooled map).
        pool: ``"avg"`` (mean over positions or tokens) or ``"cls"`` (the first token; token sequences only).
    """

    after: str
    kind: str = "conv"
    depth: int = 1
    stride: int = 2
    cells: int = 4
    hidden: int = 0
    pool: str = "avg"

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"exit kind must be one of {EXIT_KINDS}, got {self.kind!r}")
        if self.depth < 0 or self.stride < 1 or self.cells < 1 or self.hidden < 0:
            raise ValueError(f"exit depth and hidden must be >= 0, stride and cells >= 1; got depth {self.depth}, "
                             f"stride {self.stride}, cells {self.cells}, hidden {self.hidden}")
        if self.pool not in EXIT_POOLS:
            raise ValueError(f"exit pool must be one of {EXIT_POOLS}, got {self.pool!r}")


def _avg_and_max(x: torch.Tensor, cells: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average and max pooling of a conv map down to ``cells x cells``."""
    h, w = x.shape[-2:]
    if h % cells == 0 and w % cells == 0:
        # The same windows as the adaptive pools, which on CPU run about 1.4x slower on channels-last maps.
        window = (h // cells, w // cells)
        return nn.functional.avg_pool2d(x, window), nn.functional.max_pool2d(x, window)
    return nn.functional.adaptive_avg_pool2d(x, cells), nn.functional.adaptive_max_pool2d(x, cells)


class PooledMaps(nn.Module):
    """The weightless half of SDN's feature reduction: average and max pooling to ``cells x cells``, stacked
    as ``[B, 2, C, cells, cells]``."""

    def __init__(self, cells: int) -> None:
        super().__init__()
        self.cells = cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(_avg_and_max(x, self.cells), 1)


class MixedPool(nn.Module):
    """SDN's feature reduction, given :class:`PooledMaps`: ``a * max + (1 - a) * avg``, ``a`` learned, flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(()))  # a = sigmoid(mix) = 0.5 at start

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.mix)
        return (a * pooled[:, 1] + (1 - a) * pooled[:, 0]).flatten(1)


class _ServingMixedPool(nn.Module):
    """:class:`PooledMaps` and :class:`MixedPool` in one, for serving: two pools and one ``lerp``, no stack."""

    def __init__(self, cells: int, a: float) -> None:
        super().__init__()
        self.cells, self.a = cells, a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg, mx = _avg_and_max(x, self.cells)
        return torch.lerp(avg, mx, self.a).flatten(1)


def _fold_affine_into(scale: torch.Tensor, shift: torch.Tensor, linear: nn.Linear) -> nn.Linear:
    """``linear(x * scale + shift)`` as one linear layer."""
    folded = nn.Linear(linear.in_features, linear.out_features).to(linear.weight.dtype)
    folded.weight.copy_(linear.weight * scale)
    folded.bias.copy_(linear.bias + linear.weight @ shift)
    return folded


class _Mean(nn.Module):
    def __init__(self, dims: tuple[int, ...]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(self.dims)


class _FirstToken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0]


def _pool(layout: str, pool: str) -> nn.Module:
    """The weightless global pool of features in ``layout`` down to ``[B, width]``."""
    if pool == "cls":
        if layout != "tokens":
            raise ValueError(f"pool 'cls' reads the first token of a token sequence; these features are {layout}")
        return _FirstToken()
    return {"nchw": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            "nhwc": lambda: _Mean((1, 2)), "tokens": lambda: _Mean((1,)), "vector": nn.Identity}[layout]()


class ExitBranch(nn.Module):
    """An early exit: ``reduce`` (weightless), optional conv layers, pooling, optional norm and MLP,
    classifier and confidence head.

    Args:
        in_channels: channels (conv maps) or width (tokens, vectors) of the features at the attachment.
        num_classes: number of classes.
        kind: ``"conv"``, ``"linear"``, ``"sdn"`` or ``"mlp"`` (see module docstring).
        depth: conv-BN-ReLU layers for ``"conv"``, linear-GELU layers for ``"mlp"``; ignored otherwise.
        stride: stride of the first conv layer.
        cells: side of the pooled map for ``"sdn"``.
        hidden: hidden width for ``"sdn"`` (0: none).
        layout: the features' layout, one of :data:`FEATURE_LAYOUTS`.
        pool: ``"avg"`` or ``"cls"`` (token sequences only).

    Raises:
        ValueError: a ``"conv"`` or ``"sdn"`` exit on features that are not conv maps, or ``"cls"``
            pooling on anything but tokens.
    """

    def __init__(self, in_channels: int, num_classes: int, kind: str = "conv", depth: int = 1,
                 stride: int = 2, cells: int = 4, hidden: int = 0, layout: str = "nchw", pool: str = "avg") -> None:
        super().__init__()
        if layout not in FEATURE_LAYOUTS:
            raise ValueError(f"feature layout must be one of {FEATURE_LAYOUTS}, got {layout!r}")
        if kind in _MAP_ONLY and layout != "nchw":
            raise ValueError(f"a {kind!r} exit needs conv feature maps [B, C, H, W]; these features are {layout}: "
                             f"use kind 'mlp' or 'linear'")
        layers: list[nn.Module] = []
        if kind == "conv":
            for i in range(depth):
                layers += [nn.Conv2d(in_channels, in_channels, 3, stride=stride if i == 0 else 1,
                                     padding=1, bias=False),
                           nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        width = in_channels
        if kind == "sdn":
            self.reduce: nn.Module = PooledMaps(cells)
            width = in_channels * cells * cells
            self.pool: nn.Module = nn.Sequential(MixedPool(), nn.BatchNorm1d(width),
                                                 *((nn.Linear(width, hidden), nn.ReLU(inplace=True)) if hidden else ()))
            width = hidden or width
        elif kind == "conv":
            self.reduce = nn.Identity()
            self.pool = _pool(layout, pool)
        else:  # "linear", "mlp": the global pool comes first and has no weights, so it is the reduce
            self.reduce = _pool(layout, pool)
            self.pool = nn.Identity()
        # Conv maps keep PTEENet's head as it was (no norm); pooled tokens are normalised, as
        # transformers' own heads do, and so is the input of an "mlp" exit.
        self.norm = nn.LayerNorm(width) if layout != "nchw" or kind == "mlp" else nn.Identity()
        mlp: list[nn.Module] = []
        if kind == "mlp":
            for _ in range(depth):
                mlp += [nn.Linear(width, width), nn.GELU()]
        self.mlp = nn.Sequential(*mlp)
        self.classifier = nn.Linear(width, num_classes)
        self.confidence = nn.Linear(width, 1)
        self.joint: Optional[nn.Linear] = None  # set by fold_for_inference()

    def forward(self, x: torch.Tensor) -> ExitOutput:
        return self.head(self.reduce(x))

    def head(self, reduced: torch.Tensor) -> ExitOutput:
        """The exit's weighted part, on ``reduce(x)``."""
        pooled = self.mlp(self.norm(self.pool(self.features(reduced))))
        if self.joint is not None:  # folded for serving: class logits and confidence from one matmul
            z = self.joint(pooled)
            return ExitOutput(z[:, :-1], torch.sigmoid(z[:, -1]))
        return ExitOutput(self.classifier(pooled), torch.sigmoid(self.confidence(pooled)).squeeze(1))

    @torch.no_grad()
    def fold_for_inference(self) -> "ExitBranch":
        """Serving only, in place: fewer, larger ops for the same answers (to float rounding).

        The classifier and the confidence head become one linear layer. An SDN head's pools and mix become two
        pools and a ``lerp`` (no stacked copy), and its batch norm is folded into the linear layer after it.
        A folded exit can no longer be trained, cached (``reduce`` now mixes) or saved.
        """
        if self.training:
            raise RuntimeError("fold_for_inference() is for serving: call .eval() first")
        if self.joint is not None:
            return self
        joint = nn.Linear(self.classifier.in_features, self.classifier.out_features + 1).to(
            self.classifier.weight.dtype)
        joint.weight.copy_(torch.cat([self.classifier.weight, self.confidence.weight]))
        joint.bias.copy_(torch.cat([self.classifier.bias, self.confidence.bias]))
        if isinstance(self.reduce, PooledMaps):
            mix, norm, *rest = self.pool
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            shift = norm.bias - norm.running_mean * scale
            self.reduce = _ServingMixedPool(self.reduce.cells, float(torch.sigmoid(mix.mix)))
            if rest:  # hidden layer: the norm folds into it
                self.pool = nn.Sequential(_fold_affine_into(scale, shift, rest[0]), *rest[1:])
            else:  # the norm feeds the classifier and confidence head directly
                self.pool = nn.Identity()
                joint = _fold_affine_into(scale, shift, joint)
        self.joint = joint
        del self.classifier, self.confidence
        return self


class BackboneHeadExit(nn.Module):
    """The backbone's own classifier head, used as the last exit."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> ExitOutput:
        return ExitOutput(self.head(x), None)

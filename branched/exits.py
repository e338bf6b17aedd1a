"""Exit branches: small classifiers with a confidence head that attach after a backbone block.

* ``"conv"``: PTEENet's branch, ``depth`` x [conv3x3 -> BN -> ReLU] at the attachment's width,
  global average pool, then a linear classifier and a confidence head (linear -> sigmoid).
* ``"linear"``: the light BranchyNet variant, global average pool -> linear classifier, with
  the same confidence head on the pooled features.
* ``"sdn"``: SDN's internal classifier (Kaya et al. 2019): a learned mix of max and average pooling
  down to ``cells x cells``, batch norm, optionally one hidden layer (``hidden``), then the
  classifier and confidence head. It keeps where things are in the map, which a global pool throws
  away, for well under 1% of a CIFAR ResNet's FLOPs: accurate early in a network at almost no cost.

Every exit is ``head(reduce(x))``: ``reduce`` has no weights (identity, or the SDN head's two pooled
maps), so exit training can cache its small output instead of the backbone's feature maps.

The backbone's own head is the last exit (:class:`BackboneHeadExit`); it has no confidence head
and, being last, accepts every sample that reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ["ExitOutput", "ExitSpec", "ExitBranch", "BackboneHeadExit", "EXIT_KINDS", "PooledMaps", "MixedPool"]

EXIT_KINDS = ("conv", "linear", "sdn")


class ExitOutput(NamedTuple):
    """What an exit returns for a batch: class logits ``[B, C]`` and confidence ``[B]`` (or None)."""

    logits: torch.Tensor
    confidence: Optional[torch.Tensor]


@dataclass(frozen=True)
class ExitSpec:
    """Where an exit attaches and what it is.

    Args:
        after: name of the backbone block the exit reads (e.g. ``"layer1.2"``).
        kind: ``"conv"`` (PTEENet), ``"linear"`` (BranchyNet) or ``"sdn"`` (SDN).
        depth: number of conv-BN-ReLU layers of a ``"conv"`` branch.
        stride: stride of the branch's first conv; 2 (the default) quarters the head's FLOPs,
            which matters because a head's cost is paid by every sample that reaches it.
        cells: side of an ``"sdn"`` head's pooled map.
        hidden: width of an ``"sdn"`` head's hidden layer (0: none, the classifier reads the pooled map).
    """

    after: str
    kind: str = "conv"
    depth: int = 1
    stride: int = 2
    cells: int = 4
    hidden: int = 0

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"exit kind must be one of {EXIT_KINDS}, got {self.kind!r}")
        if self.depth < 0 or self.stride < 1 or self.cells < 1 or self.hidden < 0:
            raise ValueError(f"exit depth and hidden must be >= 0, stride and cells >= 1; got depth {self.depth}, "
                             f"stride {self.stride}, cells {self.cells}, hidden {self.hidden}")


class PooledMaps(nn.Module):
    """The weightless half of SDN's feature reduction: average and max pooling to ``cells x cells``, stacked
    as ``[B, 2, C, cells, cells]``."""

    def __init__(self, cells: int) -> None:
        super().__init__()
        self.cells = cells

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([nn.functional.adaptive_avg_pool2d(x, self.cells),
                            nn.functional.adaptive_max_pool2d(x, self.cells)], 1)


class MixedPool(nn.Module):
    """SDN's feature reduction, given :class:`PooledMaps`: ``a * max + (1 - a) * avg``, ``a`` learned, flattened."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(()))  # a = sigmoid(mix) = 0.5 at start

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.mix)
        return (a * pooled[:, 1] + (1 - a) * pooled[:, 0]).flatten(1)


class ExitBranch(nn.Module):
    """An early exit: optional conv layers, pooling, classifier and confidence head.

    Args:
        in_channels: channels of the feature map at the attachment point.
        num_classes: number of classes.
        kind: ``"conv"``, ``"linear"`` or ``"sdn"`` (see module docstring).
        depth: conv-BN-ReLU layers for ``"conv"``; ignored otherwise.
        stride: stride of the first conv layer.
        cells: side of the pooled map for ``"sdn"``.
        hidden: hidden width for ``"sdn"`` (0: none).
    """

    def __init__(self, in_channels: int, num_classes: int, kind: str = "conv", depth: int = 1,
                 stride: int = 2, cells: int = 4, hidden: int = 0) -> None:
        super().__init__()
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
            self.pool = nn.Sequential(MixedPool(), nn.BatchNorm1d(width),
                                      *((nn.Linear(width, hidden), nn.ReLU(inplace=True)) if hidden else ()))
            width = hidden or width
        else:
            self.reduce = nn.Identity()
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(width, num_classes)
        self.confidence = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> ExitOutput:
        return self.head(self.reduce(x))

    def head(self, reduced: torch.Tensor) -> ExitOutput:
        """The exit's weighted part, on ``reduce(x)``."""
        pooled = self.pool(self.features(reduced))
        return ExitOutput(self.classifier(pooled), torch.sigmoid(self.confidence(pooled)).squeeze(1))


class BackboneHeadExit(nn.Module):
    """The backbone's own classifier head, used as the last exit."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> ExitOutput:
        return ExitOutput(self.head(x), None)

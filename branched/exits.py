"""Exit branches: small classifiers with a confidence head that attach after a backbone block.

* ``"conv"``: PTEENet's branch, ``depth`` x [conv3x3 -> BN -> ReLU] at the attachment's width,
  global average pool, then a linear classifier and a confidence head (linear -> sigmoid).
* ``"linear"``: the light BranchyNet/SDN variant, global average pool -> linear classifier, with
  the same confidence head on the pooled features.

The backbone's own head is the last exit (:class:`BackboneHeadExit`); it has no confidence head
and, being last, accepts every sample that reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

__all__ = ["ExitOutput", "ExitSpec", "ExitBranch", "BackboneHeadExit", "EXIT_KINDS"]

EXIT_KINDS = ("conv", "linear")


class ExitOutput(NamedTuple):
    """What an exit returns for a batch: class logits ``[B, C]`` and confidence ``[B]`` (or None)."""

    logits: torch.Tensor
    confidence: Optional[torch.Tensor]


@dataclass(frozen=True)
class ExitSpec:
    """Where an exit attaches and what it is.

    Args:
        after: name of the backbone block the exit reads (e.g. ``"layer1.2"``).
        kind: ``"conv"`` (PTEENet) or ``"linear"`` (BranchyNet/SDN-style).
        depth: number of conv-BN-ReLU layers of a ``"conv"`` branch.
        stride: stride of the branch's first conv; 2 (the default) quarters the head's FLOPs,
            which matters because a head's cost is paid by every sample that reaches it.
    """

    after: str
    kind: str = "conv"
    depth: int = 1
    stride: int = 2

    def __post_init__(self) -> None:
        if self.kind not in EXIT_KINDS:
            raise ValueError(f"exit kind must be one of {EXIT_KINDS}, got {self.kind!r}")
        if self.depth < 0 or self.stride < 1:
            raise ValueError(f"exit depth must be >= 0 and stride >= 1, got {self.depth}, {self.stride}")


class ExitBranch(nn.Module):
    """An early exit: optional conv layers, pooling, classifier and confidence head.

    Args:
        in_channels: channels of the feature map at the attachment point.
        num_classes: number of classes.
        kind: ``"conv"`` or ``"linear"`` (see module docstring).
        depth: conv-BN-ReLU layers for ``"conv"``; ignored for ``"linear"``.
        stride: stride of the first conv layer.
    """

    def __init__(self, in_channels: int, num_classes: int, kind: str = "conv", depth: int = 1,
                 stride: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if kind == "conv":
            for i in range(depth):
                layers += [nn.Conv2d(in_channels, in_channels, 3, stride=stride if i == 0 else 1,
                                     padding=1, bias=False),
                           nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.classifier = nn.Linear(in_channels, num_classes)
        self.confidence = nn.Linear(in_channels, 1)

    def forward(self, x: torch.Tensor) -> ExitOutput:
        pooled = self.pool(self.features(x))
        return ExitOutput(self.classifier(pooled), torch.sigmoid(self.confidence(pooled)).squeeze(1))


class BackboneHeadExit(nn.Module):
    """The backbone's own classifier head, used as the last exit."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> ExitOutput:
        return ExitOutput(self.head(x), None)

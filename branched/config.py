"""What a branched model is, as data: the JSON half of the artifact (``config.json``).

:class:`ModelConfig` is everything needed to rebuild a :class:`~branched.model.BranchedModel`
besides its weights: backbone, input and normalisation, class names, exit placement, thresholds
and policy, FLOPs table, LC-Net gate settings and the build's provenance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from .exits import ExitSpec
from .routing import check_policy

__all__ = ["ModelConfig", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a branched model (the JSON half of the artifact).

    Attributes:
        backbone: backbone registry name (:func:`branched.backbones.available_backbones`).
        num_classes: number of classes.
        input_size: side of the square input the model runs at.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        class_names: one label per class.
        exits: side exits in backbone order (the backbone head is always the last exit).
        thresholds: one per side exit (see :mod:`branched.routing`).
        policy: exit policy name.
        dynamic: LC-Net gate settings (:mod:`branched.lcnet`), or None.
        cost: FLOPs table (filled in when the model is built).
        meta: free-form provenance (dataset, calibration report, training settings).
    """

    backbone: str
    num_classes: int
    input_size: int = 32
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    class_names: list[str] = field(default_factory=list)
    exits: list[ExitSpec] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    policy: str = "confidence"
    dynamic: Optional[dict[str, Any]] = None
    cost: Optional[dict[str, Any]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.exits = [e if isinstance(e, ExitSpec) else ExitSpec(**e) for e in self.exits]
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if not self.thresholds:
            self.thresholds = [1.0] * len(self.exits)
        if len(self.thresholds) != len(self.exits):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.exits)} early exits")
        check_policy(self.policy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exits"] = [asdict(e) for e in self.exits]
        return d

"""What a build is asked to do: :class:`BuildSettings` (the Python API's argument; ``branched build`` fills
one from its options), the per-dataset training :data:`RECIPES` and the offline :data:`DEMO` default."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UsageError
from .guarantee import P_VALUES_BY_LOSS

__all__ = ["BuildSettings", "Recipe", "RECIPES", "LR_SCALE", "DEFAULT_BACKBONE", "DEFAULT_DATASET", "DEMO"]

DEFAULT_BACKBONE = "cifar_resnet56"
DEFAULT_DATASET = "mnist5k"
# What a build with neither backbone nor dataset named builds.
DEMO = {"backbone": DEFAULT_BACKBONE, "dataset": DEFAULT_DATASET, "input_size": 16,
        "exits": "layer1.0,layer2.0,layer3.0"}


@dataclass(frozen=True)
class Recipe:
    """Per-dataset training defaults (every field can be overridden in :class:`BuildSettings`)."""

    epochs: int
    lr: float
    augment: str
    exit_epochs: int
    exit_lr: float = 0.01
    batch_size: int = 128


RECIPES: dict[str, Recipe] = {
    # Bundled digits: 3,000 training images are learned in a few epochs without augmentation.
    "mnist5k": Recipe(epochs=4, lr=0.1, augment="none", exit_epochs=15),
    "cifar10": Recipe(epochs=30, lr=0.1, augment="crop_flip", exit_epochs=10),
    "svhn": Recipe(epochs=15, lr=0.05, augment="crop", exit_epochs=8),
    "imagefolder": Recipe(epochs=30, lr=0.05, augment="crop_flip", exit_epochs=10),
}


# Plain (non-residual) VGGs diverge at the ResNet learning rate on short one-cycle schedules.
LR_SCALE = {"vgg": 0.2}


@dataclass
class BuildSettings:
    """Everything a build needs; ``None`` means "the default" (the demo, or the dataset's :class:`Recipe`).

    ``branched build --help`` describes each option; the field names are the options' names with
    ``_`` for ``-``. Only ``out`` is required.
    """

    out: str
    # backbone and data
    backbone: Optional[str] = None
    dataset: Optional[str] = None
    data_root: Optional[str] = None
    weights: Optional[str] = None
    input_size: Optional[int] = None
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    split_seed: int = 0
    calib_fraction: Optional[float] = None
    limit_train: Optional[int] = None
    limit_calib: Optional[int] = None
    limit_test: Optional[int] = None
    # exits
    exits: Optional[str] = None
    spacing: str = "even"
    exit_kind: Optional[str] = None  # None: conv on conv maps, mlp on tokens and channels-last maps
    exit_depth: int = 2
    exit_stride: int = 2
    exit_cells: int = 4
    exit_hidden: int = 0
    exit_pool: str = "avg"
    policy: str = "auto"
    # training (None: the dataset's recipe)
    epochs: Optional[int] = None
    lr: Optional[float] = None
    batch_size: Optional[int] = None
    augment: Optional[str] = None
    exit_epochs: Optional[int] = None
    exit_lr: Optional[float] = None
    exit_augment: str = "none"
    objective: str = "pteenet"
    cost_weight: float = 0.5
    ce_weight: float = 0.5
    distill: float = 0.0
    temperature: float = 1.0
    precision: str = "fp32"
    resume: bool = False
    # calibration
    max_drop: Optional[float] = None
    max_cost: Optional[float] = None
    delta: float = 0.1
    family: str = "fixed_sequence"
    p_value: Optional[str] = None  # None: binomial for --loss harm, paired for --loss net
    select: str = "ltt"
    guarantee: str = "ltt"
    loss: str = "harm"
    head_cost: str = "flops"
    path_fraction: float = 0.3
    keep_off_exits: bool = False
    # LC-Net gates
    dynamic: Optional[str] = None
    target_cost: float = 0.5
    gate_epochs: int = 10
    # run
    device: str = "cpu"
    seed: int = 0
    threads: Optional[int] = None
    quiet: bool = False

    def resolved(self) -> "BuildSettings":
        """A copy with the defaults filled in (the demo when neither backbone nor dataset is named).

        Raises:
            UsageError: a setting that cannot work (with the fix in the message).
        """
        s = dataclasses.replace(self)
        if s.backbone is None and s.dataset is None:
            for key, value in DEMO.items():
                if getattr(s, key) is None:
                    setattr(s, key, value)
        s.backbone = s.backbone or DEFAULT_BACKBONE
        s.dataset = s.dataset or DEFAULT_DATASET
        s.exits = s.exits or "3"
        if s.device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
        elif s.device != "cpu":
            raise UsageError(f"--device must be cpu or cuda, got {s.device!r}")
        for name in ("limit_train", "limit_calib", "limit_test", "epochs", "exit_epochs", "batch_size", "input_size"):
            value = getattr(s, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if s.max_drop is not None and s.max_cost is not None:
            raise UsageError("give at most one budget: --max-drop or --max-cost")
        if s.p_value is not None and s.loss in P_VALUES_BY_LOSS:  # an unknown loss is calibration's error to name
            methods = P_VALUES_BY_LOSS[s.loss]
            if s.p_value not in methods:
                raise UsageError(f"--loss {s.loss} takes --p-value {' or '.join(methods)}, got {s.p_value}")
        if s.head_cost not in ("flops", "measured"):
            raise UsageError(f"--head-cost must be flops or measured, got {s.head_cost!r}")
        return s

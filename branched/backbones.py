"""Turn a torchvision classifier into an ordered list of named blocks and a head.

A *block* is the unit at which exits may attach (a ResNet basic/bottleneck block, a VGG
conv-BN-ReLU group, a DenseNet dense layer or transition, a MobileNet inverted residual, a ViT
encoder layer...). Running the blocks in order and then the head reproduces the torchvision
model's forward exactly.

ResNet, VGG-BN and DenseNet are cut by hand here; every other family (MobileNet, EfficientNet,
RegNet, ConvNeXt, ViT, Swin, a user's own model) is registered in :mod:`branched.families` and
cut by :func:`branched.blocks.cut_model`. For the hand-cut ones, two families of input size:

* ImageNet-style (``resnet18``, ``vgg16_bn``, ``densenet121``...): the torchvision model as is.
* CIFAR-style (``cifar_resnet18``, ``cifar_vgg16_bn``, ``cifar_densenet121``, and the
  He et al. CIFAR ResNets ``cifar_resnet20/32/56/110``): a 3x3 stride-1 stem and no max-pool,
  so 32x32 inputs keep their resolution, as PTEENet served SVHN/CIFAR-10.

Weights never download: they come from a local checkpoint, a torchvision weights file already in
the torch hub cache, or training (``branched.build.train``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
import torch
from torch import nn
from torchvision import models
from torchvision.models.densenet import _DenseBlock
from torchvision.models.resnet import BasicBlock

from . import families
from .blocks import cut_model

__all__ = [
    "Backbone",
    "BACKBONES",
    "available_backbones",
    "build_backbone",
    "load_backbone_weights",
]


@dataclass
class Backbone:
    """A classifier cut into blocks.

    Attributes:
        name: registry name, e.g. ``"cifar_resnet20"``.
        blocks: ordered ``(block_name, module)`` pairs; block names follow the torchvision
            module paths (``"layer2.1"``, ``"features.14"``, ``"features.denseblock3.denselayer4"``).
        head: the backbone's own classifier (pooling + flatten + linear layers).
        num_classes: width of the head's output.
        default_input_size: side length the architecture is meant for.
        model: the whole torchvision model the blocks were cut from (they share modules).
        layout: how the backbone's rank-4 features are laid out, ``"nchw"`` or ``"nhwc"`` (Swin);
            rank-3 features are token sequences ``[B, N, D]`` whatever this says.
    """

    name: str
    blocks: list[tuple[str, nn.Module]]
    head: nn.Module
    num_classes: int
    default_input_size: int
    model: nn.Module
    layout: str = "nchw"

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The torchvision model's state_dict: what ``load_backbone_weights`` reads back."""
        return self.model.state_dict()

    @property
    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]


class DenseLayerStep(nn.Module):
    """One DenseNet layer as a block: ``x -> cat([x, layer(x)])``.

    torchvision's ``_DenseBlock`` keeps a list of features and concatenates them for every layer;
    carrying the concatenation itself between blocks is numerically the same and lets an exit
    attach after any dense layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A list, as _DenseBlock passes it: _DenseLayer branches on isinstance(input, Tensor), and an
        # FX trace (BN folding) would otherwise take the list branch for a tensor proxy.
        return torch.cat([x, self.layer([x])], dim=1)


# ---------------------------------------------------------------- building
def _cifar_stem(model: nn.Module) -> None:
    """3x3 stride-1 stem and no max-pool, so 32x32 inputs keep their resolution."""
    if isinstance(model, models.ResNet):
        width = model.conv1.out_channels
        model.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        model.maxpool = nn.Identity()
    elif isinstance(model, models.DenseNet):
        f = model.features
        f.conv0 = nn.Conv2d(3, f.conv0.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        f.pool0 = nn.Identity()
    elif isinstance(model, models.VGG):
        # 32x32 inputs leave 1x1x512 after five pools; the 4096-wide ImageNet classifier
        # would dwarf the convolutions, so CIFAR VGGs use one linear layer.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, model.classifier[-1].out_features)


class _CifarResNet(models.ResNet):
    """He et al. (2016) CIFAR ResNet-(6n+2): three stages of 16/32/64 channels, BasicBlocks."""

    def __init__(self, depth: int, num_classes: int) -> None:
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110), got {depth}")
        n = (depth - 2) // 6
        nn.Module.__init__(self)
        # ResNet._make_layer reads these attributes.
        self._norm_layer = nn.BatchNorm2d
        self.inplanes, self.dilation, self.groups, self.base_width = 16, 1, 1, 64
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        self.layer1 = self._make_layer(BasicBlock, 16, n)
        self.layer2 = self._make_layer(BasicBlock, 32, n, stride=2)
        self.layer3 = self._make_layer(BasicBlock, 64, n, stride=2)
        self.layer4 = None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_CIFAR_RESNET_DEPTHS = families.CIFAR_RESNET_DEPTHS
BACKBONES: tuple[str, ...] = families.HAND_CUT


def available_backbones() -> list[str]:
    """Every backbone name: the hand-cut families, the registered ones and installed entry points."""
    return sorted(set(BACKBONES) | set(families.family_names()))


def _make_model(name: str, num_classes: int) -> nn.Module:
    """The whole (untrained) torchvision model; its state_dict keys are torchvision's own."""
    if name not in BACKBONES:
        fam = families.family(name)
        if fam is None:
            raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(available_backbones())}; "
                             f"or register your own model (branched.families.register_backbone, or an "
                             f"entry point in the group '{families.ENTRY_POINT_GROUP}')")
        return fam.factory(num_classes)
    arch = name.removeprefix("cifar_")
    if name.startswith("cifar_resnet") and int(arch.removeprefix("resnet")) in _CIFAR_RESNET_DEPTHS:
        return _CifarResNet(int(arch.removeprefix("resnet")), num_classes)
    model = getattr(models, arch)(weights=None, num_classes=num_classes)
    if name.startswith("cifar_"):
        _cifar_stem(model)
    return model


def _cut(name: str, model: nn.Module, num_classes: int) -> Backbone:
    """Cut a torchvision model into blocks and a head, sharing its modules (no copies)."""
    blocks: list[tuple[str, nn.Module]]
    if name not in BACKBONES:
        fam = families.family(name)
        blocks, head = cut_model(model, fam.blocks, fam.input_size)
        return Backbone(name, blocks, head, num_classes, fam.input_size, model, fam.layout)
    if isinstance(model, models.ResNet):
        blocks = [("stem", nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool))]
        for layer_name in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(model, layer_name, None) or ()):
                blocks.append((f"{layer_name}.{i}", block))
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    elif isinstance(model, models.DenseNet):
        f = model.features
        blocks = [("features.stem", nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0))]
        for child_name, module in f.named_children():
            if isinstance(module, _DenseBlock):
                for layer_name, layer in module.named_children():
                    blocks.append((f"features.{child_name}.{layer_name}", DenseLayerStep(layer)))
            elif child_name.startswith("transition"):
                blocks.append((f"features.{child_name}", module))
        head = nn.Sequential(f.norm5, nn.ReLU(inplace=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                             model.classifier)
    elif isinstance(model, models.VGG):
        blocks = _vgg_blocks(model.features)
        head = nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    else:  # pragma: no cover - _make_model builds only the three families under these names
        raise TypeError(f"cannot cut a {type(model).__name__} into blocks")
    return Backbone(name, blocks, head, num_classes, 32 if name.startswith("cifar_") else 224, model)


def _vgg_blocks(features: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """Group ``features`` into conv-BN-ReLU(-MaxPool) blocks named by their conv's index."""
    blocks: list[tuple[str, nn.Module]] = []
    current: list[nn.Module] = []
    start = 0
    for i, layer in enumerate(features):
        if isinstance(layer, nn.Conv2d) and current:
            blocks.append((f"features.{start}", nn.Sequential(*current)))
            current, start = [], i
        current.append(layer)
    blocks.append((f"features.{start}", nn.Sequential(*current)))
    return blocks


def build_backbone(name: str, num_classes: int) -> Backbone:
    """Build an untrained backbone, cut into blocks.

    Args:
        name: one of :func:`available_backbones`.
        num_classes: output width of the head.

    Raises:
        ValueError: for an unknown name (the message lists the known ones), or a registered model
            that cannot be cut (:class:`branched.blocks.CutError`, which says why).
    """
    return _cut(name, _make_model(name, num_classes), num_classes)


def _torchvision_weights(spec: str):
    """``"ResNet18_Weights.IMAGENET1K_V1"`` -> the torchvision weights enum member, or None."""
    enum_name, dot, member = spec.partition(".")
    if not dot or os.sep in spec:
        return None
    enum = getattr(models, enum_name, None)
    return getattr(enum, member, None) if enum is not None else None


# torchvision's DenseNet checkpoints predate its module names ("denselayer1.norm.1.weight"); torchvision
# renames the keys when it loads them itself, and so do we.
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _torchvision_keys(state: dict) -> dict:
    """A checkpoint's state_dict with torchvision's old key names and a DDP ``module.`` prefix undone."""
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return {(lambda m: m.group(1) + m.group(2) if m else k)(_OLD_DENSENET_KEY.match(k)): v for k, v in state.items()}


def load_backbone_weights(name: str, num_classes: int, spec: str) -> Backbone:
    """Build backbone ``name`` and load its weights from ``spec``, offline.

    Args:
        name: backbone registry name.
        num_classes: output width of the head.
        spec: a local checkpoint path holding a ``state_dict`` of the torchvision model (as
            ``torch.save(model.state_dict())`` writes it; ``{"state_dict": ...}`` also works), or a
            torchvision weights name such as ``"ResNet18_Weights.IMAGENET1K_V1"`` or
            ``"ViT_B_16_Weights.DEFAULT"`` whose file is already in the torch hub cache. torchvision's
            own files load as they are (old DenseNet key names are renamed as torchvision does).

    Raises:
        FileNotFoundError: the checkpoint (or cached torchvision file) is not on disk.
        ValueError: the file is not a weights-only checkpoint or does not fit the architecture.
    """
    enum = _torchvision_weights(spec)
    if enum is not None:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(enum.url))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"torchvision weights {spec} are not in the local cache ({path}); nothing is downloaded "
                f"here: fetch {enum.url} on a connected machine and copy it to that path")
    else:
        path = spec
        if not os.path.isfile(path):
            raise FileNotFoundError(f"backbone checkpoint {path!r} does not exist; pass a local .pt/.pth state_dict")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not a weights-only checkpoint"
        raise ValueError(f"cannot read {path!r} as a weights-only PyTorch checkpoint: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}, expected a state_dict")
    state = _torchvision_keys(state)
    model = _make_model(name, num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:2]
        raise ValueError(f"{path!r} does not fit {name} with {num_classes} classes: {' '.join(first)}") from None
    return _cut(name, model, num_classes)

"""Backbones beyond ResNet, VGG and DenseNet: torchvision's other classifiers, and a user's own model.

Every family here is cut by one mechanism, :func:`branched.blocks.cut_model`: blocks are the
model's own modules under their dotted names (``features.3``, ``encoder.layers.encoder_layer_5``),
found by tracing with ``torch.fx`` unless a family names them.

* torchvision as it builds them, at their native input size: ``mobilenet_v2``,
  ``mobilenet_v3_small/large``, ``efficientnet_b0..b7``, ``efficientnet_v2_s/m/l``, the RegNets
  (``regnet_y_400mf`` ... ``regnet_x_32gf``), ``convnext_tiny/small/base/large``, the ViTs
  (``vit_b_16`` ...), ``swin_t/s/b`` and ``swin_v2_t/s/b``;
* CIFAR-sized settings where they make sense: ``cifar_`` + a MobileNet, EfficientNet or RegNet
  name (the stem convolution at stride 1, so a 32x32 input ends at 2x2 rather than 1x1; the
  weights keep their shapes, so an ImageNet checkpoint still loads), and two small ViTs at 32 px:
  ``cifar_vit_tiny`` (patch 4, 12 layers of width 192, DeiT-Tiny's shape) and ``cifar_vit_micro``
  (patch 8, 4 layers of width 32: tests and demos);
* a user's own model: :func:`register_backbone` in the process, or an entry point in the group
  ``branched.backbones`` (so that a server that loads a model directory finds it too).

Feature layouts: rank-3 features are token sequences ``[B, N, D]``; a family says how its rank-4
features are laid out (``"nchw"``, or ``"nhwc"`` for Swin's channels-last maps).
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Optional, Sequence

from torch import nn
from torchvision import models

__all__ = ["Family", "LAYOUTS", "ENTRY_POINT_GROUP", "HAND_CUT", "register_backbone", "family", "family_names"]

LAYOUTS = ("nchw", "nhwc")
ENTRY_POINT_GROUP = "branched.backbones"

# The families :mod:`branched.backbones` cuts by hand (ResNet, VGG-BN, DenseNet and their CIFAR settings);
# their names are listed here so that a registration cannot take one (and this module needs no import of
# ``backbones``, which imports it).
CIFAR_RESNET_DEPTHS = (20, 32, 56, 110)
HAND_CUT_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "vgg11_bn", "vgg16_bn", "vgg19_bn", "densenet121")
HAND_CUT: tuple[str, ...] = tuple(sorted(
    list(HAND_CUT_ARCHS) + [f"cifar_{a}" for a in HAND_CUT_ARCHS] + [f"cifar_resnet{d}" for d in CIFAR_RESNET_DEPTHS]))


@dataclass(frozen=True)
class Family:
    """How to build and cut one backbone.

    Attributes:
        factory: ``num_classes -> nn.Module``, the untrained model (weights are loaded afterwards).
        input_size: the side of the square input the model is meant for.
        layout: how rank-4 features are laid out: ``"nchw"`` (convolutions) or ``"nhwc"``.
        blocks: dotted module names whose outputs chain, or None to find them by tracing.
    """

    factory: Callable[[int], nn.Module]
    input_size: int = 224
    layout: str = "nchw"
    blocks: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


_REGISTRY: dict[str, Family] = {}


def register_backbone(name: str, factory: Callable[[int], nn.Module], *, input_size: int = 224,
                      layout: str = "nchw", blocks: Optional[Sequence[str]] = None, replace: bool = False) -> None:
    """Make a model that is not in the registry available as backbone ``name``.

    Args:
        name: the name configs and ``--backbone`` use.
        factory: ``num_classes -> nn.Module``; called for every build and every load, with fresh
            (untrained) weights that a checkpoint or the model directory then overwrites.
        input_size: the model's input side.
        layout: ``"nchw"`` or ``"nhwc"`` (how the model's rank-4 features are laid out).
        blocks: dotted module names whose outputs chain (``["layer1", "layer2.0", ...]``); None finds
            them by tracing the forward with ``torch.fx`` (:func:`branched.blocks.find_blocks`).
        replace: allow replacing an existing registration.

    Raises:
        ValueError: a name that is already taken (without ``replace``), or a bad layout.
    """
    if name in HAND_CUT or (name in _REGISTRY and not replace):
        raise ValueError(f"backbone name {name!r} is taken; choose another or pass replace=True")
    _REGISTRY[name] = Family(factory, int(input_size), layout, tuple(blocks) if blocks is not None else None)


def family(name: str) -> Optional[Family]:
    """The family registered as ``name``, loading an installed ``branched.backbones`` entry point if needed.

    An entry point may name a module (importing it registers the backbone) or a factory
    ``num_classes -> nn.Module`` (registered with the defaults of :func:`register_backbone`).
    """
    if name not in _REGISTRY:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name == name:
                obj = ep.load()
                if name not in _REGISTRY and callable(obj):
                    register_backbone(name, obj)
                break
    return _REGISTRY.get(name)


def family_names() -> list[str]:
    """Registered names, and installed entry points (not loaded)."""
    return sorted(set(_REGISTRY) | {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


# ---------------------------------------------------------------------------- torchvision's families
def _stride_one_stem(model: nn.Module) -> nn.Module:
    """CIFAR setting: the first convolution (the stem) at stride 1; its weights keep their shape."""
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    stem.stride = (1, 1)
    return model


def _torchvision(arch: str, cifar: bool = False) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        model = getattr(models, arch)(weights=None, num_classes=num_classes)
        return _stride_one_stem(model) if cifar else model
    build.__qualname__ = f"build_{'cifar_' if cifar else ''}{arch}"
    return build


def _small_vit(patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
               mlp_dim: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        return models.VisionTransformer(image_size=32, patch_size=patch_size, num_layers=num_layers,
                                        num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                        num_classes=num_classes)
    return build


_NATIVE = {
    **{a: 224 for a in ("mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large")},
    **{f"efficientnet_b{i}": s for i, s in enumerate((224, 240, 288, 300, 380, 456, 528, 600))},
    "efficientnet_v2_s": 384, "efficientnet_v2_m": 480, "efficientnet_v2_l": 480,
    **{f"regnet_{k}_{s}": 224 for k in "xy" for s in ("400mf", "800mf", "1_6gf", "3_2gf", "8gf", "16gf", "32gf")},
    "regnet_y_128gf": 224,
    **{f"convnext_{s}": 224 for s in ("tiny", "small", "base", "large")},
    **{f"vit_{s}": 224 for s in ("b_16", "b_32", "l_16", "l_32", "h_14")},
}
_CIFAR = [a for a in _NATIVE if a.startswith(("mobilenet", "efficientnet_b", "regnet"))]

for _arch, _size in _NATIVE.items():
    _REGISTRY[_arch] = Family(_torchvision(_arch), _size)
for _arch in _CIFAR:
    _REGISTRY[f"cifar_{_arch}"] = Family(_torchvision(_arch, cifar=True), 32)
for _arch, _size in {"swin_t": 224, "swin_s": 224, "swin_b": 224,
                     "swin_v2_t": 256, "swin_v2_s": 256, "swin_v2_b": 256}.items():
    _REGISTRY[_arch] = Family(_torchvision(_arch), _size, "nhwc")
_REGISTRY["cifar_vit_tiny"] = Family(_small_vit(4, 12, 3, 192, 768), 32)
_REGISTRY["cifar_vit_micro"] = Family(_small_vit(8, 4, 2, 32, 64), 32)

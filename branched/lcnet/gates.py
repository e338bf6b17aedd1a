"""LC-Net dynamic inference: per-input layer skipping (L-Net) and channel skipping (C-Net).

After Xia, Yin, Dai and Jha, "Fully Dynamic Inference with Deep Neural Networks" (2020). A compact
gate network reads a residual block's input (global-average-pooled) and decides, per sample,

* **L-Net** (``mode="layer"``): run the block or skip it (the output is then the input: identity).
  Only blocks with an identity shortcut can be skipped; the gate also predicts a scale for the
  residual branch of the samples that run it.
* **C-Net** (``mode="channel"``): which of the block's inner channels (the first conv's filters,
  which are the second conv's input channels) to compute, and a scale for each kept channel.

``mode="both"`` gives each block both gates from one shared gate network. Scales are
``2 * sigmoid(a)``: exactly 1 for ``a = 0``, where a fresh gate starts.

Real savings, not masks: :meth:`GatedBlock.forward_with_cost` runs the block only on the rows
of the samples that keep it (compaction, as routing does between exits), computes only the union
of the kept channels of those samples (the conv weights are sliced), and returns the FLOPs
spent on each sample, counted the way ``torch.utils.flop_counter`` counts them (gate included).
A sample's channel cost therefore depends on the batch it is served in: the union of a batch
is never smaller than one sample's mask. :meth:`GatedBlock.forward` computes everything and
applies the decisions as masks (hard, or relaxed with straight-through Gumbel noise for
training, see :mod:`branched.build.lcnet_train`). ``GatedBlock.ungated`` is the original block: the
core's plain-backbone path (``backbone_forward``, ``without_exits``, the FLOP table) runs it, so
the plain backbone stays the baseline even when the gated path fine-tunes its own copy.

This module holds the settings and the wiring (:func:`gate_settings`, :func:`apply_gates` used by
``BranchedModel.from_config``); the modules live in :mod:`branched.lcnet.blocks`, and gating a model
for training (``add_gates``) is build-time code in :mod:`branched.build.lcnet_train`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..backbones import Backbone
from .blocks import DEFAULT_HIDDEN, GatedBlock

__all__ = ["MODES", "gate_settings", "apply_gates", "gated_blocks"]

MODES = ("layer", "channel", "both")


# ---------------------------------------------------------------------- building
def _eligible(block: nn.Module, mode: str) -> tuple[bool, bool]:
    """Which gates ``block`` can take under ``mode``: (layer, channel)."""
    if not isinstance(block, (BasicBlock, Bottleneck)):
        return False, False
    layer = mode in ("layer", "both") and block.downsample is None
    channel = mode in ("channel", "both") and block.conv1.groups == 1
    return layer, channel


def gate_settings(backbone: Backbone, mode: str, hidden: int = DEFAULT_HIDDEN,
                  blocks: Optional[list[str]] = None, finetune: bool = True, **extra: Any) -> dict[str, Any]:
    """The ``config.dynamic`` dict for gating ``backbone``, with the gated blocks spelled out.

    Args:
        backbone: a ResNet-family backbone.
        mode: ``"layer"`` (L-Net), ``"channel"`` (C-Net) or ``"both"`` (LC-Net).
        hidden: gate hidden width.
        blocks: block names to gate; default every residual block that can take a gate under ``mode``
            (layer gates need an identity shortcut, so downsampling blocks get channel gates only).
        finetune: the gated blocks get their own copy of the weights, trained with the gates
            (:class:`GatedBlock`); the plain backbone keeps the original weights. Without it the
            gates must work with the frozen blocks, which costs far more accuracy at a given budget.
        extra: further keys recorded as they are (e.g. ``target_cost``).

    Raises:
        ValueError: unknown mode, a backbone without residual blocks, or a block that cannot be gated.
    """
    if mode not in MODES:
        raise ValueError(f"dynamic mode must be one of {', '.join(MODES)}, got {mode!r}")
    if hidden < 1:
        raise ValueError(f"gate hidden width must be at least 1, got {hidden}")
    by_name = dict(backbone.blocks)
    if blocks is None:
        blocks = [n for n, b in backbone.blocks if any(_eligible(b, mode))]
        if not blocks:
            raise ValueError(f"{backbone.name} has no residual block that can take a {mode} gate; "
                             f"LC-Net gates need a ResNet backbone (e.g. cifar_resnet20, resnet18)")
    for name in blocks:
        if name not in by_name:
            raise ValueError(f"cannot gate {name!r}: {backbone.name} has no such block")
        if not any(_eligible(by_name[name], mode)):
            raise ValueError(f"block {name!r} of {backbone.name} cannot take a {mode} gate "
                             f"(layer gates need a residual block with an identity shortcut)")
    return {"mode": mode, "hidden": int(hidden), "blocks": list(blocks), "finetune": bool(finetune), **extra}


def apply_gates(backbone: Backbone, settings: Mapping[str, Any]) -> Backbone:
    """``backbone`` with the blocks named in ``settings`` wrapped in :class:`GatedBlock` (weights shared).

    Args:
        backbone: the backbone (its blocks are wrapped, not copied).
        settings: ``config.dynamic``: ``mode``, ``hidden``, ``blocks`` and ``finetune`` (see :func:`gate_settings`).
    """
    mode = settings.get("mode")
    resolved = gate_settings(backbone, mode, int(settings.get("hidden", DEFAULT_HIDDEN)), settings.get("blocks"),
                             bool(settings.get("finetune", False)))
    chosen = set(resolved["blocks"])
    blocks = []
    for name, block in backbone.blocks:
        if name in chosen and not isinstance(block, GatedBlock):
            layer, channel = _eligible(block, mode)
            block = GatedBlock(block, layer, channel, resolved["hidden"], resolved["finetune"])
        blocks.append((name, block))
    return Backbone(backbone.name, blocks, backbone.head, backbone.num_classes, backbone.default_input_size,
                    backbone.model)


def gated_blocks(model: nn.Module) -> list[GatedBlock]:
    """Every :class:`GatedBlock` of ``model``, in order."""
    return [m for m in model.modules() if isinstance(m, GatedBlock)]

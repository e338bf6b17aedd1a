"""LC-Net building blocks: the gate network and the gated ResNet block (see :mod:`branched.lcnet.gates`).

:class:`Gate` maps a block's pooled input to keep decisions and scales; :class:`GatedBlock` wraps a
torchvision ``BasicBlock``/``Bottleneck``, applying the decisions as masks in ``forward`` (training and
reference) and computing only what they keep in ``forward_with_cost`` (inference, per-sample FLOPs);
:class:`ResidualBranch` is the sliced residual computation both share.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

__all__ = ["DEFAULT_HIDDEN", "GateDecision", "Gate", "ResidualBranch", "GatedBlock"]

DEFAULT_HIDDEN = 16
# A fresh gate keeps everything (logit 1 > 0), so training starts at the backbone; the keep
# probability sigmoid(1) = 0.73 is far enough from saturation for the cost term to move it.
_KEEP_BIAS = 1.0


@dataclass
class GateDecision:
    """One gate's decisions for a batch of ``B`` samples (``None`` where the gate has no such part).

    Attributes:
        layer_keep: ``[B]`` 1 = run the block, 0 = skip it (relaxed values while training).
        layer_scale: ``[B]`` scale of the residual branch of the samples that run it.
        channel_keep: ``[B, M]`` 1 = compute inner channel ``m``.
        channel_scale: ``[B, M]`` scale of each inner channel.
    """

    layer_keep: Optional[torch.Tensor]
    layer_scale: Optional[torch.Tensor]
    channel_keep: Optional[torch.Tensor]
    channel_scale: Optional[torch.Tensor]


def _straight_through(logits: torch.Tensor, tau: float, noise: float) -> torch.Tensor:
    """Binary Gumbel-softmax sample: hard 0/1 forward, relaxed sigmoid gradient backward.

    ``noise`` scales the logistic (Gumbel difference) noise; 0 gives the plain straight-through
    estimator of the deterministic decision that inference takes.
    """
    soft_in = logits
    if noise > 0:
        u = torch.rand_like(logits).clamp_(1e-6, 1.0 - 1e-6)
        soft_in = logits + noise * (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(soft_in / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


class Gate(nn.Module):
    """The compact gate network: pooled block input -> keep logits and scales.

    Args:
        in_channels: channels of the block input.
        hidden: width of the hidden layer.
        layer: predict a keep/skip decision and a scale for the whole block (L-Net).
        channels: inner channels to predict a keep decision and a scale for (C-Net); 0 for none.
    """

    def __init__(self, in_channels: int, hidden: int, layer: bool, channels: int) -> None:
        super().__init__()
        self.layer, self.channels = layer, channels
        self.n_out = 2 * int(layer) + 2 * channels
        self.fc1 = nn.Linear(in_channels, hidden)
        self.fc2 = nn.Linear(hidden, self.n_out)
        keep = self._keep_columns()
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()
            self.fc2.weight[keep].normal_(0.0, 0.01)
            self.fc2.bias[keep] = _KEEP_BIAS

    def _keep_columns(self) -> list[int]:
        """Output layout: [layer keep, layer scale] then [channel keeps (M), channel scales (M)]."""
        cols = [0] if self.layer else []
        start = 2 * int(self.layer)
        return cols + list(range(start, start + self.channels))

    @property
    def flops(self) -> int:
        """FLOPs per sample, as the flop counter counts two linear layers (2 * in * out each)."""
        return 2 * (self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Raw outputs ``[B, n_out]`` for block inputs ``x`` (layout: :meth:`_keep_columns`)."""
        return self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3)))))

    def forward(self, x: torch.Tensor, relaxed: bool = False, tau: float = 1.0, noise: float = 1.0) -> GateDecision:
        """Decisions for a batch: hard (logit > 0), or relaxed straight-through samples for training."""
        z = self.logits(x)
        lk = ls = ck = cs = None
        if self.layer:
            lk = _straight_through(z[:, 0], tau, noise) if relaxed else (z[:, 0] > 0).to(z.dtype)
            ls = 2.0 * torch.sigmoid(z[:, 1])
        if self.channels:
            s = 2 * int(self.layer)
            logits = z[:, s:s + self.channels]
            ck = _straight_through(logits, tau, noise) if relaxed else (logits > 0).to(z.dtype)
            cs = 2.0 * torch.sigmoid(z[:, s + self.channels:])
        return GateDecision(lk, ls, ck, cs)


def _conv_flops(conv: nn.Conv2d, c_out: int, c_in: int, h: int, w: int) -> tuple[int, int, int]:
    """Per-sample FLOPs of ``conv`` with ``c_out`` x ``c_in`` channels on an ``h x w`` input, and its output size.

    The flop counter's convolution formula: 2 * out_h * out_w * c_out * c_in / groups * kh * kw.
    """
    kh, kw = conv.kernel_size
    oh = (h + 2 * conv.padding[0] - conv.dilation[0] * (kh - 1) - 1) // conv.stride[0] + 1
    ow = (w + 2 * conv.padding[1] - conv.dilation[1] * (kw - 1) - 1) // conv.stride[1] + 1
    return 2 * oh * ow * c_out * (c_in // conv.groups) * kh * kw, oh, ow


class ResidualBranch(nn.Module):
    """The residual branch of a gated block, computing only the inner channels it is given.

    It owns no parameters: ``parts`` lists the wrapped block's ``(conv, bn-or-None)`` stages (a
    plain list, so the weights are registered once, under the block). Being a module call, it
    can be observed with forward hooks: a sample that skips the block never reaches it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[tuple[nn.Module, Optional[nn.Module]]] = []
        self._slices: dict[tuple, tuple] = {}

    def set_parts(self, parts: list[tuple[nn.Module, Optional[nn.Module]]]) -> None:
        self.parts = parts
        self._slices.clear()

    def _sliced(self, channels: torch.Tensor) -> tuple:
        """First conv (and BN) restricted to output ``channels``, second conv to input ``channels``.

        At inference the slices are cached per channel set (a trained C-Net reuses a few sets),
        keyed by the weights' identity and version so that a weight update is never missed.
        """
        (c1, bn1), (c2, _) = self.parts[0], self.parts[1]
        key = None
        if not torch.is_grad_enabled():
            key = (tuple(channels.tolist()), c1.weight.data_ptr(), c1.weight._version, c2.weight.data_ptr(),
                   c2.weight._version)
            hit = self._slices.get(key)
            if hit is not None:
                return hit
        fmt = torch.channels_last if c1.weight.is_contiguous(memory_format=torch.channels_last) and \
            not c1.weight.is_contiguous() else torch.contiguous_format
        w1 = c1.weight.index_select(0, channels).contiguous(memory_format=fmt)
        b1 = c1.bias.index_select(0, channels) if c1.bias is not None else None
        bn = None
        if bn1 is not None:
            bn = tuple(t.index_select(0, channels) for t in (bn1.running_mean, bn1.running_var, bn1.weight, bn1.bias))
        w2 = c2.weight.index_select(1, channels).contiguous(memory_format=fmt)
        value = (w1, b1, bn, w2)
        if key is not None:
            if len(self._slices) >= 64:
                self._slices.clear()
            self._slices[key] = value
        return value

    def forward(self, x: torch.Tensor, channels: Optional[torch.Tensor] = None,
                multiplier: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Args:
            x: block input rows ``[n, C, H, W]``.
            channels: indices of the inner channels to compute (all if None).
            multiplier: ``[n, len(channels)]`` keep mask times scale of those channels (None: 1).
        """
        inplace = not torch.is_grad_enabled()  # inference: intermediate tensors are ours to overwrite
        sliced = self._sliced(channels) if channels is not None else None
        h = x
        last = len(self.parts) - 1
        for j, (conv, bn) in enumerate(self.parts):
            weight, bias = conv.weight, conv.bias
            if sliced is not None and j == 0:
                weight, bias = sliced[0], sliced[1]
            elif sliced is not None and j == 1:
                weight = sliced[3]
            h = F.conv2d(h, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            if bn is not None:
                if sliced is not None and j == 0:
                    mean, var, w, b = sliced[2]
                    h = F.batch_norm(h, mean, var, w, b, False, 0.0, bn.eps)
                else:
                    h = bn(h)
            if j < last:
                h = F.relu(h, inplace=inplace)
            if j == 0 and multiplier is not None:
                m = multiplier[:, :, None, None]
                h = h.mul_(m) if inplace else h * m
        return h


class GatedBlock(nn.Module):
    """A torchvision ResNet block (Basic or Bottleneck) with an LC-Net gate.

    Args:
        block: the block; the gated path runs it as ``self.block`` (its weights are shared, not copied).
        layer: add a layer gate (the block must have an identity shortcut).
        channel: add a channel gate over the first conv's output channels.
        hidden: width of the gate's hidden layer.
        finetune: give the gated path its own copy of the block to fine-tune with the gates
            (``self.block``); ``self.original`` stays the plain backbone's block.

    Attributes:
        relaxed: training mode of the gate (straight-through Gumbel decisions, expected cost kept
            in ``expected_flops``); set by :func:`branched.build.lcnet_train.train_gates`.
        tau: Gumbel-softmax temperature while relaxed.
        noise: scale of the Gumbel noise while relaxed (0: plain straight-through).
    """

    def __init__(self, block: nn.Module, layer: bool, channel: bool, hidden: int = DEFAULT_HIDDEN,
                 finetune: bool = False) -> None:
        super().__init__()
        if not isinstance(block, (BasicBlock, Bottleneck)):
            raise TypeError(f"LC-Net gates wrap ResNet blocks, not {type(block).__name__}")
        if layer and block.downsample is not None:
            raise ValueError("a block with a downsampling shortcut cannot be skipped (its output shape differs)")
        if channel and block.conv1.groups != 1:
            raise ValueError("channel gates need an ungrouped first conv")
        # Fine-tuned gated blocks train a copy: the plain backbone (the baseline) keeps its weights.
        self.original = block if finetune else None
        self.block = copy.deepcopy(block) if finetune else block
        self.in_channels = block.conv1.in_channels
        self.mid_channels = block.conv1.out_channels
        self.gate = Gate(self.in_channels, hidden, layer, self.mid_channels if channel else 0)
        self.relaxed = False
        self.tau = 1.0
        self.noise = 1.0
        self.expected_flops: Optional[torch.Tensor] = None
        self._flop_cache: dict[tuple[int, int], tuple[int, int]] = {}
        self.branch = ResidualBranch()
        self._resolve_parts()

    has_layer_gate = property(lambda self: self.gate.layer)
    has_channel_gate = property(lambda self: self.gate.channels > 0)

    @property
    def ungated(self) -> nn.Module:
        """The original block: the plain backbone's path through this position."""
        return self.block if self.original is None else self.original

    @property
    def finetuned(self) -> bool:
        """True when the gated path runs its own (fine-tuned) copy of the block."""
        return self.original is not None

    def _resolve_parts(self) -> None:
        """(conv, bn-or-None) stages of the residual branch and of the shortcut, by name.

        Looked up by name so that a BN-folded block (``torch.fx`` fusion keeps the convs' names
        and drops the BNs) runs through the same code.
        """
        parts = []
        for j in (1, 2, 3):
            conv = getattr(self.block, f"conv{j}", None)
            if conv is not None:
                parts.append((conv, getattr(self.block, f"bn{j}", None)))
        self._parts = parts
        self.branch.set_parts(parts)
        ds = getattr(self.block, "downsample", None)
        self._shortcut = None if ds is None else (ds.get_submodule("0"), getattr(ds, "1", None))

    def optimize_for_inference(self) -> None:
        """Fold BN into the convs of the wrapped block (gated and plain paths alike); serving only."""
        from torch.fx.experimental.optimization import fuse

        for name in ("block", "original"):
            module = getattr(self, name)
            if module is not None:
                try:
                    setattr(self, name, fuse(module.eval()))
                except Exception:  # noqa: BLE001 - untraceable: keep BN unfolded
                    pass
        self._resolve_parts()

    def flop_parts(self, h: int, w: int) -> tuple[int, int]:
        """Per-sample FLOPs of running the block on an ``h x w`` input: ``(fixed, per_channel)``.

        The block costs ``fixed + k * per_channel`` with ``k`` inner channels computed
        (all of them when there is no channel gate: then ``per_channel`` is 0).
        """
        key = (h, w)
        if key not in self._flop_cache:
            (c1, _), (c2, _) = self._parts[0], self._parts[1]
            f1, h1, w1 = _conv_flops(c1, 1, c1.in_channels, h, w)
            f2, h2, w2 = _conv_flops(c2, c2.out_channels, 1, h1, w1)
            per_channel, fixed = f1 + f2, 0
            if len(self._parts) > 2:
                c3 = self._parts[2][0]
                fixed += _conv_flops(c3, c3.out_channels, c3.in_channels, h2, w2)[0]
            if self._shortcut is not None:
                cd = self._shortcut[0]
                fixed += _conv_flops(cd, cd.out_channels, cd.in_channels, h, w)[0]
            if not self.has_channel_gate:
                fixed, per_channel = fixed + self.mid_channels * per_channel, 0
            self._flop_cache[key] = (fixed, per_channel)
        return self._flop_cache[key]

    def _expected_flops(self, x: torch.Tensor, d: GateDecision) -> torch.Tensor:
        """Per-sample FLOPs of the sampled decisions, differentiable through their relaxation (the cost term).

        The straight-through samples are 0/1 forward, so the value is the FLOPs these decisions
        would spend alone; the gradient is the relaxed sigmoid's, which saturates no sooner than
        the task loss's (a cost on the keep probabilities stalls once they saturate).
        """
        fixed, per_channel = self.flop_parts(x.shape[-2], x.shape[-1])
        block = x.new_full((x.shape[0],), float(fixed))
        if d.channel_keep is not None:
            block = block + per_channel * d.channel_keep.sum(dim=1)
        if d.layer_keep is not None:
            block = block * d.layer_keep
        return block + self.gate.flops

    def _identity(self, x: torch.Tensor) -> torch.Tensor:
        if self._shortcut is None:
            return x
        conv, bn = self._shortcut
        h = conv(x)
        return bn(h) if bn is not None else h

    def _finish(self, x: torch.Tensor, residual: torch.Tensor, layer_scale: Optional[torch.Tensor]) -> torch.Tensor:
        if not torch.is_grad_enabled():  # inference: the residual is a fresh tensor, reuse it
            if layer_scale is not None:
                residual.mul_(layer_scale[:, None, None, None])
            return residual.add_(self._identity(x)).relu_()
        if layer_scale is not None:
            residual = residual * layer_scale[:, None, None, None]
        return F.relu(residual + self._identity(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All rows and channels computed, decisions applied as masks (training and reference path)."""
        d = self.gate(x, self.relaxed, self.tau, self.noise)
        mult = d.channel_keep * d.channel_scale if d.channel_keep is not None else None
        y = self._finish(x, self.branch(x, None, mult), d.layer_scale)
        if d.layer_keep is not None:
            keep = d.layer_keep[:, None, None, None]
            y = keep * y + (1.0 - keep) * x
        self.expected_flops = self._expected_flops(x, d) if self.relaxed else None
        return y

    def forward_with_cost(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard decisions, computing only what they keep; returns ``(y, flops[B])`` (float64).

        Samples that skip the block are not computed (their rows pass through); the others run
        with the union of their kept channels. A batch in which every kept sample drops every
        channel still computes one channel (multiplied by zero), so shapes stay valid; it is counted.
        """
        n = x.shape[0]
        fixed, per_channel = self.flop_parts(x.shape[-2], x.shape[-1])
        gate_flops = float(self.gate.flops)
        if n == 0:
            return x, x.new_zeros(0, dtype=torch.float64)
        z = self.gate.logits(x)
        rows = None
        if self.gate.layer:
            rows = (z[:, 0] > 0).nonzero().squeeze(1)
            if rows.numel() == 0:
                return x, torch.full((n,), gate_flops, dtype=torch.float64, device=x.device)
            if rows.numel() == n:
                rows = None
            else:
                z = z.index_select(0, rows)
        xs = x if rows is None else x[rows]  # advanced indexing keeps channels-last; index_select does not
        channels = mult = None
        k = 0
        if self.gate.channels:
            s, m = 2 * int(self.gate.layer), self.gate.channels
            keep = z[:, s:s + m] > 0
            scale_logits = z[:, s + m:]
            channels = keep.any(dim=0).nonzero().squeeze(1)
            k = channels.numel()
            if k == 0:  # nobody keeps a channel: compute one, multiplied by zero
                channels, k = channels.new_zeros(1), 1
            if k == m:
                channels = None
            else:
                keep, scale_logits = keep.index_select(1, channels), scale_logits.index_select(1, channels)
            mult = torch.where(keep, 2.0 * torch.sigmoid(scale_logits), 0.0)
        scale = 2.0 * torch.sigmoid(z[:, 1]) if self.gate.layer else None
        ys = self._finish(xs, self.branch(xs, channels, mult), scale)
        spent = gate_flops + float(fixed + k * per_channel)
        if rows is None:
            return ys, torch.full((n,), spent, dtype=torch.float64, device=x.device)
        flops = torch.full((n,), gate_flops, dtype=torch.float64, device=x.device)
        flops[rows] = spent
        y = x.clone()  # preserves the memory format (index_copy would not)
        y[rows] = ys
        return y, flops

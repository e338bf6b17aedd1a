"""FLOPs per block, segment and exit, counted with ``torch.utils.flop_counter``.

The counter sees what PyTorch dispatches (convolutions, matmuls); element-wise layers
(BN, ReLU, pooling, LayerNorm, softmax) are not counted, for the backbone and the exits alike.

Attention: torch 2.14's ``FlopCounterMode`` has formulas for the CUDA attention kernels only. On
the CPU, ``F.scaled_dot_product_attention`` runs ``aten._scaled_dot_product_flash_attention_for_cpu``
and counts 0; ``nn.MultiheadAttention`` under ``no_grad`` / ``inference_mode`` takes its fast
path, ``aten._native_multi_head_attention``, which hides the q/k/v and output projections as well
(a ViT-B encoder layer counted half its FLOPs); ``nn.TransformerEncoderLayer``'s fast path,
``aten._transformer_encoder_layer_fwd``, hides the whole layer. :func:`flop_counter` is the torch
counter with formulas for these three added (the same matmul counts as the slow paths, so a model
costs the same with and without grad); every count here goes through it.

Cost of a sample that leaves at exit ``k`` = segments ``0..k`` + exit heads ``0..k`` (the heads it
passed were evaluated and rejected it). The last exit is the backbone's head, so a sample that
runs to the end costs more than the plain backbone by the side heads it passed.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["count_flops", "flop_counter", "CostTable", "measure_cost", "eval_mode", "probe_blocks"]

aten = torch.ops.aten


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _attention(q_shape, k_shape, v_shape) -> int:
    """``softmax(q k^T) v``: two batched matmuls, as torch counts them for its CUDA kernels."""
    batch, sq, d = _prod(q_shape[:-2]), q_shape[-2], q_shape[-1]
    return 2 * batch * sq * k_shape[-2] * d + 2 * batch * sq * k_shape[-2] * v_shape[-1]


def _sdpa_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    return _attention(q_shape, k_shape, v_shape)


def _mha(q_shape, k_shape, embed_dim: int, num_heads: int) -> int:
    """q/k/v projections, attention and output projection of batch-first ``[B, L, E]`` inputs."""
    b, lq, lk, e = _prod(q_shape[:-2]), q_shape[-2], k_shape[-2], int(embed_dim)
    h = int(num_heads)
    head = (b, h, lq, e // h)
    return 2 * b * lq * e * e + 2 * 2 * b * lk * e * e + _attention(head, (b, h, lk, e // h), (b, h, lk, e // h)) \
        + 2 * b * lq * e * e


def _native_mha_flop(q_shape, k_shape, v_shape, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    return _mha(q_shape, k_shape, embed_dim, num_heads)


def _encoder_layer_flop(src_shape, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    # args: qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu, norm_first, eps, norm_weight_1,
    # norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1, ffn_bias_1, ffn_weight_2, ...
    ffn = int(args[11][0])
    tokens = _prod(src_shape[:-1])
    return _mha(src_shape, src_shape, embed_dim, num_heads) + 2 * 2 * tokens * int(embed_dim) * ffn


_EXTRA = {getattr(aten, name): formula for name, formula in (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_flop),
    ("_native_multi_head_attention", _native_mha_flop),
    ("_transformer_encoder_layer_fwd", _encoder_layer_flop)) if hasattr(aten, name)}


def flop_counter() -> FlopCounterMode:
    """torch's ``FlopCounterMode`` (no display) with the attention formulas it lacks (module docstring)."""
    mode = FlopCounterMode(display=False)
    mapping = {op: formula for op, formula in _EXTRA.items() if op not in flop_registry}
    return FlopCounterMode(display=False, custom_mapping=mapping) if mapping else mode


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of ``module`` on ``example`` (per :func:`flop_counter`)."""
    counter = flop_counter()
    with torch.no_grad(), counter:
        module(example)
    return int(counter.get_total_flops())


@dataclass
class CostTable:
    """Per-sample FLOPs of every part of a branched model at its input size.

    Attributes:
        block_flops: one entry per backbone block (list per segment).
        exit_flops: one entry per exit; the last is the backbone head.
    """

    block_flops: list[list[int]]
    exit_flops: list[int]
    segment_flops: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.segment_flops = [int(sum(b)) for b in self.block_flops]

    @property
    def backbone_flops(self) -> int:
        """The plain backbone: every segment plus its own head."""
        return int(sum(self.segment_flops) + self.exit_flops[-1])

    def stage_flops(self, k: int) -> int:
        """Segment ``k`` plus exit ``k``: the work of one stage for one sample."""
        return self.segment_flops[k] + self.exit_flops[k]

    def exit_cost(self, k: int) -> int:
        """FLOPs of a sample that leaves at exit ``k`` (rejected heads included)."""
        return int(sum(self.segment_flops[: k + 1]) + sum(self.exit_flops[: k + 1]))

    def exit_cost_fractions(self) -> list[float]:
        return [self.exit_cost(k) / self.backbone_flops for k in range(len(self.exit_flops))]

    def expected_cost_fraction(self, exit_rates: Sequence[float]) -> float:
        """Mean cost fraction for a distribution of exits (rates sum to 1)."""
        if len(exit_rates) != len(self.exit_flops):
            raise ValueError(f"need {len(self.exit_flops)} exit rates, got {len(exit_rates)}")
        return float(sum(r * c for r, c in zip(exit_rates, self.exit_cost_fractions())))

    def to_dict(self) -> dict:
        return {"block_flops": self.block_flops, "segment_flops": self.segment_flops,
                "exit_flops": self.exit_flops, "backbone_flops": self.backbone_flops,
                "exit_cost_fractions": self.exit_cost_fractions()}

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        return cls([list(map(int, b)) for b in d["block_flops"]], list(map(int, d["exit_flops"])))


@contextlib.contextmanager
def eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run probes in eval mode (BN must not update its statistics), then restore each module's mode."""
    saved = [(m, m.training) for top in modules for m in top.modules()]
    for top in modules:
        top.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def measure_cost(segments: Sequence[nn.Module], exits: Sequence[nn.Module], input_size: int) -> CostTable:
    """Count FLOPs of every block and exit of a branched model at ``input_size`` (batch of one).

    Args:
        segments: the model's segments (each with ``.blocks``); a gated block is counted by its
            ``ungated`` original, so the table holds the plain backbone.
        exits: one exit per segment (the last is the backbone head).
        input_size: side of the square input.
    """
    x = torch.zeros(1, 3, input_size, input_size)
    block_flops, exit_flops = [], []
    with eval_mode([*segments, *exits]):
        for seg, ex in zip(segments, exits):
            flops = []
            for block in seg.blocks:
                block = getattr(block, "ungated", block)
                flops.append(count_flops(block, x))
                with torch.no_grad():
                    x = block(x)
            block_flops.append(flops)
            exit_flops.append(count_flops(ex, x))
    return CostTable(block_flops, exit_flops)


def probe_blocks(backbone, input_size: int, flops: bool = False) -> list[tuple[tuple[int, ...], int]]:
    """Run a backbone's blocks on one zero image: each block's output shape, and its FLOPs when asked.

    Args:
        backbone: a :class:`branched.backbones.Backbone` (its ``blocks``, ``name`` and ``default_input_size``).
        input_size: side of the square input.
        flops: count each block's FLOPs too (0 otherwise).

    Raises:
        ValueError: the backbone does not run at ``input_size``.
    """
    x = torch.zeros(1, 3, input_size, input_size)
    out = []
    with eval_mode([b for _, b in backbone.blocks]), torch.no_grad():
        for name, block in backbone.blocks:
            block = getattr(block, "ungated", block)  # LC-Net gates change neither shapes nor the FLOP table
            try:
                f = count_flops(block, x) if flops else 0
                x = block(x)
            except Exception as exc:  # noqa: BLE001 - a shape error deep inside a block
                raise ValueError(f"{backbone.name} does not run at input size {input_size} (block {name!r}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); its own "
                                 f"size is {backbone.default_input_size}") from None
            out.append((tuple(x.shape), f))
    return out

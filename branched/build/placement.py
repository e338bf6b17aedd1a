"""Where exits go: attachment blocks chosen by the backbone's FLOPs share.

Build-time only: a served model records its exits by block name (:class:`~branched.exits.ExitSpec`).
"""
from __future__ import annotations

import torch

from ..backbones import Backbone
from ..cost import count_flops, eval_mode
from ..exits import ExitSpec

__all__ = ["place_exits"]


def place_exits(backbone: Backbone, input_size: int, count: int, spacing: str = "even",
                kind: str = "conv", depth: int = 1, stride: int = 2, cells: int = 4, hidden: int = 0) -> list[ExitSpec]:
    """Choose ``count`` attachment blocks by share of backbone FLOPs.

    Args:
        backbone: the backbone to place exits on.
        input_size: side of the input, for counting FLOPs.
        count: number of side exits.
        spacing: ``"even"`` puts exit ``i`` of ``n`` near ``i/(n+1)`` of the backbone's FLOPs;
            ``"pareto"`` front-loads them near ``(i/(n+1))**2`` (most inputs are easy, so early
            exits pay off most; our reading of PTEENet's Pareto-style placement).
        kind, depth, stride, cells, hidden: the exit branch (see :class:`branched.exits.ExitSpec`).
    """
    if spacing not in ("even", "pareto"):
        raise ValueError(f"spacing must be 'even' or 'pareto', got {spacing!r}")
    x = torch.zeros(1, 3, input_size, input_size)
    cumulative, total = [], 0
    with eval_mode([backbone.model]):
        for _, block in backbone.blocks:
            total += count_flops(block, x)
            with torch.no_grad():
                x = block(x)
            cumulative.append(total)
    if count >= len(cumulative):
        raise ValueError(f"{backbone.name} has {len(cumulative)} blocks; at most {len(cumulative) - 1} exits fit")
    chosen: list[int] = []
    for i in range(1, count + 1):
        share = i / (count + 1)
        target = total * (share ** 2 if spacing == "pareto" else share)
        candidates = [j for j in range(len(cumulative) - 1) if j not in chosen and (not chosen or j > chosen[-1])]
        if not candidates:
            break
        chosen.append(min(candidates, key=lambda j: abs(cumulative[j] - target)))
    return [ExitSpec(backbone.block_names[j], kind, depth, stride, cells, hidden) for j in chosen]

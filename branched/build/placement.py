"""Where exits go: attachment blocks chosen by the backbone's FLOPs share, or named.

Build-time only: a served model records its exits by block name (:class:`~branched.exits.ExitSpec`).
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..backbones import Backbone
from ..cost import probe_blocks
from ..exits import ExitSpec, default_exit_kind, feature_layout

__all__ = ["place_exits", "exit_specs"]


def exit_specs(backbone: Backbone, input_size: int, after: Sequence[str], kind: Optional[str] = None,
               depth: int = 1, stride: int = 2, cells: int = 4, hidden: int = 0, pool: str = "avg") -> list[ExitSpec]:
    """Exits after the named blocks; ``kind=None`` picks each exit's by its features' layout
    (:func:`branched.exits.default_exit_kind`: ``"conv"`` on conv maps, ``"mlp"`` on tokens and
    channels-last maps).

    Raises:
        ValueError: a name that is not one of the backbone's blocks (the message lists them).
    """
    names = backbone.block_names
    missing = [a for a in after if a not in names]
    if missing:
        raise ValueError(f"exit after {missing[0]!r}: {backbone.name} has no such block; blocks are: {', '.join(names)}")
    shapes = dict(zip(names, (s for s, _ in probe_blocks(backbone, input_size)))) if kind is None else {}
    return [ExitSpec(a, kind or default_exit_kind(feature_layout(shapes[a], backbone.layout)), depth, stride, cells,
                     hidden, pool) for a in after]


def place_exits(backbone: Backbone, input_size: int, count: int, spacing: str = "even",
                kind: Optional[str] = None, depth: int = 1, stride: int = 2, cells: int = 4, hidden: int = 0,
                pool: str = "avg") -> list[ExitSpec]:
    """Choose ``count`` attachment blocks by share of backbone FLOPs.

    Args:
        backbone: the backbone to place exits on.
        input_size: side of the input, for counting FLOPs.
        count: number of side exits.
        spacing: ``"even"`` puts exit ``i`` of ``n`` near ``i/(n+1)`` of the backbone's FLOPs;
            ``"pareto"`` front-loads them near ``(i/(n+1))**2`` (most inputs are easy, so early
            exits pay off most; our reading of PTEENet's Pareto-style placement).
        kind, depth, stride, cells, hidden, pool: the exit branch (see :class:`branched.exits.ExitSpec`);
            ``kind=None`` picks it by the features' layout (:func:`exit_specs`).
    """
    if spacing not in ("even", "pareto"):
        raise ValueError(f"spacing must be 'even' or 'pareto', got {spacing!r}")
    probe = probe_blocks(backbone, input_size, flops=True)
    cumulative, total = [], 0
    for _, flops in probe:
        total += flops
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
    layouts = [feature_layout(shape, backbone.layout) for shape, _ in probe]
    return [ExitSpec(backbone.block_names[j], kind or default_exit_kind(layouts[j]), depth, stride, cells, hidden, pool)
            for j in chosen]

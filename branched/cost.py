"""FLOPs per block, segment and exit, counted with ``torch.utils.flop_counter``.

The counter sees what PyTorch dispatches (convolutions, matmuls); element-wise layers
(BN, ReLU, pooling) are not counted, for the backbone and the exits alike.

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
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "CostTable", "measure_cost", "eval_mode"]


def count_flops(module: nn.Module, example: torch.Tensor) -> int:
    """FLOPs of one forward of ``module`` on ``example`` (per the torch FLOP counter)."""
    counter = FlopCounterMode(display=False)
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

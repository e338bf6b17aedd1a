"""BranchedModel: a frozen backbone cut into segments, with an exit after each segment.

Stage ``k`` is backbone segment ``k`` followed by exit ``k``; the last stage's exit is the
backbone's own head. :meth:`BranchedModel.step` runs one stage on a batch and splits it into the
samples that exit there and the survivors; :meth:`BranchedModel.routed_forward` loops it over the
stages in-process, and the serving adapters call the same ``step`` (TorchServe in-process, Ray
Serve one stage per deployment), so routing exists once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from .backbones import Backbone, build_backbone
from .config import ModelConfig
from .cost import CostTable, eval_mode, measure_cost
from .exits import BackboneHeadExit, ExitBranch, ExitOutput
from .lcnet import apply_gates
from .routing import Thresholds, exit_score, resolve_thresholds

__all__ = ["Segment", "StepResult", "RoutedOutput", "BranchedModel"]


class Segment(nn.Module):
    """Consecutive backbone blocks that run as one unit, reporting per-sample FLOPs.

    A block may implement ``forward_with_cost(x) -> (y, flops[B])`` (the LC-Net gated blocks do,
    since their work depends on the input); any other block costs its static FLOPs per sample.
    """

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.names = [n for n, _ in blocks]
        self.blocks = nn.ModuleList(m for _, m in blocks)
        self.register_buffer("block_flops", torch.zeros(len(self.blocks), dtype=torch.float64), persistent=False)
        self.dynamic = any(hasattr(b, "forward_with_cost") for b in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks without LC-Net gates: a gated block exposes its original block as ``ungated``."""
        for block in self.blocks:
            x = getattr(block, "ungated", block)(x)
        return x

    def forward_with_cost(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the blocks; return the features and the FLOPs spent on each sample."""
        if not self.dynamic:
            flops = self.block_flops.sum().expand(x.shape[0])
            return self(x), flops
        flops = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        for i, block in enumerate(self.blocks):
            if hasattr(block, "forward_with_cost"):
                x, f = block.forward_with_cost(x)
                flops = flops + f
            else:
                x = block(x)
                flops = flops + self.block_flops[i]
        return x, flops


@dataclass
class StepResult:
    """One stage's work on a batch of ``B_k`` samples, split into exited and surviving samples.

    Indices are positions in the batch that was given to :meth:`BranchedModel.step`.

    Attributes:
        exited: indices ``[E]`` of the samples that leave at this exit.
        logits: their class logits ``[E, C]``.
        score: their exit scores ``[E]``.
        exited_flops: FLOPs each of them has cost in total ``[E]``.
        survivors: indices ``[S]`` of the samples that go on.
        features: the survivors' features ``[S, ...]``, the next segment's input.
        survivor_flops: FLOPs each survivor has cost so far ``[S]``.
    """

    exited: torch.Tensor
    logits: torch.Tensor
    score: torch.Tensor
    exited_flops: torch.Tensor
    survivors: torch.Tensor
    features: torch.Tensor
    survivor_flops: torch.Tensor

    def answers(self, k: int, class_names: Sequence[str], backbone_flops: float) -> list[dict[str, Any]]:
        """The JSON-ready answers of the samples that exited at this stage ``k``, in ``exited`` order."""
        if not self.exited.numel():
            return []
        exit_index = torch.full((self.exited.numel(),), k, dtype=torch.long)
        return RoutedOutput(self.logits.cpu(), exit_index, self.score.cpu(), self.exited_flops.cpu(),
                            backbone_flops).answers(class_names)


@dataclass
class RoutedOutput:
    """Per-sample results of a routed forward, in input order.

    Attributes:
        logits: ``[B, C]`` logits of the exit each sample took.
        exit_index: ``[B]`` 0-based exit (last = backbone head).
        score: ``[B]`` exit score under the policy used.
        flops: ``[B]`` FLOPs spent on each sample.
        backbone_flops: FLOPs of the plain backbone, the unit of ``cost_fraction``.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    score: torch.Tensor
    flops: torch.Tensor
    backbone_flops: float

    @property
    def probabilities(self) -> torch.Tensor:
        return torch.softmax(self.logits.float(), dim=1)

    @property
    def class_index(self) -> torch.Tensor:
        return self.logits.argmax(dim=1)

    @property
    def confidence(self) -> torch.Tensor:
        """Probability of the predicted class."""
        return self.probabilities.amax(dim=1)

    @property
    def cost_fraction(self) -> torch.Tensor:
        return self.flops / self.backbone_flops

    def answers(self, class_names: Sequence[str]) -> list[dict[str, Any]]:
        """One JSON-ready answer per sample: the contract both servers return."""
        rows = zip(self.class_index.tolist(), self.confidence.tolist(), self.exit_index.tolist(),
                   self.cost_fraction.tolist(), self.score.tolist())
        return [{"class_index": c, "label": class_names[c], "confidence": p, "exit": e,
                 "cost_fraction": f, "exit_score": s} for c, p, e, f, s in rows]


class BranchedModel(nn.Module):
    """Backbone segments with an exit after each; the last exit is the backbone head.

    Build one with :meth:`from_config` (untrained exits on an untrained backbone) or
    :meth:`from_backbone` (exits on an already-trained backbone).
    """

    def __init__(self, config: ModelConfig, backbone: Backbone) -> None:
        super().__init__()
        self.config = config
        names = backbone.block_names
        cuts = []
        for spec in config.exits:
            if spec.after not in names:
                raise ValueError(f"exit after {spec.after!r}: {backbone.name} has no such block; "
                                 f"blocks are: {', '.join(names)}")
            cuts.append(names.index(spec.after) + 1)
        if cuts != sorted(set(cuts)) or (cuts and cuts[-1] >= len(names)):
            raise ValueError("exits must attach after distinct blocks, in backbone order, before the last block")
        bounds = [0, *cuts, len(names)]
        self.segments = nn.ModuleList(Segment(backbone.blocks[a:b]) for a, b in zip(bounds, bounds[1:]))
        widths = self._attachment_widths(backbone, cuts)
        self.exits = nn.ModuleList(
            [ExitBranch(w, config.num_classes, spec.kind, spec.depth, spec.stride) for w, spec in zip(widths, config.exits)]
            + [BackboneHeadExit(backbone.head)])
        self.backbone_frozen = False
        self.memory_format = torch.contiguous_format
        if config.cost is None:
            config.cost = measure_cost(self.segments, self.exits, config.input_size).to_dict()
        self.cost = CostTable.from_dict(config.cost)
        for seg, flops in zip(self.segments, self.cost.block_flops):
            seg.block_flops.copy_(torch.tensor(flops, dtype=torch.float64))
        self.register_buffer("exit_flops", torch.tensor(self.cost.exit_flops, dtype=torch.float64), persistent=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(cls, config: ModelConfig, backbone: Backbone) -> "BranchedModel":
        return cls(config, backbone)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "BranchedModel":
        backbone = build_backbone(config.backbone, config.num_classes)
        if config.dynamic:
            backbone = apply_gates(backbone, config.dynamic)
        return cls(config, backbone)

    def _attachment_widths(self, backbone: Backbone, cuts: list[int]) -> list[int]:
        widths: list[int] = []
        if not cuts:
            return widths
        x = torch.zeros(1, 3, self.config.input_size, self.config.input_size)
        blocks = [b for _, b in backbone.blocks]
        with eval_mode(blocks), torch.no_grad():
            for i, block in enumerate(blocks[: cuts[-1]]):
                x = block(x)
                if i + 1 in cuts:
                    widths.append(x.shape[1])
        return widths

    def optimize_for_inference(self, channels_last: bool = True) -> "BranchedModel":
        """Fold BatchNorm into the preceding convs and (optionally) switch to channels-last, in place.

        Serving only: both the plain backbone path and the routed path use the folded modules,
        so comparisons stay like for like. Element-wise layers are memory-bound and uncounted by
        the FLOP counter; folding them away brings wall time closer to the FLOPs that routing
        saves. Blocks that cannot be traced or have no conv->BN pair (DenseNet's pre-activation
        layers) are kept as they are. Do not train or save a model after this call.
        """
        from torch.fx.experimental.optimization import fuse

        self.eval()
        for seg in self.segments:
            for i, block in enumerate(seg.blocks):
                if hasattr(block, "forward_with_cost"):
                    if hasattr(block, "optimize_for_inference"):
                        block.optimize_for_inference()  # gated blocks fold their own BN
                    continue  # gated blocks decide per input; keep their own forward
                try:
                    seg.blocks[i] = fuse(block)
                except Exception:  # noqa: BLE001 - untraceable block: keep it unfused
                    pass
        for ex in self.exits[:-1]:
            if isinstance(ex, ExitBranch) and len(ex.features):  # a dropped stage's exit is an Identity
                ex.features = fuse(ex.features)
        if channels_last:
            self.memory_format = torch.channels_last
            self.to(memory_format=torch.channels_last)
        return self

    def keep_stages(self, stages: Iterable[int]) -> "BranchedModel":
        """Drop the weights of every stage not in ``stages``, in place (a serving replica that runs
        only those stages' :meth:`step`).

        ``step(k)`` reads only segment ``k``, exit ``k`` and the FLOP table, which stay for the kept
        stages; the others become empty. The model can still be optimised for inference afterwards.
        """
        kept = set(stages)
        if not kept or not kept <= set(range(self.num_exits)):
            raise ValueError(f"stages to keep must be a non-empty subset of 0..{self.num_exits - 1}, got {sorted(kept)}")
        for j in range(self.num_exits):
            if j not in kept:
                self.segments[j] = Segment([])
                self.exits[j] = nn.Identity()
        return self

    # ------------------------------------------------------------------ training helpers
    @property
    def num_exits(self) -> int:
        return len(self.exits)

    def freeze_backbone(self, frozen: bool = True) -> "BranchedModel":
        """Freeze backbone parameters and BN statistics (PTEENet: only the branches train)."""
        self.backbone_frozen = frozen
        for p in self.segments.parameters():
            p.requires_grad_(not frozen)
        for p in self.exits[-1].parameters():
            p.requires_grad_(not frozen)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "BranchedModel":
        super().train(mode)
        if self.backbone_frozen:
            self.segments.eval()
            self.exits[-1].eval()
        return self

    def forward(self, x: torch.Tensor) -> list[ExitOutput]:
        """Training forward: every exit's output for the whole batch."""
        outputs = []
        for seg, ex in zip(self.segments, self.exits):
            x = seg(x)
            outputs.append(ex(x))
        return outputs

    def backbone_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain backbone (no exits, no LC-Net gates): logits ``[B, C]``."""
        x = x.contiguous(memory_format=self.memory_format)
        for seg in self.segments:
            x = seg.plain_forward(x)
        return self.exits[-1](x).logits

    # ------------------------------------------------------------------ routing
    def step(self, k: int, features: torch.Tensor, thresholds: torch.Tensor, policy: Optional[str] = None,
             flops: Optional[torch.Tensor] = None) -> StepResult:
        """Run stage ``k`` (segment ``k`` and exit ``k``) on a batch and split it.

        Args:
            k: stage index, ``0 <= k < num_exits``.
            features: the stage's input: images for ``k == 0``, else the previous survivors' features.
            thresholds: validated side-exit thresholds (:func:`branched.routing.resolve_thresholds`),
                ``[K-1]`` for the whole batch or ``[B_k, K-1]``, one row per sample of this batch.
            policy: exit policy name; the model's own by default.
            flops: FLOPs already spent on each sample (zeros for ``k == 0``).

        Returns:
            :class:`StepResult`. The last stage lets every sample exit.
        """
        policy = policy or self.config.policy
        if k == 0:
            features = features.contiguous(memory_format=self.memory_format)
        h, seg_flops = self.segments[k].forward_with_cost(features)
        spent = seg_flops + self.exit_flops[k] if flops is None else flops + seg_flops + self.exit_flops[k]
        out = self.exits[k](h)
        score = exit_score(out, policy)
        n = h.shape[0]
        if k == self.num_exits - 1:
            leave = torch.ones(n, dtype=torch.bool, device=h.device)
        else:
            leave = score >= (thresholds[:, k] if thresholds.dim() == 2 else thresholds[k])
        n_exit = int(leave.sum())
        if n_exit == n:  # nothing to compact
            everyone = torch.arange(n, device=h.device)
            return StepResult(everyone, out.logits, score, spent, everyone[:0], h[:0], spent[:0])
        if n_exit == 0:
            everyone = torch.arange(n, device=h.device)
            return StepResult(everyone[:0], out.logits[:0], score[:0], spent[:0], everyone, h, spent)
        exited = leave.nonzero().squeeze(1)
        survivors = (~leave).nonzero().squeeze(1)
        return StepResult(exited, out.logits.index_select(0, exited), score.index_select(0, exited),
                          spent.index_select(0, exited), survivors, h[survivors],  # keeps channels-last
                          spent.index_select(0, survivors))

    @torch.no_grad()
    def routed_forward(self, x: torch.Tensor, thresholds: Optional[Thresholds] = None,
                       policy: Optional[str] = None) -> RoutedOutput:
        """Route a batch through the stages; each sample leaves at the first exit it clears.

        Args:
            x: images ``[B, 3, H, W]``, normalised as the model expects.
            thresholds: per side exit, ``[K-1]`` or one row per sample ``[B, K-1]``, overriding the
                model's calibrated ones for this call.
            policy: exit policy, overriding the model's for this call.

        Returns:
            :class:`RoutedOutput` in input order.
        """
        thr = resolve_thresholds(thresholds, self.config.thresholds).to(x.device)
        n = x.shape[0]
        if thr.dim() == 2 and thr.shape[0] != n:
            raise ValueError(f"{thr.shape[0]} threshold rows for a batch of {n}")
        logits = x.new_empty(n, self.config.num_classes)
        exit_index = torch.empty(n, dtype=torch.long, device=x.device)
        score = x.new_empty(n)
        spent = torch.empty(n, dtype=torch.float64, device=x.device)
        active = torch.arange(n, device=x.device)
        features, flops = x, None
        for k in range(self.num_exits):
            r = self.step(k, features, thr, policy, flops)
            if r.exited.numel():
                where = active if r.exited.numel() == active.numel() else active.index_select(0, r.exited)
                logits[where] = r.logits.to(logits.dtype)
                exit_index[where] = k
                score[where] = r.score.to(score.dtype)
                spent[where] = r.exited_flops
            if r.survivors.numel() == 0:
                break
            if r.survivors.numel() != active.numel():
                active = active.index_select(0, r.survivors)
                if thr.dim() == 2:
                    thr = thr.index_select(0, r.survivors)
            features, flops = r.features, r.survivor_flops
        return RoutedOutput(logits, exit_index, score, spent, float(self.cost.backbone_flops))

    def without_exits(self) -> "BranchedModel":
        """The plain backbone as a one-stage branched model sharing these weights (the baseline)."""
        cost = CostTable([[f for seg in self.cost.block_flops for f in seg]], [self.cost.exit_flops[-1]])
        config = ModelConfig(**{**self.config.to_dict(), "exits": [], "thresholds": [], "cost": cost.to_dict(),
                                "dynamic": None})
        blocks = [(name, getattr(block, "ungated", block))  # LC-Net gates off: the plain backbone
                  for seg in self.segments for name, block in zip(seg.names, seg.blocks)]
        # The same module objects, so no copy of the weights.
        holder = nn.ModuleList(b for _, b in blocks)
        backbone = Backbone(config.backbone, blocks, self.exits[-1].head, config.num_classes,
                            config.input_size, holder)
        return BranchedModel(config, backbone).eval()

"""BranchedModel: a frozen backbone cut into segments, with an exit after each segment.

Stage ``k`` is backbone segment ``k`` followed by exit ``k``; the last stage's exit is the
backbone's own head. :meth:`BranchedModel.step` runs one stage on a batch and splits it into the
samples that exit there and the survivors; :meth:`BranchedModel.routed_forward` loops it over the
stages in-process, and the serving adapters call the same ``step`` (TorchServe in-process, Ray
Serve one stage per deployment), so routing exists once.
"""
from __future__ import annotations

import time
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .backbones import Backbone, build_backbone
from .config import ModelConfig
from .cost import CostTable, measure_cost, probe_blocks
from .exits import BackboneHeadExit, ExitBranch, ExitOutput, feature_layout, feature_width
from .lcnet import apply_gates
from .outputs import RoutedOutput, StepResult
from .routing import Thresholds, exit_score, resolve_thresholds

__all__ = ["Segment", "BranchedModel", "take_rows"]


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]`` along the batch dimension, in ``x``'s memory format.

    A channels-last map is gathered as the NHWC array it is in memory (one contiguous run per row), which is
    several times faster than indexing it as NCHW (0.08 ms against 0.44 ms for 32 of 64 rows of 16x32x32 on
    one core); the result is channels-last again.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).index_select(0, rows).permute(0, 3, 1, 2)
    return x.index_select(0, rows)


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
        probe = probe_blocks(backbone, config.input_size)
        shapes = [probe[b - 1][0] for b in bounds[1:]]
        self.map_layout = backbone.layout
        #: layout of each segment's output (the input of exit k): "nchw", "nhwc", "tokens" or "vector"
        self.feature_layouts = [feature_layout(s, backbone.layout) for s in shapes]
        self.exits = nn.ModuleList(
            [ExitBranch(feature_width(s, lay), config.num_classes, spec.kind, spec.depth, spec.stride, spec.cells,
                        spec.hidden, lay, spec.pool)
             for s, lay, spec in zip(shapes, self.feature_layouts, config.exits)]
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


    def optimize_for_inference(self, channels_last: bool = True) -> "BranchedModel":
        """Fold BatchNorm into the preceding convs and (optionally) switch to channels-last, in place.

        Serving only: both the plain backbone path and the routed path use the folded modules,
        so comparisons stay like for like. Element-wise layers are memory-bound and uncounted by
        the FLOP counter; folding them away brings wall time closer to the FLOPs that routing
        saves. Only blocks that hold a BatchNorm are traced; those that cannot be traced or have no
        conv->BN pair (DenseNet's pre-activation layers) are kept as they are. Channels-last applies
        only when every segment passes conv maps on (``feature_layouts`` all ``"nchw"``): token
        sequences have no such format and Swin's maps are channels-last already. Do not train or
        save a model after this call.
        """
        from torch.fx.experimental.optimization import fuse

        self.eval()
        for seg in self.segments:
            for i, block in enumerate(seg.blocks):
                if hasattr(block, "forward_with_cost"):
                    if hasattr(block, "optimize_for_inference"):
                        block.optimize_for_inference()  # gated blocks fold their own BN
                    continue  # gated blocks decide per input; keep their own forward
                if not _has_batchnorm(block):
                    continue  # nothing to fold (transformer blocks, LayerNorm nets): keep the block as it is
                try:
                    seg.blocks[i] = fuse(block)
                except Exception:  # noqa: BLE001 - untraceable block: keep it unfused
                    pass
        for ex in self.exits[:-1]:
            if isinstance(ex, ExitBranch):  # a dropped stage's exit is an Identity
                if _has_batchnorm(ex.features):
                    ex.features = fuse(ex.features)
                ex.fold_for_inference()
        if channels_last and all(lay == "nchw" for lay in self.feature_layouts):
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

    def backbone_forward(self, x: torch.Tensor, segment_s: Optional[list[float]] = None) -> torch.Tensor:
        """The plain backbone (no exits, no LC-Net gates): logits ``[B, C]``.

        Args:
            segment_s: if given, each segment's wall-clock seconds are added to its entry (the head's to the
                last); ``bench`` turns them into the speed-up the exit mix would give at these times.
        """
        x = x.contiguous(memory_format=self.memory_format)
        start = time.perf_counter()
        for k, seg in enumerate(self.segments):
            x = seg.plain_forward(x)
            if segment_s is not None:
                now = time.perf_counter()
                segment_s[k] += now - start
                start = now
        logits = self.exits[-1](x).logits
        if segment_s is not None:
            segment_s[-1] += time.perf_counter() - start
        return logits

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
            :class:`StepResult`. The last stage lets every sample exit. A side exit is off for a sample
            whose threshold is ``inf``: its head is not computed for that sample and not charged to it.
        """
        policy = policy or self.config.policy
        if k == 0:
            features = features.contiguous(memory_format=self.memory_format)
        h, seg_flops = self.segments[k].forward_with_cost(features)
        spent = seg_flops if flops is None else flops + seg_flops
        n = h.shape[0]
        everyone = torch.arange(n, device=h.device)
        last = k == self.num_exits - 1
        threshold = None if last else (thresholds[:, k] if thresholds.dim() == 2 else thresholds[k])
        if threshold is not None:
            off = torch.isposinf(threshold)
            if bool(off.all()):
                # The exit is off for the whole batch: its head is never run and costs nothing.
                empty = h.new_empty(0)
                return StepResult(everyone[:0], h.new_empty(0, self.config.num_classes), empty, spent[:0], everyone,
                                  h, spent)
            if off.dim() == 1 and bool(off.any()):
                return self._step_where_on(k, h, threshold, spent, policy, (~off).nonzero().squeeze(1))
        spent = spent + self.exit_flops[k]
        out = self.exits[k](h)
        score = exit_score(out, policy)
        leave = torch.ones(n, dtype=torch.bool, device=h.device) if last else score >= threshold
        n_exit = int(leave.sum())
        if n_exit == n:  # nothing to compact
            return StepResult(everyone, out.logits, score, spent, everyone[:0], h[:0], spent[:0])
        if n_exit == 0:
            return StepResult(everyone[:0], out.logits[:0], score[:0], spent[:0], everyone, h, spent)
        exited = leave.nonzero().squeeze(1)
        survivors = (~leave).nonzero().squeeze(1)
        return StepResult(exited, out.logits.index_select(0, exited), score.index_select(0, exited),
                          spent.index_select(0, exited), survivors, take_rows(h, survivors),
                          spent.index_select(0, survivors))

    def _step_where_on(self, k: int, h: torch.Tensor, threshold: torch.Tensor, spent: torch.Tensor,
                       policy: str, on: torch.Tensor) -> StepResult:
        """Exit ``k`` for a batch whose own thresholds switch it off for some samples: the head runs on
        (and is charged to) the rows ``on`` only, so a sample's answer and cost do not depend on its batch."""
        out = self.exits[k](take_rows(h, on))
        score = exit_score(out, policy)
        leave = score >= threshold.index_select(0, on)
        spent = spent.clone()
        spent[on] += self.exit_flops[k]
        exited = on[leave]
        stays = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        stays[exited] = False
        survivors = stays.nonzero().squeeze(1)
        return StepResult(exited, out.logits[leave], score[leave], spent.index_select(0, exited), survivors,
                          take_rows(h, survivors), spent.index_select(0, survivors))

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
        features, flops = x.contiguous(memory_format=self.memory_format), None
        # Exits that are off for every sample of the batch: their segments run as the plain backbone's
        # do, with no step around them (no head, no split, no per-sample bookkeeping).
        off = torch.isposinf(thr).all(dim=0) if thr.dim() == 2 else torch.isposinf(thr)
        off, skipped = off.tolist(), 0.0
        for k in range(self.num_exits):
            seg = self.segments[k]
            if k < self.num_exits - 1 and off[k] and not seg.dynamic:
                features = seg(features)
                skipped += float(seg.block_flops.sum())
                continue
            if skipped:
                flops = torch.full((features.shape[0],), skipped, dtype=torch.float64, device=x.device) \
                    if flops is None else flops + skipped
                skipped = 0.0
            r = self.step(k, features, thr, policy, flops)
            if r.exited.numel():
                where = active if r.exited.numel() == active.numel() else active.index_select(0, r.exited)
                # index_copy_ / index_fill_: several times cheaper than ``t[where] = v`` (advanced indexing).
                logits.index_copy_(0, where, r.logits.to(logits.dtype))
                exit_index.index_fill_(0, where, k)
                score.index_copy_(0, where, r.score.to(score.dtype))
                spent.index_copy_(0, where, r.exited_flops)
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
        return self._regrouped([], plain=True).eval()

    def with_exits(self, keep: Sequence[int]) -> "BranchedModel":
        """A model with only the side exits ``keep`` (indices), sharing these weights and LC-Net gates.

        The segments between kept exits are joined, so a dropped exit leaves no stage behind. The
        config's thresholds follow the kept exits; ``meta`` is copied as it is (a calibration curve
        stored there still names every exit: rewrite it, as the build does).
        """
        return self._regrouped(sorted(set(keep)), plain=False).train(self.training)

    def _regrouped(self, keep: list[int], plain: bool) -> "BranchedModel":
        side = self.num_exits - 1
        if any(not 0 <= k < side for k in keep):
            raise ValueError(f"side exits are 0..{side - 1}; cannot keep {keep}")
        ends = [*keep, side]  # each new segment ends at a kept exit (the last at the backbone head)
        starts = [0, *(e + 1 for e in ends[:-1])]
        cost = CostTable([[f for seg in self.cost.block_flops[a:b + 1] for f in seg] for a, b in zip(starts, ends)],
                         [self.cost.exit_flops[e] for e in ends])
        config = ModelConfig(**{**self.config.to_dict(), "exits": [self.config.exits[k] for k in keep],
                                "thresholds": [self.config.thresholds[k] for k in keep], "cost": cost.to_dict(),
                                **({"dynamic": None} if plain else {})})
        # The same module objects, so no copy of the weights; the plain backbone runs the ungated blocks.
        blocks = [(name, getattr(block, "ungated", block) if plain else block)
                  for seg in self.segments for name, block in zip(seg.names, seg.blocks)]
        holder = nn.ModuleList(b for _, b in blocks)
        backbone = Backbone(config.backbone, blocks, self.exits[-1].head, config.num_classes,
                            config.input_size, holder, self.map_layout)
        model = BranchedModel(config, backbone)
        for i, k in enumerate(keep):
            model.exits[i] = self.exits[k]  # the trained exit itself, not a fresh one
        model.backbone_frozen = self.backbone_frozen
        model.memory_format = self.memory_format
        return model


def _has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())

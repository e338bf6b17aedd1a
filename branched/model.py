"""BranchedModel: a frozen backbone cut into segments, with an exit after each segment.

Stage ``k`` is backbone segment ``k`` followed by exit ``k``; the last stage's exit is the
backbone's own head. :meth:`BranchedModel.step` runs one stage on a batch and splits it into the
samples that exit there and the survivors; :meth:`BranchedModel.routed_forward` loops it over the
stages in-process, and the serving adapters call the same ``step`` (TorchServe in-process, Ray
Serve one stage per deployment), so routing exists once.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .backbones import Backbone, build_backbone
from .cost import CostTable, count_flops
from .exits import BackboneHeadExit, ExitBranch, ExitOutput, ExitSpec
from .routing import Thresholds, check_policy, exit_score, resolve_thresholds

__all__ = ["ModelConfig", "Segment", "StepResult", "RoutedOutput", "BranchedModel", "place_exits"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Everything needed to rebuild a branched model (the JSON half of the artifact).

    Attributes:
        backbone: backbone registry name (:func:`branched.backbones.available_backbones`).
        num_classes: number of classes.
        input_size: side of the square input the model runs at.
        mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
        class_names: one label per class.
        exits: side exits in backbone order (the backbone head is always the last exit).
        thresholds: one per side exit (see :mod:`branched.routing`).
        policy: exit policy name.
        dynamic: LC-Net gate settings (:mod:`branched.dynamic`), or None.
        cost: FLOPs table (filled in when the model is built).
        meta: free-form provenance (dataset, calibration report, training settings).
    """

    backbone: str
    num_classes: int
    input_size: int = 32
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    class_names: list[str] = field(default_factory=list)
    exits: list[ExitSpec] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    policy: str = "confidence"
    dynamic: Optional[dict[str, Any]] = None
    cost: Optional[dict[str, Any]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.exits = [e if isinstance(e, ExitSpec) else ExitSpec(**e) for e in self.exits]
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if not self.thresholds:
            self.thresholds = [1.0] * len(self.exits)
        if len(self.thresholds) != len(self.exits):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.exits)} early exits")
        check_policy(self.policy)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["exits"] = [asdict(e) for e in self.exits]
        return d


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
            config.cost = self.measure_cost().to_dict()
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
            from .dynamic import apply_gates  # the gates live with their training code
            backbone = apply_gates(backbone, config.dynamic)
        return cls(config, backbone)

    def _attachment_widths(self, backbone: Backbone, cuts: list[int]) -> list[int]:
        widths: list[int] = []
        if not cuts:
            return widths
        x = torch.zeros(1, 3, self.config.input_size, self.config.input_size)
        blocks = [b for _, b in backbone.blocks]
        with _eval_mode(blocks), torch.no_grad():
            for i, block in enumerate(blocks[: cuts[-1]]):
                x = block(x)
                if i + 1 in cuts:
                    widths.append(x.shape[1])
        return widths

    def measure_cost(self) -> CostTable:
        """Count FLOPs of every block and exit at the model's input size (batch of one)."""
        x = torch.zeros(1, 3, self.config.input_size, self.config.input_size)
        block_flops, exit_flops = [], []
        with _eval_mode([self]):
            for seg, ex in zip(self.segments, self.exits):
                flops = []
                for block in seg.blocks:
                    block = getattr(block, "ungated", block)  # the table holds the plain backbone
                    flops.append(count_flops(block, x))
                    with torch.no_grad():
                        x = block(x)
                block_flops.append(flops)
                exit_flops.append(count_flops(ex, x))
        return CostTable(block_flops, exit_flops)

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
            if len(ex.features):
                ex.features = fuse(ex.features)
        if channels_last:
            self.memory_format = torch.channels_last
            self.to(memory_format=torch.channels_last)
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


@contextlib.contextmanager
def _eval_mode(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run probes in eval mode (BN must not update its statistics), then restore each module's mode."""
    saved = [(m, m.training) for top in modules for m in top.modules()]
    for top in modules:
        top.eval()
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


def place_exits(backbone: Backbone, input_size: int, count: int, spacing: str = "even",
                kind: str = "conv", depth: int = 1, stride: int = 2) -> list[ExitSpec]:
    """Choose ``count`` attachment blocks by share of backbone FLOPs.

    Args:
        backbone: the backbone to place exits on.
        input_size: side of the input, for counting FLOPs.
        count: number of side exits.
        spacing: ``"even"`` puts exit ``i`` of ``n`` near ``i/(n+1)`` of the backbone's FLOPs;
            ``"pareto"`` front-loads them near ``(i/(n+1))**2`` (most inputs are easy, so early
            exits pay off most; our reading of PTEENet's Pareto-style placement).
        kind, depth, stride: the exit branch (see :class:`branched.exits.ExitSpec`).
    """
    if spacing not in ("even", "pareto"):
        raise ValueError(f"spacing must be 'even' or 'pareto', got {spacing!r}")
    x = torch.zeros(1, 3, input_size, input_size)
    cumulative, total = [], 0
    with _eval_mode([backbone.model]):
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
    return [ExitSpec(backbone.block_names[j], kind, depth, stride) for j in chosen]

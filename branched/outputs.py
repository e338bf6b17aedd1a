"""What routing returns: one stage's split of a batch (:class:`StepResult`) and a routed batch's answers
(:class:`RoutedOutput`), with the JSON answer both servers send."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

__all__ = ["StepResult", "RoutedOutput"]


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

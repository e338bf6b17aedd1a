"""What every exit says about every calibration (or test) sample, recorded once.

:class:`ExitRecords` holds each exit's prediction and score and what reaching it costs, so that routing
under any thresholds is a table look-up that reproduces :meth:`BranchedModel.routed_forward` exactly
(same rule: leave at the first side exit whose score is ``>= threshold``; a side exit whose threshold
is ``inf`` is off and its head costs nothing).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..routing import exit_score

__all__ = ["ExitRecords", "collect_records", "collect_records_by_policy"]


@dataclass
class ExitRecords:
    """What every exit says about every sample.

    Attributes:
        scores: ``[N, K-1]`` exit scores of the side exits under the routing policy.
        preds: ``[N, K]`` predicted class at each exit (last = backbone head).
        costs: ``[N, K]`` cost fraction of reaching exit ``k``: the segments ``0..k`` (and any head cost
            not listed in ``head_costs``) / backbone FLOPs.
        labels: ``[N]`` true classes.
        reference: ``[N]`` the plain backbone's predictions, the baseline of "accuracy drop"
            (None: the last exit's, as for any model without LC-Net gates).
        head_costs: ``[K]`` cost fraction of each exit's head. A sample that leaves at exit ``k`` pays
            the heads ``0..k`` of the exits that are on; a side exit whose threshold is ``inf`` is off and
            its head costs nothing (:meth:`BranchedModel.step` does not run it). None: no head costs.
    """

    scores: np.ndarray
    preds: np.ndarray
    costs: np.ndarray
    labels: np.ndarray
    reference: Optional[np.ndarray] = None
    head_costs: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_exits(self) -> int:
        return self.preds.shape[1]

    @property
    def backbone_correct(self) -> np.ndarray:
        return (self.preds[:, -1] if self.reference is None else self.reference) == self.labels

    @property
    def last_exit_is_backbone(self) -> bool:
        """True when leaving at the last exit gives exactly the backbone's answer (no gates)."""
        return self.reference is None

    def subset(self, index: np.ndarray) -> "ExitRecords":
        ref = None if self.reference is None else self.reference[index]
        return ExitRecords(self.scores[index], self.preds[index], self.costs[index], self.labels[index], ref,
                           self.head_costs)

    def sample_costs(self, exits: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
        """Each sample's cost fraction when it leaves at ``exits[i]`` under ``thresholds``."""
        cost = self.costs[np.arange(len(self)), exits]
        if self.head_costs is None:
            return cost
        on = np.append(np.isfinite(np.asarray(thresholds, dtype=np.float64)), True)  # the backbone head always runs
        return cost + np.cumsum(self.head_costs * on)[exits]

    def route(self, thresholds: Sequence[float]) -> np.ndarray:
        """The exit each sample takes under ``thresholds`` (first side exit with score >= threshold)."""
        t = np.asarray(thresholds, dtype=np.float64)
        leave = np.concatenate([self.scores >= t[None, :], np.ones((len(self), 1), dtype=bool)], axis=1)
        return leave.argmax(axis=1)

    def losses(self, path: Sequence[Sequence[float]]) -> np.ndarray:
        """``[N, P]``: the disagreement loss (routed wrong, backbone right) of every sample at every point."""
        rows, backbone = np.arange(len(self)), self.backbone_correct
        return np.stack([(self.preds[rows, self.route(t)] != self.labels) & backbone for t in path], axis=1)

    def point(self, thresholds: Sequence[float]) -> dict:
        """Accuracy, backbone accuracy, drop, disagreement risk, cost fraction and exit rates."""
        exits = self.route(thresholds)
        rows = np.arange(len(self))
        correct = self.preds[rows, exits] == self.labels
        backbone = self.backbone_correct
        n = max(len(self), 1)
        return {
            "thresholds": [float(v) for v in thresholds],
            "cost_fraction": float(self.sample_costs(exits, thresholds).mean()) if len(self) else 0.0,
            "accuracy": float(correct.mean()) if len(self) else 0.0,
            "backbone_accuracy": float(backbone.mean()) if len(self) else 0.0,
            "drop": float(backbone.mean() - correct.mean()) if len(self) else 0.0,
            "risk": float((~correct & backbone).sum() / n),
            "errors": int((~correct & backbone).sum()),
            "helps": int((correct & ~backbone).sum()),
            "exit_rates": (np.bincount(exits, minlength=self.num_exits) / n).tolist(),
        }


@torch.no_grad()
def collect_records_by_policy(model, x: torch.Tensor, y: torch.Tensor, policies: Sequence[str],
                              batch_size: int = 256) -> dict[str, ExitRecords]:
    """Run every stage of ``model`` on all of ``x`` once; record each exit's answer, cost and score
    under each of ``policies`` (predictions and costs are shared).

    Per-sample costs come from each segment's ``forward_with_cost`` (input-dependent for LC-Net
    gated blocks); the heads' costs are kept apart (``head_costs``), so that routing under thresholds
    that switch exits off charges only the heads that run, as :meth:`BranchedModel.step` does. A gated
    model also records the plain backbone's predictions as the reference.
    """
    model.eval()
    gated = bool(model.config.dynamic)
    scores: dict[str, list] = {p: [] for p in policies}
    preds, costs, reference = [], [], []
    exit_flops = torch.tensor(model.cost.exit_flops, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        h = x[i:i + batch_size]
        spent = torch.zeros(len(h), dtype=torch.float64)
        s_b: dict[str, list] = {p: [] for p in policies}
        p_b, c_b = [], []
        for k in range(model.num_exits):
            h, f = model.segments[k].forward_with_cost(h)
            spent = spent + f.to(torch.float64).cpu()
            out = model.exits[k](h)
            p_b.append(out.logits.argmax(1))
            c_b.append(spent.clone())
            if k < model.num_exits - 1:
                for p in policies:
                    s_b[p].append(exit_score(out, p).double())
        for p in policies:
            scores[p].append(torch.stack(s_b[p], 1) if s_b[p] else torch.zeros(len(h), 0, dtype=torch.float64))
        preds.append(torch.stack(p_b, 1))
        costs.append(torch.stack(c_b, 1))
        if gated:
            reference.append(model.backbone_forward(x[i:i + batch_size]).argmax(1))
    total = float(model.cost.backbone_flops)
    shared = (torch.cat(preds).numpy(), torch.cat(costs).numpy() / total, y.numpy().copy(),
              torch.cat(reference).numpy() if gated else None)
    heads = (exit_flops / total).numpy()
    return {p: ExitRecords(torch.cat(scores[p]).numpy(), shared[0], shared[1], shared[2], shared[3], heads)
            for p in policies}


def collect_records(model, x: torch.Tensor, y: torch.Tensor, policy: Optional[str] = None,
                    batch_size: int = 256) -> ExitRecords:
    """:func:`collect_records_by_policy` for one policy (the model's own by default)."""
    policy = policy or model.config.policy
    return collect_records_by_policy(model, x, y, [policy], batch_size)[policy]

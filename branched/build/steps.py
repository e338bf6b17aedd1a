"""The steps of a build that :func:`branched.build.pipeline.run_build` strings together: the backbone,
LC-Net gates, exits + calibration + the test split, leaving switched-off exits out, and a wall-clock check."""
from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
import numpy as np
import torch

from ..backbones import build_backbone, load_backbone_weights
from ..errors import UsageError
from ..model import BranchedModel, take_rows
from ..routing import POLICIES, exit_score
from .calibrate import Calibration, calibrate, choose_policy
from .evaluate import bench, evaluate
from .lcnet_train import add_gates, train_gates
from .records import collect_records, collect_records_by_policy
from .settings import BuildSettings
from .train import ExitObjective, FitSettings, train_backbone, train_exits

__all__ = ["backbone", "gates", "Outcome", "exits_and_calibration", "drop_off_exits", "measured_head_costs",
           "measured_speedup"]


def backbone(s: BuildSettings, num_classes: int, inputs: tuple, settings: FitSettings, train_tensors,
              progress: bool):
    """The trained backbone and a record of where it came from.

    A trained backbone is saved to ``OUT/checkpoints/backbone.pt`` with the settings it was trained
    under; ``--resume`` reuses it when those settings match.
    """
    if s.weights:
        _check_split_of_weights(s)
        return load_backbone_weights(s.backbone, num_classes, s.weights), {"source": "weights", "weights": s.weights}
    ckpt_dir = os.path.join(s.out, "checkpoints")
    ckpt = os.path.join(ckpt_dir, "backbone.pt")
    key = {"backbone": s.backbone, "dataset": s.dataset, "data_root": s.data_root,
           "split_seed": s.split_seed, "calib_fraction": s.calib_fraction, "limit_train": s.limit_train,
           "inputs": list(inputs), **settings.to_dict()}
    key.pop("progress")
    key_file = ckpt + ".json"
    if s.resume and os.path.isfile(ckpt) and os.path.isfile(key_file):
        with open(key_file) as f:
            saved = json.load(f)
        if saved.get("key") == key:
            if progress:
                print(f"resuming: backbone from {ckpt}")
            backbone = load_backbone_weights(s.backbone, num_classes, ckpt)
            return backbone, {"source": "trained", "resumed": True, **saved["record"]}
        if progress:
            print(f"not resuming: {ckpt} was trained with other settings")
    torch.manual_seed(s.seed)
    backbone = build_backbone(s.backbone, num_classes)
    history = train_backbone(backbone, *train_tensors, settings)
    record = {**settings.to_dict(), "loss_history": history}
    record.pop("progress")
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save(backbone.state_dict(), ckpt)
    with open(key_file, "w") as f:
        json.dump({"key": key, "record": record}, f, indent=2)
    return backbone, {"source": "trained", "resumed": False, **record}


def _check_split_of_weights(s: BuildSettings) -> None:
    """Refuse a backbone that ``branched build`` trained on images this build would calibrate or test on.

    A checkpoint written by a build has its settings beside it (``backbone.pt.json``); on the same dataset
    and split seed, another calibration fraction moves images the backbone has learned into the
    calibration split, where its errors and its exits' are rarer than on new data, and the guarantee no
    longer holds. Weights from elsewhere cannot be checked: keep their training images out of the dataset.
    """
    try:
        with open(s.weights + ".json") as f:
            trained = json.load(f)["key"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if trained.get("dataset") != s.dataset or trained.get("split_seed") != s.split_seed:
        return
    fraction = trained.get("calib_fraction")
    if fraction != s.calib_fraction:
        same = "no --calib-fraction" if fraction is None else f"--calib-fraction {fraction}"
        raise UsageError(f"{s.weights} was trained on the {s.dataset} split of {same}; with another fraction this "
                         f"build's calibration split would hold images the backbone learned: pass {same}, or train "
                         f"a backbone on this split")


def gates(model: BranchedModel, s: BuildSettings, train_tensors, progress: bool):
    """LC-Net: gate the frozen backbone (:func:`add_gates`) and train the gates to ``target_cost``."""
    gated = add_gates(model, s.dynamic, target_cost=s.target_cost).freeze_backbone()
    report = train_gates(gated, *train_tensors, s.target_cost, epochs=s.gate_epochs, seed=s.seed,
                         progress=progress)
    return gated, report


@dataclass
class Outcome:
    """What training the exits and calibrating them gave.

    Attributes:
        model: the model to save (switched-off exits left out unless asked to keep them).
        calibration: the report stored as ``config.meta["calibration"]``, with the test split's figures.
        calibrated: the full :class:`~branched.build.calibrate.Calibration` (its path names every exit).
        test_points: the test split at every point of the path.
        exit_training: the exits' training settings and loss history.
    """

    model: BranchedModel
    calibration: dict
    calibrated: Calibration
    test_points: list[dict]
    exit_training: dict


def exits_and_calibration(model: BranchedModel, s: BuildSettings, fit: FitSettings, tensors: dict,
                          seconds: dict) -> Outcome:
    """Train the exits of ``model`` (frozen backbone), calibrate them on the calibration split, leave out the exits
    calibration switched off, and measure the shipped model on the test split (never used for a choice)."""
    t0 = time.perf_counter()
    objective = ExitObjective(s.objective, s.cost_weight, s.ce_weight, s.distill, s.temperature)
    history = train_exits(model, *tensors["train"], fit, objective) if model.config.exits else []
    seconds["exits"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    policies = list(POLICIES) if s.policy == "auto" else [s.policy]
    by_policy = collect_records_by_policy(model, *tensors["calib"], policies)
    head_costs = measured_head_costs(model, tensors["calib"][0]) if s.head_cost == "measured" else None
    policy, policy_scores = choose_policy(by_policy, s.max_drop, s.max_cost, s.path_fraction, s.seed,
                                          path_head_costs=head_costs)
    cal = calibrate(by_policy[policy], max_drop=s.max_drop, max_cost=s.max_cost, delta=s.delta,
                    family=s.family, p_value_method=s.p_value, select=s.select,
                    path_fraction=s.path_fraction, seed=s.seed, guarantee=s.guarantee, loss=s.loss,
                    path_head_costs=head_costs)
    if head_costs is not None:
        cal.report["head_costs"] = {"basis": "measured", "measured": head_costs.tolist(),
                                    "flops": by_policy[policy].head_costs.tolist()}
    model.config.policy = policy
    model.config.thresholds = list(cal.thresholds)
    test_records = collect_records(model, *tensors["test"], policy=policy)
    test_points = [test_records.point(t) for t in cal.path]
    report = {**cal.report, "policy": policy,
              "policy_selection": {"scores": policy_scores,
                                   "rule": "best threshold path on the path part of the calibration split"}}
    if not s.keep_off_exits:
        model, report = drop_off_exits(model, report)
    result = evaluate(model, *tensors["test"])  # the routed model itself, as `branched evaluate` runs it
    test = {**{k: result[k] for k in ("samples", "accuracy", "backbone_accuracy", "cost_fraction", "exit_rates",
                                      "exit_accuracy")},
            "drop": result["backbone_accuracy"] - result["accuracy"], "risk": test_points[cal.chosen]["risk"]}
    test["guarantee_held"] = bool(test["drop"] <= cal.report["guarantee"]["drop_bound"] + 1e-12)
    test["routing_matches_records"] = abs(test_points[cal.chosen]["accuracy"] - result["accuracy"]) < 1e-6
    report["test"] = test
    seconds["calibration"] = time.perf_counter() - t0
    return Outcome(model, report, cal, test_points,
                   {**fit.to_dict(), **objective.to_dict(), "loss_history": history})


def drop_off_exits(model: BranchedModel, calibration: dict) -> tuple[BranchedModel, dict]:
    """The model without the side exits that calibration switched off (threshold ``inf``), and the calibration
    report rewritten for it.

    An exit that is off costs nothing at run time, but as a stage of its own it would still cost a Ray hop and
    its weights; ``--keep-off-exits`` keeps them for per-request thresholds that switch them on. The stored
    trade-off curve keeps only the points that do not use a dropped exit.
    """
    off = [k for k, t in enumerate(model.config.thresholds) if math.isinf(t)]
    if not off:
        return model, calibration
    keep = [k for k in range(len(model.config.thresholds)) if k not in off]
    trimmed = model.with_exits(keep)
    cal = dict(calibration)
    cal["thresholds"] = [cal["thresholds"][k] for k in keep]
    rates = cal["exit_rates"]
    cal["exit_rates"] = [rates[k] for k in keep] + [rates[-1]]
    cal["curve"] = [{**p, "thresholds": [p["thresholds"][k] for k in keep]} for p in cal.get("curve", [])
                    if all(math.isinf(p["thresholds"][k]) for k in off)]
    cal["dropped_exits"] = [model.config.exits[k].after for k in off]
    trimmed.config.meta["calibration"] = cal
    return trimmed, cal


@torch.inference_mode()
def measured_head_costs(model: BranchedModel, x: torch.Tensor, batch_size: int = 64, rounds: int = 7) -> np.ndarray:
    """Each exit's wall-clock cost on this machine as a share of the plain backbone's, per sample, at ``batch_size``.

    A head's time counts what its FLOPs miss: pooling, the score, the split into leavers and survivors and gathering
    the survivors' features (half the batch here) for the next segment. Heads are timed where they run, between the
    segments of a full pass, so each finds the caches as a routed batch leaves them (its weights evicted by the
    segment before it): timed alone in a loop, a head ran about twice as fast as in place. The last exit (the
    backbone's own head, always on) keeps its FLOPs share. Medians of ``rounds`` passes, on a copy optimised for
    serving, as the servers run it.
    """
    served = copy.deepcopy(model).optimize_for_inference()
    device = next(served.parameters()).device
    xb = x[:batch_size].to(device).contiguous(memory_format=served.memory_format)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    half = torch.arange(0, len(xb), 2, device=device)
    policy, k1 = served.config.policy, served.num_exits - 1

    def backbone_pass() -> float:
        sync()
        t0 = time.perf_counter()
        served.backbone_forward(xb)
        sync()
        return time.perf_counter() - t0

    def pass_with_heads() -> list[float]:
        times, h = [], xb
        for k in range(k1):
            h = served.segments[k](h)
            sync()
            t0 = time.perf_counter()
            leave = exit_score(served.exits[k](h), policy) >= 0.5
            leave.nonzero(), (~leave).nonzero(), take_rows(h, half)
            sync()
            times.append(time.perf_counter() - t0)
        return times

    backbone_pass(), pass_with_heads()  # warm-up
    backbone = float(np.median([backbone_pass() for _ in range(rounds)]))
    shares = np.median(np.array([pass_with_heads() for _ in range(rounds)]), axis=0) / backbone
    flops = served.cost.exit_flops
    return np.array([*shares.reshape(k1), flops[-1] / float(served.cost.backbone_flops)], dtype=np.float64)


def measured_speedup(model: BranchedModel, x: torch.Tensor, batch_size: int = 64, batches: int = 4) -> float:
    """Wall-clock speed-up of the routed model over its plain backbone at its thresholds, on this machine
    (a copy optimised for serving, as the servers run it; one process, alternating batches)."""
    served = copy.deepcopy(model).optimize_for_inference()
    return float(bench(served, x[: batch_size * batches], batch_size, rounds=2)["measured_speedup"])

"""LC-Net gates (per-input layer and channel skipping): what loading and serving a gated model needs.

Training the gates is build-time code (:mod:`branched.build.lcnet_train`).
"""
from .blocks import DEFAULT_HIDDEN, Gate, GateDecision, GatedBlock, ResidualBranch
from .gates import MODES, apply_gates, gate_settings, gated_blocks

__all__ = ["MODES", "DEFAULT_HIDDEN", "GateDecision", "Gate", "ResidualBranch", "GatedBlock", "gate_settings",
           "apply_gates", "gated_blocks"]

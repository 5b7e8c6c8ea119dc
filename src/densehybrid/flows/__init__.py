"""Normalizing flows that generate synthetic negatives: DenseFlow, its checkpoints, and flow-negative sources."""

from __future__ import annotations

from densehybrid.flows.checkpoint import load_flow_state
from densehybrid.flows.denseflow import DenseFlow
from densehybrid.flows.negatives import FlowNegatives, FlowPaste, MixedNegatives, paste_rectangles, to_8bit

__all__ = [
    "DenseFlow",
    "FlowNegatives",
    "FlowPaste",
    "MixedNegatives",
    "load_flow_state",
    "paste_rectangles",
    "to_8bit",
]

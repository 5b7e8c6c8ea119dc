"""Normalizing flows that generate synthetic negatives: DenseFlow, its checkpoints, and flow-negative sources."""

from __future__ import annotations

from densehybrid.flows.checkpoint import load_flow_state
from densehybrid.flows.denseflow import DenseFlow

__all__ = ["DenseFlow", "load_flow_state"]

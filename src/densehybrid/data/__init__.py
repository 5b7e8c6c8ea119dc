"""Datasets: the built-in RoadScene benchmark (:mod:`densehybrid.data.roadscene`) and, in
:mod:`densehybrid.data.datasets`, loaders for the official benchmark trees."""

from __future__ import annotations

from densehybrid.data.roadscene import (
    ANOMALY_FAMILIES,
    NEGATIVE_SOURCES,
    REAL_ANOMALY_SOURCES,
    ROADSCENE_ANOMALY_ID,
    ROADSCENE_CLASSES,
    ROADSCENE_NUM_CLASSES,
    ROADSCENE_PALETTE,
    ROADSCENE_SPLITS,
    TEXTURE_SOURCES,
    RoadSceneBenchmark,
    RoadSceneDataset,
    RoadSceneNegatives,
    colorize_roadscene,
    generate_negative,
    generate_scene,
    save_example_grid,
)

__all__ = [
    "ANOMALY_FAMILIES",
    "NEGATIVE_SOURCES",
    "REAL_ANOMALY_SOURCES",
    "ROADSCENE_ANOMALY_ID",
    "ROADSCENE_CLASSES",
    "ROADSCENE_NUM_CLASSES",
    "ROADSCENE_PALETTE",
    "ROADSCENE_SPLITS",
    "TEXTURE_SOURCES",
    "RoadSceneBenchmark",
    "RoadSceneDataset",
    "RoadSceneNegatives",
    "colorize_roadscene",
    "generate_negative",
    "generate_scene",
    "save_example_grid",
]

"""The BENCHMARKS registry, checked against every fake tree."""

from __future__ import annotations

import pytest
import torch

from densehybrid.data.datasets import (
    BENCHMARKS,
    PROTOCOLS,
    TARGET_KINDS,
    get_benchmark,
    list_benchmarks,
    parse_dataset_options,
)
from densehybrid.labels import IGNORE_INDEX
from tests.datasets.fake_trees import FAKE_TREES

SMIYC_PERSISTENCE = {"AnomalyTrack-all", "ObstacleTrack-all", "LostAndFound-test", "LostAndFound-train"}


def test_every_benchmark_has_a_fake_tree_builder():
    assert set(FAKE_TREES) == set(BENCHMARKS)
    assert set(BENCHMARKS) >= {"fs-laf", "fs-static", "streethazards", "smiyc-anomaly", "smiyc-obstacle"}


@pytest.mark.parametrize("name", list_benchmarks())
def test_spec_is_consistent_with_its_loader(name):
    spec = get_benchmark(name)
    assert spec.name == name
    assert spec.split in spec.dataset.splits
    assert set(spec.expected_counts) <= set(spec.dataset.splits)
    assert spec.split in spec.expected_counts or (name == "folder" and not spec.expected_counts)  # the user's own
    assert all(isinstance(n, int) and n > 0 for n in spec.expected_counts.values())
    assert spec.protocol in PROTOCOLS or (spec.protocol is None and name == "ade20k")
    assert spec.export_split is None or spec.export_split in spec.dataset.splits
    assert spec.smiyc_dataset is None or spec.smiyc_dataset in SMIYC_PERSISTENCE
    assert ("http" in spec.download or name in ("folder", "roadscene")) and spec.expected_tree  # own or generated
    assert spec.dataset.target_kind in TARGET_KINDS
    if spec.dataset.target_kind == "semantic" and spec.num_known_classes is not None:
        assert spec.num_known_classes == spec.dataset.num_classes


def test_published_counts_and_known_classes():
    assert get_benchmark("fs-laf").expected_counts == {"val": 100}
    assert get_benchmark("smiyc-anomaly").expected_counts["validation"] == 10
    assert get_benchmark("smiyc-obstacle").expected_counts["validation"] == 30
    assert get_benchmark("road-anomaly").expected_counts == {"test": 60}
    assert get_benchmark("laf-test").expected_counts["test"] == 1203
    assert get_benchmark("laf-noknown").expected_counts == {"test": 1043}
    assert get_benchmark("streethazards").expected_counts == {"train": 5125, "validation": 1031, "test": 1500}
    assert get_benchmark("streethazards").num_known_classes == 12
    assert {get_benchmark(n).num_known_classes for n in ("fs-laf", "smiyc-anomaly", "laf-noknown")} == {19}
    assert get_benchmark("streethazards").protocol == "per_image"
    assert get_benchmark("smiyc-obstacle").protocol == "smiyc"


@pytest.mark.parametrize("name", list_benchmarks())
def test_loader_on_fake_tree_returns_the_library_encoding(name, tmp_path):
    spec = get_benchmark(name)
    dataset = spec.create(FAKE_TREES[name](tmp_path))
    assert len(dataset) > 0 and not dataset.issues
    names = [frame.name for frame in dataset.frames]
    assert len(set(names)) == len(names) and all("/" not in n for n in names)
    for i in range(len(dataset)):
        sample = dataset[i]
        image, target = sample["image"], sample["target"]
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        assert target.dtype == torch.int64 and target.shape == image.shape[1:]
        assert isinstance(sample["name"], str) and sample["name"] == names[i]
        values = set(target.unique().tolist())
        if dataset.target_kind == "anomaly":
            assert values <= {0, 1, IGNORE_INDEX}
        else:
            assert values <= set(range(dataset.num_classes + 1)) | {IGNORE_INDEX}


def test_unknown_names_and_options_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark 'fishyscapes'. Available: ade20k, cityscapes"):
        get_benchmark("fishyscapes")
    with pytest.raises(ValueError, match=r"options of benchmark 'fs-static' among \(layout, cityscapes_root\).*towns"):
        get_benchmark("fs-static").create(tmp_path, towns="t5")


def test_parse_dataset_options():
    assert parse_dataset_options(["layout=official", " laf_root = /data/laf "]) == {
        "layout": "official",
        "laf_root": "/data/laf",
    }
    assert parse_dataset_options(None) == {}
    with pytest.raises(ValueError, match="KEY=VALUE.*'layout'"):
        parse_dataset_options(["layout"])
    with pytest.raises(ValueError, match="twice"):
        parse_dataset_options(["a=1", "a=2"])

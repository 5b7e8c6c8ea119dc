from __future__ import annotations

import numpy as np
import pytest
import torch

from densehybrid.data.datasets import LostAndFound, LostAndFoundNoKnown, RoadAnomaly21, RoadObstacle21
from densehybrid.errors import DatasetError
from tests.datasets.conftest import expected_target, raw_label
from tests.datasets.fake_trees import (
    make_fake_lost_and_found,
    make_fake_smiyc_anomaly,
    make_fake_smiyc_obstacle,
    write_image,
)


def test_road_anomaly21_splits_labels_and_persistence_name(tmp_path):
    root = make_fake_smiyc_anomaly(tmp_path, n_validation=2, n_test=3)
    val = RoadAnomaly21(root)
    assert [f.name for f in val.frames] == ["validation0000", "validation0001"]
    assert {f.smiyc_dataset for f in val.frames} == {"AnomalyTrack-all"}
    raw = raw_label(val.frames[0].label)
    assert set(np.unique(raw)) == {0, 1, 255}
    assert torch.equal(val[0]["target"], torch.from_numpy(raw))
    test = RoadAnomaly21(root, split="test")
    assert [f.name for f in test.frames] == ["cow0000", "cow0001", "cow0002"]
    assert all(f.label is None for f in test.frames)
    assert set(test[0]["target"].unique().tolist()) == {255}  # hidden labels: all void
    assert len(RoadAnomaly21(root, split="all")) == 5
    assert len(RoadAnomaly21(root / "dataset_AnomalyTrack")) == 2  # the track folder itself is accepted


def test_road_anomaly21_validation_frame_without_label_is_reported(tmp_path):
    root = make_fake_smiyc_anomaly(tmp_path)
    write_image(root / "dataset_AnomalyTrack" / "images" / "validation0009.jpg", (16, 32))
    with pytest.raises(DatasetError, match="validation0009.jpg.*has no label"):
        RoadAnomaly21(root)
    assert len(RoadAnomaly21(root, split="all")) == 5  # without labels it is still exportable


def test_road_obstacle21_follows_the_toolkit_splits(tmp_path):
    root = make_fake_smiyc_obstacle(tmp_path, n_validation=2, n_test=2)
    val = RoadObstacle21(root)
    assert [f.name for f in val.frames] == ["validation_1", "validation_2"]  # validation_25 is excluded
    assert torch.equal(val[0]["target"], torch.from_numpy(raw_label(val.frames[0].label)))
    assert val[0]["image"].shape == (3, 16, 32)  # webp decodes
    assert [f.name for f in RoadObstacle21(root, split="test").frames] == ["gravel_bag_1", "gravel_bag_2"]
    everything = RoadObstacle21(root, split="all")
    assert len(everything) == 6 and {f.smiyc_dataset for f in everything.frames} == {"ObstacleTrack-all"}
    assert everything.frames[[f.name for f in everything.frames].index("validation_25")].label is not None


# LostAndFound labelIds: 0 outside the road (void), 1 road (inlier), 2..200 obstacles (anomaly).
LAF = {0: 255, 1: 0} | dict.fromkeys(range(2, 201), 1)


def test_lost_and_found_test_encoding(tmp_path):
    root = make_fake_lost_and_found(tmp_path, n_per_scene=2)
    ds = LostAndFound(root)
    assert len(ds) == 6 and {f.smiyc_dataset for f in ds.frames} == {"LostAndFound-test"}
    assert ds.frames[1].name == "02_Hanns_Klemm_Str_44_000001_000030"
    raw = raw_label(ds.frames[1].label)
    assert set(np.unique(raw)) == {0, 1, 2, 17, 200}
    assert torch.equal(ds[1]["target"], torch.from_numpy(expected_target(raw, LAF)))
    assert set(ds[0]["target"].unique().tolist()) == {255}  # the empty-label frame is all void


def test_lost_and_found_webp_images_and_train_split(tmp_path):
    root = make_fake_lost_and_found(tmp_path, split="train", n_per_scene=1, empty_label_frames=0)
    image = next((root / "leftImg8bit").rglob("*.png"))
    write_image(image.with_suffix(".webp"), (16, 32))
    image.unlink()
    ds = LostAndFound(root, split="train")
    assert len(ds) == 1 and ds.frames[0].image.suffix == ".webp"
    assert ds.frames[0].smiyc_dataset == "LostAndFound-train"


def test_noknown_drops_empty_labels_and_known_classes(tmp_path):
    root = make_fake_lost_and_found(tmp_path, n_per_scene=2, empty_label_frames=1)
    names = [f.name for f in LostAndFoundNoKnown(root).frames]
    assert names == [
        "02_Hanns_Klemm_Str_44_000001_000030",
        "04_Maurener_Weg_8_000000_000040",
        "04_Maurener_Weg_8_000001_000040",
    ]


def test_noknown_on_a_complete_split_uses_the_toolkit_indices(tmp_path, monkeypatch):
    root = make_fake_lost_and_found(tmp_path, n_per_scene=2, empty_label_frames=0)
    # Pretend the 6 fake frames are the complete split: the toolkit drops frames by sorted index, not by content.
    monkeypatch.setattr(LostAndFoundNoKnown, "FULL_TEST_SIZE", 6)
    monkeypatch.setattr(LostAndFoundNoKnown, "EMPTY_LABEL_INDICES", (2,))
    names = [f.name for f in LostAndFoundNoKnown(root).frames]
    assert names == [
        "02_Hanns_Klemm_Str_44_000000_000030",
        "02_Hanns_Klemm_Str_44_000001_000030",
        "04_Maurener_Weg_8_000001_000040",
    ]


def test_lost_and_found_missing_gtcoarse(tmp_path):
    root = make_fake_lost_and_found(tmp_path)
    (root / "gtCoarse" / "test").rename(root / "gtCoarse" / "moved")
    with pytest.raises(DatasetError, match=r"(?s)gtCoarse/test.*missing.*gtCoarse\.zip"):
        LostAndFound(root)

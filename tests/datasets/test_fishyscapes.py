from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from densehybrid.data.datasets import FishyscapesLAF, FishyscapesStatic
from densehybrid.errors import DatasetError
from tests.datasets.conftest import expected_target, raw_label, rgb
from tests.datasets.fake_trees import make_fake_fs_laf, make_fake_fs_static


def test_fs_laf_official_pairs_labels_with_laf_images_of_both_splits(tmp_path):
    root = make_fake_fs_laf(tmp_path, n=3)
    ds = FishyscapesLAF(root)
    assert ds.resolved_layout == "official" and ds.target_kind == "anomaly" and ds.num_classes is None
    assert [f.name for f in ds.frames] == [
        "01_Hanns_Klemm_Str_45_000000_000030",
        "04_Maurener_Weg_8_000001_000030",
        "01_Hanns_Klemm_Str_45_000002_000030",
    ]
    assert [f.smiyc_dataset for f in ds.frames] == ["LostAndFound-train", "LostAndFound-test", "LostAndFound-train"]
    assert not ds.issues  # LostAndFound images without a Fishyscapes label are expected
    for i, frame in enumerate(ds.frames):
        raw = raw_label(frame.label)
        assert set(np.unique(raw)) == {0, 1, 255}
        assert torch.equal(ds[i]["target"], torch.from_numpy(raw))


def test_fs_laf_images_may_live_in_a_separate_laf_root(tmp_path):
    root = make_fake_fs_laf(tmp_path / "fs", n=2)
    shutil.move(root / "leftImg8bit", tmp_path / "laf" / "leftImg8bit")
    with pytest.raises(DatasetError, match="laf_root"):
        FishyscapesLAF(root)
    assert len(FishyscapesLAF(root, laf_root=tmp_path / "laf")) == 2


def test_fs_laf_densehybrid_repack_maps_void_2_to_255(tmp_path):
    root = make_fake_fs_laf(tmp_path, n=2, layout="densehybrid")
    ds = FishyscapesLAF(root)
    assert ds.resolved_layout == "densehybrid"
    raw = raw_label(ds.frames[0].label)
    assert set(np.unique(raw)) == {0, 1, 2}
    assert torch.equal(ds[0]["target"], torch.from_numpy(expected_target(raw, {0: 0, 1: 1, 2: 255})))
    # the SMIYC dataset is read from the repack's split folder
    assert {f.name: f.smiyc_dataset for f in ds.frames} == {
        "01_Hanns_Klemm_Str_45_000000_000030": "LostAndFound-train",
        "04_Maurener_Weg_8_000001_000030": "LostAndFound-test",
    }


def test_fs_laf_label_without_image_and_unknown_tree(tmp_path):
    root = make_fake_fs_laf(tmp_path / "a", n=2)
    next((root / "leftImg8bit" / "test").rglob("*.png")).unlink()
    with pytest.raises(DatasetError, match="has no LostAndFound image"):
        FishyscapesLAF(root)
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetError, match="fishyscapes_lostandfound/.*ood/"):
        FishyscapesLAF(tmp_path / "b")
    with pytest.raises(ValueError, match="`layout`"):
        FishyscapesLAF(root, layout="synboost")


def test_fs_static_official_composes_overlay_on_cityscapes(tmp_path):
    root = make_fake_fs_static(tmp_path, n=3)
    ds = FishyscapesStatic(root)
    assert ds.resolved_layout == "official" and len(ds) == 3 and not ds.issues
    frame = ds.frames[1]
    assert frame.name == "0001_lindau_000001_000019"
    overlay = np.load(frame.extra["overlay"])["rgb"].astype(np.int64)
    composed = np.clip(rgb(frame.image).astype(np.int64) + overlay, 0, 255)
    assert (overlay < 0).any() and (overlay > 0).any()  # the test exercises both directions of the clip
    sample = ds[1]
    assert torch.equal(sample["image"], torch.from_numpy(composed).permute(2, 0, 1).float() / 255)
    assert torch.equal(sample["target"], torch.from_numpy(raw_label(frame.label)))


def test_fs_static_cityscapes_root_option_and_its_error(tmp_path):
    root = make_fake_fs_static(tmp_path / "fs", n=2)
    shutil.move(root / "leftImg8bit", tmp_path / "cityscapes" / "leftImg8bit")
    with pytest.raises(DatasetError, match="cityscapes_root"):
        FishyscapesStatic(root)
    assert len(FishyscapesStatic(root, cityscapes_root=tmp_path / "cityscapes")) == 2


def test_fs_static_overlay_of_wrong_shape_or_corrupt(tmp_path):
    root = make_fake_fs_static(tmp_path, n=2)
    ds = FishyscapesStatic(root)
    np.savez(ds.frames[0].extra["overlay"], rgb=np.zeros((4, 4, 3), dtype=np.int16))
    with pytest.raises(DatasetError, match=r"overlay.*shape of its Cityscapes image"):
        ds[0]
    ds.frames[1].extra["overlay"].write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"readable \.npz"):
        ds[1]


def test_fs_static_densehybrid_repack_reads_composed_jpgs(tmp_path):
    root = make_fake_fs_static(tmp_path, n=2, layout="densehybrid")
    ds = FishyscapesStatic(root)
    assert ds.resolved_layout == "densehybrid" and len(ds) == 2
    assert torch.equal(ds[0]["target"], torch.from_numpy(raw_label(ds.frames[0].label)))
    assert torch.equal(ds[0]["image"], torch.from_numpy(rgb(ds.frames[0].image)).permute(2, 0, 1).float() / 255)


def test_fs_static_nested_overlays_are_pointed_out(tmp_path):
    make_fake_fs_static(tmp_path / "fs_val_v3", n=1)
    with pytest.raises(DatasetError, match="fs_val_v3.*pass that as ROOT"):
        FishyscapesStatic(tmp_path)

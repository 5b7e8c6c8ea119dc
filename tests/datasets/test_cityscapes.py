from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.data.datasets import Cityscapes
from densehybrid.errors import DatasetError
from tests.datasets.conftest import expected_target, raw_label, rgb
from tests.datasets.fake_trees import make_fake_cityscapes, write_image, write_label

# The official cityscapesScripts table, written out independently of the library.
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12}
TRAIN_IDS |= {26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_label_ids_become_train_ids_and_void_255(tmp_path):
    root = make_fake_cityscapes(tmp_path, n_per_city=2)
    ds = Cityscapes(root, split="val")
    assert len(ds) == 4
    assert ds.target_kind == "semantic" and ds.num_classes == 19 and len(ds.class_names) == 19
    for i, frame in enumerate(ds.frames):
        sample = ds[i]
        raw = raw_label(frame.label)
        assert set(np.unique(raw)) == set(range(34))  # the fake label exercises every labelId
        assert torch.equal(sample["target"], torch.from_numpy(expected_target(raw, TRAIN_IDS)))
        assert sample["target"].dtype == torch.int64 and sample["target"].shape == (16, 32)
        image = sample["image"]
        assert image.dtype == torch.float32 and image.shape == (3, 16, 32)
        assert torch.equal(image, torch.from_numpy(rgb(frame.image)).permute(2, 0, 1).float() / 255)
        assert sample["name"] == frame.name and sample["path"] == str(frame.image)
    assert [f.name for f in ds.frames] == sorted(f.name for f in ds.frames)
    assert ds.frames[0].name == "frankfurt_000000_000019"


def test_label_train_ids_files_are_used_as_is(tmp_path):
    root = make_fake_cityscapes(tmp_path, n_per_city=1, cities=("ulm",))
    label = np.array([[0, 18, 255, 7]], dtype=np.uint8).repeat(16, 0).repeat(8, 1)
    write_label(root / "gtFine" / "val" / "ulm" / "ulm_000000_000019_gtFine_labelTrainIds.png", label)
    ds = Cityscapes(root, split="val", label_type="labelTrainIds")
    assert torch.equal(ds[0]["target"], torch.from_numpy(label.astype(np.int64)))


def test_transform_is_applied_to_the_sample_dict(tmp_path):
    root = make_fake_cityscapes(tmp_path, n_per_city=1)

    def flip(sample):
        return {**sample, "image": sample["image"].flip(-1), "target": sample["target"].flip(-1), "flipped": True}

    plain, flipped = Cityscapes(root)[0], Cityscapes(root, transform=flip)[0]
    assert flipped["flipped"] is True
    assert torch.equal(flipped["target"], plain["target"].flip(-1))


def test_missing_label_directory_names_it_and_the_download(tmp_path):
    root = make_fake_cityscapes(tmp_path)
    (root / "gtFine" / "val").rename(root / "gtFine" / "elsewhere")
    with pytest.raises(DatasetError, match=r"(?s)gtFine/val.*missing.*gtFine_trainvaltest\.zip"):
        Cityscapes(root, split="val")


def test_missing_root_and_empty_split(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        Cityscapes(tmp_path / "nope")
    (tmp_path / "leftImg8bit" / "val").mkdir(parents=True)
    (tmp_path / "gtFine" / "val").mkdir(parents=True)
    with pytest.raises(DatasetError, match="found none"):
        Cityscapes(tmp_path)


def test_unpaired_image_raises_with_the_file_and_points_to_doctor(tmp_path):
    root = make_fake_cityscapes(tmp_path)
    write_image(root / "leftImg8bit" / "val" / "lindau" / "lindau_000099_000019_leftImg8bit.png", (16, 32))
    with pytest.raises(DatasetError, match=r"lindau_000099_000019_leftImg8bit\.png.*has no label.*densehybrid doctor"):
        Cityscapes(root)
    assert len(Cityscapes(root, strict=False).issues) == 1


def test_corrupt_image_raises_dataset_error_naming_the_file(tmp_path):
    root = make_fake_cityscapes(tmp_path)
    ds = Cityscapes(root)
    ds.frames[1].image.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DatasetError, match=f"{ds.frames[1].image.name}.*decoding failed"):
        ds[1]
    ds.frames[2].image.unlink()
    with pytest.raises(DatasetError, match="missing"):
        ds[2]


def test_colour_label_and_size_mismatch_are_dataset_errors(tmp_path):
    root = make_fake_cityscapes(tmp_path)
    ds = Cityscapes(root)
    Image.new("RGB", (32, 16)).save(ds.frames[0].label)
    with pytest.raises(DatasetError, match="single-channel.*mode RGB"):
        ds[0]
    write_label(ds.frames[1].label, np.zeros((8, 32)))
    with pytest.raises(DatasetError, match=r"size of its image.*\(16, 32\).*\(8, 32\)"):
        ds[1]


def test_bad_arguments_raise_value_errors(tmp_path):
    root = make_fake_cityscapes(tmp_path)
    with pytest.raises(ValueError, match="`split`.*train, val, test.*'valid'"):
        Cityscapes(root, split="valid")
    with pytest.raises(ValueError, match="`label_type`"):
        Cityscapes(root, label_type="trainIds")
    with pytest.raises(IndexError):
        Cityscapes(root)[99]


def test_instance_ids_join_the_sample_for_the_official_iiou(tmp_path):
    root = make_fake_cityscapes(tmp_path, cities=("frankfurt",), n_per_city=1)
    ds = Cityscapes(root, instances=True)
    frame = ds.frames[0]
    instances = np.full((16, 32), 7, dtype=np.uint16)
    instances[2:6, 3:9] = 26001  # a car instance, 16-bit as in gtFine
    Image.fromarray(instances).save(ds.instance_path(frame))
    assert ds.instance_path(frame).name == "frankfurt_000000_000019_gtFine_instanceIds.png"
    sample = ds[0]
    assert torch.equal(sample["instances"], torch.from_numpy(instances.astype(np.int64)))
    assert "instances" not in Cityscapes(root)[0]
    with pytest.raises(ValueError, match="`instances` to be a bool"):
        Cityscapes(root, instances="false")
    ds.instance_path(frame).unlink()
    with pytest.raises(DatasetError, match="instanceIds"):
        ds[0]

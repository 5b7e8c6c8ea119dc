"""RoadAnomaly, ADE20K and COCO (COCO20/80)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from densehybrid.data.datasets import (
    ADE20K,
    COCO20_CLASSES,
    VAL2017_WITHOUT_INSTANCES,
    VOC_CLASSES,
    COCOOpenSet,
    RoadAnomaly,
)
from densehybrid.errors import DatasetError
from tests.datasets.conftest import expected_target, raw_label
from tests.datasets.fake_trees import make_fake_ade20k, make_fake_coco, make_fake_road_anomaly, write_label


def test_road_anomaly_maps_2_to_anomaly(tmp_path):
    root = make_fake_road_anomaly(tmp_path, n=3)
    ds = RoadAnomaly(root)
    assert len(ds) == 3 and ds.frames[0].name == "animals00_scene"
    raw = raw_label(ds.frames[0].label)
    assert set(np.unique(raw)) == {0, 2}
    assert torch.equal(ds[0]["target"], torch.from_numpy(expected_target(raw, {0: 0, 2: 1})))
    assert len(RoadAnomaly(root / "RoadAnomaly_jpg")) == 3
    write_label(ds.frames[1].label, np.array([[0, 1, 2, 3]] * 16).repeat(8, 1))
    with pytest.raises(DatasetError, match=r"holds 1, 3, .*--void-unknown-ids"):  # undefined ids are an error
        ds[1]
    ds.void_unknown_ids = True  # or, asked for, void: never inlier
    assert ds[1]["target"][0, ::8].tolist() == [0, 255, 1, 255]


def test_road_anomaly_label_folder_without_image(tmp_path):
    root = make_fake_road_anomaly(tmp_path, n=2)
    (root / "RoadAnomaly_jpg" / "frames" / "animals01_scene.jpg").unlink()
    with pytest.raises(DatasetError, match="label folder.*animals01_scene.labels.*has no image"):
        RoadAnomaly(root)


def test_ade20k_other_is_void_and_classes_shift_down(tmp_path):
    root = make_fake_ade20k(tmp_path, n=2, splits=("training", "validation"))
    ds = ADE20K(root)
    assert len(ds) == 2 and ds.num_classes == 150 and ds.class_names[0] == "wall" and len(set(ds.class_names)) == 150
    raw = raw_label(ds.frames[0].label)
    mapping = {0: 255} | {k: k - 1 for k in range(1, 151)}
    assert torch.equal(ds[0]["target"], torch.from_numpy(expected_target(raw, mapping)))
    assert [f.name for f in ADE20K(root, split="validation").frames] == ["ADE_val_00000001", "ADE_val_00000002"]


# COCO-Stuff stuffthingmaps hold category_id - 1: person 0, bicycle 1, car 2, giraffe 24, tv 71; stuff 91..181.
def test_coco20_voc_classes_known_other_things_anomalous_stuff_void(tmp_path):
    root = make_fake_coco(tmp_path, n=2)
    ds = COCOOpenSet(root)
    # The released COCO20 ids: the VOC classes in COCO category-id order (tv last, bottle 14, dining table 18).
    assert ds.num_classes == 20 and ds.class_names == COCO20_CLASSES
    assert COCO20_CLASSES[13:] == ("cow", "bottle", "chair", "couch", "potted plant", "dining table", "tv")
    raw = raw_label(ds.frames[0].label)
    mapping = {0: 0, 1: 1, 2: 2, 24: 20, 71: 19, 91: 255, 181: 255, 255: 255}
    assert set(np.unique(raw)) == set(mapping)
    assert torch.equal(ds[0]["target"], torch.from_numpy(expected_target(raw, mapping)))
    voc = COCOOpenSet(root, known_classes="voc")  # the VOC order stays available by name
    assert voc.class_names == VOC_CLASSES
    mapping = {0: 14, 1: 1, 2: 6, 24: 20, 71: 19, 91: 255, 181: 255, 255: 255}
    assert torch.equal(voc[0]["target"], torch.from_numpy(expected_target(raw, mapping)))


def test_coco_reads_the_released_layout_and_image_list(tmp_path):
    # The released evaluation reads labels/val2017 and 4,952 images: val2017 without the 48 without instances.
    assert len(VAL2017_WITHOUT_INSTANCES) == 48 and 25593 in VAL2017_WITHOUT_INSTANCES
    root = make_fake_coco(tmp_path / "released", n=3, first_id=25592)  # ids 25592, 25593 (excluded), 25594
    assert [f.name for f in COCOOpenSet(root).frames] == ["000000025592", "000000025594"]
    assert len(COCOOpenSet(root, images="all")) == 3
    listed = tmp_path / "list.txt"
    listed.write_text("000000025594.png\n")
    assert [f.name for f in COCOOpenSet(root, images=str(listed)).frames] == ["000000025594"]
    assert len(COCOOpenSet(root, split="val2017", images="released")) == 2
    stuff = make_fake_coco(tmp_path / "cocostuff", n=1, labels="annotations")
    assert len(COCOOpenSet(stuff, layout="cocostuff")) == 1
    with pytest.raises(DatasetError, match="labels"):
        COCOOpenSet(stuff)
    with pytest.raises(ValueError, match="`layout`"):
        COCOOpenSet(stuff, layout="coco")


def test_coco_background_class_and_custom_known_classes(tmp_path):
    root = make_fake_coco(tmp_path, n=1)
    with_background = COCOOpenSet(root, background="class")
    assert with_background.num_classes == 21 and with_background.class_names[0] == "background"
    raw = raw_label(with_background.frames[0].label)
    mapping = {0: 1, 1: 2, 2: 3, 24: 21, 71: 20, 91: 0, 181: 0, 255: 255}
    assert torch.equal(with_background[0]["target"], torch.from_numpy(expected_target(raw, mapping)))
    custom = COCOOpenSet(root, known_classes="person, giraffe")
    mapping = {0: 0, 24: 1, 1: 2, 2: 2, 71: 2, 91: 255, 181: 255, 255: 255}
    assert custom.num_classes == 2
    assert torch.equal(custom[0]["target"], torch.from_numpy(expected_target(raw, mapping)))


def test_coco_rejects_unknown_class_names(tmp_path):
    root = make_fake_coco(tmp_path, n=1)
    with pytest.raises(ValueError, match=r"not COCO things: \['aeroplane'\]"):
        COCOOpenSet(root, known_classes=("aeroplane", "person"))
    with pytest.raises(ValueError, match="distinct"):
        COCOOpenSet(root, known_classes=("person", "person"))
    with pytest.raises(ValueError, match="`background`"):
        COCOOpenSet(root, background="stuff")

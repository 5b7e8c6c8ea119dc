from __future__ import annotations

import numpy as np
import pytest
import torch

from densehybrid.data.datasets import StreetHazards
from densehybrid.errors import DatasetError
from tests.datasets.conftest import expected_target, raw_label, rgb
from tests.datasets.fake_trees import make_fake_streethazards

# The released DenseHybrid remap, written out: raw-1, "other" (raw 4) ignored, later ids shifted down, anomaly 12.
DENSEHYBRID = {1: 0, 2: 1, 3: 2, 4: 255, 5: 3, 6: 4, 7: 5, 8: 6, 9: 7, 10: 8, 11: 9, 12: 10, 13: 11, 14: 12}


def test_densehybrid_encoding_ignores_other_and_marks_anomaly_as_k(tmp_path):
    root = make_fake_streethazards(tmp_path, n_per_town=2)
    ds = StreetHazards(root, split="test")
    assert len(ds) == 4 and ds.num_classes == 12 and "other" not in ds.class_names
    assert [f.name for f in ds.frames] == ["t5_300", "t5_301", "t6_300", "t6_301"]
    for i, frame in enumerate(ds.frames):
        raw = raw_label(frame.label)
        assert set(np.unique(raw)) == set(range(1, 15))
        target = ds[i]["target"]
        assert torch.equal(target, torch.from_numpy(expected_target(raw, DENSEHYBRID)))
        assert set(target.unique().tolist()) == set(range(13)) | {255}


def test_hendrycks_encoding_keeps_other_as_a_class(tmp_path):
    root = make_fake_streethazards(tmp_path, n_per_town=1)
    ds = StreetHazards(root, encoding="hendrycks")
    assert ds.num_classes == 13 and ds.class_names[3] == "other"
    raw = raw_label(ds.frames[0].label)
    assert torch.equal(ds[0]["target"], torch.from_numpy(raw - 1))
    assert StreetHazards.num_classes == 12  # the class default is untouched by the instance option


def test_rgba_images_lose_their_alpha_channel(tmp_path):
    root = make_fake_streethazards(tmp_path, n_per_town=1)
    ds = StreetHazards(root)
    image = ds[0]["image"]
    assert image.shape == (3, 16, 32)
    assert torch.equal(image, torch.from_numpy(rgb(ds.frames[0].image)).permute(2, 0, 1).float() / 255)


def test_towns_select_the_calibration_fold_and_train_splits_load(tmp_path):
    root = make_fake_streethazards(tmp_path, n_per_town=2, splits=("train", "validation", "test"))
    assert [f.name for f in StreetHazards(root, towns="t6").frames] == ["t6_300", "t6_301"]
    assert len(StreetHazards(root, towns=("t5", "t6"))) == 4
    train = StreetHazards(root, split="train")
    assert len(train) == 6 and {f.name.split("_")[0] for f in train.frames} == {"t1", "t2", "t3"}
    assert 12 not in train[0]["target"].unique().tolist()  # no anomalies outside the test towns
    assert len(StreetHazards(root, split="validation")) == 2
    with pytest.raises(ValueError, match=r"`towns`.*\['t5', 't6'\]"):
        StreetHazards(root, towns="t9")


def test_bad_options_and_missing_test_archive(tmp_path):
    root = make_fake_streethazards(tmp_path, splits=("validation",))
    with pytest.raises(ValueError, match="`encoding`"):
        StreetHazards(root, split="validation", encoding="pytorch-ood")
    with pytest.raises(DatasetError, match=r"(?s)test/images/test.*missing.*streethazards_test\.tar"):
        StreetHazards(root, split="test")

"""RoadScene is a registered dataset and benchmark: train, evaluate, calibrate and evaluate-open-set accept it."""

from __future__ import annotations

import json

import pytest
import torch

from densehybrid.cli import main
from densehybrid.data import ROADSCENE_CLASSES, ROADSCENE_NUM_CLASSES, ROADSCENE_PALETTE, RoadSceneBenchmark
from densehybrid.data.datasets import RoadScene, get_benchmark, list_benchmarks
from densehybrid.data.roadscene import benchmark_digest
from densehybrid.errors import DatasetError
from densehybrid.models import create_model

SIZES = {"train": 4, "val": 3, "test": 3}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("roadscene")
    RoadSceneBenchmark(root, seed=3, image_size=(48, 96), sizes=SIZES).prepare()
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=ROADSCENE_NUM_CLASSES, decoder_channels=16).eval()
    path = tmp_path_factory.mktemp("ckpt") / "k10.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path


def test_roadscene_is_registered_with_the_generators_classes(bench):
    assert "roadscene" in list_benchmarks()
    spec = get_benchmark("roadscene")
    assert spec.num_known_classes == RoadScene.num_classes == ROADSCENE_NUM_CLASSES
    test = spec.create(bench)
    assert test.split == "test" and len(test) == SIZES["test"]
    sample = test[0]
    assert sample["image"].shape == (3, 48, 96) and set(sample) >= {"target", "family", "name", "path"}
    assert int(sample["target"].max()) == ROADSCENE_NUM_CLASSES  # the anomaly id K in val/test
    assert test.class_names == tuple(ROADSCENE_CLASSES)
    assert test.palette == ROADSCENE_PALETTE[:ROADSCENE_NUM_CLASSES].tolist()


def test_a_digest_pins_the_benchmark(bench, tmp_path):
    digest = benchmark_digest(bench)
    assert len(get_benchmark("roadscene").create(bench, "val", digest=digest)) == SIZES["val"]
    other = tmp_path / "other"
    RoadSceneBenchmark(other, seed=4, image_size=(48, 96), sizes=SIZES).prepare()
    assert benchmark_digest(other) != digest
    with pytest.raises(DatasetError, match="digest"):
        get_benchmark("roadscene").create(other, "val", digest=digest)
    with pytest.raises(DatasetError, match="manifest"):
        get_benchmark("roadscene").create(tmp_path, "val")


def test_evaluate_calibrate_and_open_set_accept_roadscene(bench, checkpoint, tmp_path, capsys):
    common = ["--checkpoint", str(checkpoint), "--device", "cpu", "--no-progress"]
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--benchmark", "roadscene", "--root", str(bench), "--out", str(out), *common]) == 0
    result = json.loads(out.read_text())
    assert result["closed_set"]["class_names"] == list(ROADSCENE_CLASSES)
    calibrated = tmp_path / "calibrated.pt"
    assert main(["calibrate", "--benchmark", "roadscene", "--root", str(bench), "--out", str(calibrated), *common]) == 0
    open_out = tmp_path / "open.json"
    args = ["evaluate-open-set", "--benchmark", "roadscene", "--root", str(bench), "--out", str(open_out), *common]
    assert main(args) == 0
    folds = json.loads(open_out.read_text())["folds"]
    assert [(f["calibration"], f["evaluation"]) for f in folds] == [("val", "test")]
    assert folds[0]["num_images"] == SIZES["test"]

"""Each third-party family end to end through the commands: `train --recipe generic` (2 DenseHybrid steps on a folder
tree), `predict`, `calibrate` and `export` (TorchScript always, ONNX where the exporter can) of the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.cli import main
from densehybrid.cli._common import load_model
from densehybrid.data import RoadSceneBenchmark
from densehybrid.predict import CALIBRATION_KEY
from tests.recipes.conftest import TINY, TINY_NEGATIVES, make_folder_tree, make_image_folder, sets
from tests.third_party_models import HF_DOD, SMP_DOD

K = 10  # the demo benchmark's classes, so that `calibrate --benchmark roadscene` fits the trained model
MODELS = {**SMP_DOD, **HF_DOD, "tv:lraspp_mobilenet_v3_large": {}}
#: one member per family also goes through calibrate and export (the others' export parity: tests/models)
FULL = {"smp:DeepLabV3Plus:tu-mobilenetv3_small_050", "hf:segformer", "hf:upernet", "tv:lraspp_mobilenet_v3_large"}
NO_ONNX = {"hf:upernet"}  # adaptive pooling to a fixed grid on a dynamic input size (see docs/models.md)


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("third_party")
    tree = make_folder_tree(root / "mine", n_train=4, n_val=1, classes=tuple("abcdefghij"))
    negatives = make_image_folder(root / "neg", n=2)
    RoadSceneBenchmark(root / "road", seed=0, image_size=(48, 96), sizes={"train": 1, "val": 2, "test": 1}).prepare()
    photo = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(photo)
    return tree, negatives, root / "road", photo


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_predict_calibrate_export(name, data, tmp_path, capsys):
    tree, negatives, road, photo = data
    out = tmp_path / "run"
    kwargs = f"model.kwargs={_toml(MODELS[name])}"
    code = main(
        ["train", "--recipe", "generic", "--data-root", str(tree), "--neg-root", str(negatives), "--out", str(out)]
        + ["--max-steps", "2", "--device", "cpu", "--no-progress"]
        + sets(*TINY, *TINY_NEGATIVES, f"model.name={name}", kwargs)
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["global_step"] == 2 and summary["method"] == "densehybrid"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite(line["loss"]) and line["posterior"] > 0 for line in lines if line["kind"] == "train")
    model, info = load_model(out / "last.pt")
    assert info["model"] == name and info["num_classes"] == K

    pred = tmp_path / "pred"
    code = main(
        ["predict", "--checkpoint", str(out / "last.pt"), str(photo), "--out", str(pred), "--no-progress", "--save-raw"]
    )
    assert code == 0, capsys.readouterr().err
    assert np.load(pred / "photo_scores.npy").shape == (45, 70)  # the image's own size, not a multiple of 32
    if name not in FULL:
        return

    calibrated = tmp_path / "calibrated.pt"
    code = main(
        ["calibrate", "--checkpoint", str(out / "last.pt"), "--benchmark", "roadscene", "--root", str(road)]
        + ["--out", str(calibrated), "--num-workers", "0", "--no-progress"]
    )
    assert code == 0, capsys.readouterr().err
    threshold = torch.load(calibrated, weights_only=True)[CALIBRATION_KEY]["threshold"]
    for fmt in ("torchscript", "onnx"):
        target = tmp_path / f"model.{fmt}"
        code = main(["export", "--checkpoint", str(calibrated), "--format", fmt, "--out", str(target)])
        captured = capsys.readouterr()
        if fmt == "onnx" and name in NO_ONNX:
            assert code != 0 and "adaptive_avg_pool2d" in captured.err and not target.exists()
            continue
        assert code == 0, captured.err
        assert "parity" in captured.out.lower() and target.stat().st_size > 0
    assert np.isfinite(threshold)

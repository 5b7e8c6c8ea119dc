"""``densehybrid calibrate``: the threshold and display range round-trip through a new checkpoint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.cli import main
from densehybrid.data import RoadSceneBenchmark, RoadSceneDataset
from densehybrid.labels import anomaly_target
from densehybrid.models import create_model
from densehybrid.openset import calibrate_threshold
from densehybrid.predict import CALIBRATION_KEY, Predictor
from densehybrid.scores import densehybrid

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("calibrate")
    RoadSceneBenchmark(folder / "data", seed=0, image_size=(48, 96), sizes={"train": 1, "val": 2, "test": 1}).prepare()
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=10).eval()
    # a bare state dict, as released files are: calibration must record the architecture itself
    torch.save(model.state_dict(), folder / "bare.pt")
    return folder, model


def _no_model_work(monkeypatch):
    """Make reading the checkpoint fail loudly: a refusal of `--out` must come before it."""
    import densehybrid.calibrate
    import densehybrid.models.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(densehybrid.models.checkpoint, "read_checkpoint_file", refuse)
    monkeypatch.setattr(densehybrid.calibrate, "read_checkpoint", refuse)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _reference_threshold(model, root, method="tpr") -> float:
    dataset = RoadSceneDataset(root, "val")
    pairs = []
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            out = model(sample["image"][None])
            pairs.append((densehybrid(out.logits, out.ood_logits), anomaly_target(sample["target"][None], 10)))
    return calibrate_threshold(pairs, method=method, target_tpr=0.95, strict=True)


def test_threshold_round_trips_through_the_checkpoint(setup, capsys):
    folder, model = setup
    original = folder / "bare.pt"
    before = _digest(original)
    out = folder / "calibrated.pt"
    code = main(
        ["calibrate", "--checkpoint", str(original), "--model", "ladder_mobilenetv3", "--benchmark", "roadscene"]
        + ["--root", str(folder / "data"), "--out", str(out), "--num-workers", "0", "--no-progress"]
    )
    assert code == 0 and "threshold" in capsys.readouterr().out
    assert _digest(original) == before  # the original is untouched
    stored = torch.load(out, weights_only=True)[CALIBRATION_KEY]
    expected = _reference_threshold(model, folder / "data")
    assert stored["threshold"] == pytest.approx(expected, rel=1e-6)
    low, high = stored["display_range"]
    assert low <= stored["threshold"] <= high and low < high
    assert stored["split"] == "val" and stored["num_images"] == 2 and len(stored["palette"]) == 10

    predictor = Predictor.from_checkpoint(out, device="cpu")  # no flags: architecture, K and threshold stored
    assert predictor.threshold == stored["threshold"] and predictor.display_range == (low, high)
    assert predictor.threshold_source == "checkpoint" and predictor.class_names[0] == "road"
    assert Predictor.from_checkpoint(out, device="cpu", threshold=1.5).threshold == 1.5

    image = np.random.default_rng(0).integers(0, 256, size=(48, 96, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "photo.png")
    code = main(
        ["predict", "--checkpoint", str(out), str(folder / "photo.png"), "--out", str(folder / "pred")]
        + ["--num-workers", "0", "--no-progress"]
    )
    summary = json.loads((folder / "pred" / "summary.json").read_text())
    assert code == 0 and summary["threshold"] == stored["threshold"] and summary["threshold_source"] == "checkpoint"
    assert summary["display_range"] == [low, high] and summary["display_range_source"] == "checkpoint"
    code = main(
        ["predict", "--checkpoint", str(out), str(folder / "photo.png"), "--out", str(folder / "pred2")]
        + ["--num-workers", "0", "--no-progress", "--threshold=-1e9"]
    )
    record = json.loads((folder / "pred2" / "predictions.jsonl").read_text())
    assert code == 0 and record["anomalous_fraction"] == 1.0  # --threshold overrides the calibration


def test_best_f1(setup):
    folder, model = setup
    out = folder / "f1.pt"
    code = main(
        ["calibrate", "--checkpoint", str(folder / "bare.pt"), "--model", "ladder_mobilenetv3", "--benchmark"]
        + ["roadscene", "--root", str(folder / "data"), "--out", str(out), "--best-f1", "--num-workers", "0"]
        + ["--no-progress"]
    )
    stored = torch.load(out, weights_only=True)[CALIBRATION_KEY]
    assert code == 0 and stored["method"] == "f1" and stored["target_tpr"] is None
    assert stored["threshold"] == pytest.approx(_reference_threshold(model, folder / "data", "f1"), rel=1e-6)


def test_refuses_to_overwrite_the_checkpoint(setup, capsys):
    folder, _ = setup
    path = folder / "bare.pt"
    code = main(
        ["calibrate", "--checkpoint", str(path), "--model", "ladder_mobilenetv3", "--benchmark", "roadscene"]
        + ["--root", str(folder / "data"), "--out", str(path)]
    )
    assert code == 1 and "would destroy it" in capsys.readouterr().err
    before = _digest(path)
    code = main(
        ["calibrate", "--checkpoint", str(path), "--model", "ladder_mobilenetv3", "--benchmark", "roadscene"]
        + ["--root", str(folder / "data"), "--out", str(path), "--overwrite"]
    )
    assert code == 1 and "would destroy it" in capsys.readouterr().err  # not even with --overwrite
    assert _digest(path) == before


def _calibrate(folder, out, *extra):
    return main(
        ["calibrate", "--checkpoint", str(folder / "bare.pt"), "--model", "ladder_mobilenetv3", "--benchmark"]
        + ["roadscene", "--root", str(folder / "data"), "--out", str(out), "--num-workers", "0", "--no-progress"]
        + list(extra)
    )


def test_an_existing_out_needs_overwrite(setup, tmp_path, capsys, monkeypatch):
    folder, _ = setup
    out = tmp_path / "calibrated.pt"
    out.write_text("an earlier result")
    with monkeypatch.context() as patch:
        _no_model_work(patch)
        assert _calibrate(folder, out) == 1
        err = capsys.readouterr().err
        assert "--overwrite" in err and "Traceback" not in err and out.read_text() == "an earlier result"
    assert _calibrate(folder, out, "--overwrite") == 0
    printed = capsys.readouterr().out
    assert printed.index("threshold") < printed.index("calibrated checkpoint:")  # the result first, then the file
    assert "threshold" in torch.load(out, weights_only=True)[CALIBRATION_KEY]
    assert not list(tmp_path.glob("*.tmp"))


def test_default_out_of_a_second_run_needs_overwrite(setup, tmp_path, capsys, monkeypatch):
    folder, _ = setup
    checkpoint = tmp_path / "m.pt"
    checkpoint.write_bytes((folder / "bare.pt").read_bytes())
    (tmp_path / "m-calibrated.pt").write_text("the first calibration")
    _no_model_work(monkeypatch)
    code = main(
        ["calibrate", "--checkpoint", str(checkpoint), "--model", "ladder_mobilenetv3", "--benchmark", "roadscene"]
        + ["--root", str(folder / "data")]
    )
    assert code == 1 and "m-calibrated.pt" in capsys.readouterr().err


def test_out_below_a_file_is_refused_before_the_checkpoint_is_read(setup, tmp_path, capsys, monkeypatch):
    folder, _ = setup
    (tmp_path / "results").write_text("a file")
    _no_model_work(monkeypatch)
    assert _calibrate(folder, tmp_path / "results" / "c.pt", "--overwrite") == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err


def test_a_split_without_anomalies_is_a_clear_error(setup, capsys):
    folder, _ = setup
    code = main(
        ["calibrate", "--checkpoint", str(folder / "bare.pt"), "--model", "ladder_mobilenetv3", "--benchmark"]
        + ["roadscene", "--root", str(folder / "data"), "--split", "train", "--out", str(folder / "x.pt")]
        + ["--num-workers", "0", "--no-progress"]
    )
    assert code == 1 and "have none" in capsys.readouterr().err
    assert not (folder / "x.pt").exists()


def test_calibrate_on_a_registered_benchmark_with_binary_labels(tmp_path):
    """Fishyscapes LAF labels are 0 inlier / 1 anomaly / 255 void: no class ids, no anomaly id K."""
    from densehybrid.engine.evaluate import model_outputs
    from densehybrid.evaluation import open_benchmark
    from tests.datasets.fake_trees import make_fake_fs_laf

    root = make_fake_fs_laf(tmp_path / "fs", n=3, size=(64, 96))
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=19, decoder_channels=16).eval()
    checkpoint = tmp_path / "k19.pt"
    torch.save(
        {"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, checkpoint
    )
    code = main(
        ["calibrate", "--checkpoint", str(checkpoint), "--benchmark", "fs-laf", "--root", str(root)]
        + ["--num-workers", "0", "--no-progress"]
    )
    assert code == 0
    stored = torch.load(tmp_path / "k19-calibrated.pt", weights_only=True)[CALIBRATION_KEY]
    _, dataset = open_benchmark("fs-laf", root, "val")
    pairs = [
        (densehybrid(out.logits, out.ood_logits), batch["target"])
        for batch, out in model_outputs(model, dataset, "cpu", 1, progress=False)
    ]
    assert stored["threshold"] == pytest.approx(calibrate_threshold(pairs, target_tpr=0.95), rel=1e-6)
    assert stored["benchmark"] == "fs-laf" and stored["split"] == "val" and stored["num_images"] == 3


def test_a_score_the_model_cannot_give_is_named_not_blamed_on_missing_anomalies(setup, capsys, monkeypatch):
    import densehybrid.calibrate

    def no_such_output(*args, **kwargs):  # a model without the posterior head (a DiCNet) asked for its score
        from densehybrid.models.output import HybridOutput
        from densehybrid.scores import compute_score

        compute_score("densehybrid", HybridOutput(torch.zeros(1, 3, 4, 4), None))
        yield

    monkeypatch.setattr(densehybrid.calibrate, "model_outputs", no_such_output)
    folder, _ = setup
    code = main(
        ["calibrate", "--checkpoint", str(folder / "bare.pt"), "--model", "ladder_mobilenetv3", "--benchmark"]
        + ["roadscene", "--root", str(folder / "data"), "--out", str(folder / "y.pt"), "--num-workers", "0"]
        + ["--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "for score 'densehybrid'" in err and "have none: a threshold" not in err


def test_a_calibration_scale_that_empties_the_maps_is_one_message(setup, capsys):
    folder, _ = setup
    code = main(
        ["calibrate", "--checkpoint", str(folder / "bare.pt"), "--model", "ladder_mobilenetv3", "--benchmark"]
        + ["roadscene", "--root", str(folder / "data"), "--out", str(folder / "z.pt"), "--num-workers", "0"]
        + ["--no-progress", "--calibration-scale", "0.0001"]
    )
    err = capsys.readouterr().err
    assert code == 1 and "at least 1 px per side" in err and not (folder / "z.pt").exists()

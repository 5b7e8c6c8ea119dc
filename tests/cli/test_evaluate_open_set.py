"""``densehybrid evaluate-open-set``: the StreetHazards two-town protocol and the COCO20/80 protocols, on fake trees."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_curve

from densehybrid.cli import main
from densehybrid.data.datasets import COCOOpenSet, StreetHazards
from densehybrid.labels import anomaly_target
from densehybrid.models import create_model
from densehybrid.scores import densehybrid
from tests.datasets.fake_trees import (
    STREETHAZARDS_TEST_IDS,
    make_fake_coco,
    make_fake_streethazards,
    pattern,
    write_label,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for k in (12, 20):
        torch.manual_seed(k)
        model = create_model("ladder_mobilenetv3", num_classes=k, decoder_channels=16).eval()
        path = folder / f"k{k}.pt"
        torch.save(
            {"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path
        )
        out[k] = (path, model)
    return out


def _run(benchmark, root, checkpoint, out, *extra):
    args = ["evaluate-open-set", "--benchmark", benchmark, "--root", str(root), "--checkpoint", str(checkpoint)]
    args += ["--out", str(out), "--device", "cpu", "--num-workers", "0", "--no-progress", *extra]
    return main(args)


def _frames(model, dataset, indices=None):
    """(score, closed-set argmax, target) per frame, computed here one frame at a time."""
    with torch.inference_mode():
        for i in indices if indices is not None else range(len(dataset)):
            sample = dataset[i]
            out = model(sample["image"][None], output_size=tuple(sample["target"].shape))
            yield densehybrid(out.logits, out.ood_logits)[0], out.logits.argmax(1)[0], sample["target"]


def _released_threshold(frames, k, scale, tpr=0.95, at_least=False):
    """The released calibration: maps resized by `scale`, pooled, first ROC threshold with TPR > tpr (StreetHazards)
    or TPR >= tpr (COCO20)."""
    scores, labels = [], []
    for score, _, target in frames:
        binary = anomaly_target(target[None], k)
        if scale != 1.0:
            score = F.interpolate(score[None, None], scale_factor=scale, mode="bilinear", align_corners=False)[0, 0]
            binary = F.interpolate(binary[None].float(), scale_factor=scale, mode="nearest")[0].long()
        keep = binary[0] != 255
        scores.append(score[keep].numpy())
        labels.append(binary[0][keep].numpy())
    _, tprs, thresholds = roc_curve(np.concatenate(labels), np.concatenate(scores))
    return float(thresholds[np.argmax(tprs >= tpr if at_least else tprs > tpr)])


def _iou(confusion):
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, np.diag(confusion) / union, np.nan)


def _confusions(frames, k, threshold):
    """Open-set (K+1)x(K+1) and closed-set KxK confusion matrices, rows = target, void dropped."""
    opened, closed = np.zeros((k + 1, k + 1), np.int64), np.zeros((k, k), np.int64)
    for score, pred, target in frames:
        keep = target != 255
        open_pred = torch.where(score > threshold, torch.tensor(k), pred)
        np.add.at(opened, (target[keep].numpy(), open_pred[keep].numpy()), 1)
        known = target < k
        np.add.at(closed, (target[known].numpy(), pred[known].numpy()), 1)
    return opened, closed


def test_streethazards_two_fold_protocol_matches_the_released_procedure(tmp_path, checkpoints, capsys):
    root = make_fake_streethazards(tmp_path / "data", n_per_town=2)
    path, model = checkpoints[12]
    assert _run("streethazards", root, path, tmp_path / "r.json") == 0
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["benchmark"] == "streethazards" and result["calibration_scale"] == 0.5
    assert result["target_tpr"] == 0.95 and result["calibration_method"] == "tpr" and result["strict_tpr"] is True
    assert result["parts"]["t5"]["num_images"] == 2 and result["parts"]["t5"]["first_frame"] == "t5_300"
    towns = {town: list(_frames(model, StreetHazards(root, towns=town))) for town in ("t5", "t6")}
    assert [(f["calibration"], f["evaluation"]) for f in result["folds"]] == [("t5", "t6"), ("t6", "t5")]
    pooled_closed = np.zeros((12, 12), np.int64)
    for fold in result["folds"]:
        threshold = _released_threshold(towns[fold["calibration"]], 12, 0.5)
        assert fold["threshold"] == pytest.approx(threshold, abs=1e-5)
        opened, closed = _confusions(towns[fold["evaluation"]], 12, fold["threshold"])
        pooled_closed += closed
        iou = _iou(opened)
        assert fold["open_miou"] == pytest.approx(np.mean(np.nan_to_num(iou[:12])))  # TPAMI-era: NaN IoU -> 0
        assert fold["anomaly_iou"] == pytest.approx(iou[12])
        assert fold["closed_miou"] == pytest.approx(np.nanmean(_iou(closed)))
        assert fold["num_images"] == 2 and fold["calibration_images"] == 2
    assert result["open_miou"] == pytest.approx(np.mean([f["open_miou"] for f in result["folds"]]))
    assert result["closed_miou"] == pytest.approx(np.nanmean(_iou(pooled_closed)))
    assert result["miou_gap"] == pytest.approx(result["closed_miou"] - result["open_miou"])
    assert 0.0 <= result["open_miou"] <= 1.0 and result["num_images"] == 4
    assert "t5 -> t6" in printed and "open-mIoU" in printed


def test_coco_released_protocol_calibrates_on_the_evaluated_split(tmp_path, checkpoints, capsys):
    root = make_fake_coco(tmp_path / "coco", n=5)
    path, model = checkpoints[20]
    assert _run("coco20", root, path, tmp_path / "r.json", "--tpr", "0.9") == 0
    assert "TPR >= 0.9" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["coco_protocol"] == "released" and list(result["parts"]) == ["val2017"]
    assert result["calibration_rule"] == "at_least" and result["nan_iou"] == "zero"
    frames = list(_frames(model, COCOOpenSet(root)))
    (fold,) = result["folds"]
    assert fold["calibration"] == fold["evaluation"] == "val2017" and fold["num_images"] == 5
    assert fold["threshold"] == pytest.approx(_released_threshold(frames, 20, 1.0, 0.9, at_least=True), abs=1e-5)
    opened, closed = _confusions(frames, 20, fold["threshold"])
    iou = _iou(opened)[:20]
    assert np.isnan(iou).any()  # some known classes are absent from the fake split
    assert result["open_miou"] == pytest.approx(np.mean(np.nan_to_num(iou)))
    assert result["closed_miou"] == pytest.approx(np.nanmean(_iou(closed)))
    assert _run("coco20", root, path, tmp_path / "skip.json", "--tpr", "0.9", "--nan-iou", "skip") == 0
    skipped = json.loads((tmp_path / "skip.json").read_text())
    assert skipped["open_miou"] == pytest.approx(np.nanmean(iou)) and skipped["nan_iou"] == "skip"


def test_coco_halves_of_val_calibrate_each_other(tmp_path, checkpoints):
    root = make_fake_coco(tmp_path / "coco", n=5)
    path, model = checkpoints[20]
    extra = ["--tpr", "0.9", "--coco-protocol", "halves", "--calibration-rule", "above", "--nan-iou", "skip"]
    assert _run("coco20", root, path, tmp_path / "r.json", *extra) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["parts"]) == ["val2017[0:3]", "val2017[3:5]"] and result["calibration_scale"] == 1.0
    assert result["coco_protocol"] == "halves" and result["calibration_rule"] == "above"
    assert result["parts"]["val2017[3:5]"]["first_frame"] == f"{142:012d}"
    dataset = COCOOpenSet(root)
    halves = {
        "val2017[0:3]": list(_frames(model, dataset, range(3))),
        "val2017[3:5]": list(_frames(model, dataset, range(3, 5))),
    }
    for fold in result["folds"]:
        assert fold["threshold"] == pytest.approx(
            _released_threshold(halves[fold["calibration"]], 20, 1.0, 0.9), abs=1e-5
        )
        opened, _ = _confusions(halves[fold["evaluation"]], 20, fold["threshold"])
        assert fold["open_miou"] == pytest.approx(np.nanmean(_iou(opened)[:20]))
    weights = [3, 2] if result["folds"][0]["evaluation"] == "val2017[0:3]" else [2, 3]
    expected = np.average([f["open_miou"] for f in result["folds"]], weights=weights)
    assert result["open_miou"] == pytest.approx(expected) and result["num_images"] == 5
    assert result["class_names"][0] == "person" and len(result["closed_iou"]) == 20


def test_f1_calibration_limit_and_scale_options(tmp_path, checkpoints):
    root = make_fake_streethazards(tmp_path / "data", n_per_town=2)
    path, _ = checkpoints[12]
    extra = ["--calibration", "f1", "--limit", "1", "--calibration-scale", "1", "--input-scale", "0.5"]
    assert _run("streethazards", root, path, tmp_path / "r.json", *extra) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["calibration_method"] == "f1" and result["target_tpr"] is None
    assert result["calibration_scale"] == 1.0 and result["input_scale"] == 0.5 and result["num_images"] == 2
    assert all(np.isfinite(fold["threshold"]) for fold in result["folds"])


def _error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err
    return err.splitlines()[0]


def test_errors_are_one_line_and_name_the_problem(tmp_path, checkpoints, capsys):
    root = make_fake_streethazards(tmp_path / "data", n_per_town=1)
    path, _ = checkpoints[12]
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit):  # not an open-set benchmark: an argparse usage error
        _run("fs-laf", root, path, out)
    capsys.readouterr()
    assert _run("streethazards", root, path, out, "--tpr", "1.5") == 1
    assert "--tpr" in _error(capsys)
    assert _run("streethazards", root, path, out, "--option", "towns=t5") == 1
    assert "towns" in _error(capsys)
    assert _run("streethazards", root, checkpoints[20][0], out) == 1
    assert "12 classes" in _error(capsys)
    assert _run("streethazards", tmp_path / "nowhere", path, out) == 1
    assert "nowhere" in _error(capsys)
    assert _run("streethazards", root, path, out, "--score", "sml") == 1
    assert "--sml-statistics" in _error(capsys)
    # a calibration town without anomaly pixels cannot set a threshold
    no_anomaly = [i for i in STREETHAZARDS_TEST_IDS if i != 14]
    write_label(root / "test" / "annotations" / "test" / "t5" / "300.png", pattern((16, 32), no_anomaly))
    assert _run("streethazards", root, path, out) == 1
    assert "calibration part 't5'" in _error(capsys)
    assert not out.exists()


def test_coco_released_protocol_runs_the_segmenter_in_its_released_sliding_window(tmp_path):
    """The released COCO20 evaluation slides windows over the Segmenter and scores the merged probabilities; the
    model's forward gives logits, and the protocol's inference object applies the window (here 32, stride 20)."""
    from densehybrid.evaluation import coco_open_set
    from densehybrid.models.window import SlidingWindow, sliding_window_outputs

    root = make_fake_coco(tmp_path / "coco", n=3)
    torch.manual_seed(0)
    model = create_model("segmenter_vit_ti16", num_classes=20, image_size=32, window_size=32, window_stride=20).eval()
    assert model.inference_window == SlidingWindow(32, 20, "probabilities")
    result = coco_open_set(root, model, target_tpr=0.9, device="cpu", num_workers=0, progress=False)
    assert result["window"] == "32x32 windows, stride 20, merged as probabilities"

    class Released(torch.nn.Module):  # what the released script computes: window, softmax, then the score
        def forward(self, images, output_size=None):
            return sliding_window_outputs(model, images, model.inference_window, output_size)

    frames = list(_frames(Released(), COCOOpenSet(root)))
    (fold,) = result["folds"]
    assert fold["threshold"] == pytest.approx(_released_threshold(frames, 20, 1.0, 0.9, at_least=True), abs=1e-5)
    opened, closed = _confusions(frames, 20, fold["threshold"])
    assert result["open_miou"] == pytest.approx(np.mean(np.nan_to_num(_iou(opened)[:20])))
    assert result["closed_miou"] == pytest.approx(np.nanmean(_iou(closed)))
    whole = coco_open_set(root, model, target_tpr=0.9, device="cpu", num_workers=0, progress=False, window=None)
    assert whole["window"] == "whole image (no sliding window)" and whole["folds"][0]["threshold"] != fold["threshold"]

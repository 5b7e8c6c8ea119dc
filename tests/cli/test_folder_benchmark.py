"""``--benchmark folder``: a user's own tree through evaluate, calibrate, evaluate-open-set, export-smiyc and doctor.

Each command's numbers are compared with the library's functions run here on the same frames (the engine's
``evaluate``, ``calibrate_threshold`` on the model's scores, ``two_fold_open_set`` on the two halves of val).
"""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from densehybrid.cli import main
from densehybrid.data.datasets import FolderDataset, get_benchmark
from densehybrid.doctor import diagnose
from densehybrid.engine.evaluate import evaluate
from densehybrid.evaluation import evaluate_benchmark, folder_open_set, two_fold_open_set
from densehybrid.labels import anomaly_target
from densehybrid.models import create_model
from densehybrid.openset import calibrate_threshold
from densehybrid.predict import CALIBRATION_KEY
from densehybrid.scores import get_score
from tests.datasets.fake_trees import FOLDER_CLASSES, make_fake_folder, pattern, write_label

K = len(FOLDER_CLASSES)
LOOP = ["--device", "cpu", "--num-workers", "0", "--no-progress"]
pytestmark = pytest.mark.filterwarnings("ignore:The binned pooled metrics")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint written like the training loop's, the model in eval mode) with the K classes of the tree."""
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=K, decoder_channels=16).eval()
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path, model


def _scores_and_targets(model, dataset):
    with torch.inference_mode():
        for i in range(len(dataset)):
            sample = dataset[i]
            out = model(sample["image"][None], output_size=tuple(sample["target"].shape))
            yield out, get_score("densehybrid")(out.logits, out.ood_logits), sample["target"][None]


def test_evaluate_equals_the_engine_on_the_same_frames(tmp_path, trained, capsys):
    root = make_fake_folder(tmp_path / "mine", n_val=4)
    checkpoint, model = trained
    out = tmp_path / "eval.json"
    assert (
        main(
            ["evaluate", "--benchmark", "folder", "--root", str(root), "--checkpoint", str(checkpoint)]
            + LOOP
            + ["--out", str(out)]
        )
        == 0
    )
    cli = json.loads(out.read_text())
    assert cli["benchmark"] == "folder" and cli["split"] == "val" and cli["num_images"] == 4
    assert cli["closed_set"]["class_names"] == list(FOLDER_CLASSES)
    reference = evaluate(
        model,
        FolderDataset(root, "val"),
        ["densehybrid"],
        target_kind="semantic",
        num_classes=K,
        protocol="pooled",
        device="cpu",
        progress=False,
    )
    expected = reference.anomaly["densehybrid"]["all"]
    for key in ("ap", "auroc", "fpr95", "num_anomaly", "num_inlier"):
        assert cli["anomaly"]["densehybrid"][key] == pytest.approx(expected[key], abs=1e-12), key
    assert cli["closed_set"]["miou"] == pytest.approx(reference.closed_set["miou"], abs=1e-12)
    assert expected["num_anomaly"] == sum(
        int((anomaly_target(t, K) == 1).sum()) for _, _, t in _scores_and_targets(model, FolderDataset(root, "val"))
    )
    api = evaluate_benchmark("folder", root, model, device="cpu", progress=False)
    assert api["anomaly"]["densehybrid"]["ap"] == cli["anomaly"]["densehybrid"]["ap"]


def test_anomaly_id_from_dataset_toml_or_option_gives_the_same_numbers(tmp_path, trained):
    checkpoint, model = trained
    plain = make_fake_folder(tmp_path / "plain", n_val=2)
    custom = make_fake_folder(tmp_path / "custom", n_val=2, anomaly_id=200)
    results = [evaluate_benchmark("folder", root, model, device="cpu", progress=False) for root in (plain, custom)]
    assert results[0]["anomaly"]["densehybrid"]["num_anomaly"] > 0
    assert results[0]["anomaly"] == results[1]["anomaly"]
    (custom / "dataset.toml").unlink()
    args = ["evaluate", "--benchmark", "folder", "--root", str(custom), "--checkpoint", str(checkpoint)] + LOOP
    assert main([*args, "--out", str(tmp_path / "a.json")]) == 1  # 200 is no class of classes.txt
    assert main([*args, "--option", "anomaly_id=200", "--out", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["anomaly"] == results[0]["anomaly"]


def test_calibrate_equals_calibrate_threshold_on_the_scores(tmp_path, trained, capsys):
    root = make_fake_folder(tmp_path / "mine", n_val=3)
    checkpoint, model = trained
    out = tmp_path / "calibrated.pt"
    args = ["calibrate", "--benchmark", "folder", "--root", str(root), "--checkpoint", str(checkpoint)]
    assert main([*args, "--out", str(out), *LOOP]) == 0
    assert "on folder val (3 images" in capsys.readouterr().out
    stored = torch.load(out, weights_only=True)[CALIBRATION_KEY]
    pairs = [(s, anomaly_target(t, K)) for _, s, t in _scores_and_targets(model, FolderDataset(root, "val"))]
    assert stored["threshold"] == pytest.approx(calibrate_threshold(pairs, target_tpr=0.95, strict=True), abs=0)
    assert stored["class_names"] == list(FOLDER_CLASSES) and stored["benchmark"] == "folder"


def test_evaluate_open_set_equals_two_folds_over_the_halves(tmp_path, trained, capsys):
    root = make_fake_folder(tmp_path / "mine", n_val=4)
    checkpoint, model = trained
    out = tmp_path / "open.json"
    args = ["evaluate-open-set", "--benchmark", "folder", "--root", str(root), "--checkpoint", str(checkpoint)]
    assert main([*args, "--out", str(out), *LOOP]) == 0
    cli = json.loads(out.read_text())
    dataset = FolderDataset(root, "val")
    parts = {"first": Subset(dataset, range(0, 2)), "second": Subset(dataset, range(2, 4))}
    reference = two_fold_open_set(model, parts, num_classes=K, calibration_scale=1.0, device="cpu", progress=False)
    assert [fold["threshold"] for fold in cli["folds"]] == [fold["threshold"] for fold in reference["folds"]]
    for key in ("open_miou", "anomaly_iou", "closed_miou"):
        assert cli[key] == pytest.approx(reference[key], abs=1e-12), key
    assert list(cli["parts"]) == ["val[0:2]", "val[2:4]"] and cli["class_names"] == list(FOLDER_CLASSES)
    api = folder_open_set(root, model, device="cpu", progress=False)
    assert api["open_miou"] == cli["open_miou"]


def test_export_smiyc_writes_one_map_per_val_frame(tmp_path, trained):
    root = make_fake_folder(tmp_path / "mine", n_val=2)
    checkpoint, model = trained
    args = ["export-smiyc", "--benchmark", "folder", "--root", str(root), "--checkpoint", str(checkpoint)]
    with pytest.warns(UserWarning, match="SMIYC toolkit persistence name"):
        assert main([*args, "--method", "mine", "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    files = sorted((tmp_path / "out" / "anomaly_p" / "mine" / "folder-val").glob("*.hdf5"))
    assert [f.stem for f in files] == ["scene00", "scene01"]
    _, scores, _ = next(_scores_and_targets(model, FolderDataset(root, "val")))
    with h5py.File(files[0]) as handle:
        np.testing.assert_allclose(handle["value"][()], scores[0].numpy().astype(np.float16), rtol=1e-3)


def test_bad_trees_get_one_clear_message_each(tmp_path, trained, capsys):
    checkpoint, _ = trained

    def run(command, root, *extra):
        args = [command, "--benchmark", "folder", "--root", str(root), "--checkpoint", str(checkpoint)]
        status = main([*args, "--out", str(tmp_path / f"{command}-{root.name}.out"), *LOOP, *extra])
        return status, capsys.readouterr().err.strip()

    no_val = make_fake_folder(tmp_path / "no_val", n_val=0)
    status, err = run("evaluate", no_val)
    assert status == 1 and err.count("Error:") == 1
    assert f"Expected the validation split '{no_val / 'val'}' (val/images and val/labels)" in err

    bad_value = make_fake_folder(tmp_path / "bad_value", n_val=2)
    label = bad_value / "val" / "labels" / "scene01.png"
    write_label(label, pattern((16, 32), (0, 1, 77)))
    for command in ("evaluate", "calibrate"):
        status, err = run(command, bad_value)
        assert status == 1 and err.count("Error:") == 1
        assert f"classes.txt in '{label}': 0..{K - 1}, 255 (ignore), {K} (anomaly), but it holds 77." in err

    no_anomaly = make_fake_folder(tmp_path / "no_anomaly", n_val=2)
    for i in range(2):
        write_label(no_anomaly / "val" / "labels" / f"scene{i:02d}.png", pattern((16, 32), (0, 1, 255)))
    status, err = run("calibrate", no_anomaly)
    assert status == 1 and err.count("Error:") == 1
    assert "Expected anomaly pixels in split 'val' of 'folder', but its 2 labelled images have none" in err
    assert "label value K" in err

    status, err = run("evaluate", no_anomaly, "--option", "anomaly_id=3")
    assert status == 1 and f"Expected `anomaly_id` (--option anomaly_id) to be an integer in [{K}, 254]" in err


def test_doctor_counts_the_anomaly_pixels_of_each_split(tmp_path, capsys):
    root = make_fake_folder(tmp_path / "mine", n_train=2, n_val=3)
    report = diagnose("folder", root)
    assert report.ok and report.split == "train,val"
    expected = sum(int((pattern((16, 32), (*range(K), 255, K), shift=i) == K).sum()) for i in range(3))
    found = [f.problem for f in report.findings if f.severity == "info"]
    assert f"Split 'val': {expected} anomaly pixels (label value {K}) in 3 of the 3 label file(s) decoded." in found
    assert "Split 'train': 0 anomaly pixels in the 2 label file(s) decoded (anomalies are marked in val only)." in found
    assert main(["doctor", "folder", str(root)]) == 0
    printed = capsys.readouterr().out
    assert "problem:" not in printed and f"found: Split 'val': {expected} anomaly pixels" in printed
    assert "archive" not in printed

    for i in range(3):  # no anomaly pixels left: a warning that names calibrate
        write_label(root / "val" / "labels" / f"scene{i:02d}.png", pattern((16, 32), (0, 255)))
    write_label(root / "labels" / "scene00.png", pattern((16, 32), (0, 99)))
    report = diagnose("folder", root)
    assert [w.problem.split(":")[0] for w in report.warnings] == [
        f"Expected anomaly pixels (label value {K}) in split 'val', but the 3 label file(s) decoded have none"
    ]
    (error,) = report.errors
    assert "but got 99" in error.problem and "classes.txt" in error.fix and "archive" not in error.fix

    shutil.rmtree(root / "val")
    report = diagnose("folder", root, split="val")
    assert not report.ok and "Expected the validation split" in report.errors[0].problem


def test_folder_is_a_registered_benchmark():
    spec = get_benchmark("folder")
    assert spec.dataset is FolderDataset and spec.split == "val" and spec.protocol == "pooled"
    assert "anomaly_id" in spec.option_names()

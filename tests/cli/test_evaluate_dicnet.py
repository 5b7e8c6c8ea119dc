"""``densehybrid evaluate --score dicnet`` end to end on a fake StreetHazards tree, both per-image variants, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from densehybrid.cli import main
from densehybrid.data.datasets import get_benchmark
from densehybrid.metrics import PerImageAnomalyMetrics
from densehybrid.models import create_model
from densehybrid.scores import compute_score
from tests.datasets.fake_trees import make_fake_streethazards


def _save(model, path):
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A fake StreetHazards test split and three checkpoints: DiCNet with 12 and 13 classes, DenseHybrid with 12."""
    folder = tmp_path_factory.mktemp("dicnet_eval")
    root = make_fake_streethazards(folder / "sh", n_per_town=2)
    torch.manual_seed(0)
    files, models = {}, {}
    for k in (12, 13):
        models[k] = create_model("dicnet", num_classes=k, teacher="ladder_mobilenetv3", decoder_channels=8).eval()
        files[k] = _save(models[k], folder / f"dicnet{k}.pt")
    files["densehybrid"] = _save(
        create_model("ladder_mobilenetv3", num_classes=12, decoder_channels=8), folder / "dh.pt"
    )
    return root, files, models


def _run(root, checkpoint, out, *extra):
    args = ["evaluate", "--benchmark", "streethazards", "--root", str(root), "--checkpoint", str(checkpoint)]
    return main([*args, "--out", str(out), "--device", "cpu", "--num-workers", "0", "--no-progress", *extra])


def _error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err
    return err.splitlines()[0]


def _expected(model, dataset, variant, ignore_index=255):
    metric = PerImageAnomalyMetrics(variant=variant, ignore_index=ignore_index)
    with torch.inference_mode():
        for sample in (dataset[i] for i in range(len(dataset))):
            target = sample["target"]
            out = model(sample["image"][None], output_size=tuple(target.shape))
            binary = torch.where(target == dataset.num_classes, 1, torch.where(target == 255, 255, 0))
            metric.update(compute_score("dicnet", out), binary[None])
    return metric.compute()


def test_dicnet_score_with_our_per_image_protocol(setup, tmp_path, capsys):
    root, files, models = setup
    out = tmp_path / "r.json"
    assert _run(root, files[12], out, "--score", "dicnet", "--score", "msp") == 0
    result = json.loads(out.read_text())
    assert result["protocol"] == "per_image" and result["model"] == "dicnet"
    expected = _expected(models[12], get_benchmark("streethazards").create(root), "densehybrid")
    for key in ("ap", "auroc", "fpr95"):
        assert result["anomaly"]["dicnet"][key] == pytest.approx(expected[key], abs=1e-6), key
    assert result["anomaly"]["dicnet"]["num_ignored"] > 0  # "other" is ignored in our protocol
    assert 0.0 <= result["anomaly"]["msp"]["ap"] <= 1.0  # logit scores read the teacher's logits
    assert 0.0 <= result["closed_set"]["miou"] <= 1.0
    assert "dicnet" in capsys.readouterr().out


def test_released_dicnet_variant_counts_every_pixel(setup, tmp_path, capsys):
    root, files, models = setup
    out = tmp_path / "r.json"
    extra = ["--score", "dicnet", "--option", "encoding=hendrycks", "--metric-option", "variant=dicnet"]
    assert _run(root, files[13], out, *extra) == 0
    result = json.loads(out.read_text())["anomaly"]["dicnet"]
    assert result["variant"] == "dicnet" and result["num_ignored"] == 0  # "other" and "unlabeled" are inliers
    dataset = get_benchmark("streethazards").create(root, encoding="hendrycks")
    expected = _expected(models[13], dataset, "streethazards")  # the same Hendrycks FPR95 rule
    for key in ("ap", "auroc", "fpr95"):
        assert result[key] == pytest.approx(expected[key], abs=1e-6), key
    # Without the hendrycks encoding the variant is refused with the remedy.
    assert _run(root, files[12], tmp_path / "r2.json", "--score", "dicnet", "--metric-option", "variant=dicnet") == 1
    assert "--option encoding=hendrycks" in _error(capsys)


def test_a_score_of_the_other_method_gives_one_clear_message(setup, tmp_path, capsys):
    root, files, _ = setup
    out = tmp_path / "r.json"
    assert _run(root, files["densehybrid"], out, "--score", "dicnet") == 1
    message = _error(capsys)
    assert "teacher and student features of a DiCNet model" in message and "ladder_mobilenetv3" in message
    assert _run(root, files[12], out, "--score", "densehybrid") == 1  # it needs a dataset-posterior head
    message = _error(capsys)
    assert "dataset-posterior logits of a DenseHybrid model" in message and "Scores for this model: dicnet" in message
    assert not out.exists()


def test_the_default_score_follows_the_model(setup, tmp_path, capsys):
    root, files, _ = setup
    for checkpoint, expected in ((files[12], "dicnet"), (files["densehybrid"], "densehybrid")):
        out = tmp_path / f"{expected}.json"
        assert _run(root, checkpoint, out) == 0
        assert list(json.loads(out.read_text())["anomaly"]) == [expected]
    capsys.readouterr()


def test_open_set_evaluation_with_the_dicnet_score(setup, tmp_path):
    root, files, _ = setup
    out = tmp_path / "open.json"
    args = ["evaluate-open-set", "--benchmark", "streethazards", "--root", str(root), "--checkpoint", str(files[12])]
    args += ["--score", "dicnet", "--out", str(out), "--device", "cpu", "--num-workers", "0", "--no-progress"]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["score"] == "dicnet"
    assert 0.0 <= result["open_miou"] <= 1.0


@pytest.mark.filterwarnings("ignore:SMIYC files store float16")
def test_export_smiyc_writes_the_dicnet_score(setup, tmp_path, capsys):
    from densehybrid.data.datasets.smiyc import RoadAnomaly21
    from densehybrid.smiyc_export import read_anomaly_map
    from tests.datasets.fake_trees import make_fake_smiyc_anomaly

    _, files, models = setup
    root = make_fake_smiyc_anomaly(tmp_path / "data", n_validation=1, n_test=0)
    args = ["export-smiyc", "--benchmark", "smiyc-anomaly", "--root", str(root), "--checkpoint", str(files[12])]
    args += ["--method", "DiCNet", "--score", "dicnet", "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    sample = RoadAnomaly21(root, split="all")[0]
    with torch.inference_mode():
        expected = compute_score("dicnet", models[12](sample["image"][None]))[0]
    stored = read_anomaly_map(tmp_path / "out" / "anomaly_p" / "DiCNet" / "AnomalyTrack-all" / f"{sample['name']}.hdf5")
    np.testing.assert_allclose(stored.astype(np.float32), expected.numpy(), rtol=2e-3, atol=1e-3)

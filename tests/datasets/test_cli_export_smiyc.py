"""``densehybrid export-smiyc`` end to end on fake trees with a small registered model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from densehybrid.cli import main
from densehybrid.data.datasets import RoadAnomaly21
from densehybrid.models import create_model
from densehybrid.scores import densehybrid
from densehybrid.smiyc_export import read_anomaly_map
from tests.datasets.fake_trees import make_fake_fs_laf, make_fake_road_anomaly, make_fake_smiyc_anomaly


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("ladder_resnet18", num_classes=19)
    path = tmp_path_factory.mktemp("ckpt") / "ladder.pt"
    torch.save({"model": model.state_dict()}, path)
    return path, model.eval()


def _args(benchmark, root, checkpoint, out, *extra):
    return [
        "export-smiyc",
        "--benchmark",
        benchmark,
        "--root",
        str(root),
        "--model",
        "ladder_resnet18",
        "--checkpoint",
        str(checkpoint),
        "--method",
        "DenseHybrid",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


# An untrained model's scores barely vary, so the float16 warning may fire here; it is tested in test_smiyc_export.
@pytest.mark.filterwarnings("ignore:SMIYC files store float16")
def test_exports_every_frame_of_a_submission_with_the_model_scores(tmp_path, checkpoint, capsys):
    path, model = checkpoint
    root = make_fake_smiyc_anomaly(tmp_path / "data", n_validation=1, n_test=1)
    assert main(_args("smiyc-anomaly", root, path, tmp_path / "out")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["frames"] == 2 and summary["datasets"] == {"AnomalyTrack-all": 2} and summary["squash"] is None
    assert summary["float16_problem_frames"] in (0, 1, 2)
    folder = tmp_path / "out" / "anomaly_p" / "DenseHybrid" / "AnomalyTrack-all"
    assert sorted(p.name for p in folder.iterdir()) == ["cow0000.hdf5", "validation0000.hdf5"]
    sample = RoadAnomaly21(root, split="all")[1]
    assert sample["name"] == "validation0000"
    with torch.inference_mode():
        output = model(sample["image"][None], output_size=(16, 32))
        expected = densehybrid(output.logits, output.ood_logits)[0].numpy().astype(np.float16)
    stored = read_anomaly_map(folder / "validation0000.hdf5")
    assert stored.dtype == np.float16 and stored.shape == (16, 32)
    np.testing.assert_allclose(stored.astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_fs_laf_frames_go_to_their_lostandfound_split_and_squash_is_reported(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    root = make_fake_fs_laf(tmp_path / "data", n=2)
    assert main(_args("fs-laf", root, path, tmp_path / "out", "--squash", "rank")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["datasets"] == {"LostAndFound-train": 1, "LostAndFound-test": 1}
    assert summary["squash"]["squash"] == "rank"
    method = tmp_path / "out" / "anomaly_p" / "DenseHybrid"
    assert (method / "LostAndFound-train" / "01_Hanns_Klemm_Str_45_000000_000030.hdf5").is_file()
    assert (method / "LostAndFound-test" / "04_Maurener_Weg_8_000001_000030.hdf5").is_file()


def test_errors_are_reported_before_running_the_model(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    root = make_fake_road_anomaly(tmp_path / "data", n=1)
    assert main(_args("road-anomaly", root, path, tmp_path / "out")) == 1
    assert "pass --dataset NAME" in capsys.readouterr().err
    assert main(_args("road-anomaly", root, path, tmp_path / "out", "--score", "sml")) == 1
    assert "'sml'" in capsys.readouterr().err
    assert main(_args("road-anomaly", root, path, tmp_path / "out", "--squash-scale", "2")) == 1
    assert "--squash sigmoid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""``evaluate``, ``evaluate-open-set``, ``calibrate`` and ``export-smiyc`` under ``torchrun`` with 2 gloo CPU
processes give exactly the single-process outputs: odd numbers of frames (an uneven last shard), a split with fewer
frames than processes, every map of an export written once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from densehybrid.cli import main
from densehybrid.models import create_model
from densehybrid.models.checkpoint import read_checkpoint
from densehybrid.smiyc_export import read_anomaly_map
from tests.datasets.fake_trees import make_fake_fs_laf, make_fake_smiyc_anomaly, make_fake_streethazards

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
COMMON = ["--device", "cpu", "--num-workers", "0", "--no-progress"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::UserWarning"),  # untrained models: coarse or degenerate metrics warn
    pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available"),
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _torchrun(*command: str) -> subprocess.CompletedProcess:
    done = subprocess.run([*TORCHRUN, *command], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    base = tmp_path_factory.mktemp("distributed")
    checkpoints = {}
    for k in (12, 19):
        torch.manual_seed(k)
        model = create_model("ladder_mobilenetv3", num_classes=k, decoder_channels=16).eval()
        path = base / f"k{k}.pt"
        torch.save(
            {"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path
        )
        checkpoints[k] = str(path)
    return {
        "checkpoints": checkpoints,
        "smiyc-anomaly": str(make_fake_smiyc_anomaly(base / "smiyc", n_validation=3, n_test=2)),
        "streethazards": str(make_fake_streethazards(base / "streethazards", n_per_town=3)),
        "fs-laf": str(make_fake_fs_laf(base / "fs-laf", n=3)),
    }


def _evaluate(data, benchmark, k, out, *extra):
    args = ["evaluate", "--benchmark", benchmark, "--root", data[benchmark], "--checkpoint", data["checkpoints"][k]]
    return [*args, "--out", str(out), *COMMON, *extra]


def test_evaluate_through_the_module_entry_point(data, tmp_path):
    # SMIYC protocol: the per-frame bins are gathered in frame order, components summed exactly; 3 frames on 2 ranks
    extra = ["--component-track", "obstacle"]
    assert main(_evaluate(data, "smiyc-anomaly", 19, tmp_path / "one.json", *extra)) == 0
    done = _torchrun("-m", "densehybrid", *_evaluate(data, "smiyc-anomaly", 19, tmp_path / "two.json", *extra))
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two == one
    assert one["num_images"] == 3 and one["components"]["densehybrid"]["num_gt_components"] > 0
    assert one["anomaly"]["densehybrid"]["ap"] is not None
    assert done.stdout.count("JSON:") == 1  # rank 0 alone reports


def _open_set(data, out, *extra):
    args = ["evaluate-open-set", "--benchmark", "streethazards", "--root", data["streethazards"]]
    return [*args, "--checkpoint", data["checkpoints"][12], "--out", str(out), *COMMON, *extra]


def _calibrate(data, out):
    args = ["calibrate", "--benchmark", "streethazards", "--root", data["streethazards"], "--split", "test"]
    return [*args, "--checkpoint", data["checkpoints"][12], "--out", str(out), "--limit", "5", *COMMON]


def _export(data, out):
    args = ["export-smiyc", "--benchmark", "smiyc-anomaly", "--root", data["smiyc-anomaly"]]
    args += ["--checkpoint", data["checkpoints"][19]]
    return [*args, "--method", "M", "--out", str(out), "--device", "cpu", "--squash", "rank"]


def test_every_command_in_two_processes_equals_one_process(data, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()

    def commands(folder: Path) -> list[list[str]]:
        return [
            # per-image protocol (exact float sums), closed-set confusion; 5 frames in batches of 3: [0-2] and [3-4]
            _evaluate(data, "streethazards", 12, folder / "sh.json", "--limit", "5", "--batch-size", "3"),
            _evaluate(data, "fs-laf", 19, folder / "laf.json"),  # pooled histogram, 3 frames
            _evaluate(data, "fs-laf", 19, folder / "laf1.json", "--limit", "1"),  # fewer frames than processes
            _open_set(data, folder / "open.json"),  # thresholds calibrated over both ranks, 3 frames per town
            _open_set(data, folder / "open-f1.json", "--calibration", "f1"),
            _calibrate(data, folder / "calibrated.pt"),
            _export(data, folder / "smiyc"),
        ]

    for args in commands(one):
        assert main(args) == 0
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"commands": commands(two), "out": str(two)}))
    _torchrun(str(REPO / "tests" / "cli" / "distributed_commands.py"), str(plan))

    for name in ("sh.json", "laf.json", "laf1.json", "open.json", "open-f1.json"):
        assert json.loads((two / name).read_text()) == json.loads((one / name).read_text()), name
    assert json.loads((one / "sh.json").read_text())["num_images"] == 5
    assert json.loads((one / "laf1.json").read_text())["num_images"] == 1
    assert read_checkpoint(two / "calibrated.pt").calibration == read_checkpoint(one / "calibrated.pt").calibration

    maps_one = sorted((one / "smiyc").rglob("*.hdf5"))
    maps_two = sorted((two / "smiyc").rglob("*.hdf5"))
    assert [p.relative_to(one) for p in maps_one] == [p.relative_to(two) for p in maps_two] and len(maps_one) == 5
    for a, b in zip(maps_one, maps_two):
        assert np.array_equal(read_anomaly_map(a), read_anomaly_map(b)), a.name
    # Each map was written by exactly one rank: rank 0's summary counts 5 frames over both ranks, rank 1 printed nothing.
    export = len(commands(two)) - 1
    summary = json.loads((two / f"rank0-{export}.out").read_text())
    assert summary["frames"] == 5 and summary["datasets"] == {"AnomalyTrack-all": 5}
    assert all((two / f"rank1-{i}.out").read_text() == "" for i in range(export + 1))
    assert not list((two / "smiyc" / "anomaly_p").glob(".*"))  # no staged folder left behind

"""Interrupted runs resume to the parameters of an uninterrupted run, and data-parallel training under torchrun
(2 gloo CPU processes) matches a single process with the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from densehybrid.cli import main
from tests.recipes.conftest import LIGHT_LADDER, TINY, make_folder_tree, make_image_folder, sets

REPO = Path(__file__).resolve().parents[2]
#: |loss(2 processes) - loss(1 process)| allowed per step (float32 reductions in a different order; Adam steps).
DDP_LOSS_TOLERANCE = 1e-4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO)])
    env["OMP_NUM_THREADS"] = "1"
    return env


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _losses(out: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {line["step"]: line["loss"] for line in lines if line["kind"] == "train"}


def _wait_for_checkpoint(process: subprocess.Popen, path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    return make_folder_tree(base / "mine", n_train=8, n_val=1), make_image_folder(base / "neg")


@pytest.fixture(scope="module")
def reference(trees, tmp_path_factory):
    """The uninterrupted run, shared by the SIGINT and SIGKILL tests."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torch.set_num_threads(1)
    assert main(_train_args(*trees, out)) == 0
    assert json.loads((out / "train-summary.json").read_text())["global_step"] == 8
    return out


def _train_args(root: Path, neg: Path, out: Path) -> list[str]:
    return [
        "train", "--recipe", "generic", "--data-root", str(root), "--neg-root", str(neg), "--out", str(out),
        "--device", "cpu", "--no-progress",
        *sets(*TINY, *LIGHT_LADDER, "optim.epochs=2", "negatives.resize=32", "negatives.crop=24"),
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_an_interrupted_run_resumes_to_the_parameters_of_an_uninterrupted_one(sig, trees, reference, tmp_path):
    root, neg = trees
    total = 8

    out = tmp_path / "interrupted"
    command = [sys.executable, "-m", "densehybrid", *_train_args(root, neg, out)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_checkpoint(process, out / "last.pt")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    stopped_at = torch.load(out / "last.pt", weights_only=True)["global_step"]
    assert 1 <= stopped_at < total, "the run ended before it could be interrupted"
    if sig == signal.SIGINT:
        assert process.returncode == 130, stderr.decode()[-2000:]
        summary = json.loads((out / "train-summary.json").read_text())
        assert summary["interrupted"] and not summary["finished"]
    else:
        assert process.returncode == -signal.SIGKILL
    assert not list(out.glob(".*.tmp")), "a temporary file was left behind"

    assert main(_train_args(root, neg, out)) == 0  # the same command again
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["resumed"] and summary["finished"] and summary["global_step"] == total
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # steps logged after the last checkpoint of the killed run are trained again and logged once
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, total + 1))
    expected, resumed = _state(reference / "last.pt"), _state(out / "last.pt")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_and_their_checkpoint_resumes_in_one(tmp_path, capsys):
    # LayerNorm only (no BatchNorm), no dropout, full-image crops: per-rank losses average over equal pixel counts,
    # so 2 processes x 2 images must follow 1 process x 4 images up to float rounding.
    root = make_folder_tree(tmp_path / "mine", n_train=8, n_val=2, size=(32, 32))
    items = [
        "augment.crop=32", "augment.scale=[1, 1]", "optim.batch_size=4", "optim.epochs=3", "run.num_workers=0",
        "run.checkpoint_every=1", "model.name=segmenter_vit_ti16", "model.kwargs.image_size=32",
        "model.kwargs.drop_path_rate=0.0", "model.kwargs.decoder_dropout=0.0",
    ]  # fmt: skip

    def args(out: Path) -> list[str]:
        base = ["train", "--recipe", "generic", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
        return base + ["--no-progress", *sets(*items)]

    single = tmp_path / "single"
    assert main(args(single)) == 0
    reference = _losses(single)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    reference_val = [h["val_miou"] for h in json.loads((single / "train-summary.json").read_text())["history"]]

    double = tmp_path / "double"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "densehybrid", *args(double), "--max-steps", "5"],
        env=_env(),
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    console = done.stdout.decode()  # only rank 0 tells the run
    assert console.count("densehybrid train: recipe generic") == 1 and console.count("  data ") == 1
    assert console.count("epoch 1/3 ") == console.count("epoch 2/3 ") == 1
    summary = json.loads((double / "train-summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 5
    distributed = _losses(double)
    for step in (1, 2, 3, 4, 5):
        assert abs(distributed[step] - reference[step]) <= DDP_LOSS_TOLERANCE, (step, distributed, reference)
    assert torch.load(double / "last.pt", weights_only=True)["world_size"] == 2
    # validation of epochs 1 and 2 ran on both ranks (one frame each) and was summed over them
    distributed_val = [h["val_miou"] for h in summary["history"]]
    assert len(distributed_val) == 2
    assert distributed_val == pytest.approx(reference_val[:2], abs=0.02)

    capsys.readouterr()
    assert main(args(double)) == 0  # the 2-process checkpoint resumes in 1 process
    assert "resuming from step 5 of 6 (epoch 3/3, step 1/2)" in capsys.readouterr().out
    resumed = json.loads((double / "train-summary.json").read_text())
    assert resumed["resumed"] and resumed["world_size"] == 1 and resumed["global_step"] == 6
    continued = _losses(double)
    for step in (6,):
        assert abs(continued[step] - reference[step]) <= DDP_LOSS_TOLERANCE, (step, continued, reference)
    expected, got = _state(single / "last.pt"), _state(double / "last.pt")
    # BatchNorm running statistics (the posterior head's, which closed-set training does not train) are per rank
    parameters = [k for k in expected if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(parameters) > 100
    for key in parameters:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-4, msg=key)

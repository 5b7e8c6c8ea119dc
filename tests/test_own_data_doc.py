"""docs/own-data.md runs as written: its commands, taken from the page, on a tiny generated folder tree (CPU).

Only sizes and run lengths are made small (appended options: crops of 32 px, batches of 2, one epoch); every path,
recipe and flag is the document's.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from densehybrid.cli import main
from densehybrid.predict import CALIBRATION_KEY
from tests.recipes.conftest import make_folder_tree, make_image_folder, sets
from tests.test_docs import ROOT, fenced_blocks

DOCUMENT = ROOT / "docs" / "own-data.md"
LOOP = ["--device", "cpu", "--num-workers", "0", "--no-progress"]
TINY = {
    "train": [
        "--device",
        "cpu",
        "--no-progress",
        *sets("augment.crop=32", "optim.batch_size=2", "run.num_workers=0", "optim.epochs=1"),
        *sets("negatives.resize=24", "negatives.crop=24"),
    ],
    "calibrate": LOOP,
    "evaluate": LOOP,
    "evaluate-open-set": LOOP,
    "predict": ["--device", "cpu", "--no-progress"],
}
JOURNEY = ["doctor", "train", "train", "calibrate", "evaluate", "evaluate-open-set", "predict", "export"]

pytestmark = pytest.mark.filterwarnings("ignore:The binned pooled metrics", "ignore:SMIYC files store float16")


def documented_commands() -> list[list[str]]:
    """The ``densehybrid ...`` lines of the page's bash blocks, split as a shell would (comments dropped)."""
    commands = []
    for block in fenced_blocks(DOCUMENT, "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "densehybrid":
                commands.append(words[1:])
    return commands


def test_the_page_walks_the_whole_journey():
    assert [words[0] for words in documented_commands()] == JOURNEY


def test_the_documented_commands_run_on_a_tiny_tree(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    make_folder_tree(Path("mydata"), n_train=4, n_val=2)
    make_image_folder(Path("negatives"), n=3)
    make_image_folder(Path("photos"), n=2, size=(40, 56))
    for words in documented_commands():
        status = main([*words, *TINY.get(words[0], [])])
        assert status == 0, f"`densehybrid {shlex.join(words)}` failed: {capsys.readouterr().err[-2000:]}"
    assert json.loads(Path("runs/closed/train-summary.json").read_text())["method"] == "closed-set"
    finetuned = json.loads(Path("runs/densehybrid/train-summary.json").read_text())
    assert finetuned["method"] == "densehybrid" and finetuned["best"]["metric"] == "val_ap"
    assert finetuned["epochs"] == 1 and finetuned["resolved_recipe"]["optim"]["lr"] == 1e-5
    calibration = torch.load("runs/densehybrid/best-calibrated.pt", weights_only=True)[CALIBRATION_KEY]
    assert calibration["benchmark"] == "folder" and calibration["class_names"] == ["a", "b", "c"]
    evaluation = json.loads(Path("runs/densehybrid/evaluate-val.json").read_text())
    assert evaluation["benchmark"] == "folder" and evaluation["anomaly"]["densehybrid"]["num_anomaly"] == 2 * 36
    open_set = json.loads(Path("runs/densehybrid/open-set-val.json").read_text())
    assert [fold["num_images"] for fold in open_set["folds"]] == [1, 1]
    assert len(list(Path("predictions").rglob("*.png"))) >= 2 and Path("mymodel.onnx").stat().st_size > 0

"""The run log: validation is recorded at the training step it follows, in log.jsonl and in TensorBoard."""

from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from densehybrid.cli import main
from tests.recipes.conftest import LIGHT_LADDER, TINY, make_folder_tree, sets


def test_validation_is_plotted_on_the_steps_of_training(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "data", n_train=4, n_val=1)
    out = tmp_path / "run"
    args = ["train", "--recipe", "generic", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    args += ["--no-progress", *sets(*TINY, *LIGHT_LADDER, "optim.epochs=2")]
    assert main(args) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # 4 images, batch 2, 2 epochs
    assert [(r["step"], r["epoch"]) for r in records if r["kind"] == "val"] == [(2, 1), (4, 2)]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val/val_miou")] == [2, 4]

"""`densehybrid train`: every recipe runs 2 steps on a fake tree of its dataset and `densehybrid evaluate` loads the
checkpoint; bad inputs fail with one message before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densehybrid.cli import main
from densehybrid.cli._common import load_model
from tests.datasets.fake_trees import make_fake_ade20k, make_fake_cityscapes, make_fake_coco, make_fake_streethazards
from tests.recipes.conftest import LIGHT_LADDER, TINY, TINY_NEGATIVES, make_folder_tree, make_image_folder, sets

SEGMENTER_TINY = ["model.name=segmenter_vit_ti16", "model.kwargs.image_size=32", "model.kwargs.drop_path_rate=0.0"]


def _streethazards(tmp_path):
    return make_fake_streethazards(tmp_path / "sh", splits=("train", "validation", "test"))


def _cityscapes(tmp_path):
    return make_fake_cityscapes(tmp_path / "cs", splits=("train", "val"))


def _coco(tmp_path):
    root = make_fake_coco(tmp_path / "coco", n=2, split="train2017", size=(24, 40))
    return make_fake_coco(root, n=2, split="val2017", size=(24, 40))


# recipe -> (tree builder, extra --set items, evaluate benchmark and split or None)
CASES = {
    "ldn121-streethazards": (_streethazards, ["model.kwargs.checkpointing=false"], ("streethazards", "test")),
    "ldn121-streethazards-finetune": (
        _streethazards,
        ["model.kwargs.checkpointing=false", *TINY_NEGATIVES],
        ("streethazards", "test"),
    ),
    "dlv3p-cityscapes-finetune": (_cityscapes, [*LIGHT_LADDER, *TINY_NEGATIVES], ("cityscapes", "val")),
    "segmenter-coco20": (_coco, SEGMENTER_TINY, ("coco20", "val2017")),
    "segmenter-coco20-finetune": (_coco, [*SEGMENTER_TINY, *TINY_NEGATIVES], ("coco20", "val2017")),
    "generic": (lambda tmp: make_folder_tree(tmp / "mine"), [*LIGHT_LADDER, *TINY_NEGATIVES], None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_recipe_trains_two_steps_and_evaluate_loads_the_checkpoint(name, tmp_path, capsys):
    build, extra, evaluation = CASES[name]
    root = build(tmp_path)
    neg_root = make_fake_ade20k(tmp_path / "ade") if name != "generic" else make_image_folder(tmp_path / "neg")
    out = tmp_path / "run"
    args = ["train", "--recipe", name, "--data-root", str(root), "--out", str(out), "--max-steps", "2"]
    args += ["--neg-root", str(neg_root), "--device", "cpu", "--no-progress", *sets(*TINY, *extra)]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["global_step"] == 2 and summary["recipe"] == name
    expected_method = "closed-set" if name in ("ldn121-streethazards", "segmenter-coco20") else "densehybrid"
    assert summary["method"] == expected_method
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["kind"] == "train"] == [1, 2]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines if line["kind"] == "train")
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
    if expected_method == "densehybrid":
        assert {"seg", "likelihood", "posterior"} <= set(lines[0])
    if evaluation is None:
        model, info = load_model(out / "last.pt")
        assert info["model"] == "ladder_mobilenetv3" and info["num_classes"] == 3
        return
    benchmark, split = evaluation
    report = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--benchmark",
            benchmark,
            "--root",
            str(root),
            "--split",
            split,
            "--checkpoint",
            str(out / "last.pt"),
        ]
        + ["--device", "cpu", "--num-workers", "0", "--no-progress", "--out", str(report)]
    )
    assert code == 0, capsys.readouterr().err
    result = json.loads(report.read_text())
    assert result["num_images"] > 0 and result["closed_set"] is not None


def test_generic_without_negatives_trains_closed_set_and_validates_each_epoch(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=4)
    out = tmp_path / "run"
    args = ["train", "--recipe", "generic", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    args += ["--no-progress", *sets(*TINY, *LIGHT_LADDER, "optim.epochs=2")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "no --neg-root: closed-set training" in printed
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["finished"] and summary["method"] == "closed-set" and summary["global_step"] == 4
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert all(
        0 <= h["val_miou"] <= 1 and 0 <= h["val_ap"] <= 1 and 0 <= h["val_fpr95"] <= 1 for h in summary["history"]
    )
    best = summary["best"]
    assert best["value"] == max(h["val_miou"] for h in summary["history"])
    best_state = torch.load(out / "best.pt", weights_only=True)
    assert best_state["epoch"] == best["epoch"]
    # rerunning a finished run does no more steps
    assert main(args) == 0
    again = json.loads((out / "train-summary.json").read_text())
    assert again["resumed"] and again["global_step"] == 4 and again["finished"]


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_bad_inputs_fail_with_one_message_and_write_nothing(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    out = tmp_path / "run"
    base = ["train", "--recipe", "generic", "--out", str(out), "--device", "cpu", "--no-progress"]
    base += sets(*TINY, *LIGHT_LADDER)

    def error(args) -> str:
        assert main(args) == 1
        message = capsys.readouterr().err
        assert message.startswith("Error: ") and _files(out) == []
        return message

    assert "Unknown recipe key 'optim.lrr'" in error(base + ["--data-root", str(root), "--set", "optim.lrr=1"])
    # a tree that does not match the recipe: the missing folder is named
    message = error(["train", "--recipe", "ldn121-streethazards", "--data-root", str(root), "--out", str(out)])
    assert str(root / "train" / "images" / "training") in message
    # labels outside [0, K) other than 255: the file and the value are named
    bad = make_folder_tree(tmp_path / "bad", n_train=2, n_val=0)
    from PIL import Image

    label = bad / "labels" / "f0.png"
    pixels = torch.zeros(40, 56, dtype=torch.uint8).numpy()
    pixels[3, 3] = 7
    Image.fromarray(pixels).save(label)
    message = error(base + ["--data-root", str(bad)])
    assert str(label) in message and "holds 7" in message and "0..2, 255" in message
    # an --init checkpoint of another architecture
    other = tmp_path / "other.pt"
    from densehybrid.models import create_model

    torch.save(create_model("ladder_resnet18", num_classes=3, decoder_channels=16).state_dict(), other)
    message = error(base + ["--data-root", str(root), "--init", str(other)])
    assert "--init" in message and "ladder_mobilenetv3" in message
    # an --out that is not writable (a file in the way)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--recipe", "generic", "--data-root", str(root), "--out", str(blocker)]) == 1
    assert "Expected `--out`" in capsys.readouterr().err and blocker.read_text() == "x"
    # a closed-set checkpoint (no posterior head) initialises a fine-tuning run
    closed = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16).state_dict()
    torch.save({k: v for k, v in closed.items() if not k.startswith("logits_ood.")}, tmp_path / "closed.pt")
    ok = base + ["--data-root", str(root), "--init", str(tmp_path / "closed.pt"), "--max-steps", "1"]
    assert main(ok) == 0


def test_an_out_folder_of_another_configuration_is_refused_unless_no_resume(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    out = tmp_path / "run"
    base = ["train", "--recipe", "generic", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    base += ["--no-progress", "--max-steps", "1", *sets(*TINY, *LIGHT_LADDER)]
    assert main(base) == 0
    before = (out / "last.pt").read_bytes()
    assert main([*base, "--set", "optim.lr=1e-3"]) == 1
    err = capsys.readouterr().err
    assert "differs in 1 key(s): optim.lr:" in err and "-> 0.001" in err
    assert (out / "last.pt").read_bytes() == before
    assert main([*base, "--set", "optim.lr=1e-3", "--no-resume"]) == 0
    assert not json.loads((out / "train-summary.json").read_text())["resumed"]

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


# -- every file a run reads is an input --out may not hold; --no-resume deletes nothing; one run per --out ----------
def _base(root, out):
    args = ["train", "--recipe", "generic", "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    return args + ["--no-progress", "--max-steps", "1", *sets(*TINY, *LIGHT_LADDER)]


def _ladder_checkpoint(path: Path) -> Path:
    from densehybrid.models import create_model

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16).state_dict(), path)
    return path


@pytest.mark.parametrize("no_resume", [False, True])
def test_init_inside_out_is_refused_and_its_best_pt_survives(no_resume, tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    own = tmp_path / "own"
    best = _ladder_checkpoint(own / "best.pt")
    before = best.read_bytes()
    extra = ["--no-resume"] if no_resume else []
    assert main([*_base(root, own), "--init", str(best), *extra]) == 1
    assert "not to hold the input" in capsys.readouterr().err
    # the recipe's model.init and the model's pretrained_backbone are inputs too
    assert main([*_base(root, own), "--set", f"model.init={best}", *extra]) == 1
    assert "not to hold the input" in capsys.readouterr().err
    assert main([*_base(root, own), "--set", f"model.kwargs.pretrained_backbone={best}", *extra]) == 1
    assert "not to hold the input" in capsys.readouterr().err
    assert best.read_bytes() == before and sorted(p.name for p in own.iterdir()) == ["best.pt"]


def test_flow_init_inside_out_is_refused_with_no_resume(tmp_path, capsys):
    flow_out = tmp_path / "runs" / "flow"
    flow_out.mkdir(parents=True)
    last = flow_out / "last.pt"
    last.write_bytes(b"the flow run's checkpoint")
    args = ["train", "--recipe", "ldn121-streethazards-finetune-flow", "--data-root", str(tmp_path / "sh")]
    args += ["--flow-init", str(last), "--out", str(flow_out), "--no-resume"]
    assert main(args) == 1
    assert "not to hold the input" in capsys.readouterr().err
    assert last.read_bytes() == b"the flow run's checkpoint"


def test_no_resume_moves_the_earlier_run_aside_and_keeps_other_files(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    out = tmp_path / "run"
    assert main(_base(root, out)) == 0
    before = (out / "last.pt").read_bytes()
    (out / "notes.txt").write_text("mine")
    assert main([*_base(root, out), "--set", "optim.lr=1e-3", "--no-resume"]) == 0
    assert "moved to" in capsys.readouterr().out
    earlier = [p for p in out.iterdir() if p.name.startswith("earlier-run-")]
    assert len(earlier) == 1 and (earlier[0] / "last.pt").read_bytes() == before
    assert {"log.jsonl", "train-summary.json"} <= {p.name for p in earlier[0].iterdir()}
    assert (out / "notes.txt").read_text() == "mine" and (out / "last.pt").is_file()


def test_two_runs_into_one_out_collide_no_more(tmp_path, capsys):
    import os
    import socket

    from densehybrid.engine.outputs import LOCK_NAME

    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{os.getppid()} {socket.gethostname()}\n")  # a live process holds it
    assert main(_base(root, out)) == 1
    assert f"process {os.getppid()}" in capsys.readouterr().err and not (out / "last.pt").exists()
    (out / LOCK_NAME).write_text(f"{2**22 + 12345} {socket.gethostname()}\n")  # a killed run's stale lock
    assert main(_base(root, out)) == 0
    assert (out / "last.pt").is_file() and not (out / LOCK_NAME).exists()


# -- the whole dataset is checked before the first step, with the file named ----------------------------------------
def test_a_bad_validation_label_fails_before_the_first_step_not_after_an_epoch(tmp_path, capsys):
    from PIL import Image

    root = make_folder_tree(tmp_path / "mine", n_train=4, n_val=2)
    label = root / "val" / "labels" / "f1.png"
    pixels = torch.zeros(40, 56, dtype=torch.uint8).numpy()
    pixels[5, 5] = 9
    Image.fromarray(pixels).save(label)
    out = tmp_path / "run"
    assert main(_base(root, out)) == 1
    err = capsys.readouterr().err
    assert str(label) in err and "holds 9" in err
    assert not (out / "last.pt").exists() and not (out / "log.jsonl").exists()


def test_a_corrupt_negative_fails_before_the_first_step_with_its_name(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    negatives = make_image_folder(tmp_path / "neg", n=3)
    broken = negatives / "n1.jpg"
    broken.write_bytes(broken.read_bytes()[:40])
    out = tmp_path / "run"
    assert main([*_base(root, out), "--neg-root", str(negatives), *sets(*TINY_NEGATIVES)]) == 1
    err = capsys.readouterr().err
    assert str(broken) in err and not (out / "last.pt").exists()


def test_train_has_the_void_unknown_ids_switch_its_message_advises(tmp_path, capsys):
    from PIL import Image

    root = _streethazards(tmp_path)
    label = next((root / "train" / "annotations" / "validation").rglob("*.png"))
    pixels = Image.open(label).copy()
    pixels.putpixel((0, 0), 99)
    pixels.save(label)
    args = ["train", "--recipe", "ldn121-streethazards", "--data-root", str(root), "--out", str(tmp_path / "run")]
    args += ["--device", "cpu", "--no-progress", "--max-steps", "1", *sets(*TINY, *LIGHT_LADDER)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert str(label) in err and "--void-unknown-ids" in err
    assert main([*args, "--void-unknown-ids"]) == 0, capsys.readouterr().err
    folder = ["train", "--recipe", "generic", "--void-unknown-ids", "--print-config"]
    assert main(folder) == 1 and "classes.txt" in capsys.readouterr().err


# -- values that used to end in an internal error, refused before the run with one message --------------------------
@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["optim.batch_size=1"], "at least 2 images per process"),
        (["model.kwargs.decoder_channels=-1"], "Cannot build model 'ladder_mobilenetv3' with the arguments"),
    ],
)
def test_values_torch_would_refuse_mid_run_are_one_message(items, expected, tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    out = tmp_path / "run"
    assert main([*_base(root, out), *sets(*items)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and expected in err and not (out / "last.pt").exists()


def test_a_text_file_as_pretrained_backbone_is_a_checkpoint_error(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    assert main([*_base(root, tmp_path / "run"), *sets(f"model.kwargs.pretrained_backbone={text}")]) == 1
    err = capsys.readouterr().err
    assert "Cannot read checkpoint" in err and "weights_only" not in err and len(err.strip().splitlines()) == 1


def test_train_device_typo_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--recipe", "generic", "--device", "gpu"])
    assert info.value.code == 2 and "--device" in capsys.readouterr().err


# -- messages that pointed at the wrong cause ------------------------------------------------------------------------
def test_a_nan_init_is_named_a_damaged_checkpoint_not_a_learning_rate(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    init = _ladder_checkpoint(tmp_path / "nan.pt")
    state = torch.load(init, weights_only=True)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, init)
    assert main([*_base(root, tmp_path / "run"), "--init", str(init)]) == 1
    err = capsys.readouterr().err
    assert "finite weights in `--init`" in err and "learning rate" not in err


# -- every recipe option is bounded by the machine or the data before the work ---------------------------------------
@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["run.num_workers=999"], "`run.num_workers` at most"),
        (["augment.crop=60000"], "crops of 60000x60000 px to fit in memory"),
        (["negatives.crop=100000"], "negative(s) of up to 100000 px per image to fit in memory"),
        (["negatives.pastes=100000"], "`negatives.pastes` at most 16"),
    ],
)
def test_absurd_sizes_and_counts_are_refused_before_the_work(items, expected, tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    negatives = make_image_folder(tmp_path / "neg")
    out = tmp_path / "run"
    args = [*_base(root, out), "--neg-root", str(negatives), *sets(*TINY_NEGATIVES, "negatives.min_side=8", *items)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and expected in err and not (out / "last.pt").exists()


def test_the_default_worker_count_is_lowered_to_the_cores_with_a_note(tmp_path, capsys, monkeypatch):
    import densehybrid.engine.resources as resources

    monkeypatch.setattr(resources, "usable_cpu_count", lambda: 1)
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    recipe = tmp_path / "mine.toml"  # the schema's default of 4 workers (generic derives its own: "auto")
    recipe.write_text('base = "generic"\n[run]\nnum_workers = 4\n', encoding="utf-8")
    args = ["train", "--recipe", str(recipe), "--data-root", str(root), "--out", str(tmp_path / "run"), "--device"]
    args += ["cpu", "--no-progress", "--max-steps", "1", *sets("augment.crop=32", "optim.batch_size=2", *LIGHT_LADDER)]
    assert main(args) == 0, capsys.readouterr().err
    assert "run.num_workers lowered from 4 to 1" in capsys.readouterr().out

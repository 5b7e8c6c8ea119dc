"""`densehybrid train` with a flow: the flow recipes against the released values, 2-step runs on fake trees that
`densehybrid evaluate` loads, flow pre-training with its sample grids, resume restoring the flow, real/synthetic
mixtures in every fine-tuning recipe, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densehybrid.cli import main
from densehybrid.flows import DenseFlow, load_flow_state
from densehybrid.recipes import load_recipe
from tests.datasets.fake_trees import make_fake_ade20k, make_fake_cityscapes, make_fake_coco, make_fake_streethazards
from tests.recipes.conftest import LIGHT_LADDER, TINY, TINY_NEGATIVES, make_folder_tree, make_image_folder, sets

#: The small flow, its patches fitting the 32 px test crops.
TINY_FLOW = ["flow.config=small", "flow.checkpointing=false", "flow.max_side=24"]
SEGMENTER_TINY = ["model.name=segmenter_vit_ti16", "model.kwargs.image_size=32", "model.kwargs.drop_path_rate=0.0"]

# tpami-and-dicnet-code.md section 1, key by key; the StreetHazards recipe is ours (the released real-negative
# StreetHazards fine-tuning with the released traffic-scene flow settings).
RELEASED_FLOW = {
    "dlv3p-cityscapes-finetune-flow": {
        "method": "densehybrid",
        "model": {"name": "deeplabv3plus_wrn38", "num_classes": 19, "init_as": "pretrained"},
        "data": {"dataset": "cityscapes"},
        "optim": {
            "optimizer": "adam",
            "lr": 1e-6,
            "lr_min": 1e-6,
            "schedule": "constant",
            "betas": [0.9, 0.999],
            "eps": 1e-7,
            "epochs": 10,
            "batch_size": 16,
        },
        "loss": {"beta": 0.01, "lambda": 0.1, "posterior_ignore_void": False},
        "augment": {"crop": 512, "scale": [0.5, 2.0], "fill": [73.0, 83.0, 72.0], "flip": True},
        "negatives": {"source": "synthetic", "pastes": 1},
        "flow": {
            "config": "released",
            "lr": 1e-5,
            "lr_random_init": 1e-3,
            "lr_decay": 0.99,
            "betas": [0.9, 0.999],
            "eps": 1e-7,
            "min_side": 16,
            "max_side": 216,
            "side_step": 8,
            "jsd_weight": 0.03,
            "mle_weight": 1.0,
        },
    },
    "segmenter-coco20-finetune-flow": {
        "method": "densehybrid",
        "model": {"name": "segmenter_vit_b16", "num_classes": 20, "init_as": "checkpoint"},
        "data": {"dataset": "coco20", "train_split": "train2017"},
        "optim": {"optimizer": "adam", "lr": 1e-6, "schedule": "constant", "eps": 1e-8, "epochs": 10, "batch_size": 16},
        "loss": {"beta": 0.15, "lambda": 1.5, "posterior_ignore_void": True},
        "augment": {"crop": 512, "scale": [0.75, 2.0], "fill": [123.0, 116.0, 103.0], "flip": True},
        "negatives": {"source": "synthetic", "pastes": 3},
        "flow": {
            "config": "released",
            "lr": 1e-5,
            "lr_random_init": 1e-3,
            "lr_decay": 0.975,
            "eps": 1e-7,
            "min_side": 16,
            "max_side": 104,
            "side_step": 8,
            "jsd_weight": 0.03,
            "mle_weight": 1.0,
        },
    },
    "ldn121-streethazards-finetune-flow": {
        "method": "densehybrid",
        "model": {"name": "ldn121", "num_classes": 12, "init_as": "checkpoint"},
        "optim": {"lr": 1e-5, "backbone_lr_ratio": 0.25, "schedule": "cosine", "epochs": 40, "batch_size": 12},
        "loss": {"beta": 0.03, "lambda": 0.3},
        "augment": {"crop": 768, "scale": [0.5, 2.0], "fill": [84.0, 88.0, 95.0]},
        "negatives": {"source": "synthetic", "pastes": 1},
        "flow": {"lr": 1e-5, "lr_random_init": 1e-3, "lr_decay": 0.99, "min_side": 16, "max_side": 216},
    },
    "denseflow-pretrain": {
        "method": "denseflow-pretrain",
        "optim": {"optimizer": "adamax", "lr": 1e-3, "schedule": "constant", "betas": [0.9, 0.999], "eps": 1e-7},
        "flow": {"config": "released", "init": ""},
    },
}
FINE_TUNING = [
    "dlv3p-cityscapes-finetune",
    "dlv3p-cityscapes-finetune-flow",
    "generic",
    "ldn121-streethazards-finetune",
    "ldn121-streethazards-finetune-flow",
    "segmenter-coco20-finetune",
    "segmenter-coco20-finetune-flow",
]


def _json(capsys, *args) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_flow_recipes_match_the_released_code(capsys):
    resolved = _json(capsys, "recipes", "--json", *RELEASED_FLOW)
    for name, expected in RELEASED_FLOW.items():
        for section, values in expected.items():
            if isinstance(values, dict):
                for key, value in values.items():
                    assert resolved[name][section][key] == pytest.approx(value), f"{name} {section}.{key}"
            else:
                assert resolved[name][section] == values
    assert resolved["dlv3p-cityscapes-finetune-flow"]["seed_command"].startswith("python dlv3_cityscapes_finetune_flow")
    assert resolved["segmenter-coco20-finetune-flow"]["seed_command"].startswith(
        "python segmenter_coco20_finetune_flow"
    )
    ours = resolved["ldn121-streethazards-finetune-flow"]
    assert ours["seed_command"] == "" and "our addition" in ours["description"]
    # the real-negative COCO20 recipe switches to synthetic negatives with the COCO20 flow rules
    coco = resolved_real = load_recipe("segmenter-coco20-finetune")
    assert coco["flow"]["max_side"] == 104 and resolved_real["flow"]["lr_decay"] == 0.975
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in RELEASED_FLOW)
    assert main(["recipes", "--methods"]) == 0
    assert "denseflow-pretrain" in capsys.readouterr().out


@pytest.mark.parametrize("name", FINE_TUNING)
def test_every_fine_tuning_recipe_takes_real_synthetic_or_mixed_negatives(name):
    recipe = load_recipe(name, ["negatives.source=mixed", "negatives.synthetic_fraction=0.25"])
    assert recipe["negatives"]["source"] == "mixed" and recipe["negatives"]["synthetic_fraction"] == 0.25
    assert recipe["flow"]["jsd_weight"] == 0.03
    with pytest.raises(ValueError, match="`negatives.source` to be one of 'real', 'synthetic', 'mixed'"):
        load_recipe(name, ["negatives.source=adversarial"])


def test_print_config_shows_the_flow_init_and_flowless_recipes_refuse_it(capsys, tmp_path):
    flow_file = tmp_path / "flow.pt"
    printed = _json(
        capsys, "train", "--recipe", "segmenter-coco20-finetune-flow", "--flow-init", str(flow_file), "--print-config"
    )
    assert printed["flow"]["init"] == str(flow_file) and printed["negatives"]["pastes"] == 3
    assert main(["train", "--recipe", "ldn121-streethazards", "--flow-init", str(flow_file), "--print-config"]) == 1
    assert "trains no flow" in capsys.readouterr().err


def _streethazards(tmp_path):
    return make_fake_streethazards(tmp_path / "sh", splits=("train", "validation", "test"))


def _cityscapes(tmp_path):
    return make_fake_cityscapes(tmp_path / "cs", splits=("train", "val"))


def _coco(tmp_path):
    root = make_fake_coco(tmp_path / "coco", n=2, split="train2017", size=(24, 40))
    return make_fake_coco(root, n=2, split="val2017", size=(24, 40))


# name -> (tree builder, extra --set items, evaluate benchmark and split)
RUNS = {
    "dlv3p-cityscapes-finetune-flow": (_cityscapes, LIGHT_LADDER, ("cityscapes", "val")),
    "segmenter-coco20-finetune-flow": (_coco, SEGMENTER_TINY, ("coco20", "val2017")),
    "ldn121-streethazards-finetune-flow": (
        _streethazards,
        ["model.kwargs.checkpointing=false"],
        ("streethazards", "test"),
    ),
}


def _train(name: str, root: Path, out: Path, *extra: str, steps: int | None = 2, args: tuple = ()) -> list[str]:
    command = ["train", "--recipe", name, "--data-root", str(root), "--out", str(out), "--device", "cpu"]
    flow = TINY_FLOW if name != "denseflow-pretrain" else TINY_FLOW[:2]  # pre-training pastes no patches
    command += ["--no-progress", *args, *sets(*TINY, *flow, *extra)]
    return command + (["--max-steps", str(steps)] if steps else [])


@pytest.mark.parametrize("name", sorted(RUNS))
def test_flow_recipes_train_two_steps_and_evaluate_loads_the_checkpoint(name, tmp_path, capsys):
    build, extra, (benchmark, split) = RUNS[name]
    root = build(tmp_path)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="random initialisation and trains at lr 0.001"):
        assert main(_train(name, root, out, *extra)) == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["global_step"] == 2 and summary["method"] == "densehybrid"
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [line for line in lines if line["kind"] == "train"]
    assert [line["step"] for line in train] == [1, 2]
    for line in train:  # both halves of the joint iteration ran: segmenter losses and the flow step's terms
        assert {"seg", "likelihood", "posterior", "flow_jsd", "flow_bpd"} <= set(line)
        assert 0 < line["flow_jsd"] <= 1 and 0 < line["flow_bpd"] < 20 and line["likelihood"] != 0
    state = torch.load(out / "last.pt", weights_only=True)
    flow_state = state["objective_state"]["flow"]
    load_flow_state(DenseFlow.small(), flow_state)
    # the random-init rate, decayed once per finished epoch (the fake COCO20 tree has one step per epoch)
    decay = RELEASED_FLOW[name]["flow"]["lr_decay"]
    lr = state["objective_state"]["flow_optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-3 * decay ** summary["epoch"])
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


def test_pretraining_writes_a_grid_each_epoch_and_its_flow_starts_fine_tuning(tmp_path, capsys):
    root = _cityscapes(tmp_path)  # 4 training frames: 2 steps of 2 per epoch
    out = tmp_path / "flow"
    items = ["augment.crop=16", "flow.grid_samples=4", "flow.grid_size=16", "optim.epochs=2"]
    assert main(_train("denseflow-pretrain", root, out, *items, steps=None)) == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["finished"] and summary["global_step"] == 4 and summary["method"] == "denseflow-pretrain"
    assert sorted(p.name for p in out.glob("samples_epoch*.png")) == ["samples_epoch001.png", "samples_epoch002.png"]
    from PIL import Image

    assert Image.open(out / "samples_epoch002.png").size == (2 + 2 * 18, 2 + 2 * 18)  # 2x2 grid of 16 px, padding 2
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    bpd = [line["bpd"] for line in lines if line["kind"] == "train"]
    assert len(bpd) == 4 and all(0 < b < 20 for b in bpd)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["optimizer"] == "adamax" and "exp_avg" in str(state["optimizer"]["state"][0].keys())
    flow = DenseFlow.small()
    load_flow_state(flow, out / "last.pt")  # the run's checkpoint is a flow checkpoint
    assert torch.equal(flow.base_dist.loc, state["model"]["base_dist.loc"])

    # the pre-trained flow starts joint fine-tuning, at the pre-trained flow's rate and without a warning
    tune = tmp_path / "tune"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        code = main(
            _train(
                "dlv3p-cityscapes-finetune-flow",
                root,
                tune,
                *LIGHT_LADDER,
                steps=1,
                args=("--flow-init", str(out / "last.pt")),
            )
        )
    assert code == 0, capsys.readouterr().err
    tuned = torch.load(tune / "last.pt", weights_only=True)["objective_state"]
    assert tuned["flow_optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    # a fine-tuning run's checkpoint is a flow checkpoint too
    again = DenseFlow.small()
    from densehybrid.recipes.flow_methods import load_flow_init

    load_flow_init(again, str(tune / "last.pt"))
    assert torch.equal(again.base_dist.loc, tuned["flow"]["base_dist.loc"])


def test_a_resumed_flow_run_restores_the_flow_its_optimiser_and_schedule(tmp_path, capsys):
    root = _cityscapes(tmp_path)  # 2 steps per epoch: the flow's rate decays once between the epochs
    extra = [*LIGHT_LADDER, "optim.epochs=2", "flow.lr_decay=0.5"]
    reference = tmp_path / "reference"
    with pytest.warns(UserWarning):
        assert main(_train("dlv3p-cityscapes-finetune-flow", root, reference, *extra, steps=None)) == 0
    interrupted = tmp_path / "interrupted"
    with pytest.warns(UserWarning):
        assert main(_train("dlv3p-cityscapes-finetune-flow", root, interrupted, *extra, steps=3)) == 0
    with pytest.warns(UserWarning):
        assert main(_train("dlv3p-cityscapes-finetune-flow", root, interrupted, *extra, steps=None)) == 0
    capsys.readouterr()
    summary = json.loads((interrupted / "train-summary.json").read_text())
    assert summary["resumed"] and summary["finished"] and summary["global_step"] == 4
    assert [h["flow_lr"] for h in summary["history"]] == pytest.approx([5e-4, 2.5e-4])
    expected = torch.load(reference / "last.pt", weights_only=True)
    resumed = torch.load(interrupted / "last.pt", weights_only=True)
    for part in ("flow",):
        for key, value in expected["objective_state"][part].items():
            assert torch.equal(value, resumed["objective_state"][part][key]), key
    for key, value in expected["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert resumed["objective_state"]["flow_scheduler"]["last_epoch"] == 2
    exp_avg = expected["objective_state"]["flow_optimizer"]["state"]
    assert all(
        torch.equal(exp_avg[k]["exp_avg"], v["exp_avg"])
        for k, v in resumed["objective_state"]["flow_optimizer"]["state"].items()
    )


def test_mixed_negatives_train_with_real_and_flow_pastes(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=4, n_val=0)
    neg = make_image_folder(tmp_path / "neg")
    out = tmp_path / "run"
    items = [
        *LIGHT_LADDER,
        *TINY_NEGATIVES,
        "negatives.source=mixed",
        "negatives.synthetic_fraction=0.5",
        "negatives.pastes=2",
    ]
    with pytest.warns(UserWarning):
        assert main(_train("generic", root, out, *items, args=("--neg-root", str(neg)))) == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["method"] == "densehybrid" and summary["notes"] == []

    # the objective a mixed recipe builds pastes synthetic negatives with probability b
    from densehybrid.flows import MixedNegatives
    from densehybrid.recipes.methods import MethodContext, get_method

    recipe = load_recipe(
        "generic", [*TINY, *TINY_FLOW, *TINY_NEGATIVES, "negatives.source=mixed", "negatives.synthetic_fraction=0.25"]
    )
    context = MethodContext(recipe, None, 3, torch.device("cpu"), neg_root=neg, data_root=root)
    with pytest.warns(UserWarning):
        objective = get_method("densehybrid").build(context)
    assert isinstance(objective.negatives, MixedNegatives) and objective.negatives.synthetic_fraction == 0.25
    kinds = objective.negatives.draw_kinds(4000, torch.Generator().manual_seed(0))
    assert abs(float(kinds.float().mean()) - 0.25) < 0.03  # 4 standard deviations of the mean of 4000 Bernoulli(0.25)


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_bad_flow_inputs_fail_with_one_message_and_write_nothing(tmp_path, capsys):
    root = _cityscapes(tmp_path)
    out = tmp_path / "run"

    def error(*extra: str, args: tuple = ()) -> str:
        assert main(_train("dlv3p-cityscapes-finetune-flow", root, out, *LIGHT_LADDER, *extra, args=args)) == 1
        message = capsys.readouterr().err
        assert message.startswith("Error: ") and _files(out) == []
        return message

    # a flow checkpoint of another configuration: every mismatched key is listed
    other = tmp_path / "other-flow.pt"
    torch.save({"flow": DenseFlow.small(layer_mid_chnls=[8, 8, 8]).state_dict()}, other)
    message = error(args=("--flow-init", str(other)))
    assert str(other) in message and "shape-mismatched" in message and "shape mismatches" in message
    assert ": checkpoint (8, " in message and "vs flow (16, " in message
    # a missing flow checkpoint
    assert "missing" in error(args=("--flow-init", str(tmp_path / "nowhere.pt")))
    # patches larger than the crop
    message = error("flow.max_side=48")
    assert "flow.max_side = 48" in message and "32x32" in message and "augment.crop" in message
    # patch sides that are not multiples of the flow's stride
    assert "multiple of 8" in error("flow.max_side=20")
    # mixtures need real negatives and b in [0, 1]
    assert "--neg-root" in error("negatives.source=mixed")
    neg = make_fake_ade20k(tmp_path / "ade")
    message = error("negatives.source=mixed", "negatives.synthetic_fraction=1.5", args=("--neg-root", str(neg)))
    assert "`negatives.synthetic_fraction` in [0, 1]" in message
    # pre-training crops must be multiples of the flow's stride
    assert main(_train("denseflow-pretrain", root, out, "augment.crop=20")) == 1
    assert "`augment.crop` to be a multiple of 8" in capsys.readouterr().err and _files(out) == []

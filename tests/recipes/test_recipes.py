"""The released recipes, checked against the values of the released training scripts, and recipe resolution."""

from __future__ import annotations

import json

import pytest

from densehybrid.cli import main
from densehybrid.errors import OutputError
from densehybrid.recipes import list_recipes, load_recipe, parse_override, register_method
from densehybrid.recipes.methods import METHODS
from densehybrid.recipes.schema import Key

# The released values (papers.md section 7 and tpami-and-dicnet-code.md sections 2 and 4), key by key.
RELEASED = {
    "ldn121-streethazards": {
        "method": "closed-set",
        "model": {"name": "ldn121", "num_classes": 12, "init_as": "pretrained_backbone"},
        "data": {"dataset": "streethazards", "train_split": "train"},
        "augment": {"crop": 768, "scale": [0.5, 2.0], "fill": [84.0, 88.0, 95.0], "flip": True},
        "optim": {
            "optimizer": "adam",
            "lr": 4e-4,
            "backbone_lr_ratio": 0.25,
            "schedule": "cosine",
            "lr_min": 1e-7,
            "betas": [0.9, 0.999],
            "eps": 1e-7,
            "epochs": 120,
            "batch_size": 16,
        },
        "run": {"amp": False},
    },
    "ldn121-streethazards-finetune": {
        "method": "densehybrid",
        "model": {"name": "ldn121", "num_classes": 12, "init_as": "checkpoint"},
        "augment": {"crop": 768, "scale": [0.5, 2.0], "fill": [84.0, 88.0, 95.0], "flip": True},
        "optim": {"lr": 1e-5, "backbone_lr_ratio": 0.25, "schedule": "cosine", "lr_min": 1e-7, "epochs": 40},
        "loss": {"beta": 0.03, "lambda": 0.3, "posterior_ignore_void": False},
        "negatives": {"dataset": "ade20k", "resize": 384, "crop": 384, "scale": [1.0, 1.0], "pastes": 1},
        "run": {"amp": False},
    },
    "dlv3p-cityscapes-finetune": {
        "method": "densehybrid",
        "model": {"name": "deeplabv3plus_wrn38", "num_classes": 19, "init_as": "pretrained"},
        "data": {"dataset": "cityscapes", "train_split": "train"},
        "augment": {"crop": 512, "scale": [0.5, 2.0], "fill": [73.0, 83.0, 72.0], "flip": True},
        "optim": {"lr": 1e-6, "lr_min": 1e-6, "schedule": "constant", "eps": 1e-7, "epochs": 10, "batch_size": 12},
        "loss": {"beta": 0.03, "lambda": 0.3, "posterior_ignore_void": False},
        "negatives": {
            "resize": 384,
            "crop": 192,
            "scale": [0.5, 2.0],
            "pastes": 1,
            "rect_prob": 0.5,
            "min_side": 16,
            "side_step": 8,
            "classes_in_mask": 2,
        },
    },
    "segmenter-coco20": {
        "method": "closed-set",
        "model": {"name": "segmenter_vit_b16", "num_classes": 20, "init_as": "pretrained_backbone"},
        "data": {"dataset": "coco20", "train_split": "train2017"},
        "augment": {"crop": 512, "scale": [0.5, 2.0], "flip": True},
        "optim": {
            "optimizer": "sgd",
            "lr": 1e-3,
            "momentum": 0.0,
            "weight_decay": 0.0,
            "schedule": "poly",
            "poly_power": 0.9,
            "epochs": 80,
            "batch_size": 16,
        },
    },
    "segmenter-coco20-finetune": {
        "method": "densehybrid",
        "model": {"name": "segmenter_vit_b16", "num_classes": 20, "init_as": "checkpoint"},
        # Adam(params, lr=...) in segmenter_coco20_finetune.py: torch's default eps 1e-8.
        "optim": {"optimizer": "adam", "lr": 1e-6, "schedule": "constant", "eps": 1e-8, "epochs": 10, "batch_size": 16},
        "augment": {"crop": 512, "scale": [0.5, 2.0]},
        "loss": {"beta": 0.15, "lambda": 1.5, "posterior_ignore_void": True},
        "negatives": {"resize": 256, "crop": 256, "pastes": 3, "rect_prob": 0.5, "max_class_pixels": 10000},
    },
    # DiCNet train_student.py (tpami-and-dicnet-code.md section 6): Adam (torch defaults) 1e-4 constant, weight decay
    # 1e-5, 150 epochs, batch 16, full 1280x720 images with a flip, seed 666, 13 classes (raw ids - 1).
    "dicnet-streethazards": {
        "method": "dicnet",
        "model": {"name": "dicnet_pspnet", "num_classes": 13},
        "data": {"dataset": "streethazards", "train_split": "train", "options": {"encoding": "hendrycks"}},
        "augment": {"crop": 0, "scale": [1.0, 1.0], "flip": True},
        "optim": {
            "optimizer": "adam",
            "lr": 1e-4,
            "backbone_lr_ratio": 1.0,
            "schedule": "constant",
            "betas": [0.9, 0.999],
            "eps": 1e-8,
            "weight_decay": 1e-5,
            "epochs": 150,
            "batch_size": 16,
        },
        "run": {"amp": False, "seed": 666},
    },
}


def _json_recipes(capsys, *names):
    assert main(["recipes", "--json", *names]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_recipe_matches_the_released_code(name, capsys):
    resolved = _json_recipes(capsys, name)[name]
    for section, values in RELEASED[name].items():
        if isinstance(values, dict):
            for key, expected in values.items():
                assert resolved[section][key] == pytest.approx(expected), f"{section}.{key}"
        else:
            assert resolved[section] == values
    assert resolved["seed_command"].startswith("python ") and resolved["reproduces"]


def test_every_shipped_recipe_resolves_and_is_listed(capsys):
    # the flow recipes are checked in test_flow_recipes.py, the demo's stages in test_demo.py
    flow_recipes = {"denseflow-pretrain", *(f"{name}-flow" for name in RELEASED if name.endswith("finetune"))}
    demo = {"demo-closed-set", "demo-finetune", "demo-flow-pretrain", "demo-finetune-flow", "demo-dicnet"}
    assert set(list_recipes()) == set(RELEASED) | {"generic", "dicnet"} | flow_recipes | demo
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().out
    for name in list_recipes():
        assert name in listing
    assert "python ldn_streethazards_finetune.py" in listing and len(listing.splitlines()) == len(list_recipes())
    assert main(["recipes", "--methods"]) == 0
    assert "closed-set" in capsys.readouterr().out
    generic = load_recipe("generic")
    assert generic["data"]["dataset"] == "folder" and generic["negatives"]["required"] is False


def test_set_overrides_are_typed_and_checked():
    recipe = load_recipe(
        "ldn121-streethazards", ["optim.lr=1e-5", "augment.scale=[1, 1]", "model.kwargs.checkpointing=false"]
    )
    assert recipe["optim"]["lr"] == 1e-5 and recipe["augment"]["scale"] == [1.0, 1.0]
    assert recipe["model"]["kwargs"] == {"checkpointing": False}
    assert parse_override("model.init=/tmp/x.pt") == ("model.init", "/tmp/x.pt")
    with pytest.raises(ValueError, match=r"Unknown recipe key 'optim.learning_rate'.*Valid keys: .*optim\.lr"):
        load_recipe("ldn121-streethazards", ["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="`optim.epochs` to be an integer"):
        load_recipe("ldn121-streethazards", ["optim.epochs=2.5"])
    with pytest.raises(ValueError, match="`optim.schedule` to be one of 'cosine', 'constant', 'poly'"):
        load_recipe("ldn121-streethazards", ["optim.schedule=step"])
    with pytest.raises(ValueError, match="`negatives.source` to be one of 'real', 'synthetic', 'mixed', but got 'x'"):
        load_recipe("ldn121-streethazards-finetune", ["negatives.source=x"])
    with pytest.raises(ValueError, match="`model.name` to be one of"):
        load_recipe("generic", ["model.name=resnet9000"])
    # a closed-set recipe has no [negatives] section
    with pytest.raises(ValueError, match="Unknown recipe key 'negatives.crop'"):
        load_recipe("ldn121-streethazards", ["negatives.crop=3"])


def test_unknown_recipe_lists_the_shipped_ones(capsys):
    assert main(["train", "--recipe", "ldn-121", "--print-config"]) == 1
    err = capsys.readouterr().err
    assert "Unknown recipe 'ldn-121'. Available: demo-closed-set, demo-dicnet, demo-finetune, " in err
    assert "generic, ldn121-streethazards, ldn121-streethazards-finetune" in err


def test_print_config_output_is_a_recipe_file_a_user_can_edit(capsys, tmp_path):
    assert main(["train", "--recipe", "dlv3p-cityscapes-finetune", "--print-config", "--set", "optim.epochs=3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["optim"]["epochs"] == 3 and printed["negatives"]["crop"] == 192
    printed["optim"]["lr"] = 2e-6
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(printed))
    mine = load_recipe(path)
    assert mine["optim"]["lr"] == 2e-6 and mine["optim"]["epochs"] == 3 and mine["method"] == "densehybrid"
    toml = tmp_path / "mine.toml"
    toml.write_text('method = "closed-set"\n[optim]\nepochs = 1\n[bogus]\nx = 1\n')
    with pytest.raises(ValueError, match=r"Unknown recipe key 'bogus' in recipe file .*mine.toml"):
        load_recipe(toml)


def test_training_labels_are_checked_and_anomalies_ignored():
    import torch

    from densehybrid.recipes.run import TrainingTargets

    check = TrainingTargets(3)
    out = check({"image": torch.zeros(3, 2, 2), "target": torch.tensor([[0, 3], [255, 2]]), "path": "a.png"})
    assert out["target"].tolist() == [[0, 255], [255, 2]]  # K (anomaly) is ignored in training
    with pytest.raises(ValueError, match=r"label of 'b.png' holds 7"):
        check({"image": torch.zeros(3, 1, 2), "target": torch.tensor([[0, 7]]), "path": "b.png"})


def test_a_new_method_plugs_in_with_one_registration():
    def build(context):
        return lambda model, images, target, generator: (images.sum(), {"loss": 0.0})

    try:
        register_method("toy-method", build, sections={"toy": {"weight": Key("float", 0.5, "a weight", minimum=0.0)}})
        recipe = load_recipe("ldn121-streethazards", ["method=toy-method", "toy.weight=2"])
        assert recipe["method"] == "toy-method" and recipe["toy"] == {"weight": 2.0}
        assert "negatives" not in recipe
        with pytest.raises(ValueError, match="already registered"):
            register_method("toy-method", build)
    finally:
        METHODS.pop("toy-method", None)


@pytest.mark.parametrize("name", sorted(RELEASED) + ["generic"])
def test_print_config_prints_what_recipes_json_resolves(name, capsys):
    listed = _json_recipes(capsys, name)[name]
    assert listed.pop("param_groups")  # shown by `recipes --json` only: --print-config is a recipe file
    assert main(["train", "--recipe", name, "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == listed


# -- recipe values that would reach a weight reader, the file system or a silent no-op -------------------------------
def test_a_recipe_cannot_turn_off_weights_only_loading(tmp_path, capsys):
    recipe = tmp_path / "evil.toml"
    recipe.write_text(
        'method = "closed-set"\n[model]\nname = "deeplabv3plus_wrn38"\ninit_as = "pretrained"\n'
        "kwargs = {weights_only = false}\n"
    )
    with pytest.raises(ValueError, match=r"model.kwargs.*\['weights_only'\].*weights-only"):
        load_recipe(recipe)
    with pytest.raises(ValueError, match="weights-only"):
        load_recipe("generic", ["model.kwargs.weights_only=false"])
    assert main(["train", "--recipe", "generic", "--set", "model.kwargs.map_location=cpu", "--print-config"]) == 1
    assert "weights-only" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["../../victim", "/tmp/victim", "a/b", "..", ".hidden", "~user"])
def test_a_recipe_name_that_is_a_path_is_refused(name, capsys):
    with pytest.raises(OutputError, match="plain name"):
        load_recipe("generic", [f'name="{name}"'])


def test_a_typo_in_best_metric_is_refused_not_a_missing_best_pt():
    with pytest.raises(ValueError, match="`run.best_metric` to be one of 'val_miou', 'val_ap'"):
        load_recipe("generic", ["run.best_metric=val_mIoU"])


# -- recipe values that used to end in an internal error ------------------------------------------------------------
@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("optim.betas=[1.5, 2]", "`optim.betas` to be < 1"),
        (f"run.seed={2**70}", "`run.seed` to be < 4294967296"),
        ("model.name=dicnet", "DiCNet model .* only with method 'dicnet'"),
        ("augment.crop=0", r"`augment.scale` = \[1, 1\] with augment.crop = 0"),
        ("model.kwargs.colour=1", r"Expected arguments of model 'ladder_efficientnet_lite0' among .*\['colour'\]"),
    ],
)
def test_bad_recipe_values_are_refused_when_the_recipe_is_read(item, expected):
    with pytest.raises(ValueError, match=expected):
        load_recipe("generic", [item])


def test_a_recipe_file_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('method = "closed-set"\ndescription = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}' to be UTF-8 text"):
        load_recipe(path)

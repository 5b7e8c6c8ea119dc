"""The dicnet training method: 2-step runs whose checkpoints `densehybrid evaluate` scores with dicnet by default, a
resumed run that equals an uninterrupted one with the teacher untouched, a teacher trained by the generic recipe,
and one clear message for each bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from densehybrid.cli import main
from densehybrid.models import create_model
from tests.datasets.fake_trees import make_fake_streethazards
from tests.recipes.conftest import LIGHT_LADDER, TINY, make_folder_tree, sets

#: A light DiCNet for the released recipe: a 13-class ladder teacher and a timm MobileNetV3 student.
LIGHT_DICNET = ["model.name=dicnet", "model.kwargs.student_backbone=mobilenetv3_large_100"]
RUN = ["optim.batch_size=2", "run.num_workers=0", "run.checkpoint_every=1"]


def _save(model, path: Path) -> Path:
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path


@pytest.fixture(scope="module")
def streethazards(tmp_path_factory):
    """A fake StreetHazards tree (train and test) and a light 13-class teacher checkpoint."""
    folder = tmp_path_factory.mktemp("dicnet_sh")
    root = make_fake_streethazards(folder / "sh", splits=("train", "test"))
    torch.manual_seed(3)
    teacher = _save(create_model("ladder_mobilenetv3", num_classes=13, decoder_channels=8), folder / "teacher.pt")
    return root, teacher


def _train(root, teacher, out, *extra, steps=2):
    args = ["train", "--recipe", "dicnet-streethazards", "--data-root", str(root), "--out", str(out)]
    args += ["--init", str(teacher), "--max-steps", str(steps), "--device", "cpu", "--no-progress"]
    return main([*args, *sets(*RUN, *LIGHT_DICNET), *extra])


def _error(capsys, out: Path) -> str:
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    return err


def test_released_recipe_trains_and_evaluate_scores_it_with_dicnet_by_default(streethazards, tmp_path, capsys):
    root, teacher = streethazards
    out = tmp_path / "run"
    assert _train(root, teacher, out) == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["method"] == "dicnet" and summary["global_step"] == 2 and summary["num_classes"] == 13
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if line["kind"] == "train"]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["model_name"] == "dicnet" and state["model_kwargs"]["teacher"] == "ladder_mobilenetv3"
    teacher_state = torch.load(teacher, weights_only=True)["model"]
    assert all(torch.equal(state["model"][f"teacher.{k}"], v) for k, v in teacher_state.items())  # frozen
    # the optimiser holds only the student's parameters, with the released Adam settings
    (group,) = state["optimizer"]["param_groups"]
    student = sum(
        1 for k in state["model"] if k.startswith("student.") and "running" not in k and "num_batches" not in k
    )
    assert len(group["params"]) == student
    assert (group["lr"], group["weight_decay"], group["eps"]) == (1e-4, 1e-5, 1e-8)
    report = tmp_path / "eval.json"
    args = ["evaluate", "--benchmark", "streethazards", "--root", str(root), "--checkpoint", str(out / "last.pt")]
    args += ["--option", "encoding=hendrycks", "--device", "cpu", "--num-workers", "0", "--no-progress"]
    assert main([*args, "--out", str(report)]) == 0, capsys.readouterr().err  # no --score: dicnet
    result = json.loads(report.read_text())
    assert list(result["anomaly"]) == ["dicnet"] and result["model"] == "dicnet" and result["num_classes"] == 13
    assert 0.0 <= result["anomaly"]["dicnet"]["ap"] <= 1.0 and result["closed_set"] is not None
    released = tmp_path / "eval-released.json"
    assert main([*args, "--out", str(released), "--score", "dicnet", "--metric-option", "variant=dicnet"]) == 0
    assert json.loads(released.read_text())["anomaly"]["dicnet"]["variant"] == "dicnet"


def test_an_interrupted_run_resumes_to_the_uninterrupted_parameters_and_the_teacher_never_changes(
    streethazards, tmp_path, capsys
):
    root, teacher = streethazards
    assert _train(root, teacher, tmp_path / "whole", steps=3) == 0
    assert _train(root, teacher, tmp_path / "parts", steps=1) == 0
    first = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)["model"]
    assert _train(root, teacher, tmp_path / "parts", steps=3) == 0
    capsys.readouterr()
    assert json.loads((tmp_path / "parts" / "train-summary.json").read_text())["resumed"]
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    assert whole["global_step"] == parts["global_step"] == 3
    assert whole["model"].keys() == parts["model"].keys()
    for key, value in whole["model"].items():
        assert torch.equal(value, parts["model"][key]), key
    teacher_state = torch.load(teacher, weights_only=True)["model"]
    for key, value in teacher_state.items():  # weights and BatchNorm statistics alike
        assert torch.equal(parts["model"][f"teacher.{key}"], value), key
    assert any(not torch.equal(v, parts["model"][k]) for k, v in first.items() if k.startswith("student."))


def test_a_teacher_trained_by_the_generic_recipe_is_distilled_on_its_folder_tree(tmp_path, capsys):
    root = make_folder_tree(tmp_path / "mine", n_train=4, n_val=2)
    generic = tmp_path / "generic"
    args = ["train", "--recipe", "generic", "--data-root", str(root), "--out", str(generic), "--device", "cpu"]
    assert main([*args, "--no-progress", "--max-steps", "1", *sets(*TINY, *LIGHT_LADDER)]) == 0
    out = tmp_path / "dicnet"
    args = ["train", "--recipe", "dicnet", "--data-root", str(root), "--init", str(generic / "last.pt")]
    args += ["--out", str(out), "--device", "cpu", "--no-progress"]
    extra = sets(*RUN, "optim.epochs=1", "model.kwargs.student_backbone=mobilenetv3_large_100")
    assert main([*args, *extra]) == 0, capsys.readouterr().err
    summary = json.loads((out / "train-summary.json").read_text())
    assert summary["finished"] and summary["global_step"] == 2  # whole 40x56 images, batch 2
    (epoch,) = summary["history"]
    assert 0.0 <= epoch["val_ap"] <= 1.0 and 0.0 <= epoch["val_fpr95"] <= 1.0  # the dicnet score on anomalies
    assert summary["best"]["metric"] == "val_ap" and (out / "best.pt").is_file()
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["model_kwargs"]["teacher"] == "ladder_mobilenetv3"
    assert state["model_kwargs"]["decoder_channels"] == 16  # the teacher's architecture, read from its checkpoint
    # a DiCNet checkpoint as --init: the teacher and the student continue from it
    again = tmp_path / "again"
    args = ["train", "--recipe", "dicnet", "--data-root", str(root), "--init", str(out / "last.pt")]
    args += ["--out", str(again), "--device", "cpu", "--no-progress", "--max-steps", "1"]
    assert main([*args, *extra]) == 0, capsys.readouterr().err
    continued = torch.load(again / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(continued[k], v) for k, v in state["model"].items() if k.startswith("teacher."))
    # one Adam step (lr 1e-4) from the distilled student stays close to it, unlike a fresh initialisation
    key = next(k for k in continued if k.startswith("student.") and k.endswith("conv_last.0.weight"))
    assert (continued[key] - state["model"][key]).abs().max() < 1e-3


def test_bad_inputs_fail_with_one_message_before_anything_is_written(streethazards, tmp_path, capsys):
    root, teacher = streethazards
    out = tmp_path / "run"
    # a DenseHybrid checkpoint as the released recipe's teacher
    densehybrid = _save(create_model("ladder_mobilenetv3", num_classes=13, decoder_channels=8), tmp_path / "dh.pt")
    args = ["train", "--recipe", "dicnet-streethazards", "--data-root", str(root), "--out", str(out)]
    args += ["--device", "cpu", "--no-progress", *sets(*RUN)]
    assert main([*args, "--init", str(densehybrid)]) == 1
    message = _error(capsys, out)
    assert "the released DiCNet teacher" in message and "'ladder_mobilenetv3'" in message
    assert "use recipe `dicnet`" in message
    # no teacher at all
    assert main(args) == 1
    assert "Expected `--init` (the frozen teacher: encoder.pth and decoder.pth)" in _error(capsys, out)
    # a folder without the released decoder.pth
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "encoder.pth").write_bytes(b"")
    assert main([*args, "--init", str(folder)]) == 1
    assert "decoder.pth is missing" in _error(capsys, out)
    # a student checkpoint distilled from a teacher of another feature width (16 channels, the teacher has 8)
    other = create_model("dicnet", num_classes=13, teacher="ladder_mobilenetv3", decoder_channels=16)
    torch.save(other.student.state_dict(), tmp_path / "student.pt")
    light = sets(*LIGHT_DICNET[:1])
    assert main([*args, *light, "--init", str(teacher), "--set", f"distill.student={tmp_path / 'student.pt'}"]) == 1
    message = _error(capsys, out)
    assert "teacher's feature width (8 channels), but it produces 16" in message and "student.pt" in message
    # a model that is not a DiCNet
    assert main([*args, "--init", str(teacher), "--set", "model.name=ladder_mobilenetv3"]) == 1
    assert "model.kwargs.teacher=ladder_mobilenetv3" in _error(capsys, out)


def test_whole_image_augmentation_only_flips():
    from densehybrid.data.transforms import SegmentationAugment

    image, target = torch.rand(3, 5, 7), torch.arange(35).reshape(5, 7)
    augment = SegmentationAugment(0, (1.0, 1.0))
    flips = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = augment({"image": image, "target": target})
        flipped = torch.equal(out["image"], image.flip(-1))
        assert flipped or torch.equal(out["image"], image)
        assert torch.equal(out["target"], target.flip(-1) if flipped else target)
        flips += flipped
    assert 0 < flips < 8


@pytest.mark.slow
def test_the_released_teacher_loads_from_its_folder_or_a_packed_checkpoint(tmp_path):
    from densehybrid.recipes import MethodContext, load_recipe
    from densehybrid.recipes.distillation import build_distillation_model

    torch.manual_seed(1)
    released = create_model("dicnet_pspnet", num_classes=13)
    folder = tmp_path / "released"
    folder.mkdir()
    torch.save(released.teacher.encoder.state_dict(), folder / "encoder.pth")
    torch.save(released.teacher.decoder.state_dict(), folder / "decoder.pth")
    recipe = load_recipe("dicnet-streethazards")
    expected = released.teacher.state_dict()
    # Without the ImageNet ResNet-34 the student starts from random weights: said loudly at start.
    with pytest.warns(UserWarning, match="RANDOM weights.*pretrained_backbone"):
        model = build_distillation_model(MethodContext(recipe, None, 13, torch.device("cpu"), init=str(folder)))
    assert all(torch.equal(v, expected[k]) for k, v in model.teacher.state_dict().items())
    assert model.model_kwargs["pretrained"] == (str(folder / "encoder.pth"), str(folder / "decoder.pth"))
    import warnings

    import torchvision

    backbone = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), backbone)
    with_backbone = load_recipe("dicnet-streethazards", [f"model.kwargs.pretrained_backbone={backbone}"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_distillation_model(MethodContext(with_backbone, None, 13, torch.device("cpu"), init=str(folder)))
    # the same weights packed in one file (the PSPNet's encoder.* and decoder.*)
    (folder / "encoder.pth").unlink()
    torch.save({"model": expected}, tmp_path / "teacher.pt")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = build_distillation_model(
            MethodContext(recipe, None, 13, torch.device("cpu"), init=str(tmp_path / "teacher.pt"))
        )
    assert all(torch.equal(v, expected[k]) for k, v in model.teacher.state_dict().items())


def test_distillation_step_skips_the_teachers_classifier_head():
    # The loss reads only the features: the released step never runs the teacher's classifier.
    from densehybrid.recipes.distillation import DistillationObjective

    torch.manual_seed(0)
    model = create_model("dicnet", num_classes=3, teacher="ladder_mobilenetv3", student_backbone="resnet18")
    model.teacher.forward_head = lambda features: pytest.fail("the teacher's head ran")
    loss, logs = DistillationObjective()(model, torch.rand(2, 3, 32, 32), torch.zeros(2, 32, 32), torch.Generator())
    assert loss.requires_grad and logs["loss"] > 0

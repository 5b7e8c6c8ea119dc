"""DiCNet: the released teacher/student layout and outputs (compat fixtures), loading, any-segmenter teachers, errors.

The references are ``tests/data/compat/dicnet_*`` (copied from ``shared/compat``): the state-dict layout of the released
teacher files and student checkpoint, and the outputs of the released code for deterministic weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from densehybrid import scores
from densehybrid.errors import CheckpointError
from densehybrid.models import DistillationOutput, create_model, load_checkpoint, output_fields
from densehybrid.models.dicnet import DiCNet, PPMStudent, dilate_stage_, load_student
from tests.models.test_official import deterministic_state_dict, relative_error

COMPAT = Path(__file__).resolve().parents[1] / "data" / "compat"
PARTS = {"teacher.encoder.": "teacher_encoder", "teacher.decoder.": "teacher_decoder", "student.": "student"}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The fixture weights written as the released files (teacher encoder/decoder, a DataParallel student)."""
    model = create_model("dicnet_pspnet", num_classes=13)
    state = deterministic_state_dict(model)
    folder = tmp_path_factory.mktemp("dicnet")
    files = {}
    for prefix, name in PARTS.items():
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if name == "student":  # saved by the training script from an nn.DataParallel model
            part = {f"module.{k}": v for k, v in part.items()}
        files[name] = folder / f"{name}.pth"
        torch.save(part, files[name])
    return files


def test_state_dict_equals_released_files():
    model = create_model("dicnet_pspnet", num_classes=13)
    expected = {}
    for prefix, name in PARTS.items():
        keys = json.loads((COMPAT / f"dicnet_{name}_keys.json").read_text())
        expected.update({prefix + k: v for k, v in keys.items()})
    actual = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert list(actual) == list(expected)  # same names in the same order
    assert actual == expected  # same shapes and dtypes


def test_released_files_load_strictly_and_reproduce_the_reference(released):
    model = create_model(
        "dicnet_pspnet", num_classes=13, pretrained=(released["teacher_encoder"], released["teacher_decoder"])
    )
    load_student(model, released["student"])
    assert model.model_kwargs == {"num_classes": 13}  # file paths as Path objects are not recorded
    ref = np.load(COMPAT / "dicnet_ref.npz")
    images = torch.from_numpy(ref["input"])
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert isinstance(out, DistillationOutput)
    assert out.logits.shape == (2, 13, 64, 96)
    for key in ("teacher_features", "student_features"):
        assert getattr(out, key).shape == (2, 512, 8, 12)
        assert relative_error(getattr(out, key), torch.from_numpy(ref[key])) < 1e-4, key
    score = scores.dicnet(out.teacher_features, out.student_features, (64, 96))
    assert relative_error(score, torch.from_numpy(ref["score"])) < 1e-4
    assert torch.equal(scores.compute_score("dicnet", out), score)  # the map at the logits' (output) size
    # The library's generic loader reads each file as well (strict, ``module.`` stripped).
    other = create_model("dicnet_pspnet", num_classes=13)
    load_checkpoint(other.teacher.encoder, released["teacher_encoder"])
    load_checkpoint(other.teacher.decoder, released["teacher_decoder"])
    load_checkpoint(other.student, released["student"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_teacher_is_frozen_and_stays_in_eval_mode():
    model = create_model("dicnet", num_classes=3, teacher="ladder_mobilenetv3", decoder_channels=16)
    model.train()
    assert not model.teacher.training and model.student.training
    assert not any(p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())
    assert output_fields(model) == ("logits", "teacher_features", "student_features")
    assert output_fields(create_model("ladder_mobilenetv3", num_classes=3)) == ("logits", "ood_logits")


def test_any_registered_segmenter_can_be_the_teacher(tmp_path):
    teacher = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16).eval()
    path = tmp_path / "teacher.pt"
    closed_set = {k: v for k, v in teacher.state_dict().items() if not k.startswith("logits_ood.")}
    torch.save({"model": closed_set}, path)  # a closed-set checkpoint: the unused head may be absent
    model = create_model(
        "dicnet", num_classes=3, teacher="ladder_mobilenetv3", decoder_channels=16, pretrained=str(path)
    ).eval()
    kwargs = {"num_classes": 3, "teacher": "ladder_mobilenetv3", "decoder_channels": 16, "pretrained": str(path)}
    assert model.model_kwargs == kwargs  # what a checkpoint records to rebuild it (the teacher file is then dropped)
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        out = model(images)
        expected_features = teacher.forward_features(images)
        expected_logits = teacher(images).logits
    # The teacher's pre-logit features (stride 4 here) and its logits, untouched by the distillation model.
    assert torch.equal(out.teacher_features, expected_features)
    assert torch.allclose(out.logits, expected_logits)
    assert out.student_features.shape == out.teacher_features.shape == (2, 16, 8, 12)
    assert scores.compute_score("dicnet", out).shape == (2, 32, 48)
    assert scores.compute_score("msp", out).shape == (2, 32, 48)  # logit scores read the teacher's logits


def test_student_of_another_width_gives_one_clear_message(tmp_path):
    teacher = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16)
    with pytest.raises(ValueError, match=r"teacher's feature width \(16 channels.*produces 32"):
        DiCNet(teacher, PPMStudent(18, 32))
    wide = DiCNet(create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=32), PPMStudent(18, 32))
    path = tmp_path / "student.pth"
    torch.save(wide.student.state_dict(), path)
    model = DiCNet(teacher, PPMStudent(18, 16))
    with pytest.raises(CheckpointError, match=r"teacher's feature width \(16 channels\), but it produces 32"):
        load_student(model, path)


def test_teacher_contract_errors():
    with pytest.raises(TypeError, match="lacks feature_channels, forward_features, forward_head"):
        DiCNet(torch.nn.Conv2d(3, 8, 1), PPMStudent(18, 8))
    with pytest.raises(ValueError, match="closed-set segmenter"):
        create_model("dicnet", num_classes=3, teacher="dicnet_pspnet")
    with pytest.raises(ValueError, match="teacher's two files"):
        create_model("dicnet_pspnet", num_classes=13, pretrained="encoder.pth")


def test_dilation_follows_the_released_rule():
    stage = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.Conv2d(4, 4, 3, padding=1))
    dilate_stage_(stage, 4)
    assert (stage[0].stride, stage[0].dilation, stage[0].padding) == ((1, 1), (2, 2), (2, 2))
    assert (stage[1].stride, stage[1].dilation, stage[1].padding) == ((1, 1), (4, 4), (4, 4))


def test_student_loads_a_torchvision_backbone(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    student = PPMStudent(18, 8, pretrained_backbone=path)
    assert torch.equal(student.encoder.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert student.encoder.conv1.padding == (1, 1)  # the released 7x7 stem padding


def test_open_set_prediction_with_the_dicnet_score():
    from densehybrid.openset import OpenSetModel

    model = create_model("dicnet", num_classes=3, teacher="ladder_mobilenetv3", decoder_channels=8).eval()
    with torch.no_grad():
        prediction = OpenSetModel(model, "dicnet", threshold=0.0)(torch.rand(1, 3, 32, 48))
    assert prediction.scores.shape == prediction.labels.shape == (1, 32, 48)
    assert (prediction.labels == 3).all()  # every squared discrepancy is above 0: all pixels are "unknown"
    with pytest.raises(ValueError, match="dataset-posterior logits of a DenseHybrid model"):
        OpenSetModel(model, "densehybrid")


def test_a_light_timm_student(tmp_path):
    import timm

    backbone = timm.create_model("mobilenetv3_large_100", pretrained=False)
    path = tmp_path / "mnv3.pth"
    torch.save(backbone.state_dict(), path)
    model = create_model(
        "dicnet",
        num_classes=3,
        teacher="ladder_mobilenetv3",
        decoder_channels=8,
        student_backbone="mobilenetv3_large_100",
        pretrained_backbone=str(path),
    ).eval()
    assert model.model_kwargs["student_backbone"] == "mobilenetv3_large_100"
    assert torch.equal(model.student.encoder.conv_stem.weight, backbone.conv_stem.weight)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 32, 48))
    assert out.student_features.shape == out.teacher_features.shape == (1, 8, 8, 12)
    resnet_student = sum(p.numel() for p in PPMStudent(18, 8).parameters())
    assert sum(p.numel() for p in model.student.parameters()) < resnet_student / 3  # a light student
    with pytest.raises(CheckpointError, match="missing"):
        create_model("dicnet", num_classes=3, student_backbone="resnet18", pretrained_backbone=str(path))


def test_a_released_part_loaded_into_the_whole_model_names_the_submodule(released):
    model = create_model("dicnet_pspnet", num_classes=13)
    with pytest.raises(CheckpointError, match=r"load_checkpoint\(model\.student, PATH\)"):
        load_checkpoint(model, released["student"])
    with pytest.raises(CheckpointError, match=r"load_checkpoint\(model\.teacher\.decoder, PATH\)"):
        load_checkpoint(model, released["teacher_decoder"])

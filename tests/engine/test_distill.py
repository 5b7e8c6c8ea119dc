"""DiCNet distillation through fit: the loss falls, the teacher never changes, the score marks teacher-student disagreement."""

from __future__ import annotations

import pytest
import torch

from densehybrid import scores
from densehybrid.models import DistillationOutput, create_model
from densehybrid.models.dicnet import distillation_loss


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("dicnet", num_classes=3, teacher="ladder_mobilenetv3", decoder_channels=8)


def test_distillation_runs_in_fit_lowers_the_loss_and_leaves_the_teacher_unchanged(model):
    """DiCNet distillation is fit with the distillation objective (the released Adam 1e-4, weight decay 1e-5)."""
    from densehybrid.engine import TrainConfig, build_optimizer, fit
    from densehybrid.recipes.distillation import DistillationObjective

    config = TrainConfig(
        epochs=6,
        batch_size=2,
        lr=1e-4,
        lr_min=1e-4,
        schedule="constant",
        backbone_lr_ratio=1.0,
        eps=1e-8,
        weight_decay=1e-5,
        device="cpu",
        amp=False,
        hflip=False,
        progress=False,
    )
    (group,) = build_optimizer(model, config).param_groups  # only the student trains
    assert {id(p) for p in group["params"]} == {id(p) for p in model.student.parameters()}
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}  # BN statistics included
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    images = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    data = [{"image": image, "target": torch.zeros(32, 48, dtype=torch.int64)} for image in images]
    history = fit(model, data, DistillationObjective(), config).history
    losses = [h["loss"] for h in history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())
    assert not model.teacher.training and all(p.grad is None for p in model.teacher.parameters())
    # The loss is the released plain mean squared error between the two feature maps.
    model.eval()
    with torch.no_grad():
        out = model(images)
    expected = torch.nn.functional.mse_loss(out.student_features, out.teacher_features)
    assert torch.allclose(distillation_loss(out.student_features, out.teacher_features), expected)


def test_score_is_higher_where_teacher_and_student_disagree():
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 16, 6, 8, generator=generator)
    student = teacher + 0.01 * torch.randn(2, 16, 6, 8, generator=generator)
    student[:, :, 2:4, 3:6] += 2.0  # the student fails to reproduce the teacher here
    out = DistillationOutput(torch.zeros(2, 3, 48, 64), teacher, student)
    score = scores.compute_score("dicnet", out)
    assert score.shape == (2, 48, 64)
    disagree = torch.zeros(48, 64, dtype=torch.bool)
    disagree[19:29, 27:46] = True  # inside the upsampled region
    far = torch.ones(48, 64, dtype=torch.bool)
    far[9:39, 18:55] = False  # outside it (the bilinear ramp included)
    assert score[:, disagree].min() > 10 * score[:, far].max()
    # mean over channels of the squared difference, on the feature grid
    coarse = scores.dicnet(teacher, student)
    torch.testing.assert_close(coarse, (teacher - student).pow(2).mean(1))
    assert torch.allclose(score[:, 0, 0], coarse[:, 0, 0])  # align_corners=True keeps the corner values


def test_score_and_loss_errors():
    with pytest.raises(ValueError, match="`student_features` to have the shape of `teacher_features`"):
        scores.dicnet(torch.zeros(1, 8, 2, 2), torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="`teacher_features` to contain no NaN"):
        scores.dicnet(torch.full((1, 8, 2, 2), float("nan")), torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="`student_features` to have the shape"):
        distillation_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 8, 2, 2))
    with pytest.raises(ValueError, match="DiCNet model.*ood_logits"):
        scores.compute_score(
            "dicnet", create_model("ladder_mobilenetv3", num_classes=3).eval()(torch.rand(1, 3, 32, 32))
        )

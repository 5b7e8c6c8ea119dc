"""DiCNet training: distil a frozen teacher's pre-logit features into the student, one optimiser step at a time.

The released schedule (zhouhuan-hust/DiCNet ``train_student.py`` with the values its ``__main__`` sets): Adam, constant
learning rate 1e-4, weight decay 1e-5, 150 epochs, batch 16, full 1280x720 StreetHazards images with a random
horizontal flip, ImageNet normalisation; the loss is :func:`~densehybrid.models.dicnet.distillation_loss`. Only the
student's parameters are optimised; the teacher stays in eval mode and receives no gradient.
"""

from __future__ import annotations

import torch

from densehybrid.models.dicnet import DiCNet, distillation_loss

#: The released optimiser settings.
DISTILLATION_LR = 1e-4
DISTILLATION_WEIGHT_DECAY = 1e-5


def distillation_optimizer(
    model: DiCNet, lr: float = DISTILLATION_LR, weight_decay: float = DISTILLATION_WEIGHT_DECAY
) -> torch.optim.Adam:
    """Adam over the student's parameters (the released settings by default).

    Raises:
        TypeError: ``model`` is not a :class:`~densehybrid.models.dicnet.DiCNet`.
    """
    if not isinstance(model, DiCNet):
        raise TypeError(f"Expected `model` to be a DiCNet (teacher and student), but got {type(model).__name__}.")
    return torch.optim.Adam(
        [p for p in model.student.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay
    )


def distillation_step(
    model: DiCNet, images: torch.Tensor, optimizer: torch.optim.Optimizer, *, amp: bool = False
) -> float:
    """One distillation step: ``loss = mse(S(x), T(x))``, backward through the student, ``optimizer.step()``.

    Args:
        model: a :class:`~densehybrid.models.dicnet.DiCNet`; it is put in train mode (its teacher stays in eval mode).
        images: (N, 3, H, W) float in [0, 1], on the model's device (augmented by the caller, e.g. flipped).
        optimizer: from :func:`distillation_optimizer`.
        amp: bfloat16 autocast on CUDA for the forward passes (the loss is computed in float32).

    Returns:
        the loss value before the step.

    Example:
        >>> from densehybrid.models import create_model
        >>> model = create_model("dicnet", num_classes=3, teacher="ladder_mobilenetv3")
        >>> optimizer = distillation_optimizer(model)
        >>> loss = distillation_step(model, torch.rand(2, 3, 64, 64), optimizer)
    """
    if not isinstance(model, DiCNet):
        raise TypeError(f"Expected `model` to be a DiCNet (teacher and student), but got {type(model).__name__}.")
    model.train()
    enabled = amp and images.device.type == "cuda"
    with torch.autocast(device_type=images.device.type, dtype=torch.bfloat16, enabled=enabled):
        teacher_features = model.forward_teacher(images)
        student_features = model.forward_student(images, teacher_features.shape[-2:])
    loss = distillation_loss(student_features, teacher_features)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())

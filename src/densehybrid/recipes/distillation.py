"""The ``dicnet`` training method: distil a frozen teacher's pre-logit features into a student (DiCNet).

A recipe of this method trains a DiCNet model (``model.name`` = ``dicnet_pspnet``, the released PSPNet teacher and
ResNet-34 student, or ``dicnet``, any registered closed-set model as the teacher). The objective is the released
``F.mse_loss(S(x), T(x))`` (:func:`densehybrid.models.dicnet.distillation_loss`); labels are not used. Only the
student is optimised: the teacher's parameters have ``requires_grad=False`` and :class:`~densehybrid.models.dicnet.DiCNet`
keeps it in eval mode, so neither its weights nor its BatchNorm statistics move.

The teacher comes from ``--init`` (or ``model.init``):

* a folder holding the released ``encoder.pth`` and ``decoder.pth`` (``dicnet_pspnet``), or those two files named by
  the recipe keys ``distill.teacher_encoder`` and ``distill.teacher_decoder``;
* a packed checkpoint: a DiCNet checkpoint (``teacher.*``, and ``student.*`` when it has one: the student then
  continues from it), or, for ``dicnet_pspnet``, the PSPNet's own ``encoder.*``/``decoder.*`` weights;
* for ``dicnet``, the checkpoint of any registered closed-set model (e.g. trained with the ``generic`` recipe): the
  teacher's architecture is the one the checkpoint records (``model.kwargs.teacher`` names it for a bare state dict).

``distill.student`` optionally starts the student from a student checkpoint (e.g. the released
``student_epoch_N.pth``); one distilled from a teacher of another feature width is refused.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from densehybrid.errors import CheckpointError
from densehybrid.recipes.schema import Key

if TYPE_CHECKING:
    from densehybrid.recipes.methods import MethodContext

__all__ = [
    "DISTILL_SECTIONS",
    "DICNET_MODELS",
    "DistillationObjective",
    "build_distillation_model",
    "build_objective",
]

#: The registered DiCNet models a ``dicnet`` recipe can train.
DICNET_MODELS = ("dicnet_pspnet", "dicnet")
#: The released teacher's two files, as a ``--init`` folder holds them.
TEACHER_FILES = ("encoder.pth", "decoder.pth")
_INIT_ONLY = ("pretrained", "pretrained_backbone", "num_classes")

DISTILL_SECTIONS: dict[str, dict[str, Key]] = {
    "distill": {
        "teacher_encoder": Key("str", "", "the released teacher's encoder file (dicnet_pspnet); empty: from --init"),
        "teacher_decoder": Key("str", "", "the released teacher's decoder file (dicnet_pspnet); empty: from --init"),
        "student": Key("str", "", "a student checkpoint to start from (e.g. student_epoch_N.pth); empty: none"),
    }
}


class DistillationObjective:
    """``F.mse_loss(S(x), T(x))`` on a batch; the targets are ignored (distillation needs no labels).

    The model is called as a whole (so that ``DistributedDataParallel`` sees the forward pass); the teacher's
    classifier head, whose logits the loss does not read, is skipped.
    """

    name = "dicnet"

    def __call__(
        self, model: nn.Module, images: torch.Tensor, target: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        from densehybrid.models.dicnet import distillation_loss

        out = model(images, teacher_logits=False)
        loss = distillation_loss(out.student_features, out.teacher_features)
        return loss, {"loss": float(loss.detach())}


def build_objective(context: MethodContext) -> Callable:
    """The ``dicnet`` method's objective (see :class:`DistillationObjective`)."""
    return DistillationObjective()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from densehybrid.models.checkpoint import read_checkpoint

    info = read_checkpoint(path)
    return info.state_dict, info.fields()


def _recorded(metadata: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The architecture a checkpoint records: its model name and the keyword arguments that rebuild it."""
    name = metadata.get("model_name") if isinstance(metadata.get("model_name"), str) else None
    kwargs = metadata.get("model_kwargs") if isinstance(metadata.get("model_kwargs"), Mapping) else {}
    return name, {k: v for k, v in kwargs.items() if k not in _INIT_ONLY}


def _teacher_file_pair(init: str, distill: Mapping[str, str]) -> tuple[str, str] | None:
    """The released teacher's (encoder, decoder) files from a ``--init`` folder or the recipe keys, else None."""
    keys = (distill["teacher_encoder"], distill["teacher_decoder"])
    if init and Path(init).expanduser().is_dir():
        folder = Path(init).expanduser()
        missing = [name for name in TEACHER_FILES if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"Expected `--init` folder {str(folder)!r} to hold the released teacher's {' and '.join(TEACHER_FILES)}, "
                f"but {', '.join(missing)} is missing."
            )
        return str(folder / TEACHER_FILES[0]), str(folder / TEACHER_FILES[1])
    if init or not any(keys):
        return None
    if not all(keys):
        raise ValueError(
            "Expected both recipe keys `distill.teacher_encoder` and `distill.teacher_decoder` (the released "
            f"teacher's two files), but got only {'the encoder' if keys[0] else 'the decoder'}."
        )
    for key, path in zip(("teacher_encoder", "teacher_decoder"), keys):
        if not Path(path).expanduser().is_file():
            raise CheckpointError(
                f"Expected recipe key `distill.{key}` {path!r} to be an existing file, but it is missing."
            )
    return str(Path(keys[0]).expanduser()), str(Path(keys[1]).expanduser())


def _load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    from densehybrid.models.checkpoint import check_state_dict

    *_, message = check_state_dict(module, state, source=what)
    if message:
        raise CheckpointError(message)
    module.load_state_dict(state)


def _sub_state(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _wrong_teacher(init: str, recorded: str | None, name: str, detail: str = "") -> CheckpointError:
    found = f"a checkpoint of model {recorded!r}" if recorded else "weights of another architecture"
    hint = (
        " To distil from that model, use recipe `dicnet` (the teacher's architecture is read from the checkpoint)."
        if recorded and not recorded.startswith("dicnet")
        else ""
    )
    return CheckpointError(
        f"Expected `--init` {init!r} to be the released DiCNet teacher for model {name!r} (a folder with "
        f"{' and '.join(TEACHER_FILES)}, the PSPNet's encoder.*/decoder.* weights, or a {name} checkpoint), but it "
        f"holds {found}.{hint}" + (f"\n{detail}" if detail else "")
    )


def build_distillation_model(context: MethodContext) -> nn.Module:
    """The DiCNet model of a ``dicnet`` recipe, its teacher loaded from ``--init`` (see the module docstring).

    Raises:
        ValueError: ``model.name`` is not a DiCNet model, or no teacher is given.
        CheckpointError: a teacher or student file that is missing or does not fit (a DenseHybrid checkpoint for the
            PSPNet teacher, a student distilled from a teacher of another feature width, ...).
    """
    from densehybrid.engine.runtime import seed_everything
    from densehybrid.models import create_model
    from densehybrid.models.dicnet import load_student

    recipe = context.recipe
    model_cfg, distill = recipe["model"], recipe["distill"]
    name, k = model_cfg["name"], context.num_classes
    if name not in DICNET_MODELS:
        raise ValueError(
            f"Expected recipe key `model.name` to be a DiCNet model ({', '.join(DICNET_MODELS)}) for the dicnet "
            f"method, but got {name!r}. Any registered closed-set model can be the teacher: model.name=dicnet with "
            f"model.kwargs.teacher={name}."
        )
    init = context.init
    if init and not Path(init).expanduser().exists():
        raise CheckpointError(
            f"Expected `--init` {init!r} to be the teacher's weights (a file or folder), but it is missing."
        )
    kwargs = dict(model_cfg["kwargs"])
    pair = _teacher_file_pair(init, distill)
    state: dict[str, torch.Tensor] = {}
    student_started = bool(kwargs.get("pretrained_backbone")) or bool(distill["student"])
    recorded: str | None = None
    recorded_kwargs: dict[str, Any] = {}
    if pair is None:
        if not init:
            files = " and ".join(TEACHER_FILES) if name == "dicnet_pspnet" else "the trained teacher's checkpoint"
            raise ValueError(
                f"Expected `--init` (the frozen teacher: {files}) for recipe {recipe['name']!r}, but got none. "
                "Distilling an untrained teacher detects nothing."
            )
        init = str(Path(init).expanduser())
        state, metadata = _read(Path(init))
        recorded, recorded_kwargs = _recorded(metadata)
        if recorded in DICNET_MODELS and recorded != name:
            raise CheckpointError(
                f"Expected `--init` {init!r} to be a teacher or a {name!r} checkpoint, but it is a {recorded!r} "
                f"checkpoint. Set model.name={recorded}."
            )
        if recorded == name:  # a DiCNet checkpoint rebuilds its own architecture (teacher, student)
            kwargs = {**recorded_kwargs, **kwargs}
    seed_everything(recipe["run"]["seed"])
    if pair is not None:  # the released teacher's two files
        if name != "dicnet_pspnet":
            raise ValueError(
                f"Expected model.name=dicnet_pspnet for the released teacher's {' and '.join(TEACHER_FILES)}, but got "
                f"{name!r}."
            )
        model = create_model(name, num_classes=k, pretrained=pair, **kwargs)
    elif any(key.startswith("teacher.") for key in state):  # a DiCNet checkpoint: teacher, and student if present
        model = create_model(name, num_classes=k, **kwargs)
        _load_strict(model.teacher, _sub_state(state, "teacher."), f"the teacher in `--init` {init!r}")
        student = _sub_state(state, "student.")
        student_started = bool(student)
        if student:
            _check_student_width(model, student, f"`--init` {init!r}")
            _load_strict(model.student, student, f"the student in `--init` {init!r}")
    elif name == "dicnet_pspnet":  # the PSPNet teacher's own weights, encoder.* and decoder.*
        if not any(key.startswith(("encoder.", "decoder.")) for key in state) or (
            recorded is not None and recorded not in DICNET_MODELS
        ):
            raise _wrong_teacher(init, recorded, name)
        model = create_model(name, num_classes=k, **kwargs)
        try:
            _load_strict(model.teacher, state, f"`--init` {init!r}")
        except CheckpointError as err:
            raise _wrong_teacher(init, recorded, name, str(err)) from err
    else:  # dicnet: any registered closed-set model's checkpoint is the teacher
        teacher = kwargs.get("teacher", recorded)
        if teacher is None:
            raise ValueError(
                f"Expected model.kwargs.teacher (the teacher's registered model name) for `--init` {init!r}, which does "
                "not record its architecture."
            )
        if recorded is not None and teacher != recorded:
            raise CheckpointError(
                f"Expected `--init` {init!r} to be a checkpoint of the teacher model.kwargs.teacher={teacher!r}, but "
                f"it records model {recorded!r}. Drop model.kwargs.teacher to use the checkpoint's architecture."
            )
        teacher_kwargs = {key: value for key, value in recorded_kwargs.items() if key not in kwargs}
        kwargs = {**teacher_kwargs, **kwargs, "teacher": teacher}
        model = create_model(name, num_classes=k, pretrained=init, **kwargs)
    if distill["student"]:
        path = Path(distill["student"]).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"Expected recipe key `distill.student` {distill['student']!r} to be an existing student checkpoint, "
                "but it is missing."
            )
        load_student(model, path)
    if name == "dicnet_pspnet" and not student_started:
        warnings.warn(
            "The DiCNet student (ResNet-34) starts from RANDOM weights: the released train_student.py starts it from "
            "ImageNet (resnet34-imagenet.pth). Pass --set model.kwargs.pretrained_backbone=FILE (a torchvision "
            "ResNet-34 state dict, e.g. resnet34-b627a593.pth) to train as released.",
            UserWarning,
            stacklevel=2,
        )
    return model


def _check_student_width(model: nn.Module, student: Mapping[str, torch.Tensor], where: str) -> None:
    weights = [v for key, v in student.items() if key.endswith("conv_last.0.weight") and v.ndim == 4]
    if weights and int(weights[-1].shape[0]) != model.feature_channels:
        raise CheckpointError(
            f"Expected the student in {where} to produce the teacher's feature width ({model.feature_channels} "
            f"channels), but it produces {int(weights[-1].shape[0])}: it was distilled from another teacher."
        )

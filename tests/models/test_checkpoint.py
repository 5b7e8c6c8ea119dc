"""Checkpoint loading: released file layouts, wrapper prefixes, metadata, and the errors for files that do not fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from densehybrid.errors import CheckpointError
from densehybrid.models import create_model
from densehybrid.models.checkpoint import (
    extract_state_dict,
    load_checkpoint,
    model_from_checkpoint,
    read_checkpoint_file,
    split_checkpoint,
    strip_prefix,
    suggest_model,
)


@pytest.fixture(scope="module")
def ldn() -> nn.Module:
    return create_model("ldn121", num_classes=12)


@pytest.fixture(scope="module")
def ldn_state(ldn) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in ldn.state_dict().items()}


def assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    torch.testing.assert_close(model.state_dict(), state, rtol=0, atol=0)


def test_extract_state_dict_layouts():
    sd = {"a.weight": torch.zeros(2), "a.bias": torch.ones(2)}
    assert extract_state_dict(sd) == sd
    for key in ("state_dict", "model", "model_state", "model_state_dict"):
        assert extract_state_dict({key: sd, "epoch": 3}) == sd
    assert extract_state_dict({"checkpoint_meta": 1, "model": {"state_dict": sd}}) == sd
    assert extract_state_dict(nn.Linear(2, 2)).keys() == {"weight", "bias"}


def test_split_checkpoint_returns_metadata_of_the_training_engine_format():
    sd = {"a.weight": torch.zeros(2)}
    obj = {"format": "densehybrid", "model": sd, "model_name": "ldn121", "epoch": 4, "optimizer": {"state": {}}}
    state, metadata = split_checkpoint(obj)
    assert state == sd
    assert metadata == {"format": "densehybrid", "model_name": "ldn121", "epoch": 4, "optimizer": {"state": {}}}


@pytest.mark.parametrize("obj", [{"epoch": 3, "lr": 0.1}, [torch.zeros(1)], {"model": {}}])
def test_extract_state_dict_without_weights_raises(obj):
    with pytest.raises(CheckpointError, match="Expected the checkpoint to hold a state dict"):
        extract_state_dict(obj)


def test_strip_prefix():
    sd = {"module.conv.weight": torch.zeros(1), "module.conv.bias": torch.zeros(1)}
    assert set(strip_prefix(sd)) == {"conv.weight", "conv.bias"}
    assert set(strip_prefix({"module._orig_mod.module.x": torch.zeros(1)})) == {"x"}
    # Only a prefix shared by every key is a wrapper's; a submodule that happens to be called `module` stays.
    mixed = {"module.x": torch.zeros(1), "head.y": torch.zeros(1)}
    assert strip_prefix(mixed) == mixed
    assert set(strip_prefix({"backbone.x": torch.zeros(1)}, "backbone.")) == {"x"}


@pytest.mark.parametrize(
    ("wrap", "expected_metadata"),
    [
        (lambda sd: sd, {}),
        (lambda sd: {f"module.{k}": v for k, v in sd.items()}, {}),
        (lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 7}, {"epoch": 7}),
        (lambda sd: {"model": sd, "model_name": "ldn121"}, {"model_name": "ldn121"}),
        (lambda sd: {"model_state": {f"_orig_mod.{k}": v for k, v in sd.items()}, "epoch": 7}, {"epoch": 7}),
    ],
    ids=["raw", "DataParallel", "state_dict+DataParallel", "engine", "model_state+compile"],
)
def test_load_checkpoint_accepts_released_layouts(ldn, ldn_state, tmp_path, wrap, expected_metadata):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(ldn_state), path)
    with torch.no_grad():
        for p in ldn.parameters():
            p.zero_()
    metadata = load_checkpoint(ldn, path)
    assert_loaded(ldn, ldn_state)
    assert metadata == expected_metadata


def test_load_checkpoint_safetensors(ldn, ldn_state, tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in ldn_state.items()}, str(tmp_path / "ckpt.safetensors"))
    assert load_checkpoint(ldn, tmp_path / "ckpt.safetensors") == {}
    assert_loaded(ldn, ldn_state)


def test_wrong_architecture_lists_keys_and_suggests_the_right_model(ldn_state, tmp_path):
    torch.save({"model": ldn_state}, tmp_path / "ldn.pt")
    segmenter = create_model("segmenter_vit_ti16", num_classes=12, image_size=32)
    before = {k: v.clone() for k, v in segmenter.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(segmenter, tmp_path / "ldn.pt")
    message = str(info.value)
    n_model, n_file = len(before), len(ldn_state)
    shared = len(before.keys() & ldn_state.keys())  # the dataset-posterior head
    assert f"missing keys ({n_model - shared}): encoder.cls_token, encoder.pos_embed" in message
    assert f"unexpected keys ({n_file - shared}): backbone.features.conv0.weight" in message
    assert f"({n_file - shared - 10} more)" in message  # only the first 10 are listed
    assert "registered model 'ldn121'" in message and "create_model('ldn121', num_classes=12)" in message
    # Nothing was copied into the model.
    torch.testing.assert_close(segmenter.state_dict(), before, rtol=0, atol=0)


def test_suggestion_uses_shapes_to_pick_the_vit_size(tmp_path):
    state = create_model("segmenter_vit_s16", num_classes=5, image_size=32).state_dict()
    assert suggest_model(state) == ("segmenter_vit_s16", 1.0)  # the ViT sizes share every name; shapes decide
    torch.save(state, tmp_path / "s16.pt")
    tiny = create_model("segmenter_vit_ti16", num_classes=5, image_size=32)
    with pytest.raises(CheckpointError, match=r"fit the registered model 'segmenter_vit_s16' best") as info:
        load_checkpoint(tiny, tmp_path / "s16.pt")
    assert "0 missing, 0 unexpected and" in str(info.value)


def test_closed_set_checkpoint_hint_and_non_strict_load(ldn, ldn_state, tmp_path):
    closed = {k: v for k, v in ldn_state.items() if not k.startswith("logits_ood.")}
    torch.save({"state_dict": closed, "epoch": 1}, tmp_path / "closed.pt")
    with pytest.raises(CheckpointError, match="closed-set checkpoint without the dataset-posterior head") as info:
        load_checkpoint(ldn, tmp_path / "closed.pt")
    assert "missing keys (7): logits_ood.norm.weight" in str(info.value)
    head_before = ldn.logits_ood.conv.weight.detach().clone()
    with pytest.warns(UserWarning, match="7 missing"):
        metadata = load_checkpoint(ldn, tmp_path / "closed.pt", strict=False)
    assert metadata == {"epoch": 1}
    torch.testing.assert_close(ldn.backbone.features.conv0.weight, closed["backbone.features.conv0.weight"])
    torch.testing.assert_close(ldn.logits_ood.conv.weight, head_before)


def test_other_num_classes_is_named(ldn_state, tmp_path):
    torch.save(ldn_state, tmp_path / "k12.pt")
    model = create_model("ldn121", num_classes=19)
    with pytest.raises(CheckpointError, match="num_classes=12") as info:
        load_checkpoint(model, tmp_path / "k12.pt", strict=False)  # shape mismatches raise even when not strict
    assert "logits.conv.weight: checkpoint (12, 128, 1, 1) vs model (19, 128, 1, 1)" in str(info.value)


class _Opaque:
    """A pickled Python object a weights-only load refuses."""


def test_weights_only_refusal_explains_the_remedy(ldn, ldn_state, tmp_path):
    torch.save({"state_dict": ldn_state, "args": _Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="weights-only") as info:
        load_checkpoint(ldn, tmp_path / "pickled.pt")
    assert "_Opaque" in str(info.value) and "weights_only=False" not in str(info.value)
    assert "\n" not in str(info.value)  # one line, not torch's multi-line advice


class _RunsCode:
    """Unpickling this object creates a marker file (what a hostile checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# -- one rule for reading weight files: weights-only everywhere, not configurable --------------------------------------
def test_weight_files_run_no_code_whatever_the_caller_asks(ldn_state, tmp_path):
    marker = tmp_path / "executed"
    torch.save({"state_dict": ldn_state, "payload": _RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(TypeError):
        read_checkpoint_file(tmp_path / "evil.pt", weights_only=False)  # the reader has no such switch
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint_file(tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only"):  # no model entry point can be asked to unpickle
        create_model("deeplabv3plus_wrn38", num_classes=2, pretrained=tmp_path / "evil.pt", weights_only=False)
    assert not marker.exists()


def test_numpy_scalars_in_released_metadata_load_weights_only(ldn, ldn_state, tmp_path):
    import numpy as np

    torch.save({"state_dict": ldn_state, "epoch": np.int64(3), "miou": np.float64(0.5)}, tmp_path / "nvidia.pt")
    metadata = load_checkpoint(ldn, tmp_path / "nvidia.pt")
    assert int(metadata["epoch"]) == 3 and float(metadata["miou"]) == 0.5


def test_metadata_cannot_choose_how_a_file_is_read(tmp_path):
    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16)
    kwargs = {"num_classes": 3, "decoder_channels": 16, "weights_only": False}
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": kwargs}, tmp_path / "m.pt")
    rebuilt, metadata = model_from_checkpoint(read_checkpoint_file(tmp_path / "m.pt"), tmp_path / "m.pt")
    assert "weights_only" not in metadata["model_kwargs"] and rebuilt.model_kwargs["decoder_channels"] == 16


def test_unknown_model_arguments_are_a_clear_value_error():
    with pytest.raises(ValueError, match="Expected arguments of model 'ladder_mobilenetv3'.*'colour'"):
        create_model("ladder_mobilenetv3", num_classes=3, colour=2)


def test_unreadable_files(ldn, tmp_path):
    with pytest.raises(CheckpointError, match="to be an existing file"):
        load_checkpoint(ldn, tmp_path / "absent.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="Cannot read checkpoint"):
        load_checkpoint(ldn, tmp_path / "garbage.pt")


def test_huge_recorded_model_arguments_are_refused_before_allocation(tmp_path, monkeypatch):
    import densehybrid.models.registry as registry

    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16)
    kwargs = {"num_classes": 3, "decoder_channels": 2048}
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": kwargs}, tmp_path / "m.pt")
    real, built = registry.create_model, []

    def recording(*args, **kw):  # every real (non-meta) build is recorded
        result = real(*args, **kw)
        if next(result.parameters()).device.type != "meta":
            built.append(kw)
        return result

    monkeypatch.setattr(registry, "create_model", recording)
    with pytest.raises(CheckpointError, match=r"records \(\{'decoder_channels': 2048\}\): they do not fit its weights"):
        model_from_checkpoint(read_checkpoint_file(tmp_path / "m.pt"), tmp_path / "m.pt")
    assert built == []  # the check ran on the meta device: nothing of that size was allocated

"""Every registered model (``list_models()``, adapters of other libraries included): forward and backward at a small
size, finite outputs, logits in train and eval mode, a state-dict round trip through a file, and export parity
(TorchScript for all, ONNX where the exporter can).

A model added to the registry is covered here without a line of its own; only models that need small settings to
be fast, or that the ONNX exporter cannot express, are named below.
"""

from __future__ import annotations

import pytest
import torch

from densehybrid.errors import DenseHybridError
from densehybrid.export import check_parity, export_model
from densehybrid.models import create_model, list_models, load_checkpoint
from densehybrid.models.output import output_fields
from densehybrid.scores import default_score

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3
#: (N, H, W) of every forward; the parity check adds a second size and aspect ratio, batch of two.
SIZE = (1, 64, 96)
PARITY_SIZES = (SIZE, (2, 96, 64))
#: Settings that make a model small enough for these tests (any other name is built with its defaults).
SMALL = {
    "ladder_resnet18": {"decoder_channels": 16},
    "ladder_mobilenetv3": {"decoder_channels": 16},
    "ladder_efficientnet_lite0": {"decoder_channels": 16, "pretrained": False},
    "segmenter_vit_ti16": {"image_size": 64},
    "segmenter_vit_s16": {"image_size": 64},
    "segmenter_vit_b16": {"image_size": 64},
    "dicnet": {"teacher": "ladder_mobilenetv3", "decoder_channels": 8},
}
#: The official architectures of 50-140 M parameters: still run in CI, marked slow.
BIG = {"deeplabv3plus_wrn38", "segmenter_vit_b16", "dicnet_pspnet", "deeplabv3_resnet50"}
#: Models the TorchScript-based ONNX exporter cannot express, and why (their export must fail with a clear error).
NO_ONNX = {
    "dicnet": "the student's pyramid pooling to fixed bins (adaptive_avg_pool2d of a dynamic input)",
    "dicnet_pspnet": "the PSPNet and student pyramid pooling to fixed bins (adaptive_avg_pool2d of a dynamic input)",
}
#: Exported in both formats, with parity, by a dedicated test (about 550 MB per file; not repeated here).
EXPORTED_ELSEWHERE = {"deeplabv3plus_wrn38": "tests/test_export.py::test_export_deeplabv3plus_wrn38"}


def _marks(name: str) -> list:
    return [pytest.mark.slow] if name in BIG else []


MODELS = [pytest.param(name, marks=_marks(name), id=name) for name in list_models()]


def _model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, num_classes=K, **SMALL.get(name, {}))


def _images(n: int = SIZE[0], h: int = SIZE[1], w: int = SIZE[2], seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _dense_fields(out) -> dict[str, torch.Tensor]:
    return {name: value for name, value in out._asdict().items() if isinstance(value, torch.Tensor)}


def test_every_registered_model_is_covered():
    names = list_models()
    assert names and {param.values[0] for param in MODELS} == set(names)
    assert set(SMALL) | BIG | set(NO_ONNX) | set(EXPORTED_ELSEWHERE) <= set(names)  # no stale entries


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_finite_logits_in_every_mode(name):
    model = _model(name).train()
    images = _images(n=2)
    out = model(images)
    assert type(out)._fields == output_fields(model)
    for field, value in _dense_fields(out).items():
        assert torch.isfinite(value).all(), f"{name}: `{field}` is not finite in train mode"
    assert out.logits.shape == (2, K, *SIZE[1:])
    loss = sum(value.float().square().mean() for value in _dense_fields(out).values())
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads), f"{name}: no parameter received a gradient"
    assert all(g is None or torch.isfinite(g).all() for g in grads)

    model.eval()
    with torch.no_grad():
        first, again = model(images), model(images)
        resized = model(images, output_size=(32, 48))
    assert first.logits.shape == (2, K, *SIZE[1:]) and resized.logits.shape == (2, K, 32, 48)
    torch.testing.assert_close(first.logits, again.logits)  # eval mode is deterministic
    for field, value in _dense_fields(first).items():
        assert torch.isfinite(value).all(), f"{name}: `{field}` is not finite in eval mode"
    # logits, not probabilities: no eval-mode output is a distribution over its channels
    for field in ("logits", "ood_logits"):
        value = getattr(first, field, None)
        if value is not None:
            simplex = (value >= 0).all() and (value <= 1).all() and torch.allclose(value.sum(1), torch.ones(1))
            assert not simplex, f"{name}: eval-mode `{field}` holds probabilities, not logits"


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip_through_a_file(name, tmp_path):
    model = _model(name, seed=0).eval()
    path = tmp_path / f"{name}.pt"
    torch.save({"model": model.state_dict()}, path)
    other = _model(name, seed=1).eval()
    load_checkpoint(other, path, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), f"{name}: {key} differs after the round trip"
    images = _images()
    with torch.no_grad():
        for a, b in zip(_dense_fields(model(images)).values(), _dense_fields(other(images)).values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


EXPORTS = [
    pytest.param(name, fmt, marks=_marks(name), id=f"{name}-{fmt}")
    for name in list_models()
    if name not in EXPORTED_ELSEWHERE
    for fmt in ("torchscript", "onnx")
]


@pytest.mark.parametrize(("name", "fmt"), EXPORTS)
def test_export_parity(name, fmt, tmp_path):
    model = _model(name).eval()
    score = default_score(output_fields(model))
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "onnx" and name in NO_ONNX:
        with pytest.raises(DenseHybridError, match=f"Cannot export {name} to onnx"):
            export_model(model, path, fmt, score=score, example_size=SIZE)
        assert not path.exists()
        return
    export_model(model, path, fmt, score=score, example_size=SIZE)
    report = check_parity(model, path, fmt, score=score, sizes=PARITY_SIZES)
    assert report.passed, report.lines()
    assert not model.training  # the export leaves the model's mode as it was


def test_export_entries_name_real_tests():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for where in EXPORTED_ELSEWHERE.values():
        file, test = where.split("::")
        assert f"def {test}(" in (root.parent / file).read_text(), where

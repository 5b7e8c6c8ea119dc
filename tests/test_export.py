"""``densehybrid export``: ONNX and TorchScript files reproduce eager PyTorch for the light model, LDN-121 and
DeepLabV3+ WRN38 at small inputs."""

from __future__ import annotations

import json
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from densehybrid.cli import main
from densehybrid.errors import DenseHybridError
from densehybrid.export import (
    ExportGraph,
    check_parity,
    eager_reference,
    export_model,
    load_exported,
    require_onnx,
)
from densehybrid.models import create_model
from densehybrid.models.hybrid import aspect_pool
from densehybrid.openset import OpenSetModel
from densehybrid.predict import CALIBRATION_KEY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("h", "w"), [(5, 9), (2, 3), (7, 4), (1, 1), (3, 13), (8, 8)])
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
def test_traced_aspect_pool_matches_adaptive_average_pooling_at_every_size(h, w, rows):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the Python-level checks it freezes
        traced = torch.jit.trace(lambda x: aspect_pool(x, rows), torch.randn(1, 3, 6, 10, dtype=torch.float64))
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    cols = max(1, round(rows * (w / h)))
    torch.testing.assert_close(traced(x), F.adaptive_avg_pool2d(x, (rows, cols)))
    torch.testing.assert_close(aspect_pool(x, rows), F.adaptive_avg_pool2d(x, (rows, cols)))


def _median_threshold(model, size=(1, 3, 96, 160)) -> float:
    scores, _, _ = eager_reference(model, torch.rand(*size, generator=torch.Generator().manual_seed(1)))
    return float(scores.median())


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize(
    ("name", "kwargs"), [("ladder_mobilenetv3", {"decoder_channels": 16}), ("ldn121", {})], ids=["light", "ldn121"]
)
def test_export_reproduces_pytorch(tmp_path, name, kwargs, fmt):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, **kwargs).eval()
    threshold = _median_threshold(model)  # half the pixels unknown: the label comparison means something
    path = export_model(model, tmp_path / f"m.{fmt}", fmt, threshold=threshold)
    report = check_parity(model, path, fmt, threshold=threshold)
    assert report.passed, report.lines()
    assert max(report.relative_error) <= 1e-4 and report.label_mismatches == [0, 0]
    # the dynamic shapes really are dynamic: a third size and aspect ratio, batch of three
    images = torch.rand(3, 3, 72, 200, generator=torch.Generator().manual_seed(2))
    scores, labels, closed = load_exported(path, fmt)(images.numpy())
    reference, expected, _ = eager_reference(model, images, threshold=threshold)
    assert scores.shape == (3, 72, 200) and labels.dtype == np.int64
    assert ((closed == labels) | (labels == 5)).all() and (closed < 5).all()
    assert np.abs(scores - reference.numpy()).max() <= 1e-4 * np.abs(reference.numpy()).max()
    near = np.abs(reference.numpy() - threshold) <= 1e-4 * np.abs(reference.numpy()).max()
    assert ((labels == expected.numpy()) | near).all() and (labels == 5).any() and (labels < 5).any()


@pytest.mark.slow
def test_export_deeplabv3plus_wrn38(tmp_path):
    torch.manual_seed(0)
    model = create_model("deeplabv3plus_wrn38", num_classes=19).eval()
    threshold = _median_threshold(model, (1, 3, 64, 96))
    for fmt in ("onnx", "torchscript"):
        path = export_model(model, tmp_path / f"wrn38.{fmt}", fmt, threshold=threshold, example_size=(1, 64, 96))
        report = check_parity(model, path, fmt, threshold=threshold, sizes=((1, 64, 96), (2, 80, 48)))
        assert report.passed, report.lines()
        path.unlink()  # about 550 MB each


def test_parity_check_detects_a_wrong_file(tmp_path):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16).eval()

    class Shifted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.graph = ExportGraph(OpenSetModel(model))

        def forward(self, images):
            scores, labels, closed = self.graph(images)
            return scores * 1.01, labels, closed

    with pytest.warns(Warning):
        torch.jit.save(torch.jit.trace(Shifted(), torch.rand(1, 3, 64, 96), check_trace=False), tmp_path / "bad.pt")
    report = check_parity(model, tmp_path / "bad.pt", "torchscript", sizes=((1, 64, 96),))
    assert not report.passed and report.relative_error[0] > 1e-3 and "FAILED" in report.lines()[0]


def test_missing_onnxruntime_gets_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(DenseHybridError, match=r"densehybrid\[export\]"):
        require_onnx()


def test_cli_export_bakes_in_the_calibrated_threshold(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=4, decoder_channels=16).eval()
    threshold = _median_threshold(model)
    calibration = {"score": "densehybrid", "threshold": threshold, "display_range": [threshold - 1, threshold + 1]}
    checkpoint = tmp_path / "calibrated.pt"
    torch.save(
        {
            "model": model.state_dict(),
            "model_name": model.model_name,
            "model_kwargs": model.model_kwargs,
            CALIBRATION_KEY: calibration,
        },
        checkpoint,
    )
    out = tmp_path / "model.onnx"
    code = main(["export", "--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "parity onnx vs PyTorch eager: passed" in printed and "(checkpoint)" in printed
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["densehybrid.threshold"] == threshold and props["densehybrid.unknown_label"] == 4
    images = torch.rand(1, 3, 64, 64)
    _, labels, _ = load_exported(out, "onnx")(images.numpy())
    _, expected, _ = eager_reference(model, images, threshold=threshold)
    assert (labels == expected.numpy()).mean() > 0.99 and (labels == 4).any()

    code = main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(checkpoint)])
    assert code == 1 and "differ" in capsys.readouterr().err


@pytest.fixture
def small_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=4, decoder_channels=16).eval()
    path = tmp_path / "m.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path


def _export(checkpoint, out, *extra):
    return main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out), *extra])


def _no_model_work(monkeypatch):
    import densehybrid.models.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(densehybrid.models.checkpoint, "read_checkpoint_file", refuse)


def test_cli_export_an_existing_out_needs_overwrite(small_checkpoint, tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.ts"
    out.write_text("an earlier export")
    with monkeypatch.context() as patch:
        _no_model_work(patch)
        assert _export(small_checkpoint, out, "--no-parity") == 1
        err = capsys.readouterr().err
        assert "--overwrite" in err and "Traceback" not in err and out.read_text() == "an earlier export"
    assert _export(small_checkpoint, out, "--no-parity", "--overwrite") == 0
    scores, *_ = load_exported(out, "torchscript")(np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32))
    assert scores.shape == (1, 32, 32) and not list(tmp_path.glob("*.tmp"))
    before = small_checkpoint.read_bytes()
    assert _export(small_checkpoint, small_checkpoint, "--overwrite") == 1  # the checkpoint never
    assert "differ from the inputs" in capsys.readouterr().err and small_checkpoint.read_bytes() == before


def test_cli_export_out_below_a_file_is_refused_before_the_checkpoint_is_read(
    small_checkpoint, tmp_path, capsys, monkeypatch
):
    (tmp_path / "results").write_text("a file")
    _no_model_work(monkeypatch)
    assert _export(small_checkpoint, tmp_path / "results" / "model.ts") == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err


def test_cli_export_of_a_nan_model_names_the_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=4, decoder_channels=16)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    bad = tmp_path / "diverged.pt"
    torch.save({"model": state, "model_name": model.model_name, "model_kwargs": model.model_kwargs}, bad)
    assert _export(bad, tmp_path / "model.ts", "--no-parity") == 1
    err = capsys.readouterr().err
    assert "diverged.pt" in err and "NaN" in err and not (tmp_path / "model.ts").exists()

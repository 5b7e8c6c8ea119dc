"""The Predictor and ``densehybrid predict`` end to end on generated images, good and bad."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from densehybrid.cli import main
from densehybrid.data.datasets._io import read_rgb
from densehybrid.models import HybridOutput, create_model
from densehybrid.predict import (
    OUT_OF_DOMAIN_FRACTION,
    PredictionResult,
    Predictor,
    _atomic_write,
    class_labels,
    colour_bar_panel,
    legend_panel,
    out_of_domain,
    predict_files,
    render_heatmap,
    render_segmentation,
    tile_spans,
)
from densehybrid.report.figures import UNKNOWN_COLOUR
from densehybrid.scores import compute_score
from densehybrid.scores import densehybrid as densehybrid_score

pytestmark = pytest.mark.usefixtures("one_thread")


class Pointwise(nn.Module):
    """A model whose outputs at a pixel depend on that pixel only: tiling must not change them. Records input sizes."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Conv2d(3, num_classes, 1)
        self.ood = nn.Conv2d(3, 2, 1)
        self.num_classes = num_classes
        self.seen: list[tuple[int, int]] = []

    def forward(self, images, output_size=None):
        self.seen.append(tuple(images.shape[-2:]))
        logits, ood = self.head(images * 4), self.ood(images * 4)
        if output_size is not None and tuple(output_size) != tuple(images.shape[-2:]):
            logits = nn.functional.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
            ood = nn.functional.interpolate(ood, size=output_size, mode="bilinear", align_corners=False)
        return HybridOutput(logits, ood)


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=4, decoder_channels=16).eval()
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path, model


def test_tile_spans_partition_the_axis():
    for length, tile, overlap in [(100, 100, 8), (300, 128, 32), (257, 64, 0), (1000, 96, 64), (65, 64, 63)]:
        spans = tile_spans(length, tile, overlap)
        kept = [(a, b) for _, a, b in spans]
        assert kept[0][0] == 0 and kept[-1][1] == length
        assert all(kept[i][1] == kept[i + 1][0] for i in range(len(kept) - 1))
        for start, a, b in spans:
            assert start <= a < b <= start + min(tile, length)  # kept part inside its tile
            assert start + min(tile, length) <= length


def test_tiling_reproduces_the_full_image_for_a_pointwise_model():
    model = Pointwise()
    image = _rgb(150, 230)
    full = Predictor(model, threshold=0.0, device="cpu").predict(image)
    model.seen.clear()
    tiled = Predictor(model, threshold=0.0, device="cpu", max_pixels=64 * 80, tile_overlap=16).predict(image)
    assert len(model.seen) > 1 and all(h * w <= 64 * 80 for h, w in model.seen)
    np.testing.assert_allclose(tiled.scores, full.scores, rtol=0, atol=1e-5)
    assert (tiled.labels == full.labels).all()


def test_predict_accepts_paths_pil_arrays_and_tensors(tmp_path, checkpoint):
    path, model = checkpoint
    predictor = Predictor.from_checkpoint(path, device="cpu", threshold=-2.5)
    rgb = _rgb(40, 56)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    results = [
        predictor.predict(tmp_path / "x.png"),
        predictor.predict(Image.fromarray(rgb)),
        predictor.predict(rgb),
        predictor.predict(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255),
    ]
    with torch.no_grad():
        out = model(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255)
    expected = densehybrid_score(out.logits, out.ood_logits)[0].numpy()
    for result in results:
        assert result.scores.shape == (40, 56) and result.threshold == -2.5
        np.testing.assert_allclose(result.scores, expected, atol=1e-5)
        assert ((result.labels == 4) == (result.scores > -2.5)).all()
        closed = out.logits[0].argmax(0).numpy()
        assert (result.labels[result.labels < 4] == closed[result.labels < 4]).all()


def test_input_scale_keeps_the_image_size():
    result = Predictor(Pointwise(), device="cpu", input_scale=0.5).predict(_rgb(64, 96))
    assert result.scores.shape == (64, 96) and result.threshold is None and (result.labels < 3).all()


def _write_mixed_folder(folder):
    """Every case of a real photo collection: modes, bit depths, EXIF, and files that cannot be read."""
    folder.mkdir()
    Image.fromarray(_rgb(48, 64, 1)).save(folder / "good.png")
    Image.fromarray(_rgb(48, 64, 2)[:, :, 0]).save(folder / "gray.png")
    Image.fromarray((np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)).save(folder / "gray16.png")
    Image.fromarray(_rgb(48, 64, 3)).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([_rgb(48, 64, 4), np.full((48, 64), 128, np.uint8)])).save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: stored 64 wide and 48 high, shown 48 wide and 64 high
    (folder / "sub").mkdir()
    Image.fromarray(_rgb(48, 64, 5)).save(folder / "sub" / "exif.jpg", exif=exif)
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    os.symlink(folder / "missing-target.png", folder / "broken.png")
    (folder / "readme.txt").write_text("ignored: not an image suffix")


def test_predict_folder_with_good_and_bad_files(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    _write_mixed_folder(tmp_path / "in")
    out = tmp_path / "out"
    code = main(
        ["predict", "--checkpoint", str(path), str(tmp_path / "in"), str(tmp_path / "nope.png"), "--out", str(out)]
        + ["--threshold", "-2.5", "--display-range", "-4", "-1", "--save-raw", "--num-workers", "0", "--no-progress"]
    )
    captured = capsys.readouterr()
    assert code == 1  # some inputs were skipped
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 5
    for name in ("nope.png", "truncated.png", "empty.png", "notes.png", "broken.png"):
        assert sum(name in line for line in skipped) == 1
    assert "empty file" in next(line for line in skipped if "empty.png" in line)
    assert "predicted 6 image(s), skipped 5" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_images"] == 6 and summary["num_failed"] == 5 and summary["threshold"] == -2.5
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 6
    by_name = {os.path.basename(r["input"]): r for r in records}
    assert (by_name["exif.jpg"]["width"], by_name["exif.jpg"]["height"]) == (48, 64)  # EXIF orientation applied
    for name, record in by_name.items():
        stem = out / (f"sub/{name[:-4]}" if name == "exif.jpg" else name[:-4])
        scores = np.load(f"{stem}_scores.npy")
        labels = np.asarray(Image.open(f"{stem}_labels.png"))
        heatmap = np.asarray(Image.open(f"{stem}_heatmap.png"))
        segmentation = np.asarray(Image.open(f"{stem}_segmentation.png"))
        assert scores.dtype == np.float32 and scores.shape == (record["height"], record["width"])
        height, width = scores.shape
        assert ((labels == 4) == (scores > -2.5)).all()  # unknown = K in the raw label map
        assert (segmentation[:height][labels == 4] == UNKNOWN_COLOUR).all()
        np.testing.assert_array_equal(heatmap[:height], render_heatmap(scores, (-4.0, -1.0)))  # one fixed scale
        # the colour bar under the heatmap, the legend (no class names in the checkpoint: "class i") under the map
        np.testing.assert_array_equal(heatmap[height:], colour_bar_panel(width, (-4.0, -1.0), -2.5, "densehybrid"))
        palette = Predictor.from_checkpoint(path, device="cpu").palette
        np.testing.assert_array_equal(segmentation[height:], legend_panel(width, [], palette))
        assert record["out_of_domain"] == (record["anomalous_fraction"] > 0.5)
        assert record["anomalous_fraction"] == pytest.approx(float((labels == 4).mean()))
        assert record["max_score"] == pytest.approx(float(scores.max()))
        assert Image.open(f"{stem}_overlay.png").size == (record["width"], record["height"])
    assert not list(out.rglob("*.tmp"))  # every write was atomic


def test_strict_stops_at_the_first_bad_file(tmp_path, checkpoint):
    path, _ = checkpoint
    _write_mixed_folder(tmp_path / "in")
    code = main(
        ["predict", "--checkpoint", str(path), str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--strict"]
        + ["--num-workers", "0", "--no-progress"]
    )
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert code == 1 and summary["stopped_at_first_failure"] and summary["num_failed"] == 1
    assert summary["num_images"] < 6


def test_an_output_that_would_overwrite_an_input_is_refused(tmp_path, checkpoint):
    path, _ = checkpoint
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(_rgb(32, 48, 1)).save(folder / "a.png")
    Image.fromarray(_rgb(32, 48, 2)).save(folder / "a_heatmap.png")
    before = (folder / "a_heatmap.png").read_bytes()
    predictor = Predictor.from_checkpoint(path, device="cpu")
    lines = []
    summary = predict_files(predictor, [folder], folder, progress=False, report=lines.append)
    assert summary.num_images == 1 and len(summary.failures) == 1
    assert "would overwrite the input" in lines[0] and "a.png" in lines[0]
    assert (folder / "a_heatmap.png").read_bytes() == before
    assert (folder / "a_heatmap_heatmap.png").exists()


def test_heatmaps_share_one_scale_without_calibration(tmp_path, checkpoint):
    path, _ = checkpoint
    for i in range(3):
        Image.fromarray(_rgb(32 + 8 * i, 40, i)).save(tmp_path / f"{i}.png")
    predictor = Predictor.from_checkpoint(path, device="cpu")
    summary = predict_files(
        predictor, [str(tmp_path / "*.png")], tmp_path / "out", save_raw=True, batch_size=2, progress=False
    )
    assert summary.num_images == 3 and "first image" in summary.display_range_source
    first = np.load(tmp_path / "out" / "0_scores.npy")
    assert summary.display_range == pytest.approx(tuple(np.percentile(first, (1, 99))))
    for i in range(3):
        scores = np.load(tmp_path / "out" / f"{i}_scores.npy")
        heatmap = np.asarray(Image.open(tmp_path / "out" / f"{i}_heatmap.png"))
        np.testing.assert_array_equal(heatmap[: scores.shape[0]], render_heatmap(scores, summary.display_range))
        labels = np.asarray(Image.open(tmp_path / "out" / f"{i}_labels.png"))
        assert labels.max() < 4  # no threshold: closed-set labels only
        single = predictor.predict(read_rgb(tmp_path / f"{i}.png"))
        np.testing.assert_allclose(scores, single.scores, atol=1e-5)  # batching does not change results


def test_num_workers_and_batches_of_mixed_sizes(tmp_path, checkpoint):
    path, _ = checkpoint
    for i, (h, w) in enumerate([(32, 40), (40, 32), (32, 40)]):
        Image.fromarray(_rgb(h, w, i)).save(tmp_path / f"{i}.png")
    predictor = Predictor.from_checkpoint(path, device="cpu", threshold=-2.5)
    summary = predict_files(predictor, [tmp_path], tmp_path / "out", batch_size=3, num_workers=1, progress=False)
    assert summary.num_images == 3 and not summary.failures


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        _atomic_write(target, failing)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]


def test_no_legend_keeps_the_input_size(tmp_path, checkpoint):
    path, _ = checkpoint
    Image.fromarray(_rgb(32, 40, 1)).save(tmp_path / "a.png")
    predictor = Predictor.from_checkpoint(path, device="cpu", threshold=-2.5)
    predict_files(predictor, [tmp_path / "a.png"], tmp_path / "out", save_raw=True, progress=False, legend=False)
    scores = np.load(tmp_path / "out" / "a_scores.npy")
    heatmap = np.asarray(Image.open(tmp_path / "out" / "a_heatmap.png"))
    np.testing.assert_array_equal(heatmap, render_heatmap(scores, predictor.display_range or heatmap_range(scores)))
    assert Image.open(tmp_path / "out" / "a_segmentation.png").size == (40, 32)


def heatmap_range(scores):
    return tuple(float(v) for v in np.percentile(scores, (1, 99)))


def test_legend_shows_the_class_names_of_the_metadata(tmp_path):
    """The names drawn come from the checkpoint's metadata (else "class i"); other names draw other pixels."""
    from densehybrid.models.checkpoint import checkpoint_dict, write_checkpoint

    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=3, decoder_channels=16).eval()
    names = ["road", "wall", "sky"]
    path = tmp_path / "named.pt"
    write_checkpoint(checkpoint_dict(model, class_names=names), path)
    predictor = Predictor.from_checkpoint(path, device="cpu", threshold=0.0)
    assert predictor.class_names == names
    Image.fromarray(_rgb(40, 160, 1)).save(tmp_path / "a.png")
    predict_files(predictor, [tmp_path / "a.png"], tmp_path / "out", progress=False)
    segmentation = np.asarray(Image.open(tmp_path / "out" / "a_segmentation.png"))
    assert segmentation.shape[0] > 40  # the legend is drawn below the map
    np.testing.assert_array_equal(segmentation[40:], legend_panel(160, names, predictor.palette))
    unnamed = legend_panel(160, [], predictor.palette)
    assert class_labels([], 3) == ["class 0", "class 1", "class 2"]
    assert class_labels(names, 3) == names and class_labels(names[:2], 3) == ["class 0", "class 1", "class 2"]
    # a calibration without names (e.g. from data without classes.txt) keeps the checkpoint's names
    from densehybrid.predict import Calibration

    calibration = Calibration(score="densehybrid", threshold=0.0, display_range=(-1.0, 1.0))
    calibrated = checkpoint_dict(model, class_names=names, calibration=calibration.to_dict())
    write_checkpoint(calibrated, tmp_path / "calibrated.pt")
    assert Predictor.from_checkpoint(tmp_path / "calibrated.pt", device="cpu").class_names == names
    other = legend_panel(160, ["lane", "pole", "tree"], predictor.palette)
    assert not np.array_equal(segmentation[40:], unnamed) and not np.array_equal(segmentation[40:], other)
    # every class colour and the unknown colour appear as swatches
    panel = segmentation[40:].reshape(-1, 3)
    for colour in [*predictor.palette, UNKNOWN_COLOUR]:
        assert (panel == colour).all(axis=1).any()


def test_colour_bar_shows_the_scale_and_marks_the_threshold():
    width = 300
    bar = colour_bar_panel(width, (-5.0, 0.0), -2.5, "densehybrid")
    assert bar.shape[1] == width and bar.shape[0] > 10 and bar.dtype == np.uint8
    lut = render_heatmap(np.linspace(-5.0, 0.0, 256)[None], (-5.0, 0.0))[0]
    for end in (lut[0], lut[-1]):  # both ends of the colour scale are drawn
        assert (bar.reshape(-1, 3) == end).all(axis=1).any()
    marker = (bar == UNKNOWN_COLOUR).all(axis=2)  # the threshold marker, in the unknown colour
    columns = np.flatnonzero(marker.any(axis=0))
    assert columns.size and abs(columns.mean() - width / 2) < width * 0.05  # -2.5 is mid-scale
    low = np.flatnonzero((colour_bar_panel(width, (-5.0, 0.0), -4.0, "densehybrid") == UNKNOWN_COLOUR).all(2).any(0))
    assert low.mean() < columns.mean() - width * 0.2  # a lower threshold sits further left
    assert not (colour_bar_panel(width, (-5.0, 0.0), None, "densehybrid") == UNKNOWN_COLOUR).all(axis=2).any()
    off = (colour_bar_panel(width, (-5.0, 0.0), -9.0, "densehybrid") == UNKNOWN_COLOUR).all(axis=2).any(axis=0)
    assert np.flatnonzero(off).mean() < width * 0.1  # off the scale: marked at its end
    assert not np.array_equal(bar, colour_bar_panel(width, (-5.0, 1.0), -2.5, "densehybrid"))  # labels follow range


def _result_with_unknown(fraction_pixels: int, total: int = 100) -> PredictionResult:
    labels = np.zeros((1, total), dtype=np.int64)
    labels[0, :fraction_pixels] = 3
    scores = np.zeros((1, total), dtype=np.float32)
    return PredictionResult(scores, labels, labels.clip(max=2), threshold=0.5, num_classes=3)


def test_out_of_domain_note_above_half_unknown(tmp_path, checkpoint, capsys):
    assert OUT_OF_DOMAIN_FRACTION == 0.5
    assert not out_of_domain(_result_with_unknown(50))  # exactly half: no note
    assert out_of_domain(_result_with_unknown(51))
    assert not out_of_domain(PredictionResult(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2)), None, 3))
    path, _ = checkpoint
    Image.fromarray(_rgb(32, 40, 1)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(32, 40, 2)).save(tmp_path / "b.png")
    scores = Predictor.from_checkpoint(path, device="cpu").predict(read_rgb(tmp_path / "a.png")).scores
    median = float(np.median(scores))
    # a threshold just below the median marks slightly more than half of a.png unknown
    threshold = float(np.sort(scores.ravel())[scores.size // 2 - 2])
    code = main(
        ["predict", "--checkpoint", str(path), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
        + ["--threshold", repr(threshold), "--num-workers", "0", "--no-progress"]
    )
    captured = capsys.readouterr()
    assert code == 0 and median > threshold
    record = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    assert record["anomalous_fraction"] > 0.5 and record["out_of_domain"] and "training domain" in record["note"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["out_of_domain"] == [str(tmp_path / "a.png")]
    assert "a.png" in captured.err and "outside the model's training domain" in captured.err
    assert "may be outside the model's training domain" in captured.out
    # a threshold above the median: less than half unknown, no note anywhere
    code = main(
        ["predict", "--checkpoint", str(path), str(tmp_path / "b.png"), "--out", str(tmp_path / "out2")]
        + ["--threshold", repr(float(scores.max())), "--num-workers", "0", "--no-progress"]
    )
    captured = capsys.readouterr()
    record = json.loads((tmp_path / "out2" / "predictions.jsonl").read_text())
    assert not record["out_of_domain"] and record["note"] is None
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["out_of_domain"] == []
    assert "training domain" not in captured.out + captured.err


def test_render_segmentation_marks_unknown_in_cyan():
    palette = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8)
    colours = render_segmentation(np.array([[0, 1, 2]]), palette)
    assert (colours[0, 0] == palette[0]).all() and (colours[0, 2] == UNKNOWN_COLOUR).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is about a missing GPU")
def test_unknown_device_is_a_clear_error(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    code = main(["predict", "--checkpoint", str(path), str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert code == 1 and "CUDA" in capsys.readouterr().err


def test_predict_on_the_demo_checkpoint(tmp_path):
    """A demo stage's checkpoint (the training loop's file, e.g. OUT/finetune/last.pt) predicts as is."""
    from densehybrid.data.roadscene import ROADSCENE_CLASSES
    from densehybrid.engine.train import TrainConfig, training_checkpoint
    from densehybrid.models.checkpoint import write_checkpoint

    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=10)
    optimizer = torch.optim.Adam(model.parameters())
    metadata = {"method": "densehybrid", "class_names": list(ROADSCENE_CLASSES)}
    state = training_checkpoint(
        model, optimizer, TrainConfig(), "densehybrid", 1, 0, 5, torch.Generator(), [], None, metadata
    )
    write_checkpoint(state, tmp_path / "densehybrid.pt")
    Image.fromarray(_rgb(64, 128)).save(tmp_path / "photo.jpg")
    out = tmp_path / "predictions"
    code = main(
        ["predict", "--checkpoint", str(tmp_path / "densehybrid.pt"), str(tmp_path / "photo.jpg"), "--out", str(out)]
        + ["--num-workers", "0", "--no-progress"]
    )
    assert code == 0
    assert Image.open(out / "photo_overlay.png").size == (128, 64)
    for kind in ("heatmap", "segmentation"):  # the colour bar and the legend lie below the map
        width, height = Image.open(out / f"photo_{kind}.png").size
        assert width == 128 and height > 64


@pytest.mark.parametrize("command", ["predict", "calibrate", "export"])
def test_help_documents_every_option(command, capsys):
    from densehybrid.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices[command]
    assert all(action.help for action in sub._actions if action.dest != "help")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--checkpoint" in capsys.readouterr().out


def _no_model_work(monkeypatch):
    """Make reading any checkpoint fail loudly: a refusal must come before it."""
    import densehybrid.calibrate
    import densehybrid.models.checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the outputs were checked")

    monkeypatch.setattr(densehybrid.models.checkpoint, "read_checkpoint_file", refuse)
    monkeypatch.setattr(densehybrid.calibrate, "read_checkpoint", refuse)


def _predict(path, out, *inputs, extra=()):
    return main(
        ["predict", "--checkpoint", str(path), *map(str, inputs), "--out", str(out), "--num-workers", "0"]
        + ["--no-progress", *extra]
    )


def test_earlier_results_need_overwrite_which_replaces_them(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    for name, seed in (("a", 1), ("b", 2)):
        Image.fromarray(_rgb(24, 32, seed)).save(tmp_path / f"{name}.png")
    out = tmp_path / "out"
    assert _predict(path, out, tmp_path / "a.png", tmp_path / "b.png") == 0
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    assert _predict(path, out, tmp_path / "a.png", tmp_path / "b.png") == 1  # an earlier run's results are kept
    err = capsys.readouterr().err
    assert "--overwrite" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # an interrupted run (no summary yet) left an image's outputs: they are results too
    (out / "summary.json").unlink()
    (out / "predictions.jsonl").unlink()
    assert _predict(path, out, tmp_path / "a.png") == 1 and "a_heatmap.png" in capsys.readouterr().err

    # --overwrite: no folder to delete by hand; b's outputs of the earlier run go, the user's file stays
    assert _predict(path, out, tmp_path / "b.png", extra=["--overwrite"]) == 0
    capsys.readouterr()
    assert _predict(path, out, tmp_path / "a.png", extra=["--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_heatmap.png", "a_overlay.png", "a_segmentation.png", "notes.txt", "predictions.jsonl"] + [
        "summary.json"
    ]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["outputs"] for r in records] == [["a_heatmap.png", "a_segmentation.png", "a_overlay.png"]]
    assert json.loads((out / "summary.json").read_text())["num_images"] == 1
    assert not list(out.rglob("*.tmp"))


def test_predict_files_refuses_an_earlier_result_and_an_input_as_output(tmp_path, checkpoint):
    from densehybrid.errors import OutputError

    path, _ = checkpoint
    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    predictor = Predictor.from_checkpoint(path, device="cpu")
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    with pytest.raises(OutputError, match="--overwrite"):
        predict_files(predictor, [tmp_path / "a.png"], out, progress=False)
    assert predict_files(predictor, [tmp_path / "a.png"], out, progress=False, overwrite=True).num_images == 1
    with pytest.raises(OutputError, match="destroy|input"):
        predict_files(predictor, [tmp_path / "a.png"], tmp_path, progress=False, read_files=[tmp_path], overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        predict_files(predictor, [tmp_path / "a.png"], tmp_path / "a.png", progress=False)


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_out_that_is_a_file_is_refused_before_the_checkpoint_is_read(tmp_path, checkpoint, capsys, monkeypatch, where):
    path, _ = checkpoint
    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    _no_model_work(monkeypatch)
    out = blocker if where == "file" else blocker / "sub"
    assert _predict(path, out, tmp_path / "a.png", extra=["--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err and "results" in err
    assert blocker.read_text() == "a file, not a folder"


def test_nan_outputs_name_the_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("ladder_mobilenetv3", num_classes=4, decoder_channels=16)
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    bad = tmp_path / "diverged.pt"
    torch.save({"model": state, "model_name": model.model_name, "model_kwargs": model.model_kwargs}, bad)
    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    assert _predict(bad, tmp_path / "out", tmp_path / "a.png") == 1
    err = capsys.readouterr().err
    assert "diverged.pt" in err and "NaN" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "summary.json").exists()


def test_predict_runs_a_dicnet_checkpoint_with_its_own_score(tmp_path, capsys):
    from densehybrid.predict import Predictor

    torch.manual_seed(0)
    model = create_model("dicnet", num_classes=3, teacher="ladder_mobilenetv3", decoder_channels=8).eval()
    path = tmp_path / "dicnet.pt"
    torch.save({"model": model.state_dict(), "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    predictor = Predictor.from_checkpoint(path, device="cpu")
    assert predictor.score == "dicnet"
    image = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    result = predictor.predict(image)
    with torch.no_grad():
        expected = compute_score("dicnet", model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255))[0]
    assert result.scores.shape == (48, 64)
    np.testing.assert_allclose(result.scores, expected.numpy(), rtol=1e-5, atol=1e-6)
    # a score the model cannot give is one clear message
    with pytest.raises(ValueError, match="dataset-posterior logits"):
        Predictor.from_checkpoint(path, device="cpu", score="densehybrid")
    # and the command writes its outputs for it
    Image.fromarray(image).save(tmp_path / "photo.png")
    code = main(["predict", "--checkpoint", str(path), str(tmp_path / "photo.png"), "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "o" / "predictions.jsonl").read_text().splitlines()[0])["input"].endswith("photo.png")


@pytest.mark.parametrize(("fmt", "suffix"), [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_predict_on_an_exported_graph_equals_predict_on_the_checkpoint(tmp_path, checkpoint, fmt, suffix, capsys):
    from densehybrid.export import PARITY_TOLERANCE

    path, model = checkpoint
    threshold = float(np.median(Predictor(model, device="cpu").predict(_rgb(48, 64, 0)).scores))  # half unknown
    folder = tmp_path / "images"
    folder.mkdir()
    for i, (h, w) in enumerate([(48, 64), (40, 56)]):
        Image.fromarray(_rgb(h, w, i)).save(folder / f"{i}.png")
    graph = tmp_path / f"model{suffix}"
    export = ["export", "--checkpoint", str(path), "--format", fmt, "--threshold", str(threshold), "--out", str(graph)]
    assert main([*export, "--no-parity"]) == 0
    common = [str(folder), "--save-raw", "--num-workers", "0", "--no-progress", "--display-range", "-5", "0"]
    assert (
        main(
            ["predict", "--checkpoint", str(path), "--threshold", str(threshold), "--out", str(tmp_path / "a"), *common]
        )
        == 0
    )
    assert main(["predict", "--checkpoint", str(graph), "--out", str(tmp_path / "b"), *common]) == 0
    printed = capsys.readouterr().out
    assert ("ONNX Runtime" if fmt == "onnx" else "TorchScript") in printed and "exported file" in printed
    for i in range(2):
        eager = np.load(tmp_path / "a" / f"{i}_scores.npy")
        exported = np.load(tmp_path / "b" / f"{i}_scores.npy")
        assert np.abs(exported - eager).max() <= PARITY_TOLERANCE * np.abs(eager).max()
        labels_a = np.asarray(Image.open(tmp_path / "a" / f"{i}_labels.png"))
        labels_b = np.asarray(Image.open(tmp_path / "b" / f"{i}_labels.png"))
        near = np.abs(eager - threshold) <= PARITY_TOLERANCE * np.abs(eager).max()
        assert ((labels_a == labels_b) | near).all() and (labels_a == 4).any() and (labels_a < 4).any()
    # the graph's threshold is baked in: another one is refused with the remedy
    assert main(["predict", "--checkpoint", str(graph), "--threshold", "0", "--out", str(tmp_path / "c"), *common]) == 1
    assert "Export again with --threshold" in capsys.readouterr().err


def test_read_ahead_keeps_order_passes_errors_on_and_stops_early():
    from densehybrid.predict.run import _read_ahead

    assert list(_read_ahead(iter(range(7)))) == list(range(7))

    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(_read_ahead(failing()))
    reader = _read_ahead(iter(range(100)), depth=2)
    assert next(reader) == 0
    reader.close()  # the reader thread is blocked on a full buffer: closing must not hang


# ---- input validation of Predictor.predict (dtype, value range, shape), one message per bad input ----------------


@pytest.mark.parametrize(
    ("kind", "make", "found"),
    [
        ("float 0..255", lambda rgb: rgb.astype(np.float32), "[0, 255]"),
        ("negative float", lambda rgb: rgb.astype(np.float32) / 255.0 - 0.5, "normalised"),
        ("int32 tensor", lambda rgb: torch.from_numpy(rgb.astype(np.int32)).permute(2, 0, 1), "int32"),
        ("int64 array", lambda rgb: rgb.astype(np.int64), "int64"),
        ("NaN", lambda rgb: np.full(rgb.shape, np.nan, np.float32), "NaN"),
        ("two channels", lambda rgb: rgb[:, :, :2], "(24, 32, 2)"),
        ("no pixels", lambda rgb: rgb[:0], "32x0"),
        ("(H, W, 3) tensor", lambda rgb: torch.from_numpy(rgb), "(24, 32, 3)"),
    ],
)
def test_predict_refuses_images_it_would_misread_instead_of_a_silently_wrong_fraction(kind, make, found):
    predictor = Predictor(Pointwise(), threshold=0.0, device="cpu")
    with pytest.raises((ValueError, TypeError)) as info:
        predictor.predict(make(_rgb(24, 32)))
    message = str(info.value)
    assert message.startswith("Expected `image`") and found in message and "\n" not in message


def test_predict_gives_one_result_for_uint8_and_float_images_of_the_documented_range():
    predictor = Predictor(Pointwise(), threshold=0.0, device="cpu")
    rgb = _rgb(24, 32)
    reference = predictor.predict(rgb)
    for image in (rgb.astype(np.float64) / 255.0, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0):
        np.testing.assert_allclose(predictor.predict(image).scores, reference.scores, atol=1e-5)
    with pytest.raises(ValueError, match=r"`images` to hold float values in \[0, 1\]"):
        predictor.predict_tensor(torch.full((1, 3, 8, 8), 2.0))


def test_palette_value_of_300_is_a_clear_error(tmp_path, checkpoint, capsys):
    with pytest.raises(ValueError, match=r"integer colour values in 0\.\.255, but row 1 \(class 1\) is \[0, 300, 0\]"):
        Predictor(Pointwise(), device="cpu", palette=[[0, 0, 0], [0, 300, 0], [0, 0, 0]])
    path, model = checkpoint
    bad = tmp_path / "palette.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "palette": [[300, 0, 0]] + [[0, 0, 0]] * 3}, bad)
    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    assert _predict(bad, tmp_path / "out", tmp_path / "a.png") == 1
    err = capsys.readouterr().err
    assert "palette of checkpoint" in err and "0..255" in err and "Internal error" not in err


@pytest.mark.parametrize(
    ("scale", "size", "found"), [(0.001, 32, "at least 1 px per side"), (1000.0, 320, "fit in memory")]
)
def test_input_scale_without_pixels_or_beyond_memory_is_refused_before_the_model_runs(scale, size, found):
    model = Pointwise()
    predictor = Predictor(model, threshold=0.0, device="cpu", input_scale=scale)
    with pytest.raises(Exception, match=found):  # 1000 x a 320x240 image: about 2.5 TB of maps
        predictor.predict(_rgb(size * 3 // 4, size))
    assert model.seen == []


# ---- bounds of the command's options, checked before any work ---------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "found"),
    [("--num-workers", "24", "CPU cores available"), ("--input-scale", "1000", "(0, 4]")],
)
def test_num_workers_and_input_scale_beyond_the_machine_are_refused_before_work(
    tmp_path, checkpoint, capsys, monkeypatch, option, value, found
):
    import densehybrid.engine.resources

    monkeypatch.setattr(densehybrid.engine.resources, "usable_cpu_count", lambda: 2)
    _no_model_work(monkeypatch)
    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    argv = ["predict", "--checkpoint", str(checkpoint[0]), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as info:
        main([*argv, option, value])
    assert info.value.code == 2 and found in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_image_the_input_scale_leaves_without_pixels_is_one_skipped_line(tmp_path, checkpoint, capsys):
    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    Image.fromarray(_rgb(480, 640)).save(tmp_path / "b.png")
    argv = (tmp_path / "a.png", tmp_path / "b.png")
    assert _predict(checkpoint[0], tmp_path / "out", *argv, extra=["--input-scale", "0.01"]) == 1
    captured = capsys.readouterr()
    assert "skipped" in captured.err and "Expected `input_scale` 0.01 to leave at least 1 px per side" in captured.err
    assert "Internal error" not in captured.err and "predicted 1 image(s), skipped 1" in captured.out


def test_a_symlink_loop_among_the_inputs_is_one_skipped_line_not_a_crash(tmp_path, checkpoint, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_rgb(24, 32)).save(folder / "good.png")
    os.symlink("b.png", folder / "a.png")
    os.symlink("a.png", folder / "b.png")
    os.symlink("c.png", tmp_path / "c.png")
    assert _predict(checkpoint[0], tmp_path / "out", folder, tmp_path / "c.png") == 1
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 3 and all("symbolic link loop" in line for line in skipped)
    assert "predicted 1 image(s), skipped 3" in captured.out and (tmp_path / "out" / "good_overlay.png").is_file()


# ---- one run per --out, a record that grows per image, --overwrite and --resume after an interrupted run ----------


def test_a_second_predict_into_a_locked_out_is_refused_and_a_stale_lock_taken_over(tmp_path, checkpoint, capsys):
    import socket
    import subprocess
    import sys

    Image.fromarray(_rgb(24, 32)).save(tmp_path / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".densehybrid.lock").write_text(f"{owner.pid} {socket.gethostname()}\n")
        assert _predict(checkpoint[0], out, tmp_path / "a.png") == 1
        err = capsys.readouterr().err
        assert f"process {owner.pid}" in err and "Internal error" not in err
        assert not (out / "predictions.jsonl").exists() and not (out / "a_overlay.png").exists()
    finally:
        owner.kill()
        owner.wait()
    assert _predict(checkpoint[0], out, tmp_path / "a.png") == 0  # the owner is gone: its lock is stale
    assert not (out / ".densehybrid.lock").exists() and (out / "a_overlay.png").is_file()


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after the raise runs, no handler catches it."""


def _interrupt_at(monkeypatch, image: str, kind: str):
    """Stop the run while it writes ``image``'s ``kind`` file (the files written before it stay)."""
    import densehybrid.predict.writing as writing

    original = writing.write_png

    def write_png(path, array):
        if path.name == f"{image}_{kind}.png":
            raise _Killed()
        original(path, array)

    monkeypatch.setattr(writing, "write_png", write_png)


def _four_images(folder):
    folder.mkdir()
    for i in range(4):
        Image.fromarray(_rgb(24, 32, seed=i)).save(folder / f"im{i}.png")


def test_a_killed_predict_leaves_a_record_of_every_finished_image_and_overwrite_leaves_no_unrecorded_output(
    tmp_path, checkpoint, monkeypatch
):
    images, out = tmp_path / "in", tmp_path / "out"
    _four_images(images)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "im2", "overlay")
        with pytest.raises(_Killed):
            _predict(checkpoint[0], out, images)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {str(images / "im0.png"), str(images / "im1.png")} <= {r["input"] for r in records}
    assert str(images / "im2.png") not in {r["input"] for r in records}
    assert all((out / name).is_file() for r in records for name in r["outputs"])
    assert (out / "im2_heatmap.png").is_file() and not (out / "summary.json").exists()  # written, not yet recorded

    assert _predict(checkpoint[0], out, images / "im0.png", extra=["--overwrite"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["im0_heatmap.png", "im0_overlay.png", "im0_segmentation.png", "predictions.jsonl", "summary.json"]


def test_resume_skips_the_finished_images_and_gives_the_outputs_of_an_uninterrupted_run(
    tmp_path, checkpoint, monkeypatch, capsys
):
    images = tmp_path / "in"
    _four_images(images)
    assert _predict(checkpoint[0], tmp_path / "whole", images) == 0
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "im2", "segmentation")
        with pytest.raises(_Killed):
            _predict(checkpoint[0], tmp_path / "out", images)
    assert _predict(checkpoint[0], tmp_path / "out", images) == 1  # neither --resume nor --overwrite: refused
    assert "--resume" in capsys.readouterr().err
    finished = len((tmp_path / "out" / "predictions.jsonl").read_text().splitlines())
    assert 2 <= finished < 4  # im0 and im1, and im3 when the writer reached it before the run stopped
    seen = []
    original = Predictor.predict_batch
    monkeypatch.setattr(Predictor, "predict_batch", lambda self, batch: seen.append(1) or original(self, batch))
    assert _predict(checkpoint[0], tmp_path / "out", images, extra=["--resume"]) == 0
    assert len(seen) == 4 - finished and f"{finished} image(s) done by the resumed run kept" in capsys.readouterr().out
    whole = {p.name: p.read_bytes() for p in (tmp_path / "whole").iterdir() if p.suffix == ".png"}
    resumed = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.suffix == ".png"}
    assert resumed == whole
    lines = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (tmp_path / "whole" / "predictions.jsonl").read_text().splitlines()]
    assert [{**r, "seconds": 0} for r in lines] == [{**r, "seconds": 0} for r in reference]
    assert sorted(p.name for p in (tmp_path / "out").glob(".*")) == []


# ---- predict under torchrun: 2 processes on gloo give the outputs of 1 process ----------------------------------


def _torchrun_predict(*args: str, status: int = 0) -> None:
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo / "src"), str(repo)]), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "densehybrid", "predict", *args, "--num-workers", "0", "--no-progress"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == status, done.stderr.decode()[-3000:]


def _folder(out) -> dict[str, bytes]:
    """Every file of a prediction folder; ``predictions.jsonl`` without the timings."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name not in ("predictions.jsonl", "summary.json")}
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    files["predictions.jsonl"] = json.dumps([{**line, "seconds": None} for line in lines]).encode()
    return files


def test_two_processes_under_torchrun_write_the_outputs_of_one_and_resume_a_one_process_run(
    tmp_path, checkpoint, monkeypatch
):
    images = tmp_path / "in"
    images.mkdir()
    for i in range(5):  # not a multiple of 2 processes; one of them unreadable (skipped, the exit status is 1)
        Image.fromarray(_rgb(24, 32, seed=i)).save(images / f"im{i}.png")
    (images / "im3.png").write_bytes(b"not an image")
    path = checkpoint[0]
    assert _predict(path, tmp_path / "one", images, extra=["--save-raw"]) == 1  # 1: an input was skipped
    _torchrun_predict("--checkpoint", str(path), str(images), "--out", str(tmp_path / "two"), "--save-raw", status=1)
    assert _folder(tmp_path / "two") == _folder(tmp_path / "one")
    one, two = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two"))
    assert two["num_images"] == one["num_images"] == 4 and two["failures"] == one["failures"]
    assert [f["input"] for f in two["failures"]] == [str(images / "im3.png")] and two["num_resumed"] == 0

    # a one-process run killed after im1 is resumed by two processes: the finished images are kept
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "im2", "heatmap")
        with pytest.raises(_Killed):
            _predict(path, tmp_path / "resumed", images, extra=["--save-raw"])
    finished = len((tmp_path / "resumed" / "predictions.jsonl").read_text().splitlines())
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("im0_*")}
    _torchrun_predict(
        "--checkpoint", str(path), str(images), "--out", str(tmp_path / "resumed"), "--save-raw", "--resume", status=1
    )  # fmt: skip
    assert _folder(tmp_path / "resumed") == _folder(tmp_path / "one")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "resumed").glob("im0_*")} == before
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert summary["num_resumed"] == finished and summary["num_images"] == 4 - finished


def test_resume_continues_what_a_killed_two_process_run_left_in_one_process(tmp_path, checkpoint):
    import shutil

    images = tmp_path / "in"
    _four_images(images)
    Image.fromarray(_rgb(24, 32, seed=4)).save(images / "im4.png")
    whole = tmp_path / "whole"
    assert _predict(checkpoint[0], whole, images) == 0
    lines = {json.loads(line)["input"]: line for line in (whole / "predictions.jsonl").read_text().splitlines()}
    # what 2 ranks leave when killed: rank 0 finished im0 and im1 (of im0-im2), rank 1 im3 (of im3-im4) and was
    # writing im4 (its heatmap is written, its record is not)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("im0", "im1", "im3"):
        for kind in ("heatmap", "segmentation", "overlay"):
            shutil.copy(whole / f"{name}_{kind}.png", out)
    shutil.copy(whole / "im4_heatmap.png", out)
    (out / ".predictions.rank-0.jsonl").write_text(
        lines[str(images / "im0.png")] + "\n" + lines[str(images / "im1.png")] + "\n"
    )
    (out / ".predictions.rank-1.jsonl").write_text(lines[str(images / "im3.png")] + "\n" + '{"input": "cut by the kil')
    pending = {"input": str(images / "im4.png"), "outputs": json.loads(lines[str(images / "im4.png")])["outputs"]}
    (out / ".predictions.pending.rank-1.jsonl").write_text(json.dumps(pending) + "\n")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("im[013]_*")}

    assert _predict(checkpoint[0], out, images, extra=["--resume"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("im[013]_*")} == before  # kept, not predicted again
    assert _folder(out) == _folder(whole) and sorted(p.name for p in out.glob(".*")) == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_resumed"] == 3 and summary["num_images"] == 2

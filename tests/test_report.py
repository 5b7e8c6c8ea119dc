"""Tests of densehybrid.report: exact curves against scikit-learn, the metric table, and the written report."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn import metrics as skm

from densehybrid.report import Example, ReportData, ScoreSample, curves, format_table, write_report
from densehybrid.report.figures import colorize, family_masks, normalize_for_display

NAN = float("nan")
CLASS_NAMES = ["road", "car", "sky"]
PALETTE = np.array([[128, 64, 128], [0, 0, 142], [70, 130, 180]], dtype=np.uint8)
SCORE_NAMES = ("densehybrid", "discriminative", "generative")


def _sample(rng: np.random.Generator, shift: float, n: int = 400) -> ScoreSample:
    labels = (rng.random(n) < 0.2).astype(np.int64)
    family = rng.integers(1, 3, n)
    scores = rng.normal(size=n) + shift * labels
    return ScoreSample(scores, labels, family)


def _example(rng: np.random.Generator, title: str) -> Example:
    height, width = 12, 20
    target = rng.integers(0, 3, (height, width))
    target[3:6, 4:9] = 3
    target[0] = 255
    prediction = np.where(target == 255, 0, target)
    score = rng.normal(size=(height, width))
    score[3:6, 4:9] += 4.0
    score[0, 0] = np.inf
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Example(image, target, prediction, score, title)


def _rows() -> list[dict]:
    rows = []
    values = {"densehybrid": (0.61, 0.12, 0.97), "discriminative": (0.42, 0.30, 0.91), "generative": (0.55, NAN, 0.93)}
    for name, (ap, fpr, auc) in values.items():
        for family, offset in (("real", 0.0), ("procedural", 0.05), ("all", 0.02)):
            rows.append(
                {"model": "tiny", "score": name, "family": family, "ap": ap + offset, "fpr95": fpr, "auroc": auc}
            )
    return rows


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[ReportData, dict[str, Path]]:
    rng = np.random.default_rng(0)
    data = ReportData(
        title="Tiny report",
        command="densehybrid demo --steps 3",
        rows=_rows(),
        segmentation={
            "closed_miou": 0.71,
            "open_miou": 0.62,
            "anomaly_iou": NAN,
            "threshold": -3.25,
            "threshold_tpr": 0.95,
            "per_class_iou": dict(zip(CLASS_NAMES, [0.9, 0.8, 0.7])),
            "per_class_open_iou": dict(zip(CLASS_NAMES, [0.85, 0.7, NAN])),
        },
        class_names=CLASS_NAMES,
        palette=PALETTE,
        samples={name: _sample(rng, shift) for name, shift in zip(SCORE_NAMES, (2.0, 1.0, 1.5))},
        examples=[_example(rng, "first"), _example(rng, "second")],
        config={"steps": 3, "size": (12, 20)},
        timings={"train": 1.5, "evaluate": NAN},
        notes=["a note with a | pipe"],
        family_names={1: "real", 2: "procedural"},
    )
    return data, write_report(data, tmp_path_factory.mktemp("report"))


# ------------------------------------------------------------------------------------------------------------ curves


@pytest.mark.parametrize("seed", range(6))
def test_curves_match_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    # Odd seeds use few distinct values so that ties are frequent.
    scores = rng.integers(0, 6, n).astype(float) if seed % 2 else rng.normal(size=n)
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    fpr, tpr, thresholds = curves.roc_curve(scores, labels)
    ref_fpr, ref_tpr, ref_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
    np.testing.assert_allclose(thresholds[1:], ref_thr[1:])
    precision, recall, pr_thr = curves.precision_recall_curve(scores, labels)
    ref_p, ref_r, ref_pr_thr = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, ref_p)
    np.testing.assert_allclose(recall, ref_r)
    np.testing.assert_allclose(pr_thr, ref_pr_thr)
    assert curves.average_precision(scores, labels) == pytest.approx(skm.average_precision_score(labels, scores))
    assert curves.auroc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))
    first = int(np.searchsorted(ref_tpr, 0.95, side="left"))
    assert curves.fpr_at_tpr(scores, labels) == pytest.approx(ref_fpr[first])


def test_fpr_at_tpr_hits_an_exact_target_and_validates() -> None:
    # 20 anomalies: TPR 0.95 is reached exactly after 19 of them, before the one inlier ranked 20th.
    scores = np.r_[np.arange(40.0, 21.0, -1.0), 20.5, np.arange(20.0, 0.0, -1.0)]
    labels = np.r_[np.ones(19, int), 0, np.ones(1, int), np.zeros(19, int)]
    assert curves.fpr_at_tpr(scores, labels) == 0.0
    assert curves.fpr_at_tpr(scores, labels, tpr=1.0) == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="Expected `tpr` to be a number in"):
        curves.fpr_at_tpr(scores, labels, tpr=1.5)


def test_curves_degenerate_and_bad_input() -> None:
    with pytest.warns(UserWarning, match="no anomaly"):
        assert math.isnan(curves.average_precision(np.array([0.1, 0.2]), np.array([0, 0])))
    with pytest.warns(UserWarning, match="no inlier"):
        assert math.isnan(curves.auroc(np.array([0.1, 0.2]), np.array([1, 1])))
    with pytest.raises(ValueError, match="contain no NaN"):
        curves.auroc(np.array([0.1, NAN]), np.array([0, 1]))
    with pytest.raises(ValueError, match="only 0 \\(inlier\\) and 1 \\(anomaly\\), but got \\[255\\]"):
        curves.auroc(np.array([0.1, 0.2]), np.array([0, 255]))
    # Infinite scores still rank.
    assert curves.auroc(np.array([-np.inf, np.inf]), np.array([0, 1])) == 1.0


# ------------------------------------------------------------------------------------------------------------ table


def test_format_table_header_bold_and_nan() -> None:
    table = format_table(_rows())
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["model", "score", "real AP", "real FPR95", "real AUROC"]
    assert header[-3:] == ["all AP", "all FPR95", "all AUROC"]
    assert len(lines) == 2 + 3
    cells = {line.split("|")[2].strip(): [c.strip() for c in line.strip("|").split("|")] for line in lines[2:]}
    # Best AP of the 'real' column is densehybrid's 61.00; lowest FPR95 is densehybrid's 12.00.
    assert cells["densehybrid"][2] == "**61.00**"
    assert cells["densehybrid"][3] == "**12.00**"
    assert cells["discriminative"][2] == "42.00"
    assert cells["generative"][3] == "n/a"
    assert "**" not in format_table(_rows(), bold=False)


def test_format_table_families_and_missing_values() -> None:
    rows = [{"model": "m", "score": "s", "ap": 0.5, "fpr95": None}]
    table = format_table(rows, families=["all", "real"])
    body = [c.strip() for c in table.splitlines()[2].strip("|").split("|")]
    assert body == ["m", "s", "50.00", "n/a", "n/a", "n/a", "n/a", "n/a"]
    with pytest.raises(ValueError, match="Expected `rows\\[0\\]` to have the keys 'model' and 'score'"):
        format_table([{"model": "m"}])
    with pytest.raises(TypeError, match="Expected `rows` to be a list of dicts"):
        format_table("rows")


# ------------------------------------------------------------------------------------------------------------ figures


def test_display_helpers() -> None:
    score = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, np.inf, -np.inf, 100.0]])
    shown = normalize_for_display(score, percentiles=(0.0, 80.0))
    assert shown.min() == 0.0 and shown.max() == 1.0
    assert shown[1, 1] == 1.0 and shown[1, 2] == 0.0 and shown[1, 3] == 1.0
    np.testing.assert_allclose(shown[0, :3], np.array([0.0, 1.0, 2.0]) / np.percentile([0, 1, 2, 3, 4, 100], 80))
    assert not normalize_for_display(np.full((2, 2), 3.0)).any()
    colours = colorize(np.array([[0, 3], [255, 2]]), PALETTE)
    assert colours[0, 0].tolist() == PALETTE[0].tolist()
    assert colours[0, 1].tolist() == [0, 255, 255]
    assert colours[1, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="Expected label ids in \\[0, 3\\]"):
        colorize(np.array([[4]]), PALETTE)


def test_family_masks_share_unnamed_ids() -> None:
    family = np.array([0, 1, 2, 1, 0])
    panels = dict(family_masks(family, {1: "real", 2: "procedural"}))
    assert list(panels) == ["all", "real", "procedural"]
    assert panels["all"] is None
    assert panels["real"].tolist() == [True, True, False, True, True]
    assert panels["procedural"].tolist() == [True, False, True, False, True]
    assert list(dict(family_masks(family, None))) == ["all", "family 0", "family 1", "family 2"]


# ------------------------------------------------------------------------------------------------------------ report


def test_write_report_writes_every_file(report: tuple[ReportData, dict[str, Path]]) -> None:
    _, paths = report
    assert list(paths) == ["markdown", "html", "json", "roc", "pr", "histograms", "examples"]
    for key in ("roc", "pr", "histograms", "examples"):
        assert paths[key].name == f"{key}.png" and paths[key].parent.name == "figures"
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(path.is_file() and path.stat().st_size > 0 for path in paths.values())


def test_json_round_trips_rows(report: tuple[ReportData, dict[str, Path]]) -> None:
    data, paths = report
    results = json.loads(paths["json"].read_text())
    expected = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in data.rows]
    assert results["rows"] == expected
    assert results["segmentation"]["anomaly_iou"] is None
    assert results["segmentation"]["per_class_iou"] == {"road": 0.9, "car": 0.8, "sky": 0.7}
    assert results["config"] == {"steps": 3, "size": [12, 20]}
    assert results["timings"] == {"train": 1.5, "evaluate": None}
    assert results["family_names"] == {"1": "real", "2": "procedural"}
    assert set(results["samples"]) == set(SCORE_NAMES)
    sample = data.samples["densehybrid"]
    expected_ap = skm.average_precision_score(sample.labels, sample.scores)
    assert results["samples"]["densehybrid"]["ap"] == pytest.approx(expected_ap)
    assert results["figures"]["roc"] == "figures/roc.png"


def test_markdown_content(report: tuple[ReportData, dict[str, Path]]) -> None:
    data, paths = report
    text = paths["markdown"].read_text()
    assert text.startswith("# Tiny report")
    assert data.command in text
    assert format_table(data.rows) in text
    for name in SCORE_NAMES:
        assert name in text
    for key in ("roc", "pr", "histograms", "examples"):
        assert f"(figures/{key}.png)" in text
    assert re.search(r"\| anomaly IoU\s+\|\s+n/a \|", text)
    assert re.search(r"\| sky\s+\|\s+70.00 \|\s+n/a \|", text)
    assert re.search(r"\| evaluate\s+\|\s+n/a \|", text)
    assert "a note with a \\| pipe" in text
    assert "1st-99th" in text  # the heatmap normalisation is stated


def test_html_embeds_every_figure(report: tuple[ReportData, dict[str, Path]]) -> None:
    data, paths = report
    text = paths["html"].read_text()
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == 4
    for key, payload in zip(("roc", "pr", "histograms", "examples"), embedded):
        assert base64.b64decode(payload) == paths[key].read_bytes()
    assert 'src="http' not in text and "<script" not in text
    for name in SCORE_NAMES:
        assert f"<td>{name}</td>" in text
    assert '<td class="num best">61.00</td>' in text
    assert "n/a" in text
    assert "a note with a | pipe" in text


def test_report_without_optional_content(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    # A sample without anomalies must not stop the report: its metrics become n/a.
    samples = {"msp": ScoreSample(rng.normal(size=50), np.zeros(50, dtype=int))}
    data = ReportData("Empty", "", [], {}, CLASS_NAMES, PALETTE, samples, [])
    paths = write_report(data, tmp_path / "out")
    results = json.loads(paths["json"].read_text())
    assert results["rows"] == [] and results["samples"]["msp"]["ap"] is None
    text = paths["markdown"].read_text()
    assert "No metric rows." in text and "No segmentation numbers." in text
    assert re.search(r"\| msp\s+\|\s+50 \|\s+0.00 \|\s+n/a \|", text)


def test_report_input_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    example = _example(rng, "x")
    with pytest.raises(TypeError, match="Expected `image` to be uint8"):
        Example(example.image.astype(np.float32) / 255, example.target, example.prediction, example.score)
    with pytest.raises(ValueError, match="Expected `score` to have shape \\(12, 20\\)"):
        Example(example.image, example.target, example.prediction, example.score[:3])
    with pytest.raises(ValueError, match="Drop ignore pixels"):
        ScoreSample(np.zeros(3), np.array([0, 1, 255]))
    bad = Example(example.image, example.target, np.full_like(example.prediction, 7), example.score)
    with pytest.raises(ValueError, match="Expected `prediction` ids in \\[0, 3\\], but got \\[7\\]"):
        write_report(ReportData("t", "c", [], {}, CLASS_NAMES, PALETTE, {}, [bad]), tmp_path)
    with pytest.raises(ValueError, match="Expected `class_names` to name the 3 palette colours"):
        write_report(ReportData("t", "c", [], {}, ["road"], PALETTE, {}, []), tmp_path)


def test_report_sections_show_tables_and_images(tmp_path: Path) -> None:
    from PIL import Image

    from densehybrid.report import ReportSection

    rng = np.random.default_rng(3)
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    picture = out / "figures" / "grid.png"
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(picture)
    section = ReportSection(
        "Extra part",
        paragraphs=["Some text."],
        tables=[(["score", "family", "AP"], [["msp", "all", "12.50"]])],
        images=[("a grid", picture)],
        label_columns=2,
    )
    samples = {"msp": ScoreSample(rng.normal(size=50), (rng.random(50) < 0.3).astype(int))}
    data = ReportData("Sections", "", [], {}, CLASS_NAMES, PALETTE, samples, [], sections=[section])
    paths = write_report(data, out)
    text = paths["markdown"].read_text()
    assert "## Extra part" in text and "Some text." in text and "![a grid](figures/grid.png)" in text
    assert "| msp   | all    | 12.50 |" in text  # two left-aligned label columns, one numeric column
    assert text.index("## Extra part") < text.index("## Configuration")
    page = paths["html"].read_text()
    encoded = base64.b64encode(picture.read_bytes()).decode("ascii")
    assert "<h2>Extra part</h2>" in page and encoded in page and '<td class="num">12.50</td>' in page

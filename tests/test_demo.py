"""A tiny end-to-end run of the demo pipeline: every stage, the report files and the table's keys."""

from __future__ import annotations

import json

import pytest

from densehybrid.cli import build_parser, main
from densehybrid.demo import FAMILIES, DemoConfig, run_demo
from densehybrid.scores import list_scores

TINY = dict(
    image_size=(48, 96),
    train_images=8,
    val_images=4,
    test_images=4,
    closed_epochs=1,
    finetune_epochs=1,
    batch_size=4,
    negative_size=24,
    num_examples=2,
    device="cpu",
    progress=False,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoConfig.quick(out_dir=out, **TINY), command="densehybrid demo --quick")


def test_demo_writes_every_report_file(tiny_run):
    out, result = tiny_run
    for key in ("markdown", "html", "json", "roc", "pr", "histograms", "examples"):
        assert result.files[key].exists() and result.files[key].stat().st_size > 0, key
    assert (out / "closed_set.pt").exists() and (out / "densehybrid.pt").exists()
    html = result.files["html"].read_text()
    assert html.count("data:image/png;base64,") >= 4


def test_demo_table_has_every_score_and_family(tiny_run):
    _, result = tiny_run
    stored = json.loads(result.files["json"].read_text())
    rows = stored["rows"]
    finetuned = {(r["score"], r["family"]) for r in rows if r["model"] == "densehybrid"}
    families = set(FAMILIES.values()) | {"all"}
    assert finetuned == {(s, f) for s in list_scores() for f in families}
    assert {r["model"] for r in rows} == {"closed-set", "densehybrid"}
    for row in rows:
        assert set(row) >= {"model", "score", "family", "ap", "fpr95", "auroc"}
        for key in ("ap", "fpr95", "auroc"):
            assert row[key] is None or 0.0 <= row[key] <= 1.0
    for key in ("closed_miou", "open_miou", "anomaly_iou", "threshold"):
        assert key in stored["segmentation"]
    assert "densehybrid" in result.table and "procedural AP" in result.table
    assert set(stored["timings"]) >= {"benchmark", "closed-set training", "DenseHybrid fine-tuning", "evaluation"}


def test_demo_rerun_reuses_finished_stages(tiny_run):
    out, first = tiny_run
    again = run_demo(DemoConfig.quick(out_dir=out, **TINY), command="densehybrid demo --quick")
    assert again.threshold == pytest.approx(first.threshold)
    assert again.timings["closed-set training"] < first.timings["closed-set training"]
    assert [r["ap"] for r in again.rows] == pytest.approx([r["ap"] for r in first.rows], nan_ok=True)


def test_demo_help_documents_every_option(capsys):
    parser = build_parser()
    demo = parser._subparsers._group_actions[0].choices["demo"]
    for action in demo._actions:
        if action.dest != "help":
            assert action.help, f"--{action.dest} has no help text"
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for option in ("--quick", "--out", "--device", "--seed", "--closed-epochs", "--finetune-epochs", "--target-tpr"):
        assert option in text


def test_demo_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # a malformed option value is a usage error (exit 2)
        main(["demo", "--quick", "--out", str(tmp_path), "--train-images", "0"])
    assert exc.value.code == 2 and "--train-images" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "--train-images", "2", "--batch-size", "4"]) == 1
    assert "train_images" in capsys.readouterr().err


def test_demo_retrains_a_stage_whose_settings_changed(tiny_run, tmp_path):
    import shutil

    import torch

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run_demo(DemoConfig.quick(**{**TINY, "out_dir": copy, "closed_epochs": 2}), command="densehybrid demo --quick")
    closed = torch.load(copy / "closed_set.pt", weights_only=True)
    assert closed["settings"]["closed_epochs"] == 2 and len(closed["history"]) == 2
    finetuned = torch.load(copy / "densehybrid.pt", weights_only=True)
    assert finetuned["settings"]["closed_epochs"] == 2  # fine-tuning restarted from the new closed-set model

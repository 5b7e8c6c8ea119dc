"""The demo with synthetic and mixed negatives: the flow stage, the joint fine-tuning, the samples grid, the reuse of
finished stages and the three-way comparison of negative sources."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from densehybrid.cli import main
from densehybrid.demo import DemoConfig, run_demo
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
    flow_crop=16,
)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_synthetic")
    config = DemoConfig.quick(out_dir=out, negatives="synthetic", **TINY)
    return out, run_demo(config, command="densehybrid demo --quick --negatives synthetic")


def _finetuned_metrics_are_finite(rows):
    finetuned = [r for r in rows if r["model"] == "densehybrid"]
    assert finetuned
    for row in finetuned:
        for key in ("ap", "fpr95", "auroc"):
            assert row[key] is not None and math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0, (row, key)


def test_synthetic_run_trains_the_flow_and_shows_its_samples(synthetic_run):
    out, result = synthetic_run
    stored = json.loads(result.files["json"].read_text())
    _finetuned_metrics_are_finite(stored["rows"])
    assert stored["negatives"] == "synthetic" and "negatives_comparison" not in stored
    for name in ("closed-set", "flow-pretrain", "finetune-synthetic"):
        assert (out / name / "last.pt").exists(), name
    assert not (out / "finetune").exists()  # the real-negative stage keeps its own folder
    assert (out / "flow-pretrain" / "samples_epoch001.png").exists()
    assert stored["flow_samples"] == {
        "pretrained": "figures/flow_samples_pretrained.png",
        "finetuned_synthetic": "figures/flow_samples_synthetic.png",
    }
    from PIL import Image

    for relative in stored["flow_samples"].values():
        with Image.open(out / relative) as grid:
            assert grid.size[0] > 16 * 4 and grid.size[1] > 16 * 4  # a 4x4 grid of 16x16 samples with padding
    markdown = result.files["markdown"].read_text()
    assert "## Flow samples" in markdown and "](figures/flow_samples_pretrained.png)" in markdown
    assert "](figures/flow_samples_synthetic.png)" in markdown
    html = result.files["html"].read_text()
    assert "<h2>Flow samples</h2>" in html and html.count("data:image/png;base64,") >= 6
    assert {"flow pre-training", "DenseHybrid fine-tuning"} <= set(stored["timings"])
    history = json.loads(json.dumps(__import__("torch").load(out / "finetune-synthetic" / "last.pt")["history"]))
    assert "flow_bpd" in history[0] and "flow_jsd" in history[0]  # the joint iteration's flow step ran


def test_rerun_reuses_the_flow_and_fine_tuning_stages(synthetic_run, capsys):
    out, first = synthetic_run
    config = DemoConfig.quick(out_dir=out, negatives="synthetic", **{**TINY, "progress": True})
    again = run_demo(config, command="densehybrid demo --quick --negatives synthetic")
    banners = capsys.readouterr().err
    assert "== flow pre-training" in banners
    assert f"reused the finished stage {out / 'flow-pretrain' / 'last.pt'}" in banners
    assert f"reused the finished stage {out / 'finetune-synthetic' / 'last.pt'}" in banners
    assert banners.count("reused the finished stage") == 3
    assert again.timings["flow pre-training"] < first.timings["flow pre-training"]
    assert [r["ap"] for r in again.rows] == pytest.approx([r["ap"] for r in first.rows], nan_ok=True)


def test_compare_negatives_with_mixed_main_run(synthetic_run, tmp_path, capsys):
    out, synthetic = synthetic_run
    copy = tmp_path / "compare"
    shutil.copytree(out, copy)
    config = DemoConfig.quick(
        out_dir=copy, negatives="mixed", synthetic_fraction=0.5, compare_negatives=True, **{**TINY, "progress": True}
    )
    result = run_demo(config, command="densehybrid demo --quick --negatives mixed --compare-negatives")
    banners = capsys.readouterr().err
    # one closed-set model for all three fine-tunings, one pre-trained flow for synthetic and mixed
    assert banners.count(f"reused the finished stage {copy / 'closed-set' / 'last.pt'}") == 3
    assert banners.count(f"reused the finished stage {copy / 'flow-pretrain' / 'last.pt'}") == 2
    assert f"reused the finished stage {copy / 'finetune-synthetic' / 'last.pt'}" in banners
    assert "== DenseHybrid fine-tuning with mixed negatives" in banners
    stored = json.loads(result.files["json"].read_text())
    assert stored["negatives"] == "mixed" and stored["synthetic_fraction"] == 0.5
    _finetuned_metrics_are_finite(stored["rows"])
    for name in ("finetune-mixed/last.pt", "finetune/last.pt", "figures/flow_samples_mixed.png"):
        assert (copy / name).exists(), name
    comparison = stored["negatives_comparison"]
    assert comparison["sources"] == ["real", "synthetic", "mixed"]
    assert comparison["rows"]["mixed"] == stored["rows"]  # the main run's rows, unchanged in place
    for source in ("real", "synthetic"):
        _finetuned_metrics_are_finite(comparison["rows"][source])
    reused = [(r["model"], r["score"], r["family"], r["ap"]) for r in comparison["rows"]["synthetic"]]
    assert reused == [(r["model"], r["score"], r["family"], r["ap"]) for r in synthetic.rows]
    assert set(comparison["thresholds_per_seed"]) == {"real", "synthetic", "mixed"}
    markdown = result.files["markdown"].read_text()
    assert "## Negatives compared" in markdown and "mixed (b = 0.5)" in markdown
    header = next(line for line in markdown.splitlines() if line.startswith("| score") and "real AP" in line)
    for column in ("real AP", "real FPR95", "synthetic AP", "synthetic FPR95", "mixed AP", "mixed FPR95"):
        assert column in header
    section = markdown.split("## Negatives compared")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3 * len(list_scores())  # header, every score of the fine-tuned model for each family
    assert "densehybrid" in result.comparison and "synthetic FPR95" in result.comparison
    assert "<h2>Negatives compared</h2>" in result.files["html"].read_text()


def test_default_real_run_is_unchanged_by_the_flow_options(synthetic_run, tmp_path):
    """A real run trains no flow, keeps its file names and rows, and equals the real run of a comparison."""
    out, _ = synthetic_run
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copytree(out / "data", plain / "data")
    shutil.copytree(out / "closed-set", plain / "closed-set")
    result = run_demo(DemoConfig.quick(out_dir=plain, **TINY), command="densehybrid demo --quick")
    assert DemoConfig().negatives == "real"
    assert (plain / "finetune" / "last.pt").exists() and not (plain / "flow-pretrain").exists()
    stored = json.loads(result.files["json"].read_text())
    assert stored["negatives"] == "real" and "negatives_comparison" not in stored and "flow_samples" not in stored
    assert "## Flow samples" not in result.files["markdown"].read_text()
    for row in stored["rows"]:
        assert set(row) == {"model", "score", "family", "ap", "fpr95", "auroc"}
    # the same real fine-tuning inside a comparison, after the synthetic one in the same process
    both = tmp_path / "both"
    shutil.copytree(out, both)
    config = DemoConfig.quick(out_dir=both, negatives="synthetic", compare_negatives=True, **TINY)
    compared = run_demo(config, command="densehybrid demo --quick --negatives synthetic --compare-negatives")
    real_rows = json.loads(compared.files["json"].read_text())["negatives_comparison"]["rows"]["real"]
    assert [r["ap"] for r in real_rows] == pytest.approx([r["ap"] for r in stored["rows"]], nan_ok=True, abs=1e-6)


def test_demo_refuses_bad_negative_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="`negatives`"):
        DemoConfig.quick(out_dir=tmp_path, negatives="fake")
    with pytest.raises(ValueError, match="`synthetic_fraction` in \\[0, 1\\], but got 1.5"):
        DemoConfig.quick(out_dir=tmp_path, negatives="mixed", synthetic_fraction=1.5)
    with pytest.raises(ValueError, match="`flow_crop`"):
        DemoConfig.quick(out_dir=tmp_path, flow_crop=20)
    with pytest.raises(ValueError, match="largest flow patch"):
        DemoConfig.quick(out_dir=tmp_path, negatives="synthetic", image_size=(32, 128), negative_size=40, flow_crop=16)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--quick", "--out", str(tmp_path), "--negatives", "fake"])
    assert exc.value.code == 2 and "--negatives" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "--negatives", "mixed", "--synthetic-fraction", "2"]) == 1
    assert "synthetic_fraction" in capsys.readouterr().err


def test_demo_help_lists_the_negative_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--negatives {real,synthetic,mixed}" in flat and "(default: real)" in flat
    assert "--synthetic-fraction B" in flat and "--compare-negatives" in flat
    assert "--flow-epochs N" in flat and "(default: 3; --quick: 1)" in flat

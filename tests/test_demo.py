"""A tiny end-to-end run of the demo pipeline: every stage, the report files and the table's keys."""

from __future__ import annotations

import json
from dataclasses import replace as dataclasses_replace

import pytest

from densehybrid.cli import build_parser, main
from densehybrid.demo import FAMILIES, DemoConfig, _aggregate, _verdict, run_demo
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
    assert (out / "closed-set" / "last.pt").exists() and (out / "finetune" / "last.pt").exists()
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


def test_demo_report_reads_well(tiny_run):
    out, result = tiny_run
    markdown = result.files["markdown"].read_text()
    assert "closed_miou_before_finetuning" not in markdown and "closed-set mIoU before fine-tuning" in markdown
    assert "| report " in markdown  # the report stage is timed in the report itself
    assert "One training seed: no number in this report carries a spread" in markdown
    assert "One panel per family" not in markdown and "One panel: all anomaly families pooled" in markdown
    stored = json.loads(result.files["json"].read_text())
    assert stored["seeds"] == [0] and set(stored["rows_per_seed"]) == {"0"} and stored["eval_split"] == "test"
    assert "report" in stored["timings"]
    assert not any("_std" in key for row in stored["rows"] for key in row)


def test_demo_rerun_reuses_finished_stages(tiny_run, capsys):
    out, first = tiny_run
    again = run_demo(DemoConfig.quick(out_dir=out, **{**TINY, "progress": True}), command="densehybrid demo --quick")
    banners = capsys.readouterr().err
    assert "== closed-set training" in banners and "== DenseHybrid fine-tuning" in banners and "== report" in banners
    assert banners.count("reused the finished stage") == 2 and "reused the generated benchmark" in banners
    assert again.threshold == pytest.approx(first.threshold)
    assert again.timings["closed-set training"] < first.timings["closed-set training"]
    assert [r["ap"] for r in again.rows] == pytest.approx([r["ap"] for r in first.rows], nan_ok=True)


def test_demo_over_two_seeds_reports_mean_and_spread(tmp_path):
    config = DemoConfig.quick(out_dir=tmp_path, **{**TINY, "seeds": 2, "finetune_epochs": 0})
    result = run_demo(config, command="densehybrid demo --quick --seeds 2")
    stored = json.loads(result.files["json"].read_text())
    assert stored["seeds"] == [0, 1] and set(stored["rows_per_seed"]) == {"0", "1"}
    assert (tmp_path / "closed-set" / "last.pt").exists()
    assert (tmp_path / "seeds" / "seed-1" / "closed-set" / "last.pt").exists()
    assert not (tmp_path / "finetune").exists()  # --finetune-epochs 0: no fine-tuning stage
    per_seed = {
        seed: {(r["model"], r["score"], r["family"]): r for r in rows} for seed, rows in stored["rows_per_seed"].items()
    }
    assert per_seed["0"] != per_seed["1"]  # the second seed trained its own model
    for row in stored["rows"]:
        assert set(row) >= {"model", "score", "family", "ap", "fpr95", "auroc", "ap_std", "fpr95_std", "auroc_std"}
        key = (row["model"], row["score"], row["family"])
        values = [per_seed[s][key]["ap"] for s in ("0", "1")]
        if None not in values:
            assert row["ap"] == pytest.approx(sum(values) / 2)
    assert " ± " in result.table
    assert "mean ± standard deviation over 2 training seeds" in result.files["markdown"].read_text()


def test_aggregate_gives_mean_and_sample_std():
    rows = {
        0: [{"model": "m", "score": "s", "family": "all", "ap": 0.2, "fpr95": 0.5, "auroc": 0.7}],
        1: [{"model": "m", "score": "s", "family": "all", "ap": 0.4, "fpr95": 0.3, "auroc": float("nan")}],
    }
    (row,) = _aggregate(rows)
    assert row["ap"] == pytest.approx(0.3) and row["ap_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert row["fpr95"] == pytest.approx(0.4) and row["auroc"] == pytest.approx(0.7)  # NaN skipped
    assert row["seeds"] == 2
    (single,) = _aggregate({0: rows[0]})
    assert single == rows[0][0]


def test_verdict_compares_with_both_models_and_each_family():
    def row(model, score, family, ap, fpr):
        return {"model": model, "score": score, "family": family, "ap": ap, "fpr95": fpr, "auroc": 0.5}

    rows = [row("densehybrid", "densehybrid", f, 0.5, 0.2) for f in ("all", "real", "procedural")]
    rows += [
        row("densehybrid", c, f, 0.4, 0.3)
        for c in ("discriminative", "generative")
        for f in ("all", "real", "procedural")
    ]
    rows += [row("closed-set", "energy", "all", 0.6, 0.1)]
    lines = _verdict(rows)
    closed = [line for line in lines if "closed-set model" in line and line.startswith("hybrid vs")]
    assert closed == [
        "hybrid vs energy (closed-set model), pooled: AP 50.00 vs 60.00 (not better), FPR95 20.00 vs 10.00 (not better)"
    ]
    assert any(
        line.startswith("hybrid vs generative (fine-tuned model), real:") and "(better)" in line for line in lines
    )
    goals = [line for line in lines if line.startswith("goal")]
    assert goals == [
        "goal, pooled AP: hybrid best by any margin (one seed: no spread): not met (hybrid 50.00, runner-up energy "
        "(closed-set model) 60.00)",
        "goal, pooled FPR95: hybrid best by any margin (one seed: no spread): not met (hybrid 20.00, runner-up energy "
        "(closed-set model) 10.00)",
    ]


def test_verdict_asks_for_a_lead_larger_than_the_runner_ups_spread():
    def row(score, ap, ap_std, fpr, fpr_std):
        base = {"model": "densehybrid", "score": score, "family": "all", "ap": ap, "fpr95": fpr, "auroc": 0.5}
        return base | {"ap_std": ap_std, "fpr95_std": fpr_std}

    hybrid = row("densehybrid", 0.50, 0.01, 0.15, 0.01)
    lines = _verdict([hybrid, row("generative", 0.45, 0.04, 0.17, 0.03), row("entropy", 0.30, 0.01, 0.40, 0.01)])
    # AP: the runner-up (generative) trails by 5 points, more than its std of 4; FPR95: by 2, less than its std of 3
    assert [line.split(":")[1].strip() for line in lines if line.startswith("goal")] == [
        "hybrid best by more than one std of the runner-up",
        "hybrid best by more than one std of the runner-up",
    ]
    ap, fpr = (line for line in lines if line.startswith("goal"))
    assert ": met (hybrid 50.00, runner-up generative (fine-tuned model) 45.00 ± 4.00)" in ap
    assert ": not met (hybrid 15.00, runner-up generative (fine-tuned model) 17.00 ± 3.00)" in fpr


def test_bare_command_prints_help_to_stdout(capsys):
    assert main([]) == 0
    captured = capsys.readouterr()
    assert "usage: densehybrid" in captured.out and "demo" in captured.out and captured.err == ""


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
    assert "--seeds N" in text and "--lambda LAMBDA " in text and "LAMBDA_" not in text
    flat = " ".join(text.split())
    assert "scene size (default: 128x256; --quick: 64x128)" in flat
    assert "(default ladder" not in flat and "(default: ladder_efficientnet_lite0)" in flat


def test_demo_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:  # a malformed option value is a usage error (exit 2)
        main(["demo", "--quick", "--out", str(tmp_path), "--train-images", "0"])
    assert exc.value.code == 2 and "--train-images" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path), "--train-images", "2", "--batch-size", "4"]) == 1
    assert "train_images" in capsys.readouterr().err


def test_demo_refuses_a_stage_of_other_settings_unless_no_resume(tiny_run, tmp_path):
    import shutil

    import torch

    from densehybrid.errors import DenseHybridError

    out, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = (copy / "finetune" / "last.pt").stat().st_mtime_ns
    changed = DemoConfig.quick(**{**TINY, "out_dir": copy, "closed_epochs": 2})
    with pytest.raises(DenseHybridError, match=r"differs in 1 key\(s\): optim.epochs: 1 -> 2.*--no-resume"):
        run_demo(changed, command="densehybrid demo --quick")
    run_demo(dataclasses_replace(changed, resume=False), command="densehybrid demo --quick --no-resume")
    closed = torch.load(copy / "closed-set" / "last.pt", weights_only=True)
    assert closed["recipe"]["optim"]["epochs"] == 2 and len(closed["history"]) == 2
    assert (copy / "finetune" / "last.pt").stat().st_mtime_ns > before  # fine-tuned again from the new model


def test_demo_dicnet_adds_its_rows_and_reuses_its_stage(tiny_run, tmp_path, capsys):
    import math
    import shutil

    import torch

    out, plain = tiny_run
    assert not (out / "dicnet").exists() and "DiCNet distillation" not in plain.timings  # the flag is off
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = DemoConfig.quick(**{**TINY, "out_dir": copy, "dicnet": True, "dicnet_epochs": 1})
    result = run_demo(config, command="densehybrid demo --quick --dicnet")
    stored = json.loads(result.files["json"].read_text())
    dicnet_rows = [r for r in stored["rows"] if r["model"] == "dicnet"]
    assert {(r["score"], r["family"]) for r in dicnet_rows} == {("dicnet", f) for f in (*FAMILIES.values(), "all")}
    for row in dicnet_rows:
        for key in ("ap", "fpr95", "auroc"):
            assert row[key] is not None and math.isfinite(row[key]) and 0.0 <= row[key] <= 1.0
    # the other rows are those of the run without the flag (their stages were reused, evaluation is deterministic)
    others = [r for r in stored["rows"] if r["model"] != "dicnet"]
    assert [(r["model"], r["score"], r["family"]) for r in others] == [
        (r["model"], r["score"], r["family"]) for r in plain.rows
    ]
    assert [r["ap"] for r in others] == pytest.approx([r["ap"] for r in plain.rows], nan_ok=True)
    assert (
        stored["timings"]["DiCNet distillation"] > 0 and "| DiCNet distillation" in result.files["markdown"].read_text()
    )
    assert any(
        line.startswith("hybrid vs dicnet (DiCNet student of the closed-set model), pooled:") for line in result.verdict
    )
    assert "| dicnet " in result.table
    # the demo-dicnet recipe's run; the teacher is the closed-set model, unchanged by the distillation
    finished = torch.load(copy / "dicnet" / "last.pt", weights_only=True)
    assert finished["recipe"]["name"] == "demo-dicnet" and len(finished["history"]) == 1
    closed = torch.load(copy / "closed-set" / "last.pt", weights_only=True)["model"]
    for name, tensor in closed.items():
        assert torch.equal(finished["model"][f"teacher.{name}"], tensor), name
    capsys.readouterr()
    again = run_demo(dataclasses_replace(config, progress=True), command="densehybrid demo --quick --dicnet")
    banners = capsys.readouterr().err
    assert (
        banners.count("reused the finished stage") == 3
        and f"reused the finished stage {copy / 'dicnet' / 'last.pt'}" in banners
    )
    again_rows = [r for r in again.rows if r["model"] == "dicnet"]
    assert [r["ap"] for r in again_rows] == pytest.approx([r["ap"] for r in result.rows if r["model"] == "dicnet"])


def test_demo_dicnet_options_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "--dicnet " in flat and "DiCNet distillation epochs (with --dicnet) (default: 5; --quick: 1)" in flat
    assert DemoConfig().dicnet is False
    with pytest.raises(ValueError, match="dicnet_epochs"):
        DemoConfig.create(dicnet_epochs=0)


def test_demo_options_are_recipe_overrides_of_its_presets():
    config = DemoConfig.create(closed_epochs=7, lr=1e-3, negative_size=40, beta=0.1, batch_size=4)
    assert config.overrides["demo-closed-set"] == ["optim.epochs=7", "optim.lr=0.001", "optim.batch_size=4"]
    assert (
        "negatives.crop=40" in config.overrides["demo-finetune"]
        and "loss.beta=0.1" in config.overrides["demo-finetune"]
    )
    assert "flow.max_side=40" in config.overrides["demo-finetune-flow"]
    assert config.recipe("demo-closed-set")["optim"]["epochs"] == 7 and config.setting("lr") == 1e-3
    assert config.recipe("demo-finetune")["run"]["seed"] == 1  # each stage's seed: the run's seed + its offset
    default = DemoConfig.create()
    assert default.overrides == {} and default.setting("closed_epochs") == 3 and default.setting("finetune_lr") == 1e-3
    assert not {f.name for f in __import__("dataclasses").fields(DemoConfig)} & {"closed_epochs", "lr", "beta"}


def test_a_stage_run_by_hand_gives_the_demos_weights(tmp_path, capsys):
    """`densehybrid train --recipe demo-closed-set --data-root OUT/data` (and the fine-tuning stage) with the
    overrides the demo records: the same parameters as the demo's stages, at --quick size."""
    import shlex

    import torch

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    capsys.readouterr()
    stages = {s["recipe"]: s for s in json.loads((out / "results.json").read_text())["stages"]}
    assert set(stages) == {"demo-closed-set", "demo-finetune"}
    for preset, folder in (("demo-closed-set", "closed-set"), ("demo-finetune", "finetune")):
        args = shlex.split(stages[preset]["command"])
        assert args[:6] == ["densehybrid", "train", "--recipe", preset, "--data-root", str(out / "data")]
        args[args.index("--out") + 1] = str(tmp_path / folder)
        assert main([*args[1:], "--device", "cpu", "--no-progress"]) == 0
        demo = torch.load(out / folder / "last.pt", weights_only=True)["model"]
        by_hand = torch.load(tmp_path / folder / "last.pt", weights_only=True)["model"]
        assert demo.keys() == by_hand.keys()
        assert all(torch.equal(demo[k], by_hand[k]) for k in demo), preset


def test_released_settings_restore_the_released_rate_and_loss_weights(capsys):
    from densehybrid.recipes import load_recipe

    released = load_recipe("ldn121-streethazards-finetune")
    config = DemoConfig.create(released=True)
    assert config.setting("finetune_lr") == released["optim"]["lr"] == 1e-5
    assert (
        config.setting("beta") == released["loss"]["beta"] and config.setting("lambda_") == released["loss"]["lambda"]
    )
    assert DemoConfig.create(released=True, beta=0.1).setting("beta") == 0.1  # a given option wins
    assert DemoConfig.quick(released=True).setting("finetune_epochs") == 1  # --quick's sizes stay
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "--released-settings" in capsys.readouterr().out


@pytest.mark.slow
def test_the_settings_study_runs_at_quick_size_and_keeps_earlier_rows(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "demo_study.py"
    study = tmp_path / "study"
    base = [sys.executable, str(script), "--quick", "--out", str(study), "--seeds", "2"]
    subprocess.run([*base, "--settings", "lr-1e-3"], check=True, capture_output=True)
    # the second setting copies the first one's closed-set stages (the same closed-set recipe) instead of training
    done = subprocess.run(
        [*base, "--settings", "released", "--reuse", str(study / "lr-1e-3")], check=True, capture_output=True, text=True
    )
    stored = json.loads((study / "study.json").read_text())
    assert [row["setting"] for row in stored["rows"]] == ["lr-1e-3", "released"] and stored["seeds"] == 2
    for row in stored["rows"]:
        for score in ("densehybrid", "generative", "discriminative"):
            values = row["scores"][score]
            assert 0 <= values["ap"] <= 1 and 0 <= values["fpr95"] <= 1 and values["ap_std"] is not None
        assert 0 < row["open_miou"] <= row["closed_miou"] <= 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("| setting | densehybrid AP | densehybrid FPR95 |") and len(lines) == 4
    assert lines[0].endswith("| closed mIoU | open-mIoU | open/closed |")
    assert lines[2].startswith("| released |") and " ± " in lines[2]  # the table in SETTINGS order
    finetuned = [json.loads(p.read_text()) for p in sorted(study.glob("*/results.json"))]
    assert finetuned[0]["stages"] != finetuned[1]["stages"]  # the two settings fine-tuned differently
    released = " ".join(stage["command"] for stage in finetuned[1]["stages"])
    assert "optim.lr=1e-05" in released and "loss.beta=0.03" in released

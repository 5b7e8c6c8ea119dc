"""Regression suite of hostile-use probes: no data loss, no silently wrong number, no traceback, bounded resources.

Each test names the item of the reliability review it guards (1-12): outputs over inputs, interrupted demo re-runs,
unwritable outputs, orphan temporaries, label ids outside an encoding, 16-bit images, stale SMIYC maps, history
averages after a resume, NaN models and settings, absurd sizes, tracebacks, and wording.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from densehybrid.cli import EXIT_CODES, main
from densehybrid.data.datasets import get_benchmark
from densehybrid.engine import ClosedSetObjective, TrainConfig, fit
from densehybrid.engine.outputs import (
    atomic_write_text,
    check_output_dir,
    check_output_file,
    remove_stale_temporaries,
    staging_dir,
    swap_in,
)
from densehybrid.engine.resources import check_memory, check_num_workers, usable_cpu_count
from densehybrid.errors import CheckpointError, DatasetError, NonFiniteError, OutputError, ResourceError
from densehybrid.models import create_model
from tests.datasets.fake_trees import make_fake_fs_laf, make_fake_streethazards, pattern, write_label
from tests.helpers import tiny_model

KWARGS = {"decoder_channels": 16}
LOOP = ["--device", "cpu", "--num-workers", "0", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _checkpoint(path, k=19, nan=False):
    torch.manual_seed(k)
    model = create_model("ladder_mobilenetv3", num_classes=k, **KWARGS)
    state = model.state_dict()
    if nan:
        state = {key: torch.full_like(v, math.nan) if v.is_floating_point() else v for key, v in state.items()}
    torch.save({"model": state, "model_name": model.model_name, "model_kwargs": model.model_kwargs}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "m.pt")


@pytest.fixture
def fs_laf(tmp_path):
    return make_fake_fs_laf(tmp_path / "fs", n=2)


def _evaluate(root, checkpoint, out, *extra):
    return main(
        ["evaluate", "--benchmark", "fs-laf", "--root", str(root), "--checkpoint", str(checkpoint), "--out", str(out)]
        + LOOP
        + list(extra)
    )


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# -- 1. outputs never overwrite inputs; existing outputs need --overwrite -----------------------------------------
def test_1_out_equal_to_the_checkpoint_is_refused_and_the_checkpoint_survives(fs_laf, ckpt, capsys):
    before = ckpt.read_bytes()
    assert _evaluate(fs_laf, ckpt, ckpt) == 1
    assert "differ from the inputs" in _one_line_error(capsys)
    assert ckpt.read_bytes() == before
    assert _evaluate(fs_laf, ckpt, ckpt, "--overwrite") == 1  # never, not even with --overwrite
    assert ckpt.read_bytes() == before


def test_1_existing_out_needs_overwrite(fs_laf, ckpt, tmp_path, capsys):
    out = tmp_path / "result.json"
    out.write_text("earlier result")
    assert _evaluate(fs_laf, ckpt, out) == 1
    assert "--overwrite" in _one_line_error(capsys) and out.read_text() == "earlier result"
    assert _evaluate(fs_laf, ckpt, out, "--overwrite") == 0
    assert json.loads(out.read_text())["benchmark"] == "fs-laf"


def test_1_policy_functions(tmp_path):
    source = tmp_path / "in.pt"
    source.write_bytes(b"x")
    with pytest.raises(OutputError, match="differ from the inputs"):
        check_output_file(tmp_path / "." / "in.pt", inputs=[source], overwrite=True)
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(source)
    with pytest.raises(OutputError, match="not to hold the input"):
        check_output_dir(tmp_path, inputs=[source], outputs=["in.pt"], overwrite=True)
    assert check_output_file(tmp_path / "new" / "deeper" / "out.json") == tmp_path / "new" / "deeper" / "out.json"
    assert not (tmp_path / "new").exists()  # checking creates nothing


# -- 2. a demo re-run never deletes a finished stage of other settings: it is refused, naming the keys that differ -
def test_2_demo_rerun_with_other_settings_keeps_the_finished_stage(tmp_path):
    import densehybrid.demo as demo
    from densehybrid.errors import DenseHybridError

    tiny = dict(image_size=(48, 96), train_images=4, val_images=2, test_images=2, batch_size=2, negative_size=24)
    old = demo.DemoConfig.quick(out_dir=tmp_path, device="cpu", progress=False, **tiny)
    stage = tmp_path / "closed-set" / "last.pt"
    stage.parent.mkdir(parents=True)
    from densehybrid.models.checkpoint import checkpoint_dict, write_checkpoint

    finished = checkpoint_dict({"w": torch.zeros(1)}, recipe=old.recipe("demo-closed-set"), training={"epoch": 2})
    write_checkpoint(finished, stage)
    before = stage.read_bytes()
    new = demo.DemoConfig.quick(out_dir=tmp_path, device="cpu", progress=False, lr=5e-4, **tiny)
    with pytest.raises(DenseHybridError, match=r"optim.lr: 0.0004 -> 0.0005.*--no-resume"):
        demo.run_demo(new)
    assert stage.read_bytes() == before  # the old finished stage, intact


# -- 3. outputs are checked before the work; results are printed before files are written --------------------------
def test_3_unwritable_out_fails_before_loading_anything(fs_laf, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    missing_checkpoint = tmp_path / "absent.pt"  # would fail later, when loaded: the output check comes first
    assert _evaluate(fs_laf, missing_checkpoint, blocker / "out.json") == 1
    assert "is a file" in _one_line_error(capsys)


def test_3_toy2d_checks_its_folder_before_training(tmp_path, capsys, monkeypatch):
    import densehybrid.toy2d as toy2d

    monkeypatch.setattr(toy2d, "run_toy2d", lambda *a, **k: pytest.fail("trained before checking --out"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["toy2d", "--out", str(blocker)]) == 1
    assert "to be a folder, but it is a file" in _one_line_error(capsys)


def test_3_results_are_printed_even_when_the_write_fails(fs_laf, ckpt, tmp_path, capsys, monkeypatch):
    import densehybrid.cli.evaluate as command

    def failing(path, data):
        raise OutputError(f"Cannot write `--out` {str(path)!r}: No space left on device.")

    monkeypatch.setattr(command, "write_json", failing)
    assert _evaluate(fs_laf, ckpt, tmp_path / "r.json") == 1
    captured = capsys.readouterr()
    assert "AP" in captured.out and "FPR95" in captured.out and "No space left" in captured.err


# -- 4. temporaries of killed saves are removed at the start of a run that owns the folder ---------------------------
def test_4_orphan_checkpoint_temporaries_are_removed(tiny_set, tmp_path):
    orphan = tmp_path / ".last.pt.k3j2h1.tmp"
    orphan.write_bytes(b"\0" * 1000)
    fit(
        tiny_model(),
        tiny_set,
        ClosedSetObjective(),
        TrainConfig(epochs=1, max_steps=1, device="cpu", progress=False, num_workers=0),
        out_dir=tmp_path,
    )
    assert not orphan.exists() and (tmp_path / "last.pt").exists()
    staged = staging_dir(tmp_path / "result")
    assert remove_stale_temporaries(tmp_path) == [staged] and not staged.exists()


# -- 5. label ids outside a benchmark's encoding are an error unless voided knowingly --------------------------------
def test_5_unknown_label_ids_stop_evaluate_with_the_file_and_the_ids(fs_laf, ckpt, tmp_path, capsys):
    label = sorted((fs_laf / "fishyscapes_lostandfound").glob("*_labels.png"))[1]
    write_label(label, pattern((16, 32), (0, 15, 29)))
    assert _evaluate(fs_laf, ckpt, tmp_path / "r.json") == 1
    line = _one_line_error(capsys)
    assert label.name in line and "15, 29" in line and "--void-unknown-ids" in line
    assert _evaluate(fs_laf, ckpt, tmp_path / "r.json", "--void-unknown-ids") == 0
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["options"] == {"void_unknown_ids": True}


# -- 6. 16-bit images are scaled, not clipped to white, on the command's path ----------------------------------------
def test_6_sixteen_bit_image_reaches_the_model_scaled(fs_laf):
    dataset = get_benchmark("fs-laf").create(fs_laf)
    path = dataset.frames[0].image
    values = (np.arange(16 * 32, dtype=np.uint16).reshape(16, 32) * 100).astype(np.uint16)
    Image.frombytes("I;16", (32, 16), values.tobytes()).save(path)
    image = dataset[0]["image"]
    assert float((image >= 1.0).float().mean()) < 0.01 and 0.2 < float(image.mean()) < 0.6


# -- 7. export-smiyc replaces the maps of an earlier export instead of mixing them ----------------------------------
@pytest.mark.filterwarnings("ignore:SMIYC files store float16")
def test_7_export_replaces_earlier_maps(ckpt, tmp_path, capsys):
    fs_laf = make_fake_fs_laf(tmp_path / "fs", n=4)  # frames alternate between LostAndFound-train and -test

    def export(*extra):
        return main(
            [
                "export-smiyc",
                "--benchmark",
                "fs-laf",
                "--root",
                str(fs_laf),
                "--checkpoint",
                str(ckpt),
                "--method",
                "M",
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
                *extra,
            ]
        )

    assert export() == 0
    method = tmp_path / "out" / "anomaly_p" / "M"
    assert sum(1 for _ in method.rglob("*.hdf5")) == 4
    capsys.readouterr()
    assert export("--limit", "3") == 1  # an earlier export is not mixed into silently
    assert "--overwrite" in _one_line_error(capsys)
    assert export("--limit", "3", "--overwrite") == 0  # frames 0, 2 -> train; 1 -> test (frame 3's map is gone)
    assert sum(1 for _ in method.rglob("*.hdf5")) == 3
    assert not [p for p in method.parent.iterdir() if p.name.endswith(".tmp")]


def test_7_swap_in_keeps_the_old_result_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "maps"
    final.mkdir()
    (final / "old.txt").write_text("old")
    staged = staging_dir(final)
    atomic_write_text(staged / "new.txt", "new")
    swap_in(staged, final)
    assert [p.name for p in final.iterdir()] == ["new.txt"] and not staged.exists()


# -- 8. per-epoch averages of the history are right after a resume --------------------------------------------------
def test_8_history_averages_are_identical_after_a_resume(tiny_set, tmp_path):
    fast = dict(batch_size=4, lr=3e-3, device="cpu", progress=False, seed=3, num_workers=0)
    reference = fit(tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=1, **fast))
    fit(
        tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=1, max_steps=2, **fast), out_dir=tmp_path / "b"
    )
    resumed = fit(
        tiny_model(), tiny_set, ClosedSetObjective(), TrainConfig(epochs=1, **fast), out_dir=tmp_path / "b", resume=True
    )
    assert resumed.history[0]["loss"] == pytest.approx(reference.history[0]["loss"], rel=1e-6)


# -- 9. NaN scores are named as such; NaN settings are refused; a NaN model is never saved as finished ---------------
def test_9_open_set_with_a_nan_model_names_nan_and_the_checkpoint(tmp_path, capsys):
    root = make_fake_streethazards(tmp_path / "sh", n_per_town=1)
    bad = _checkpoint(tmp_path / "nan.pt", k=12, nan=True)
    code = main(
        [
            "evaluate-open-set",
            "--benchmark",
            "streethazards",
            "--root",
            str(root),
            "--checkpoint",
            str(bad),
            "--out",
            str(tmp_path / "o.json"),
            *LOOP,
        ]
    )
    assert code == 1
    line = _one_line_error(capsys)
    assert "NaN" in line and "nan.pt" in line and "no anomaly pixels" not in line.lower()


def test_9_nan_settings_and_nan_models(tmp_path, capsys):
    import densehybrid.demo as demo

    with pytest.raises(SystemExit) as exc:
        main(["demo", "--out", str(tmp_path), "--lr", "nan"])
    assert exc.value.code == 2
    with pytest.raises(ValueError, match="finite"):
        demo.DemoConfig.create(beta=math.inf)
    with pytest.raises(ValueError, match="finite"):
        TrainConfig(lr=math.nan)
    model = tiny_model()
    with torch.no_grad():
        next(model.parameters()).fill_(math.nan)
    torch.save({"model": model.state_dict()}, tmp_path / "last.pt")
    with pytest.raises(NonFiniteError, match="diverged"):  # a demo stage that diverged is not used
        demo._check_finite_weights(tmp_path / "last.pt")


# -- 10. sizes, image counts and workers are bounded by the machine -------------------------------------------------
def test_10_bounds_from_the_machine(tmp_path, capsys):
    import densehybrid.demo as demo

    with pytest.raises(SystemExit) as exc:
        main(
            [
                "evaluate",
                "--benchmark",
                "fs-laf",
                "--root",
                str(tmp_path),
                "--checkpoint",
                "x.pt",
                "--num-workers",
                "512",
            ]
        )
    assert exc.value.code == 2 and "CPU cores" in capsys.readouterr().err
    assert check_num_workers(usable_cpu_count()) == usable_cpu_count()
    with pytest.raises(ResourceError, match="available"):
        check_memory(1e18, "a test array", "Ask for less.")
    with pytest.raises(ValueError, match="negative_size"):
        demo.DemoConfig.create(negative_size=100_000)
    with pytest.raises(ResourceError, match="fit in memory"):
        demo.DemoConfig(image_size=(4096, 4096), train_images=10**7)
    assert main(["toy2d", "--out", str(tmp_path / "toy"), "--resolution", "10000000"]) == 1
    assert "fit in memory" in _one_line_error(capsys)


# -- 11. expected failures are one line with exit 1; bugs one line with exit 70 ------------------------------------
def test_11_device_typos_fail_before_any_work(fs_laf, ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--benchmark", "fs-laf", "--root", str(fs_laf), "--checkpoint", str(ckpt), "--device", "gpu"])
    assert exc.value.code == 2 and "gpu" in capsys.readouterr().err


def test_11_garbled_checkpoints_are_checkpoint_errors(ckpt, tmp_path, fs_laf, capsys):
    from densehybrid.models.checkpoint import read_checkpoint_file

    text = tmp_path / "notes.pt"
    text.write_text("these are notes, not weights\n")
    assert _evaluate(fs_laf, text, tmp_path / "r.json") == 1
    assert "Cannot read checkpoint" in _one_line_error(capsys)
    data = bytearray(ckpt.read_bytes())
    rng = np.random.default_rng(0)
    for trial in range(12):
        garbled = bytearray(data)
        if trial % 2:
            garbled = garbled[: int(rng.integers(1, len(data)))]
        else:
            for pos in rng.integers(0, len(data), 64):
                garbled[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"g{trial}.pt"
        path.write_bytes(bytes(garbled))
        try:
            read_checkpoint_file(path)
        except CheckpointError:
            pass


def test_11_corrupt_demo_cache_gets_the_regenerate_advice(tmp_path):
    from densehybrid.data import RoadSceneBenchmark

    bench = RoadSceneBenchmark(tmp_path, seed=0, image_size=(48, 96), sizes={"train": 2, "val": 1, "test": 1})
    bench.prepare()
    (tmp_path / "test.npz").write_bytes(b"PK\x03\x04 garbage")
    fresh = RoadSceneBenchmark(tmp_path, seed=0, image_size=(48, 96), sizes={"train": 2, "val": 1, "test": 1})
    with pytest.raises(DatasetError, match="Delete") as exc:
        fresh.split("test")
    assert "pickle" not in str(exc.value)


def test_11_input_scale_that_empties_a_frame(fs_laf, ckpt, tmp_path, capsys):
    assert _evaluate(fs_laf, ckpt, tmp_path / "r.json", "--input-scale", "0.01") == 1
    assert "--input-scale" in _one_line_error(capsys)


def test_11_diverging_and_unexpected_failures(monkeypatch, capsys, tmp_path):
    import densehybrid.cli.models as command

    def diverging(args):
        raise FloatingPointError("The training loss became nan at step 3 (epoch 1); lower the learning rate.")

    monkeypatch.setattr(command, "run", diverging)
    assert main(["models"]) == 1 and "lower the learning rate" in _one_line_error(capsys)

    def bug(args):
        return {}["missing"]

    monkeypatch.setattr(command, "run", bug)
    assert main(["models"]) == 70
    assert "Internal error: KeyError" in _one_line_error(capsys) and set(EXIT_CODES) == {0, 1, 2, 70, 130, 141}

    # A ValueError that densehybrid code raised deliberately is the user's; one that NumPy raised inside
    # densehybrid code (no `raise` line) is a bug.
    from densehybrid.cli import _PACKAGE_DIR

    namespace = {"np": np}
    exec(
        compile("def run(args):\n    return np.zeros(2) + np.zeros(3)\n", str(_PACKAGE_DIR / "x.py"), "exec"), namespace
    )
    monkeypatch.setattr(command, "run", namespace["run"])
    assert main(["models"]) == 70
    assert "Internal error: ValueError" in _one_line_error(capsys)

    def deliberate(args):
        from densehybrid.data.datasets import get_benchmark

        return get_benchmark("no-such-benchmark")

    monkeypatch.setattr(command, "run", deliberate)
    assert main(["models"]) == 1
    assert "Unknown benchmark" in _one_line_error(capsys)


def test_11_unreadable_dataset_folder_in_doctor(fs_laf, monkeypatch, capsys):
    from densehybrid.data.datasets import BenchmarkSpec

    def unreadable(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(fs_laf / "leftImg8bit"))

    monkeypatch.setattr(BenchmarkSpec, "create", unreadable)
    assert main(["doctor", "fs-laf", str(fs_laf)]) == 1
    assert "Permission denied" in capsys.readouterr().out


# -- 12. wording ---------------------------------------------------------------------------------------------------
def test_12_doctor_wording(fs_laf, tmp_path, capsys):
    for label in (fs_laf / "fishyscapes_lostandfound").glob("*_labels.png"):
        write_label(label, np.full((16, 32), 255))
    assert main(["doctor", "fs-laf", str(fs_laf), "--allow-partial"]) == 1
    assert "every pixel" in capsys.readouterr().out
    a_file = tmp_path / "root.txt"
    a_file.write_text("")
    assert main(["doctor", "fs-laf", str(a_file)]) == 1
    out = capsys.readouterr().out
    assert "is a file" in out and "does not exist" not in out


def test_12_text_file_as_npz_is_not_advertised_as_pickled(tmp_path):
    from densehybrid.data.datasets._io import read_overlay

    path = tmp_path / "x_rgb.npz"
    path.write_text("plain text\n")
    with pytest.raises(DatasetError) as exc:
        read_overlay(path)
    assert "pickle" not in str(exc.value) and "not a NumPy .npz archive" in str(exc.value)


def test_12_wrong_architecture_hint_names_the_option(fs_laf, tmp_path, capsys):
    other = create_model("ladder_resnet18", num_classes=19, decoder_channels=16)
    path = tmp_path / "resnet.pt"
    torch.save({"model": other.state_dict(), "model_name": "ladder_mobilenetv3", "model_kwargs": KWARGS}, path)
    assert _evaluate(fs_laf, path, tmp_path / "r.json") == 1
    err = capsys.readouterr().err
    assert "--model ladder_resnet18" in err and "create_model(" not in err


def test_12_nan_output_error_names_the_checkpoint(fs_laf, tmp_path, capsys):
    bad = _checkpoint(tmp_path / "diverged.pt", nan=True)
    assert _evaluate(fs_laf, bad, tmp_path / "r.json") == 1
    line = _one_line_error(capsys)
    assert "diverged.pt" in line and "NaN" in line


def test_12_truncated_last_pt_mentions_no_resume(tiny_set, tmp_path):
    config = TrainConfig(epochs=1, max_steps=1, device="cpu", progress=False, num_workers=0)
    fit(tiny_model(), tiny_set, ClosedSetObjective(), config, out_dir=tmp_path)
    last = tmp_path / "last.pt"
    last.write_bytes(last.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="--no-resume"):
        fit(
            tiny_model(),
            tiny_set,
            ClosedSetObjective(),
            TrainConfig(epochs=1, device="cpu", progress=False, num_workers=0),
            out_dir=tmp_path,
            resume=True,
        )


@pytest.mark.filterwarnings("ignore:SMIYC files store float16")
def test_12_export_ignores_bad_labels_it_does_not_use(fs_laf, ckpt, tmp_path):
    label = sorted((fs_laf / "fishyscapes_lostandfound").glob("*_labels.png"))[0]
    label.write_bytes(b"not a png")
    args = [
        "export-smiyc",
        "--benchmark",
        "fs-laf",
        "--root",
        str(fs_laf),
        "--checkpoint",
        str(ckpt),
        "--method",
        "M",
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    ]
    assert main(args) == 0

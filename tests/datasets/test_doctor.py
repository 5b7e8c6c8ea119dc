"""``densehybrid doctor`` on clean and broken copies of every fake benchmark tree."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from densehybrid.cli import main
from densehybrid.data.datasets import get_benchmark, list_benchmarks
from densehybrid.doctor import describe_values, diagnose
from tests.datasets.fake_trees import FAKE_TREES, make_fake_cityscapes, make_fake_fs_laf, pattern, write_label

# benchmark -> (which file of frame 0 to duplicate without a partner, how to rename it)
UNPAIRED = {
    "cityscapes": ("image", ("_000019_", "_000077_")),
    "streethazards": ("image", ("300", "377")),
    "fs-laf": ("label", ("_000000_000030", "_000077_000030")),
    "fs-static": ("label", ("0000_frankfurt_000000", "0077_frankfurt_000077")),
    "smiyc-anomaly": ("image", ("validation0000", "validation0077")),
    "smiyc-obstacle": ("image", ("validation_1", "validation_77")),
    "laf-test": ("image", ("_000000_000030", "_000077_000030")),
    "laf-noknown": ("image", ("_000001_000030", "_000077_000030")),
    "road-anomaly": ("image", ("animals00", "animals77")),
    "coco20": ("image", ("000000000139", "000000000777")),
    "ade20k": ("image", ("00000001", "00000077")),
    "folder": ("image", ("scene00", "scene77")),
}
#: Benchmarks with a published frame count (not the user's own folder).
PUBLISHED = [name for name in list_benchmarks() if get_benchmark(name).expected_counts]


#: the trees of image and label files; the generated roadscene has none (its manifest's SHA-256 checks its arrays)
DOWNLOADED = [name for name in list_benchmarks() if name != "roadscene"]


def _tree(name, tmp_path):
    root = FAKE_TREES[name](tmp_path / name)
    return root, get_benchmark(name).create(root)


def _errors_about(report, text):
    return [f for f in report.errors if text in f.problem or text == f.path]


def test_every_benchmark_has_a_breakage_recipe():
    assert set(UNPAIRED) == set(DOWNLOADED)


@pytest.mark.parametrize("name", [name for name in PUBLISHED if name in DOWNLOADED])
def test_clean_fake_tree_passes_only_as_a_partial_copy(name, tmp_path):
    root, dataset = _tree(name, tmp_path)
    report = diagnose(name, root, allow_partial=True)
    assert report.ok, report.format()
    assert report.num_frames == len(dataset) and report.labels_checked == sum(
        f.label is not None for f in dataset.frames
    )
    assert [w.problem for w in report.warnings] == [
        f"Expected the {report.expected_frames} frames of a complete {name} {report.split!r} split, but found "
        f"{len(dataset)}: the download is partial or files are missing. Accepted because of --allow-partial."
    ]
    strict = diagnose(name, root)
    assert not strict.ok and len(strict.errors) == 1
    assert "--allow-partial" in strict.errors[0].fix and get_benchmark(name).download in strict.errors[0].fix


@pytest.mark.parametrize("name", DOWNLOADED)
def test_missing_file_is_reported_with_its_partner(name, tmp_path):
    root, dataset = _tree(name, tmp_path)
    frame = dataset.frames[0]
    frame.image.unlink()
    report = diagnose(name, root, allow_partial=True)
    assert not report.ok
    mentioned = _errors_about(report, str(frame.label)) + _errors_about(report, str(frame.image))
    assert mentioned, report.format()
    assert "has no" in mentioned[0].problem and "image" in mentioned[0].problem and mentioned[0].fix


@pytest.mark.parametrize("name", DOWNLOADED)
def test_wrong_label_values_are_named(name, tmp_path):
    root, dataset = _tree(name, tmp_path)
    frame = next(f for f in dataset.frames if f.label is not None)
    write_label(frame.label, pattern((16, 32), (min(dataset.raw_label_values), 250)))
    report = diagnose(name, root, allow_partial=True, max_label_checks=100)
    bad = [f for f in report.errors if f.path == str(frame.label)]
    assert len(bad) == 1, report.format()
    assert bad[0].problem.endswith("but got 250.") and f"({name} encoding)" in bad[0].problem and bad[0].fix


@pytest.mark.parametrize("name", DOWNLOADED)
def test_unpaired_file_is_reported(name, tmp_path):
    root, dataset = _tree(name, tmp_path)
    kind, (old, new) = UNPAIRED[name]
    source = getattr(dataset.frames[0], kind)
    assert old in source.name
    stray = source.with_name(source.name.replace(old, new))
    shutil.copy(source, stray)
    report = diagnose(name, root, allow_partial=True)
    assert not report.ok
    stray_errors = [f for f in report.errors if f.path == str(stray)]
    assert len(stray_errors) == 1, report.format()
    assert "has no" in stray_errors[0].problem and stray_errors[0].fix


@pytest.mark.parametrize("name", DOWNLOADED)
def test_corrupt_image_is_an_error_not_a_crash(name, tmp_path):
    root, dataset = _tree(name, tmp_path)
    dataset.frames[0].image.write_bytes(b"\xff\xd8\xff not really an image")
    report = diagnose(name, root, allow_partial=True)
    bad = [f for f in report.errors if f.path == str(dataset.frames[0].image)]
    assert len(bad) == 1 and "decoding failed" in bad[0].problem, report.format()


def test_missing_root_and_missing_directory(tmp_path):
    report = diagnose("streethazards", tmp_path / "nowhere")
    assert not report.ok and "does not exist" in report.errors[0].problem
    assert "streethazards_test.tar" in report.errors[0].fix
    root = make_fake_cityscapes(tmp_path / "cs")
    shutil.rmtree(root / "gtFine")
    report = diagnose("cityscapes", root)
    assert [f.path for f in report.errors] == [str(root / "gtFine" / "val")]
    assert "gtFine_trainvaltest.zip" in report.errors[0].fix


def test_size_mismatch_and_trainid_hint(tmp_path):
    root = make_fake_cityscapes(tmp_path, n_per_city=1)
    dataset = get_benchmark("cityscapes").create(root)
    write_label(dataset.frames[0].label, np.zeros((8, 32)))
    write_label(dataset.frames[1].label, pattern((16, 32), (0, 5, 18, 255)))
    report = diagnose("cityscapes", root, allow_partial=True)
    problems = {f.path: f for f in report.errors}
    assert "(8, 32)" in problems[str(dataset.frames[0].label)].problem
    assert "trainIds" in problems[str(dataset.frames[1].label)].fix


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="Unknown benchmark"):
        diagnose("fishyscapes", tmp_path)
    with pytest.raises(ValueError, match="`split`"):
        diagnose("fs-laf", tmp_path, split="test")
    with pytest.raises(ValueError, match="`max_label_checks`"):
        diagnose("fs-laf", tmp_path, max_label_checks=-1)


def test_describe_values():
    assert describe_values({0, 1, 255}) == "{0, 1, 255}"
    assert describe_values(range(34)) == "{0..33}"
    assert describe_values(list(range(182)) + [255]) == "{0..181, 255}"


def test_cli_exit_codes_and_output(tmp_path, capsys):
    root = make_fake_fs_laf(tmp_path, n=2)
    assert main(["doctor", "fs-laf", str(root)]) == 1
    out = capsys.readouterr().out
    assert "problem: Expected the 100 frames" in out and "NOT OK: 1 error(s)" in out
    assert main(["doctor", "fs-laf", str(root), "--allow-partial"]) == 0
    assert "OK: 0 error(s), 1 warning(s)." in capsys.readouterr().out
    assert main(["doctor", "fs-laf", str(root), "--allow-partial", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is True and data["num_frames"] == 2
    assert [f["severity"] for f in data["findings"]] == ["info", "warning"]
    assert main(["doctor", "fs-laf", str(root), "--option", "layout=densehybrid"]) == 1
    assert "ood" in capsys.readouterr().out
    assert main(["doctor", "fishyscapes", str(root)]) == 1
    assert "Unknown benchmark 'fishyscapes'" in capsys.readouterr().err

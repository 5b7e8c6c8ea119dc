"""Every fenced code block of README.md and docs/ is run by a test or says why not.

The line right before each block is ``<!-- run: tests/FILE.py -->`` (a test runs it) or ``<!-- not run: REASON -->``.
The Python blocks marked ``run: tests/test_doc_blocks.py`` run here, as written, on tiny CPU data: the blocks of one
page in order in one namespace (a page's later block may continue an earlier one), after the page's setup has made
the files and names the text says are the reader's (``photo.jpg``, ``model-calibrated.pt``, ``loader``, ...). The
bash blocks marked so run their ``densehybrid`` lines, split as a shell would, on the files their setup makes.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_docs import DOCUMENTS, ROOT

_BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MARK = re.compile(r"^<!-- (run|not run): (.+?) -->$")
THIS = "tests/test_doc_blocks.py"


def marked_blocks(path: Path) -> list[tuple[str, str, str | None, str | None]]:
    """``(language, body, mark, detail)`` per fenced block of ``path``: mark ``"run"`` (detail: the test file),
    ``"not run"`` (detail: the reason) or None (no mark on the line before the block)."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in _BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.match(before)
        blocks.append((match.group(1), match.group(2), *(mark.groups() if mark else (None, None))))
    return blocks


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_every_block_is_run_by_a_test_or_says_why_not():
    unmarked, wrong = [], []
    for path in DOCUMENTS:
        for i, (language, _, mark, detail) in enumerate(marked_blocks(path)):
            where = f"{_name(path)} block {i} ({language or 'no language'})"
            if mark is None:
                unmarked.append(where)
            elif mark == "not run" and not detail.strip():
                wrong.append(f"{where}: no reason")
            elif mark == "run":
                # each runner collects exactly the blocks it claims: TOML blocks (test_docs), the bash blocks of
                # own-data.md (test_own_data_doc), the Python blocks run below
                runs = {
                    "tests/test_docs.py": language == "toml",
                    "tests/test_own_data_doc.py": path.name == "own-data.md" and language == "bash",
                    THIS: language in ("python", "bash"),
                }
                if not runs.get(detail, False) or not (ROOT / detail).is_file():
                    wrong.append(f"{where}: marked run by {detail}, which does not run it")
    assert not unmarked, "blocks with neither <!-- run: ... --> nor <!-- not run: REASON --> before them: " + ", ".join(
        unmarked
    )
    assert not wrong, "; ".join(wrong)


def test_the_toml_blocks_are_marked_run():
    """test_docs.py runs every TOML block, so none may claim it is not run."""
    for path in DOCUMENTS:
        for language, _, mark, _ in marked_blocks(path):
            if language == "toml":
                assert mark == "run"


def _tiny_model(num_classes: int = 4) -> torch.nn.Module:
    """A small model with random weights (timings and file formats do not depend on them)."""
    from densehybrid.models import create_model

    torch.manual_seed(0)
    return create_model("ladder_mobilenetv3", num_classes=num_classes, decoder_channels=16).eval()


def _save_calibrated(path: Path, num_classes: int = 4, calibrated: bool = True) -> None:
    from densehybrid.models.checkpoint import checkpoint_dict, write_checkpoint
    from densehybrid.predict import Calibration

    model = _tiny_model(num_classes)
    path.parent.mkdir(parents=True, exist_ok=True)
    calibration = Calibration(score="densehybrid", threshold=-2.0, display_range=(-4.0, 0.0))
    write_checkpoint(checkpoint_dict(model, calibration=calibration.to_dict() if calibrated else None), path)


def _photo(path: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)


def _score_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        target = torch.zeros(2, 64, 64, dtype=torch.long)
        target[:, 16:40, 20:44] = 1  # one anomalous object per image
        target[:, 0] = 255  # a void row
        batches.append((torch.rand(2, 64, 64, generator=generator) + target.clamp(max=1) * 0.5, target))
    return batches


def _setup_metrics(step: int, names: dict[str, Any]) -> None:
    names["loader"] = _score_batches()


def _setup_predict(step: int, names: dict[str, Any]) -> None:
    if step == 0:
        from densehybrid.export import export_model

        export_model(_tiny_model(), Path("model.onnx"), "onnx", threshold=-2.0)
        names["images"] = np.random.default_rng(0).random((1, 3, 32, 48), dtype=np.float32)
    else:
        _save_calibrated(Path("model-calibrated.pt"))
        _photo(Path("photo.jpg"))
        names["images"] = torch.rand(2, 3, 32, 48)


def _setup_usage(step: int, names: dict[str, Any]) -> None:
    if step == 2:  # the calibration example continues the model of the first block
        generator = torch.Generator().manual_seed(0)
        names["calibration_set"] = [
            {"image": torch.rand(3, 32, 32, generator=generator), "target": torch.tensor([[0, 19]]).repeat(32, 16)}
            for _ in range(2)
        ]
        names["images"] = torch.rand(1, 3, 32, 32)
    elif step == 3:
        _save_calibrated(Path("demo_out/densehybrid-calibrated.pt"))
        _photo(Path("photo.jpg"))


#: What each page's blocks leave behind, checked after they ran.
EXPECTED: dict[str, Callable[[dict[str, Any]], bool]] = {
    "README.md": lambda names: names["score"].shape == (1, 256, 512),
    "docs/metrics.md": lambda names: 0.0 <= names["pixels"]["ap"] <= 1.0,
    "docs/predict.md": lambda names: names["result"].scores.shape == (40, 56) and names["result"].threshold == -2.0,
    "docs/usage.md": lambda names: names["result"].scores.shape == (40, 56) and names["open_set"].threshold is not None,
}
SETUPS: dict[str, Callable[[int, dict[str, Any]], None]] = {
    "docs/metrics.md": _setup_metrics,
    "docs/predict.md": _setup_predict,
    "docs/usage.md": _setup_usage,
}
PAGES = [
    pytest.param(path, id=_name(path))
    for path in DOCUMENTS
    if any(lang == "python" and mark == "run" and detail == THIS for lang, _, mark, detail in marked_blocks(path))
]


def _setup_readme_commands() -> None:
    """What `densehybrid demo` leaves in demo_out/, small: an uncalibrated checkpoint and a tiny road-scene cache."""
    from densehybrid.data import RoadSceneBenchmark
    from densehybrid.data.roadscene import ROADSCENE_NUM_CLASSES

    _save_calibrated(Path("demo_out/finetune/last.pt"), ROADSCENE_NUM_CLASSES, calibrated=False)
    RoadSceneBenchmark("demo_out/data", image_size=(48, 64), sizes={"train": 1, "val": 2, "test": 1}).prepare()
    for name in ("my_photos/a.png", "my_photos/b.jpg"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        _photo(Path(name))


def _readme_outputs() -> bool:
    from densehybrid.models.checkpoint import read_checkpoint_file
    from densehybrid.predict import CALIBRATION_KEY

    calibrated = read_checkpoint_file(Path("demo_out/densehybrid-calibrated.pt"))
    return (
        CALIBRATION_KEY in calibrated
        and len(list(Path("predictions").glob("*_heatmap.png"))) == 2
        and len(list(Path("predictions-onnx").glob("*_heatmap.png"))) == 2
    )


def _setup_predict_command() -> None:
    _save_calibrated(Path("model.pt"), calibrated=False)  # an uncalibrated checkpoint, as the synopsis's model.pt
    for name in ("photos/a.png", "photos/sub/b.jpg", "extra/c.jpg", "frame_0001.png"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        _photo(Path(name))


#: The files each bash block run here needs, made in an empty folder; and what its run leaves behind.
BASH_BLOCKS: dict[str, tuple[Callable[[], None], Callable[[], bool]]] = {
    "README.md": (_setup_readme_commands, _readme_outputs),
    "docs/predict.md": (
        _setup_predict_command,
        lambda: len(list(Path("predictions").rglob("*_heatmap.png"))) == 4,
    ),
}


def test_bash_blocks_to_run_have_a_setup():
    pages = {
        _name(path)
        for path in DOCUMENTS
        for language, _, mark, detail in marked_blocks(path)
        if language == "bash" and mark == "run" and detail == THIS
    }
    assert pages == set(BASH_BLOCKS)


@pytest.mark.parametrize(
    "page",
    [pytest.param(page, marks=[pytest.mark.slow] if page == "README.md" else []) for page in sorted(BASH_BLOCKS)],
)
def test_the_bash_blocks_run_as_written(page, tmp_path, monkeypatch, capsys):
    from densehybrid.cli import main

    monkeypatch.chdir(tmp_path)
    setup, check = BASH_BLOCKS[page]
    setup()
    blocks = [b for lang, b, mark, detail in marked_blocks(ROOT / page) if lang == "bash" and detail == THIS]
    commands = [shlex.split(line, comments=True) for block in blocks for line in block.splitlines()]
    commands = [words for words in commands if words]
    assert commands and all(words[0] == "densehybrid" for words in commands)
    for words in commands:
        tiny = ["--num-workers", "0"] if words[1] in ("calibrate", "predict") else []
        status = main([*words[1:], *(["--device", "cpu", "--no-progress", *tiny] if words[1] != "export" else [])])
        assert status == 0, f"`{shlex.join(words)}` failed: {capsys.readouterr().err[-2000:]}"
    assert check()


def test_pages_with_python_blocks_to_run():
    assert {_name(p.values[0]) for p in PAGES} >= {"README.md", "docs/usage.md", "docs/predict.md", "docs/metrics.md"}


@pytest.mark.parametrize("path", PAGES)
@pytest.mark.filterwarnings("ignore:The binned pooled metrics")
def test_the_python_blocks_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names: dict[str, Any] = {"__name__": "__doc_example__"}
    setup = SETUPS.get(_name(path), lambda step, names: None)
    blocks = [body for lang, body, mark, detail in marked_blocks(path) if lang == "python" and detail == THIS]
    assert blocks
    for step, body in enumerate(blocks):
        setup(step, names)
        try:
            exec(compile(body, f"{_name(path)} python block {step}", "exec"), names)
        except Exception as exc:
            raise AssertionError(f"{_name(path)} python block {step} failed:\n{body}") from exc
    assert EXPECTED[_name(path)](names)

"""The command line's start: light imports, a fast ``--help``, a quiet broken pipe; the package's entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import densehybrid
from densehybrid.cli import COMMANDS, build_parser

SRC = str(Path(densehybrid.__file__).resolve().parent.parent)
HEAVY = ("torch", "numpy", "matplotlib", "PIL", "scipy", "h5py")


def _python(code: str, stdout: int = subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-c", code]
    return subprocess.run(command, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)


def _imported_after(statement: str) -> set[str]:
    probe = _python(f"import sys\n{statement}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))")
    assert probe.returncode == 0, probe.stderr
    return set(probe.stdout.split())


@pytest.mark.parametrize(
    "statement",
    [
        "import densehybrid",
        "import densehybrid.cli",
        "from densehybrid.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    ],
    ids=["package", "cli", "help"],
)
def test_the_command_line_starts_without_torch(statement):
    assert not _imported_after(statement) & set(HEAVY)


def test_a_command_imports_what_it_needs_and_help_lists_every_command():
    assert "torch" in _imported_after("from densehybrid.cli import main\nmain(['scores'])")
    listed = build_parser([]).format_help()
    assert all(name in listed for name in COMMANDS)
    evaluate = build_parser(["evaluate"])._subparsers._group_actions[0].choices["evaluate"]
    assert "--benchmark" in evaluate.format_help() and "folder (pooled)" in evaluate.format_help()


def test_a_closed_pipe_ends_the_command_quietly():
    # The reader closes the pipe before the command writes: `densehybrid recipes --json | head -0`.
    read, write = os.pipe()
    os.close(read)
    try:
        result = _python(
            "from densehybrid.cli import main\nraise SystemExit(main(['recipes', '--json']))", stdout=write
        )
    finally:
        os.close(write)
    assert result.stderr == "" and result.returncode == 141


def test_the_package_names_its_entry_points():
    assert sorted(densehybrid.__all__) == sorted(["__version__", *densehybrid._ENTRY_POINTS])
    assert "densehybrid --help" in densehybrid.__doc__ and len(densehybrid.__doc__.splitlines()) > 10
    for name in densehybrid.__all__:
        assert getattr(densehybrid, name) is not None, name
    assert set(densehybrid.__all__) <= set(dir(densehybrid))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        densehybrid.nothing  # noqa: B018


def test_a_run_warns_once_about_binned_metrics():
    code = """
import torch
import densehybrid.cli.scores as command
from densehybrid.cli import main
from densehybrid.metrics import AnomalyMetrics

def run(args):
    g = torch.Generator().manual_seed(2)
    labels = (torch.rand(1 << 15, generator=g) < 0.1).long()
    scores = 1000 + 1e-3 * (torch.randn(1 << 15, generator=g) + 2 * labels)  # crowded float32 values
    for offset in (0.0, 1.0, 2.0):  # three evaluations with different bounds, as a run's validations
        metric = AnomalyMetrics()
        metric.update((scores + offset).view(1, 128, -1), labels.view(1, 128, -1))
        assert metric.compute()["ap_error_bound"] > 1e-4
    return 0

command.run = run
raise SystemExit(main(["scores"]))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("The binned pooled metrics may differ") == 1
    assert "--metric-option bits=28" in result.stderr


def test_the_warning_text_the_command_line_filters_is_the_metrics_one():
    from densehybrid.cli import _COARSE_METRICS_WARNING
    from densehybrid.metrics.streaming import COARSE_METRICS_WARNING

    assert _COARSE_METRICS_WARNING == COARSE_METRICS_WARNING

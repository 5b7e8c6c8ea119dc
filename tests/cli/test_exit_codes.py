"""The command line's error mapping (docs/usage.md section 6): one line and the documented exit code per failure."""

from __future__ import annotations

import pytest

import densehybrid.cli as cli
from densehybrid.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_an_allocation_failure_shows_the_out_of_memory_message(monkeypatch, capsys):
    import densehybrid.cli.models as command

    def allocate(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried")

    monkeypatch.setattr(command, "run", allocate)
    assert main(["models"]) == 1
    assert _one_line(capsys).startswith("Error: Out of memory")


def test_ctrl_c_during_start_up_is_an_interruption(monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["models"]) == 130
    assert _one_line(capsys) == "Interrupted."


@pytest.mark.parametrize("command", ["train", "calibrate"])
def test_commands_that_check_labels_have_the_switch_the_check_advises(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--void-unknown-ids" in capsys.readouterr().out

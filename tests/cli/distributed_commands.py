"""Run several ``densehybrid`` commands in one ``torchrun`` launch (one process-group start for many checks).

``torchrun --nproc-per-node N tests/cli/distributed_commands.py PLAN.json``: PLAN.json holds ``{"commands": [[args],
...], "out": DIR}``. Every rank joins the group once and runs each command through ``densehybrid.cli.main`` (whose
commands then find the group joined and keep it), writing what the command printed to
``DIR/rank{R}-{I}.out``; the exit status is the first non-zero status of a command.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch

from densehybrid.cli import main
from densehybrid.engine import distributed


def run(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    out = Path(plan["out"])
    distributed.init_from_env(torch.device("cpu"))
    try:
        for index, args in enumerate(plan["commands"]):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                status = main(args)
            (out / f"rank{distributed.rank()}-{index}.out").write_text(printed.getvalue())
            if status != 0:
                return status
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1]))

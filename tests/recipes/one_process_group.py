"""Run several `densehybrid` commands in one torchrun process group (one launch instead of one per command).

Usage: ``torchrun --nproc-per-node 2 tests/recipes/one_process_group.py COMMANDS.json``, where the file holds a list
of argument lists. Every command must exit with 0; the group is left once, after the last.
"""

from __future__ import annotations

import json
import sys

from densehybrid.cli import main
from densehybrid.engine import distributed


def run_all(commands: list[list[str]]) -> int:
    leave = distributed.shutdown
    distributed.shutdown = lambda: None  # each `train` leaves the group at its end: keep it for the next command
    try:
        for args in commands:
            code = main(args)
            if code != 0:
                print(f"command failed with {code}: {args}", file=sys.stderr)
                return code
    finally:
        distributed.shutdown = leave
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(run_all(json.loads(open(sys.argv[1]).read())))

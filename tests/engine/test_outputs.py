"""The output-path policy's run-folder mechanisms: names that stay names, folder locks, moving an earlier run aside."""

from __future__ import annotations

import os
import socket

import pytest

from densehybrid.engine.outputs import LOCK_NAME, check_name, check_output_dir, folder_lock, move_aside
from densehybrid.errors import OutputError


@pytest.mark.parametrize("name", ["../victim", "/abs", "a\\b", "", " x", ".", "..", "~root"])
def test_a_name_that_leads_out_of_its_folder_is_refused(name):
    with pytest.raises(OutputError, match="plain name"):
        check_name(name, "recipe key `name`")


def test_plain_names_pass():
    assert check_name("ldn121-streethazards_v1.2", "name") == "ldn121-streethazards_v1.2"


def test_an_owned_folder_may_not_hold_an_input(tmp_path):
    (tmp_path / "run").mkdir()
    weights = tmp_path / "run" / "best.pt"
    weights.write_bytes(b"x")
    check_output_dir(tmp_path / "run", inputs=[weights])  # a command writing named outputs only: allowed
    with pytest.raises(OutputError, match="not to hold the input"):
        check_output_dir(tmp_path / "run", inputs=[weights], owns_folder=True)


def test_the_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    with folder_lock(tmp_path) as lock:
        assert lock.read_text().split() == [str(os.getpid()), socket.gethostname()]
        (tmp_path / "other").mkdir()
    assert not lock.exists()
    lock.write_text(f"1 {socket.gethostname()}\n")  # pid 1 is always alive
    with pytest.raises(OutputError, match="process 1 on"):
        with folder_lock(tmp_path):
            pass
    assert lock.exists()  # another process's lock is left alone
    lock.write_text(f"{2**22 + 7} {socket.gethostname()}\n")  # above any pid: that run is gone
    with folder_lock(tmp_path):
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / LOCK_NAME).exists()


def test_move_aside_deletes_nothing(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"1")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "keep.txt").write_text("k")
    aside = move_aside(tmp_path, ["last.pt", "best.pt", "tensorboard"])
    assert aside is not None and sorted(p.name for p in aside.iterdir()) == ["last.pt", "tensorboard"]
    assert (aside / "last.pt").read_bytes() == b"1" and (tmp_path / "keep.txt").exists()
    assert move_aside(tmp_path, ["last.pt"]) is None

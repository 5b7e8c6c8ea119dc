"""Inference sharding: every rank's block of the inputs, covering them once and in order."""

from __future__ import annotations

import pytest

from densehybrid.engine.distributed import gather_to_main, shard_range


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shard_range_covers_the_inputs_once_in_order(n: int, world: int) -> None:
    blocks = [shard_range(n, r, world) for r in range(world)]
    assert [i for block in blocks for i in block] == list(range(n))
    assert max(len(b) for b in blocks) - min(len(b) for b in blocks) <= 1


def test_shard_range_rejects_a_rank_outside_the_world() -> None:
    with pytest.raises(ValueError, match="rank 2, world 2"):
        shard_range(4, 2, 2)


def test_gather_to_main_in_one_process_is_a_list_of_one() -> None:
    assert gather_to_main({"a": 1}) == [{"a": 1}]

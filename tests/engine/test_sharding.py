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


@pytest.mark.parametrize("n", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("batch_size", [1, 2, 3])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_inference_blocks_hold_the_single_process_batches(n: int, batch_size: int, world: int) -> None:
    from densehybrid.engine.evaluate import batch_aligned_block

    blocks = [batch_aligned_block(n, batch_size, r, world) for r in range(world)]
    assert [i for block in blocks for i in block] == list(range(n))
    single = [list(range(n))[i : i + batch_size] for i in range(0, n, batch_size)]
    per_rank = [[list(b)[i : i + batch_size] for i in range(0, len(b), batch_size)] for b in blocks]
    assert [batch for batches in per_rank for batch in batches] == single


def test_collectives_in_one_process_are_identities() -> None:
    import torch

    from densehybrid.engine.distributed import broadcast_from_main, gather_to_all, is_distributed, process_group

    assert gather_to_all([1, 2]) == [[1, 2]] and broadcast_from_main({"a": 1}) == {"a": 1}
    with process_group(torch.device("cpu")) as device:  # not launched by torchrun: no group is joined
        assert device == torch.device("cpu") and not is_distributed()

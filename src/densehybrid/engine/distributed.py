"""Data-parallel training on PyTorch's distributed engine (``torchrun``), and the single-process fallbacks.

Under ``torchrun --nproc-per-node N`` every process reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from its
environment; :func:`init_from_env` joins the process group (NCCL on CUDA, gloo on the CPU). Everything else here is a
no-op in a single process, so the training loop calls these helpers unconditionally.

How a step is split: the loop draws one global batch of ``batch_size`` indices from the seeded permutation
(:class:`~densehybrid.engine.batches.ResumableSampler`) and rank ``r`` of ``W`` takes the ``r``-th of ``W`` equal
slices (:class:`ShardedBatchSampler`). ``DistributedDataParallel`` averages the gradients over the ranks, so with a
per-rank mean loss a step equals a single-process step on the whole global batch whenever every rank's loss averages
over the same number of pixels (BatchNorm statistics are per rank unless SyncBatchNorm is used). Because the split
depends only on the global batch, a checkpoint written by ``W`` processes resumes on any other number.

How inference is split: :func:`shard_range` gives rank ``r`` one contiguous block of the ``n`` inputs (the blocks
differ in length by at most one, an empty block is allowed), so concatenating what :func:`gather_to_main` returns, in
rank order, restores the input order exactly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = [
    "ShardedBatchSampler",
    "any_rank",
    "barrier",
    "broadcast_from_main",
    "gather_to_main",
    "init_from_env",
    "is_distributed",
    "is_main",
    "local_device",
    "mean_over_ranks",
    "rank",
    "rank_generator",
    "shard_range",
    "shutdown",
    "sum_over_ranks",
    "world_size",
    "wrap",
]


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """True on the process that writes files and logs (rank 0)."""
    return rank() == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process launch (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: torch.device) -> bool:
    """Join the process group ``torchrun`` describes in the environment; return True when distributed.

    Args:
        device: the resolved device of the run; CUDA selects the NCCL backend and this process's ``LOCAL_RANK`` GPU,
            anything else gloo.
    """
    if is_distributed():
        return True
    if not launched_by_torchrun():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Leave the process group (if any)."""
    if is_distributed():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """In a distributed CUDA run, this process's GPU (``cuda:LOCAL_RANK``); otherwise ``device`` unchanged."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """``DistributedDataParallel`` around ``model`` (optionally with SyncBatchNorm, which PyTorch runs on CUDA only).

    ``find_unused_parameters`` is on because objectives may leave a head without gradient (closed-set training
    does not train the dataset-posterior head).

    Raises:
        ValueError: ``sync_bn`` on a non-CUDA device.
    """
    if sync_bn:
        if device.type != "cuda":
            raise ValueError(
                f"Expected a CUDA device for `sync_bn` (PyTorch's SyncBatchNorm runs on GPUs only), but got {device}. "
                "Set run.sync_bn=false."
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


class ShardedBatchSampler(Sampler[list[int]]):
    """Global batches of ``batch_size`` consecutive indices of ``sampler`` (the last partial one dropped), and this
    rank's equal slice of each.

    Args:
        sampler: the index order (e.g. a :class:`~densehybrid.engine.batches.ResumableSampler`).
        batch_size: the global batch; must be divisible by ``world``.
        rank: this process's rank.
        world: number of processes.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world: int = 1) -> None:
        if batch_size % world:
            raise ValueError(f"Expected `batch_size` {batch_size} to be divisible by the world size {world}.")
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch_size // self.world
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch[self.rank * per_rank : (self.rank + 1) * per_rank]
                batch = []

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size


def rank_generator(shared: torch.Generator) -> torch.Generator:
    """A generator for this rank's step, seeded by one draw from the ``shared`` stream (identical on every rank).

    Every rank advances ``shared`` the same way, so its state in a checkpoint is valid at any world size, while the
    ranks draw different flips and negatives.
    """
    seed = int(torch.randint(2**62, (1,), generator=shared))
    return torch.Generator().manual_seed(seed + 1_000_003 * rank())


def _collective_device() -> torch.device:
    """Where tensors must live for a collective: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average each value over the ranks (the same keys on every rank)."""
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    tensor /= world_size()
    return dict(zip(keys, tensor.cpu().tolist()))


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks (a copy; on the CPU for gloo)."""
    if not is_distributed():
        return tensor.clone()
    out = tensor.detach().clone().to(_collective_device())
    dist.all_reduce(out)
    return out.to(tensor.device)


def any_rank(flag: bool) -> bool:
    """True when ``flag`` is True on at least one rank (every rank gets the same answer)."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def shard_range(n: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``: rank ``r`` of ``W`` gets ``[r*n//W, (r+1)*n//W)``.

    The blocks cover ``range(n)`` once, in order, for any ``n`` (also ``n < W``: some blocks are empty).
    """
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n < 0 or not 0 <= r < w:
        raise ValueError(f"Expected 0 <= rank < world and n >= 0, found rank {r}, world {w}, n {n}.")
    return range(r * n // w, (r + 1) * n // w)


def gather_to_main(obj: object) -> list[object] | None:
    """Every rank's ``obj`` (picklable), in rank order, on rank 0; ``None`` on the other ranks.

    In a single process: ``[obj]``. Concatenating per-rank lists of :func:`shard_range` blocks restores input order.
    """
    if not is_distributed():
        return [obj]
    gathered: list[object] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_from_main(obj: object) -> object:
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]

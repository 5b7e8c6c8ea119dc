"""Shared machinery of the streaming metrics: reset, merge and the distributed reduction of their states.

A streaming metric keeps only tensors that combine by addition (histograms, confusion matrices, sums and counts)
or by element-wise maximum, so two metrics fed disjoint data merge into the metric of the union, and processes
reduce with one ``all_reduce`` (SUM or MAX) per tensor.

Sums of floats (per-image means, component sIoU) are kept exactly (:func:`exact_sum_state`): every finite float64 is
an integer multiple of 2**-1074, so a sum of them is an integer in those units, stored as int64 limbs of 32 bits.
Integer addition is associative, so the sum does not depend on the order of the terms, the batch boundaries or how
the images were split over processes, and :func:`exact_sum_value` rounds it to float64 once (correctly rounded, as
``math.fsum``). A run over N processes therefore gives the single process's numbers bit for bit.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def zeros(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zero tensor whose untouched pages cost no memory on CPU.

    ``numpy.zeros`` obtains zeroed pages lazily from the operating system (calloc), so a large, sparsely filled
    histogram only occupies the pages that updates write to; ``torch.zeros`` would write (and fault in) every page.
    """
    if device.type == "cpu":
        return torch.from_numpy(np.zeros(size, dtype=torch.empty((), dtype=dtype).numpy().dtype))
    return torch.zeros(size, dtype=dtype, device=device)


def distributed_ready() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def collective_device(group: Any = None) -> torch.device:
    """Device that the process group's backend reduces on: CUDA for NCCL, CPU otherwise."""
    backend = dist.get_backend(group)
    if str(backend).lower() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


#: Limbs of an exact float64 sum: 32 value bits each, 68 * 32 = 2176 bits for the 2098 bits of the float64 range
#: (2**-1074 to 2**1024) and 2**78 terms of headroom; the last limb is signed.
EXACT_SUM_LIMBS = 68
_LIMB_BITS = 32
_LIMB_MASK = (1 << _LIMB_BITS) - 1
_UNIT_EXPONENT = 1074  # 2**-1074: the smallest positive float64, the unit of the exact sums


def exact_sum_state(rows: int, device: torch.device) -> torch.Tensor:
    """A zero ``(rows, EXACT_SUM_LIMBS)`` int64 tensor: ``rows`` exact float64 sums."""
    return torch.zeros(rows, EXACT_SUM_LIMBS, dtype=torch.int64, device=device)


def _limbs_to_int(limbs: list[int]) -> int:
    return sum(limb << (_LIMB_BITS * i) for i, limb in enumerate(limbs))


def exact_sum_add(state: torch.Tensor, row: int, values: Iterable[float]) -> None:
    """Add finite float64 ``values`` to the exact sum in ``state[row]``, in place (the limbs are left normalised, so
    ``all_reduce`` over up to 2**31 processes cannot overflow them).

    Raises:
        ValueError: a NaN or infinite value.
    """
    total = 0
    for value in values:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"Expected finite values in an exact sum, but got {value!r}.")
        numerator, denominator = value.as_integer_ratio()  # denominator: a power of two, at most 2**1074
        total += numerator << (_UNIT_EXPONENT - denominator.bit_length() + 1)
    if total == 0 and not bool(state[row].abs().gt(_LIMB_MASK).any()):
        return
    total += _limbs_to_int(state[row].tolist())
    limbs = [(total >> (_LIMB_BITS * i)) & _LIMB_MASK for i in range(EXACT_SUM_LIMBS - 1)]
    limbs.append(total >> (_LIMB_BITS * (EXACT_SUM_LIMBS - 1)))  # signed top limb (floor shift)
    state[row] = torch.tensor(limbs, dtype=torch.int64, device=state.device)


def exact_sum_value(limbs: torch.Tensor) -> float:
    """The float64 nearest to the exact sum held in ``limbs`` (one row of :func:`exact_sum_state`)."""
    return _limbs_to_int(limbs.tolist()) / (1 << _UNIT_EXPONENT)  # int / int is correctly rounded


class SumStateMetric(ABC):
    """Base class of metrics whose state is a set of tensors reduced by summation (or maximum).

    Subclasses implement :meth:`_new_state` (zero tensors on a device) and :meth:`_config` (the settings that must
    agree for two metrics to merge); the state lives in ``self._state`` (a dict of tensors, or None before the
    first update). States named in ``_max_states`` combine by element-wise maximum instead of summation.
    """

    _max_states: tuple[str, ...] = ()

    def __init__(self, device: torch.device | str | None = None) -> None:
        self._device = torch.device(device) if device is not None else None
        self._state: dict[str, torch.Tensor] | None = None
        if self._device is not None:
            self._state = self._new_state(self._device)

    @abstractmethod
    def _new_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Zero-initialised state tensors on ``device``."""

    @abstractmethod
    def _config(self) -> tuple:
        """Settings that must be equal for two metrics to merge."""

    # -- shared ---------------------------------------------------------------------------------------------------
    def _ensure_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Allocate the state on the first update's device unless a device was fixed at construction."""
        if self._state is None:
            self._state = self._new_state(self._device or device)
        return self._state

    @property
    def device(self) -> torch.device | None:
        """Device of the state (None until the first update when no device was given)."""
        if self._state is None:
            return self._device
        return next(iter(self._state.values())).device

    def reset(self) -> SumStateMetric:
        """Forget all updates (the state keeps its device)."""
        if self._state is not None:
            self._state = self._new_state(self.device)
        return self

    def merge(self, other: SumStateMetric) -> SumStateMetric:
        """Add the state of ``other`` (fed with different data) to this metric, in place.

        Raises:
            TypeError: if ``other`` is not the same kind of metric.
            ValueError: if the two metrics were configured differently.
        """
        if type(other) is not type(self):
            raise TypeError(f"Expected `other` to be a {type(self).__name__}, but got {type(other).__name__}.")
        if other._config() != self._config():
            raise ValueError(
                f"Expected `other` to have the same configuration {self._config()}, but got {other._config()}."
            )
        if other._state is None:
            return self
        state = self._ensure_state(other.device)
        for name, tensor in state.items():
            incoming = other._state[name].to(tensor.device)
            if name in self._max_states:
                torch.maximum(tensor, incoming, out=tensor)
            else:
                tensor += incoming
        return self

    def sync(self, group: Any = None) -> SumStateMetric:
        """Reduce the state over all processes of ``group`` with ``torch.distributed.all_reduce``, in place.

        Call it once, after the last :meth:`update` and before :meth:`compute`, on every process. A no-op when
        ``torch.distributed`` is not initialised. Processes that saw no data contribute zeros.
        """
        if not distributed_ready():
            return self
        device = collective_device(group)
        state = self._ensure_state(device)
        for name, tensor in state.items():
            op = dist.ReduceOp.MAX if name in self._max_states else dist.ReduceOp.SUM
            if tensor.device == device:
                dist.all_reduce(tensor, op=op, group=group)
            else:
                moved = tensor.to(device)
                dist.all_reduce(moved, op=op, group=group)
                state[name] = moved.to(tensor.device)
        return self

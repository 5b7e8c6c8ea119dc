"""Bounds on sizes, image counts and worker processes, derived from the machine the command runs on.

A request the machine cannot serve (more DataLoader workers than CPU cores, arrays larger than the available memory)
is refused before the work starts with a :class:`~densehybrid.errors.ResourceError` that says what was asked, what
the machine has and what to change, instead of letting the kernel's out-of-memory killer stop the whole machine.
"""

from __future__ import annotations

import os

from densehybrid.errors import ResourceError

#: Share of the available memory one request may plan to use (the rest is left to the model, the OS and others).
MEMORY_SHARE = 0.5


def usable_cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``, else free pages), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(count: float) -> str:
    """``1.5 GiB``-style text."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def check_num_workers(count: int, option: str = "--num-workers") -> int:
    """Refuse more DataLoader worker processes than usable CPU cores (each worker is a full Python process).

    Raises:
        ResourceError: ``count`` exceeds :func:`usable_cpu_count`.
    """
    cores = usable_cpu_count()
    if count > cores:
        raise ResourceError(
            f"Expected `{option}` at most {cores} (the CPU cores available here), but got {count}: every worker is a "
            f"separate process with its own memory. Use `{option} {min(cores, 4)}` or fewer."
        )
    return count


def check_memory(required: float, what: str, remedy: str) -> None:
    """Refuse a request whose planned memory exceeds :data:`MEMORY_SHARE` of the available memory.

    Args:
        required: estimated bytes.
        what: what needs them (``"the benchmark and negatives of these demo settings"``).
        remedy: what to reduce.

    Raises:
        ResourceError: the estimate exceeds the share (nothing is checked when the available memory is unknown).
    """
    available = available_memory()
    if available is None:
        return
    budget = MEMORY_SHARE * available
    if required > budget:
        raise ResourceError(
            f"Expected {what} to fit in memory, but they need about {format_bytes(required)} and this machine has "
            f"{format_bytes(available)} available (at most {format_bytes(budget)} is planned per run). {remedy}"
        )


def worker_bound(requested: int, default: int, option: str, processes: int = 1) -> tuple[int, str | None]:
    """The DataLoader workers of each of ``processes`` local processes: ``requested``, bounded by the usable cores.

    A value above the bound is refused, unless it is the untouched ``default`` (a recipe's default of 4 on a 2-core
    machine), which is lowered to the bound with a note.

    Returns:
        ``(workers, note)``; ``note`` says what was lowered (None when nothing was).

    Raises:
        ResourceError: an explicit ``requested`` above the bound.
    """
    bound = max(1, usable_cpu_count() // max(1, processes))
    if requested <= bound:
        return requested, None
    if requested == default:
        return bound, f"{option} lowered from {requested} to {bound} (the CPU cores available per process)"
    raise ResourceError(
        f"Expected `{option}` at most {bound} (the CPU cores available here, over {processes} process(es)), but got "
        f"{requested}: every worker is a separate process with its own memory. Set {option}={bound} or fewer."
    )


def check_pixels(count: float, bytes_per_pixel: float, what: str, remedy: str) -> None:
    """Refuse ``count`` pixels of ``bytes_per_pixel`` each when they do not fit (see :func:`check_memory`)."""
    check_memory(float(count) * float(bytes_per_pixel), what, remedy)


__all__ = [
    "check_pixels",
    "worker_bound",
    "MEMORY_SHARE",
    "available_memory",
    "check_memory",
    "check_num_workers",
    "format_bytes",
    "usable_cpu_count",
]

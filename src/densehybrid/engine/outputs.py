"""The output-path policy every command follows, so that no run destroys data or loses its results.

1. **Inputs are never outputs**: a path the command reads (checkpoint, dataset root, statistics file) is refused as
   an output, even with ``--overwrite``.
2. **Existing results are kept**: an output file (or result folder) that already exists is refused unless the user
   passes ``--overwrite``.
3. **Checked before the work**: that a file path is not a folder, that a folder is not a file, and that the folder
   can be written (a probe file is created and removed), before any model is loaded or any step is trained.
4. **Written atomically**: to a temporary ``.NAME.*.tmp`` beside the target, renamed over it when complete
   (:func:`atomic_path`); a folder of results is built beside the old one and swapped in (:func:`swap_in`), so an
   interrupted run leaves the previous result intact.
5. **Stale temporaries are removed** at the start of a run that owns the folder (:func:`remove_stale_temporaries`):
   a killed save leaves its ``.*.tmp`` behind.

6. **Run folders** (a training run owns its ``--out``): no input may lie inside it (``owns_folder=True`` of
   :func:`check_output_dir`), an earlier run is moved aside, never deleted (:func:`move_aside`), a name that becomes
   part of a path is a plain name (:func:`check_name`), and one process writes there at a time (:func:`folder_lock`).

Commands print their results before writing files, so a failed write never loses a finished evaluation.

Example (a command writing one JSON file and reading a checkpoint)::

    out = check_output_file(args.out, inputs=[args.checkpoint], overwrite=args.overwrite)
    ...  # the work
    print(table)
    write_json(out, document)  # atomic
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from densehybrid.errors import OutputError

#: Temporary names of atomic writes: ``.NAME.RANDOM.tmp`` (files) and ``.NAME.RANDOM.tmp`` (staged folders).
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".tmp"


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def _probe_folder(folder: Path, option: str) -> None:
    """Check that ``folder`` (or, when missing, its nearest existing ancestor) is a writable directory."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(
            f"Expected `{option}` to lie in a folder, but {str(existing)!r} is a file: choose another path or move "
            "that file away."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=TEMPORARY_PREFIX + "write-check.", suffix=TEMPORARY_SUFFIX, dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"Expected `{option}` to be writable, but folder {str(existing)!r} cannot be written "
            f"({exc.strerror or exc}): choose another path or fix its permissions."
        ) from None


def _check_not_input(path: Path, inputs: Iterable[str | os.PathLike[str] | None], option: str) -> None:
    for item in inputs:
        if item is None:
            continue
        source = Path(item).expanduser()
        if _same(path, source) or (source.exists() and path.exists() and path.is_dir() and _inside(source, path)):
            raise OutputError(
                f"Expected `{option}` {str(path)!r} to differ from the inputs, but it is (or holds) the input "
                f"{str(source)!r}: writing there would destroy it. Choose another `{option}`."
            )


def check_name(name: str, option: str) -> str:
    """Check that ``name`` is a plain name (a file or folder name it becomes part of cannot leave its parent folder).

    Raises:
        OutputError: ``name`` is empty, holds a path separator, starts with ``.`` or ``~``, or is absolute.
    """
    bad = (
        not name
        or any(sep in name for sep in ("/", "\\", "\0"))
        or name.startswith((".", "~"))
        or Path(name).is_absolute()
        or name.strip() != name
    )
    if bad:
        raise OutputError(
            f"Expected {option} to be a plain name (letters, digits, '-', '_', '.'; no folder), but got {name!r}: "
            "a name becomes part of output paths (runs/NAME), so it may not lead out of their folder."
        )
    return name


def check_output_file(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    overwrite: bool = False,
    option: str = "--out",
) -> Path:
    """Check, before the work, that a file may be written at ``path``; return it as a :class:`Path`.

    Args:
        path: the output file.
        inputs: files and folders the command reads; ``path`` may be none of them (``--overwrite`` included).
        overwrite: allow replacing an existing file.
        option: the option name shown in messages.

    Raises:
        OutputError: ``path`` is an input, an existing folder, an existing file without ``overwrite``, lies below a
            file, or its folder cannot be written.
    """
    path = Path(path).expanduser()
    _check_not_input(path, inputs, option)
    if path.is_dir():
        raise OutputError(f"Expected `{option}` {str(path)!r} to be a file path, but it is a folder.")
    if path.exists() and not overwrite:
        raise OutputError(
            f"Expected `{option}` {str(path)!r} not to exist, but it does: pass --overwrite to replace it, or choose "
            "another path."
        )
    _probe_folder(path.parent, option)
    return path


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    inputs: Iterable[str | os.PathLike[str] | None] = (),
    outputs: Iterable[str] = (),
    overwrite: bool = False,
    option: str = "--out",
    owns_folder: bool = False,
) -> Path:
    """Check, before the work, that results may be written into folder ``path``; return it as a :class:`Path`.

    Args:
        path: the output folder (created later by the command; it may exist).
        inputs: files and folders the command reads; none may be ``path`` or one of ``outputs``.
        outputs: names (relative to ``path``) of the files or folders the command writes; an existing one is refused
            unless ``overwrite``. A command that resumes its own folder (the demo) passes none.
        overwrite: allow replacing existing ``outputs``.
        option: the option name shown in messages.
        owns_folder: the command writes, resumes and moves aside files anywhere in ``path`` (a training run), so no
            input may lie inside it either.

    Raises:
        OutputError: ``path`` is a file, an input, or cannot be written, or an output exists without ``overwrite``;
            with ``owns_folder``, an input lies inside ``path``.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"Expected `{option}` {str(path)!r} to be a folder, but it is a file.")
    if owns_folder:
        for item in inputs:
            if item is not None and str(item) and _inside(Path(item).expanduser(), path):
                raise OutputError(
                    f"Expected `{option}` {str(path)!r} not to hold the input {str(item)!r}: a run owns its output "
                    f"folder (it replaces last.pt and best.pt there). Copy the input elsewhere or choose another "
                    f"`{option}`."
                )
    targets = [path / name for name in outputs]
    for target in [path, *targets]:
        for item in inputs:
            if item is not None and _same(target, Path(item).expanduser()):
                raise OutputError(
                    f"Expected `{option}` {str(path)!r} not to hold the input {str(item)!r} where results are "
                    f"written ({str(target)!r}). Choose another `{option}`."
                )
    for target in targets:
        if target.exists() and not overwrite:
            raise OutputError(
                f"Expected {str(target)!r} (under `{option}`) not to exist, but it does: pass --overwrite to replace "
                "it, or choose another folder."
            )
    _probe_folder(path, option)
    return path


def move_aside(folder: str | os.PathLike[str], names: Iterable[str], label: str = "earlier-run") -> Path | None:
    """Move the existing ``names`` of ``folder`` into a new subfolder ``LABEL-YYYYmmdd-HHMMSS`` (nothing is deleted).

    Returns:
        the new subfolder, or None when none of ``names`` exists.
    """
    folder = Path(folder)
    present = [folder / name for name in names if (folder / name).exists() or (folder / name).is_symlink()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = folder / f"{label}-{stamp}"
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = folder / f"{label}-{stamp}-{suffix}"
    aside.mkdir()
    for item in present:
        os.replace(item, aside / item.name)
    return aside


#: The lock file of a folder one process writes at a time (holds the owner's pid and host).
LOCK_NAME = ".densehybrid.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], option: str = "--out") -> Iterator[Path]:
    """Hold ``folder/.densehybrid.lock`` while the block runs, so that one run writes into ``folder`` at a time.

    The lock file holds the owner's pid and host name; a lock whose process no longer exists on this host (a killed
    run) is stale and taken over. The file is removed when the block ends.

    Raises:
        OutputError: another live process holds the lock.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(50):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is None and _age(lock) < 2.0:  # being written by the process that just created it
                time.sleep(0.05)
                continue
            if owner is None or (owner[1] == socket.gethostname() and not _alive(owner[0])):
                lock.unlink(missing_ok=True)  # stale: its run was killed
                continue
            pid, host = owner
            raise OutputError(
                f"Expected no other run writing into `{option}` {str(folder)!r}, but process {pid} on {host} holds "
                f"{str(lock)!r}. Wait for it, choose another `{option}`, or delete the lock file if that process is "
                "gone."
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(me)
        break
    else:
        raise OutputError(f"Cannot take the lock {str(lock)!r} of `{option}`: other runs keep creating it.")
    try:
        yield lock
    finally:
        if _lock_owner(lock) == (os.getpid(), socket.gethostname()):
            lock.unlink(missing_ok=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _lock_owner(lock: Path) -> tuple[int, str] | None:
    """``(pid, host)`` of a lock file, or None when it is unreadable or malformed (a half-written lock)."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def remove_stale_temporaries(folder: str | os.PathLike[str], pattern: str = ".*.tmp") -> list[Path]:
    """Delete the temporaries (``.NAME.*.tmp`` files and staged folders) a killed run left in ``folder``.

    Call it only for a folder the current run owns (no other process writes there at the same time).

    Returns:
        the removed paths.
    """
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for stale in folder.glob(pattern):
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except OSError:
            continue  # not ours to force; a later write of the same name replaces it anyway
        removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block ends without an error.

    Example:
        >>> with atomic_path("figure.png") as tmp:  # doctest: +SKIP
        ...     fig.savefig(tmp, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)  # mkstemp creates 0600; give the file the permissions open() would
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def staging_dir(beside: str | os.PathLike[str]) -> Path:
    """A new empty temporary folder ``.NAME.*.tmp`` beside ``beside``, to build a result in before :func:`swap_in`."""
    beside = Path(beside)
    beside.parent.mkdir(parents=True, exist_ok=True)
    return Path(
        tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{beside.name}.", suffix=TEMPORARY_SUFFIX, dir=beside.parent)
    )


def swap_in(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> Path:
    """Replace ``final`` (file or folder, may be missing) by the complete ``staged`` one, then delete the old one.

    The old result is moved aside (not deleted) until the new one is in place.
    """
    staged, final = Path(staged), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final.exists() or final.is_symlink():
        old = Path(
            tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{final.name}.old.", suffix=TEMPORARY_SUFFIX, dir=final.parent)
        )
        old.rmdir()
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    return final


class JsonLines:
    """Appends one strict JSON line per :meth:`append` to ``path`` and flushes it, so that an interrupted run keeps
    every line it wrote (the file is opened on the first line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, allow_nan=False) + "\n"
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()
            self._file.write(line)
            self._file.flush()
        except OSError as exc:
            raise OutputError(f"Cannot write {str(self.path)!r}: {exc.strerror or exc}.") from exc

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


__all__ = [
    "JsonLines",
    "atomic_path",
    "atomic_write_text",
    "check_name",
    "check_output_dir",
    "check_output_file",
    "folder_lock",
    "move_aside",
    "remove_stale_temporaries",
    "staging_dir",
    "swap_in",
]

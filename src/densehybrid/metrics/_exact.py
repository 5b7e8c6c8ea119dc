"""The exact grouped ROC curve of many pixels in bounded memory, piece by piece.

Pixels come as re-iterable chunks of ``(keys, labels)``: int32 order keys of the float32 scores
(:func:`~densehybrid.metrics._keys.order_keys`) and labels in {0, 1}. One pass counts anomaly and inlier pixels in
2**16 coarse bins of the keys' upper half. The curve is then produced from the highest score down as a sequence of
pieces, each an exact :class:`~densehybrid.metrics._curve.Curve` of distinct scores:

* consecutive coarse bins holding together at most ``budget`` pixels are gathered by one more pass and sorted;
* a coarse bin holding more than ``budget`` pixels is resolved by one pass that counts its 2**16 keys (each a
  single float32 value), so it needs no sort at all.

Memory: O(budget) for the piece being built plus the two coarse histograms (1 MiB), whatever the pixel count.
Time: one pass per piece (or per oversized bin), each a scan of the chunks.

Over several processes (``distributed=True``, every rank of the default process group holding its own pixels):
the coarse and per-key counts are summed with ``all_reduce`` and the pixels of a piece are gathered from every rank
before the sort. Integer counts and a sort are exact, so every rank walks the same curve as one process holding all
the pixels, in the same order of collectives.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from densehybrid.metrics import _curve
from densehybrid.metrics._keys import keys_to_float

#: (keys int32 (n,), labels (n,) in {0, 1}) of valid pixels; called once per pass.
PixelChunks = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]

_COARSE_SHIFT = 16
_COARSE_BINS = 1 << (32 - _COARSE_SHIFT)
_COARSE_OFFSET = _COARSE_BINS // 2
#: Default pixels per piece: at most about 400 MiB of temporaries while one piece is sorted and grouped.
DEFAULT_BUDGET = 1 << 22


class Piece(NamedTuple):
    """A run of the curve: its groups and the anomaly / inlier pixels of every higher score."""

    curve: _curve.Curve
    tps_before: int
    fps_before: int


def _coarse(keys: torch.Tensor) -> torch.Tensor:
    return (keys.to(torch.int64) >> _COARSE_SHIFT) + _COARSE_OFFSET


def _sum_over_ranks(counts: torch.Tensor) -> torch.Tensor:
    """``counts`` summed over the ranks of the default process group (exact for integers)."""
    from densehybrid.metrics._base import collective_device

    device = collective_device()
    reduced = counts.to(device)
    dist.all_reduce(reduced)
    return reduced.cpu()


def _gather_from_ranks(part: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``part`` (CPU tensors), in rank order."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, part)
    return gathered


class ExactCurve:
    """Exact grouped counts of the pixels that ``chunks`` yields, built piece by piece (see the module doc).

    Args:
        chunks: called once per pass; yields ``(keys, labels)`` on the CPU.
        budget: most pixels gathered and sorted at once.
        distributed: the pixels are spread over the ranks of the default process group (each rank's ``chunks``
            yields its own): counts are summed and pieces gathered over the ranks. Every rank must then build the
            curve and walk the same pieces.
    """

    def __init__(self, chunks: PixelChunks, budget: int = DEFAULT_BUDGET, distributed: bool = False) -> None:
        if budget < 1:
            raise ValueError(f"Expected `budget` >= 1, but got {budget}.")
        self.chunks = chunks
        self.budget = int(budget)
        self.distributed = distributed
        counts = torch.zeros(2 * _COARSE_BINS, dtype=torch.int64)
        for keys, labels in chunks():
            if keys.numel():
                counts += torch.bincount(_coarse(keys) * 2 + labels.to(torch.int64), minlength=2 * _COARSE_BINS)
        if distributed:
            counts = _sum_over_ranks(counts)
        counts = counts.view(-1, 2)
        self.neg_per_bin, self.pos_per_bin = counts[:, 0].clone(), counts[:, 1].clone()
        self.num_pos, self.num_neg = int(self.pos_per_bin.sum()), int(self.neg_per_bin.sum())

    def first_bin_at_tpr(self, tpr: float, strict: bool) -> int:
        """Position (highest first, over occupied coarse bins) of the first bin at whose end the TPR meets the rule:
        no operating point above it does. 0 without anomaly pixels."""
        if self.num_pos == 0:
            return 0
        rates = self.pos_per_bin[self._occupied()].cumsum(0).to(torch.float64) / self.num_pos
        hits = ((rates > tpr) if strict else (rates >= tpr)).nonzero()
        return int(hits[0, 0]) if hits.numel() else 0

    def _occupied(self) -> torch.Tensor:
        """Occupied coarse bins, highest first."""
        return ((self.pos_per_bin + self.neg_per_bin) > 0).nonzero().squeeze(1).flip(0)

    def pieces(self, start: int = 0) -> Iterator[Piece]:
        """The curve from the ``start``-th occupied coarse bin (highest first) down, as exact pieces."""
        order = self._occupied()
        sizes = (self.pos_per_bin + self.neg_per_bin)[order]
        tps_before = int(self.pos_per_bin[order[:start]].sum())
        fps_before = int(self.neg_per_bin[order[:start]].sum())
        position = start
        while position < order.numel():
            if int(sizes[position]) > self.budget:
                curve = self._resolve_bin(int(order[position]))
                position += 1
            else:
                end = position + 1
                total = int(sizes[position])
                while end < order.numel() and total + int(sizes[end]) <= self.budget:
                    total += int(sizes[end])
                    end += 1
                curve = self._gather(int(order[end - 1]), int(order[position]))
                position = end
            yield Piece(curve, tps_before, fps_before)
            tps_before += curve.num_pos
            fps_before += curve.num_neg

    def _gather(self, low_bin: int, high_bin: int) -> _curve.Curve:
        """Sort the pixels of coarse bins ``low_bin..high_bin`` and group them by key, highest first."""
        low = (low_bin - _COARSE_OFFSET) << _COARSE_SHIFT
        high = ((high_bin - _COARSE_OFFSET + 1) << _COARSE_SHIFT) - 1
        parts = []
        for keys, labels in self.chunks():
            inside = (keys >= low) & (keys <= high)
            if bool(inside.any()):
                packed = keys[inside].to(torch.int64)
                packed <<= 1
                packed |= labels[inside]
                parts.append(packed)
        packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        del parts
        if self.distributed:
            packed = torch.cat(_gather_from_ranks(packed))
        packed.numpy().sort()
        labels = packed & 1
        packed >>= 1
        ends = torch.cat([(packed[1:] != packed[:-1]).nonzero().squeeze(1), packed.new_tensor([packed.numel() - 1])])
        tps = labels.cumsum_(0)[ends]
        del labels
        counts = ends + 1
        pos = torch.diff(tps, prepend=tps.new_zeros(1))
        neg = torch.diff(counts - tps, prepend=tps.new_zeros(1))
        return _curve.Curve(pos.flip(0), neg.flip(0), keys_to_float(packed[ends]).flip(0))

    def _resolve_bin(self, coarse_bin: int) -> _curve.Curve:
        """Count the pixels of one coarse bin per key (its 2**16 keys are single float32 values)."""
        base = (coarse_bin - _COARSE_OFFSET) << _COARSE_SHIFT
        counts = torch.zeros(2 << _COARSE_SHIFT, dtype=torch.int64)
        for keys, labels in self.chunks():
            inside = _coarse(keys) == coarse_bin
            if bool(inside.any()):
                fine = keys[inside].to(torch.int64) - base
                counts += torch.bincount(fine * 2 + labels[inside].to(torch.int64), minlength=2 << _COARSE_SHIFT)
        if self.distributed:
            counts = _sum_over_ranks(counts)
        counts = counts.view(-1, 2)
        occupied = ((counts[:, 0] + counts[:, 1]) > 0).nonzero().squeeze(1).flip(0)
        return _curve.Curve(counts[occupied, 1], counts[occupied, 0], keys_to_float(occupied + base))


def tensor_chunks(
    scores: torch.Tensor, target: torch.Tensor, ignore_index: int | None, chunk: int = 1 << 20
) -> PixelChunks:
    """Chunks of in-memory ``scores`` / ``target`` (any shape), ignored pixels dropped, keys computed per chunk."""
    from densehybrid.metrics._keys import order_keys

    flat_scores, flat_target = scores.reshape(-1), target.reshape(-1)

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, flat_scores.numel(), chunk):
            s = flat_scores[start : start + chunk].cpu()
            t = flat_target[start : start + chunk].cpu()
            if ignore_index is not None and t.dtype != torch.bool:
                keep = t != ignore_index
                s, t = s[keep], t[keep]
            yield order_keys(s), t.to(torch.uint8)

    return chunks


class WholeCurve:
    """A curve already in memory, with the interface of :class:`ExactCurve` (one piece)."""

    def __init__(self, curve: _curve.Curve) -> None:
        self.curve = curve
        self.num_pos, self.num_neg = curve.num_pos, curve.num_neg

    def first_bin_at_tpr(self, tpr: float, strict: bool) -> int:
        return 0

    def pieces(self, start: int = 0) -> Iterator[Piece]:
        yield Piece(self.curve, 0, 0)


class PixelStore:
    """Keys and labels of streamed pixels for the passes of :class:`ExactCurve`: in memory up to ``memory_pixels``,
    then appended to two anonymous temporary files (5 bytes per pixel, deleted on :meth:`close`).

    Args:
        memory_pixels: pixels kept in memory before everything moves to disk.
        directory: where the temporary files go (default: the system's temporary directory).
    """

    def __init__(self, memory_pixels: int = 1 << 24, directory: str | None = None) -> None:
        self.memory_pixels = int(memory_pixels)
        self.directory = directory
        self._keys: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._in_memory = 0
        self._files = None
        self._on_disk = 0

    def __len__(self) -> int:
        return self._in_memory + self._on_disk

    def add(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Append int32 ``keys`` and {0, 1} ``labels`` (1-D, same length)."""
        self._keys.append(keys.to("cpu", torch.int32).contiguous())
        self._labels.append(labels.to("cpu", torch.uint8).contiguous())
        self._in_memory += keys.numel()
        if self._in_memory > self.memory_pixels:
            self._spill()

    def _spill(self) -> None:
        import tempfile

        if self._files is None:
            self._files = (tempfile.TemporaryFile(dir=self.directory), tempfile.TemporaryFile(dir=self.directory))
        keys_file, labels_file = self._files
        keys_file.seek(0, 2)
        labels_file.seek(0, 2)
        for keys, labels in zip(self._keys, self._labels):
            keys_file.write(keys.numpy().tobytes())
            labels_file.write(labels.numpy().tobytes())
        self._on_disk += self._in_memory
        self._keys, self._labels, self._in_memory = [], [], 0

    def chunks(self, chunk: int = 1 << 22) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """All stored pixels, in order of arrival, in chunks of at most ``chunk`` pixels."""
        import numpy as np

        if self._files is not None:
            keys_file, labels_file = self._files
            keys_file.seek(0)
            labels_file.seek(0)
            for start in range(0, self._on_disk, chunk):
                count = min(chunk, self._on_disk - start)
                keys = np.frombuffer(keys_file.read(4 * count), dtype=np.int32)
                labels = np.frombuffer(labels_file.read(count), dtype=np.uint8)
                yield torch.from_numpy(keys.copy()), torch.from_numpy(labels.copy())
        yield from zip(self._keys, self._labels)

    def close(self) -> None:
        """Delete the temporary files and free the memory."""
        if self._files is not None:
            for f in self._files:
                f.close()
            self._files = None
        self._keys, self._labels, self._in_memory, self._on_disk = [], [], 0, 0


# ---- metrics over the pieces, highest score first; each agrees exactly with its whole-curve version in _curve ----


def average_precision(pieces: Iterable[Piece], num_pos: int) -> float:
    """:func:`densehybrid.metrics._curve.average_precision` over pieces."""
    total = torch.zeros((), dtype=torch.float64)
    for curve, tps_before, fps_before in pieces:
        tps, fps = curve.cumulative()
        tps += tps_before
        fps += fps_before
        total += (curve.pos.to(torch.float64) * (tps / (tps + fps))).sum()
    return float(total / num_pos)


def auroc(pieces: Iterable[Piece], num_pos: int, num_neg: int) -> float:
    """:func:`densehybrid.metrics._curve.auroc` over pieces."""
    area = torch.zeros((), dtype=torch.float64)
    for curve, tps_before, _ in pieces:
        tps, _ = curve.cumulative()
        tps += tps_before
        previous = tps - curve.pos.to(torch.float64)
        area += (curve.neg.to(torch.float64) * (previous + tps)).sum()
    return float(area / 2 / num_pos / num_neg)


def best_f1(pieces: Iterable[Piece], num_pos: int) -> tuple[float, float]:
    """``(threshold, f1)`` of :func:`densehybrid.metrics._curve.best_f1_index` over pieces (first on ties)."""
    best, threshold = -1.0, float("nan")
    for curve, tps_before, fps_before in pieces:
        tps, fps = curve.cumulative()
        tps += tps_before
        fps += fps_before
        f1 = 2 * tps / (tps + fps + num_pos)
        index = int(torch.argmax(f1))
        if float(f1[index]) > best:
            best, threshold = float(f1[index]), float(curve.thresholds[index])
    return threshold, best


def point_at_tpr(
    pieces: Iterable[Piece], num_pos: int, tpr: float, strict: bool, drop_intermediate: bool
) -> tuple[float, int]:
    """``(threshold, fps)`` of :func:`densehybrid.metrics._curve.index_at_tpr`'s point over pieces; ``(nan, -1)``
    if there is none.

    With ``drop_intermediate`` a point is skipped as scikit-learn's ``roc_curve`` drops it: it is neither the first
    nor the last point and the second differences of its tps and fps are zero. Its neighbours may lie in the
    previous or next piece, so the last point of every piece waits for the next one.
    """
    prev: tuple[float, float] | None = None  # the decided point before `pending` (None: pending is the first)
    pending: tuple[float, float, float] | None = None  # (tps, fps, threshold) of the point awaiting its successor
    started = False
    for curve, tps_before, fps_before in pieces:
        if not started and tps_before + fps_before > 0:
            prev = (float(tps_before), float(fps_before))  # the walk starts below the top: the point above it
        started = True
        tps, fps = curve.cumulative()
        head = ([prev] if prev is not None else []) + ([pending[:2]] if pending is not None else [])
        all_tps = torch.cat([tps.new_tensor([h[0] for h in head]), tps + tps_before])
        all_fps = torch.cat([fps.new_tensor([h[1] for h in head]), fps + fps_before])
        head_thr = [pending[2]] if pending is not None else []
        all_thr = torch.cat([curve.thresholds.new_tensor(head_thr), curve.thresholds])
        first = 1 if prev is not None else 0  # candidates: all_tps[first:-1]; their thresholds: all_thr[:-1]
        count = all_tps.numel()
        if count - 1 > first:
            index = torch.arange(first, count - 1)
            rates = all_tps[index] / num_pos
            hit = (rates > tpr) if strict else (rates >= tpr)
            if drop_intermediate:
                before = (index - 1).clamp(min=0)
                bend = (all_fps[before] - 2 * all_fps[index] + all_fps[index + 1] != 0) | (
                    all_tps[before] - 2 * all_tps[index] + all_tps[index + 1] != 0
                )
                hit &= bend | (index == 0)
            hits = hit.nonzero()
            if hits.numel():
                found = int(index[int(hits[0, 0])])
                return float(all_thr[found - first]), int(all_fps[found])
        if count >= 2:
            prev = (float(all_tps[-2]), float(all_fps[-2]))
        pending = (float(all_tps[-1]), float(all_fps[-1]), float(all_thr[-1]))
    if pending is not None:  # the last point is always kept
        rate = pending[0] / num_pos
        if (rate > tpr) if strict else (rate >= tpr):
            return pending[2], int(pending[1])
    return float("nan"), -1

r"""Write anomaly maps where the SegmentMeIfYouCan toolkit and its Codabench server read them.

The toolkit (``road_anomaly_benchmark``) stores one file per frame, ``{DIR_OUTPUTS}/anomaly_p/{method}/{dataset}/
{frame}.hdf5``, holding an HDF5 dataset named ``value``: the (H, W) anomaly map at the image's resolution, higher =
more anomalous, saved as **float16** with gzip compression. ``dataset`` is the toolkit's persistence name
(``AnomalyTrack-all``, ``ObstacleTrack-all``, ``LostAndFound-test``, ``LostAndFound-train``): the validation and
test subsets are evaluated from those folders.

float16 has 11 significant bits and a largest finite value of 65504. DenseHybrid scores are unbounded log-ratios, so
a raw cast can round many distinct scores to one value (ties that flatten the precision-recall curve) or overflow.
:func:`write_anomaly_map` counts the distinct values before and after the cast and warns when the cast loses them;
a monotone ``squash`` keeps the ranking of pixels across all frames while spending float16's resolution better:

* ``"sigmoid"``: :math:`y = \sigma((s - c) / t)` in (0, 1), for consumers that expect probabilities. Fitted on the
  first frame: ``c`` = its 99th percentile, ``t`` = (max - c) / 4, so that frame's top scores stay below
  :math:`\sigma(4) \approx 0.982`, where float16 still resolves differences.
* ``"rank"``: :math:`y = \operatorname{logit} F(s) - \operatorname{logit} 0.99`, with :math:`F` the empirical CDF of
  the first frame's scores (1001 quantiles, linear in between, linear tails outside). Unlike a rank in [0, 1], whose
  top percent would collapse to about 20 float16 values, both tails keep float16 resolution.

Both put the first frame's 99th percentile where float16 is densest (0 for ``"rank"``, 0.5 for ``"sigmoid"``):
anomalies cover a few percent of the pixels, so the detection thresholds lie in that upper tail. On a simulated
DenseHybrid map (NumPy seed 0: 2M inlier pixels ~ N(-25, 4), 2 % anomalies ~ N(-5, 3)) the float16 cast keeps 9951
distinct values raw, 17574 after ``"rank"`` and 14828 after ``"sigmoid"``; the same map shifted by +3000 keeps 28 raw.
Both are strictly increasing and fitted once (by :class:`SmiycWriter` on its first frame, or given explicitly), then
applied unchanged to every frame: a per-frame normalisation would change the pooled metrics.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from densehybrid.errors import DenseHybridError, NonFiniteError
from densehybrid.openset import OpenSetModel

#: Persistence names of the SMIYC toolkit datasets (where it looks for saved outputs).
SMIYC_DATASETS = ("AnomalyTrack-all", "ObstacleTrack-all", "LostAndFound-test", "LostAndFound-train")
SQUASHES = ("sigmoid", "rank")
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_NAME = re.compile(r"[^/\\\x00]+")
_RANK_QUANTILES = np.linspace(0.0005, 0.9995, 1001)
_UPPER_QUANTILE = 0.99  # mapped to float16's densest region (see the module docstring)
_SIGMOID_SPAN = 4.0
# A cast "loses" distinct values when fewer than half of min(before, these) survive (whole map, top 1 %).
_MIN_LEVELS, _MIN_TOP_LEVELS, _TOP_FRACTION = 1000, 100, 0.01


def _check_name(argument: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"Expected `{argument}` to be a non-empty file or folder name without '/', but got {value!r}.")
    return value


def anomaly_map_path(out_root: str | Path, method: str, dataset: str, frame: str) -> Path:
    """``out_root/anomaly_p/{method}/{dataset}/{frame}.hdf5``, the toolkit's path for one frame."""
    return (
        Path(out_root)
        / "anomaly_p"
        / _check_name("method", method)
        / _check_name("dataset", dataset)
        / f"{_check_name('frame', frame)}.hdf5"
    )


def _as_scores(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    if not isinstance(scores, np.ndarray):
        raise TypeError(f"Expected `scores` to be a numpy array or torch tensor, but got {type(scores).__name__}.")
    if scores.dtype == bool or not (
        np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)
    ):
        raise TypeError(f"Expected `scores` to hold real numbers, but got dtype {scores.dtype}.")
    if scores.ndim != 2:
        raise ValueError(f"Expected `scores` to have shape (H, W), but got {scores.shape}.")
    values = scores.astype(np.float64)
    if np.isnan(values).any():
        raise ValueError(
            f"Expected `scores` to contain no NaN, but got {int(np.isnan(values).sum())} NaN value(s) of {values.size}."
        )
    return values


class Squash:
    """A strictly increasing map applied identically to every frame before the float16 cast.

    Args:
        method: ``"sigmoid"`` or ``"rank"`` (see the module docstring).
        center: sigmoid centre ``c``; fitted when None.
        scale: sigmoid temperature ``t`` > 0; fitted when None.
        reference: rank reference scores (any shape); the quantiles of the first fitted frame when None.

    Example:
        >>> squash = Squash("rank").fit(np.random.default_rng(0).normal(size=(64, 64)))
        >>> out = squash(np.array([[-1.0, 0.0, 1.0]]))
        >>> bool(np.all(np.diff(out) > 0))
        True
    """

    def __init__(
        self,
        method: str,
        center: float | None = None,
        scale: float | None = None,
        reference: np.ndarray | None = None,
    ) -> None:
        if method not in SQUASHES:
            raise ValueError(f"Expected `squash` to be one of {', '.join(SQUASHES)} or None, but got {method!r}.")
        if scale is not None and not (np.isfinite(scale) and scale > 0):
            raise ValueError(f"Expected `scale` to be a finite number > 0, but got {scale!r}.")
        if center is not None and not np.isfinite(center):
            raise ValueError(f"Expected `center` to be a finite number, but got {center!r}.")
        if method == "rank" and (center is not None or scale is not None):
            raise ValueError("Expected `center` and `scale` only with squash='sigmoid'; 'rank' uses `reference`.")
        self.method = method
        self.center = None if center is None else float(center)
        self.scale = None if scale is None else float(scale)
        self._knots: np.ndarray | None = None
        self._logits: np.ndarray | None = None
        if reference is not None:
            self._fit_rank(np.asarray(reference, dtype=np.float64))

    @property
    def fitted(self) -> bool:
        if self.method == "sigmoid":
            return self.center is not None and self.scale is not None
        return self._knots is not None

    def fit(self, scores: np.ndarray | torch.Tensor) -> Squash:
        """Set the parameters not given explicitly from ``scores`` (finite values only); returns ``self``."""
        values = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            raise ValueError("Expected `scores` to contain finite values to fit the squash on, but got none.")
        if self.method == "sigmoid":
            if self.center is None:
                self.center = float(np.quantile(finite, _UPPER_QUANTILE))
            if self.scale is None:
                span = float(finite.max()) - self.center
                self.scale = span / _SIGMOID_SPAN if span > 0 else 1.0
        elif self._knots is None:
            self._fit_rank(finite)
        return self

    def _fit_rank(self, reference: np.ndarray) -> None:
        finite = reference[np.isfinite(reference)].ravel()
        if finite.size == 0:
            raise ValueError("Expected `reference` to contain finite scores, but got none.")
        quantiles = np.quantile(finite, _RANK_QUANTILES)
        knots, inverse = np.unique(quantiles, return_inverse=True)
        # Tied quantiles form one knot at the mean probability of the tie, so the map stays strictly increasing.
        probs = np.bincount(inverse, weights=_RANK_QUANTILES) / np.bincount(inverse)
        self._knots = knots
        self._logits = (np.log(probs) - np.log1p(-probs)) - np.log(_UPPER_QUANTILE / (1 - _UPPER_QUANTILE))

    def __call__(self, scores: np.ndarray) -> np.ndarray:
        """Apply the squash to float64 scores (same shape); ``fit`` first if parameters are missing."""
        if not self.fitted:
            raise ValueError(
                f"Expected a fitted squash, but {self.method!r} has no parameters: call fit(scores) first."
            )
        values = np.asarray(scores, dtype=np.float64)
        if self.method == "sigmoid":
            with np.errstate(over="ignore"):
                return 1.0 / (1.0 + np.exp(-(values - self.center) / self.scale))
        knots, logits = self._knots, self._logits
        slope = (logits[-1] - logits[0]) / (knots[-1] - knots[0]) if knots.size > 1 else 1.0
        out = np.interp(values, knots, logits)
        low, high = values < knots[0], values > knots[-1]
        out[low] = logits[0] + (values[low] - knots[0]) * slope
        out[high] = logits[-1] + (values[high] - knots[-1]) * slope
        return out

    def params(self) -> dict[str, object]:
        """The fitted parameters, for logs and reproducibility."""
        if self.method == "sigmoid":
            return {"squash": "sigmoid", "center": self.center, "scale": self.scale}
        knots = None if self._knots is None else [float(self._knots[0]), float(self._knots[-1])]
        return {
            "squash": "rank",
            "reference_range": knots,
            "knots": 0 if self._knots is None else int(self._knots.size),
        }

    def __repr__(self) -> str:
        return f"Squash({self.params()})"


@dataclass(frozen=True)
class Float16Check:
    """What casting one anomaly map to float16 does to it.

    Attributes:
        unique_before: distinct values of the float64 map.
        unique_after: distinct values after the float16 cast.
        top_unique_before: distinct values among the top 1 % of pixels (at least one pixel), before the cast.
        top_unique_after: the same after the cast.
        clipped: values beyond float16's range (|s| > 65504, infinities included), clipped to +-65504.
    """

    unique_before: int
    unique_after: int
    top_unique_before: int
    top_unique_after: int
    clipped: int

    @property
    def loses_resolution(self) -> bool:
        """True when the cast merges more than half of the (up to 1000, top: 100) distinct values."""
        return self.unique_after < 0.5 * min(self.unique_before, _MIN_LEVELS) or self.top_unique_after < 0.5 * min(
            self.top_unique_before, _MIN_TOP_LEVELS
        )

    @property
    def ok(self) -> bool:
        return self.clipped == 0 and not self.loses_resolution


def float16_check(values: np.ndarray) -> Float16Check:
    """Compare a float64 map with its float16 cast (see :class:`Float16Check`)."""
    flat = np.asarray(values, dtype=np.float64).ravel()
    clipped = int(np.count_nonzero(np.abs(flat) > FLOAT16_MAX))
    cast = np.clip(flat, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
    top_count = max(1, int(round(_TOP_FRACTION * flat.size)))
    top = np.argpartition(flat, flat.size - top_count)[flat.size - top_count :]
    return Float16Check(
        unique_before=int(np.unique(flat).size),
        unique_after=int(np.unique(cast).size),
        top_unique_before=int(np.unique(flat[top]).size),
        top_unique_after=int(np.unique(cast[top]).size),
        clipped=clipped,
    )


def _float16_warning(frame: str, check: Float16Check, squash: Squash | None) -> str:
    parts = []
    if check.clipped:
        parts.append(f"{check.clipped} value(s) beyond +-65504 were clipped")
    if check.loses_resolution:
        parts.append(
            f"the float16 cast keeps {check.unique_after} of {check.unique_before} distinct values "
            f"({check.top_unique_after} of {check.top_unique_before} among the top 1 %)"
        )
    remedy = (
        "Pass squash='rank' (or 'sigmoid') to map scores monotonically into float16's precise range."
        if squash is None
        else f"The {squash.method!r} squash fitted on the first frame does not cover this frame well: fit it on "
        "more representative scores (Squash(..., reference=...) or explicit center/scale)."
    )
    return f"SMIYC files store float16: in frame {frame!r}, " + " and ".join(parts) + f". {remedy}"


def _encode(values: np.ndarray, squash: Squash | None, check: bool) -> tuple[np.ndarray, Float16Check | None]:
    if squash is not None:
        values = squash(values)
    report = float16_check(values) if check else None
    return np.clip(values, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16), report


def _write_hdf5(path: Path, data: np.ndarray, compression_level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    try:
        with h5py.File(partial, "w") as handle:
            handle.create_dataset("value", data=data, compression="gzip", compression_opts=compression_level)
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise DenseHybridError(f"Cannot write SMIYC anomaly map {str(path)!r}: {err}") from err


def _resolve_squash(squash: str | Squash | None) -> Squash | None:
    if squash is None or isinstance(squash, Squash):
        return squash
    return Squash(squash)


def _check_level(level: int) -> int:
    if not isinstance(level, int) or not 0 <= level <= 9:
        raise ValueError(f"Expected `compression_level` to be an int in [0, 9], but got {level!r}.")
    return level


def _warn_unknown_dataset(dataset: str) -> None:
    if dataset not in SMIYC_DATASETS:
        warnings.warn(
            f"Expected `dataset` to be a SMIYC toolkit persistence name ({', '.join(SMIYC_DATASETS)}), but got "
            f"{dataset!r}; the toolkit will not find these files (validation frames are stored under the '-all' "
            "datasets).",
            UserWarning,
            stacklevel=3,
        )


def write_anomaly_map(
    out_root: str | Path,
    method: str,
    dataset: str,
    frame: str,
    scores: np.ndarray | torch.Tensor,
    squash: str | Squash | None = None,
    *,
    compression_level: int = 9,
    check_float16: bool = True,
) -> Path:
    """Write one frame's anomaly map in the SMIYC toolkit's tree and format.

    Args:
        out_root: the toolkit's output directory (what you set as ``DIR_OUTPUTS``); files go to
            ``out_root/anomaly_p/{method}/{dataset}/{frame}.hdf5``.
        method: the method name the toolkit is run with.
        dataset: the toolkit's persistence name (:data:`SMIYC_DATASETS`); other names warn.
        frame: the frame id (the image file stem for RoadAnomaly21/RoadObstacle21, the LostAndFound frame id).
        scores: (H, W) anomaly scores at image resolution, higher = more anomalous (numpy or torch, any real dtype).
        squash: None (raw cast), ``"sigmoid"``, ``"rank"`` or a :class:`Squash`. A name is fitted on this frame alone;
            to give several frames the same map, pass one fitted :class:`Squash` or use :class:`SmiycWriter`.
        compression_level: gzip level 0..9 (the toolkit writes 9; any level reads back the same).
        check_float16: warn (``UserWarning``) when the float16 cast clips values or merges distinct ones.

    Returns:
        the written path.

    Raises:
        ValueError: bad names, a non-2-D map, NaN scores, an unknown squash.
        TypeError: ``scores`` is not a real-valued array.
        DenseHybridError: the file cannot be written.

    Example:
        >>> path = write_anomaly_map("outputs", "DenseHybrid", "AnomalyTrack-all", "validation0000",
        ...                          np.zeros((720, 1280)))  # doctest: +SKIP
    """
    path = anomaly_map_path(out_root, method, dataset, frame)
    level = _check_level(compression_level)
    _warn_unknown_dataset(dataset)
    values = _as_scores(scores)
    resolved = _resolve_squash(squash)
    if resolved is not None and not resolved.fitted:
        resolved.fit(values)
    data, check = _encode(values, resolved, check_float16)
    if check is not None and not check.ok:
        warnings.warn(_float16_warning(frame, check, resolved), UserWarning, stacklevel=2)
    _write_hdf5(path, data, level)
    return path


def read_anomaly_map(path: str | Path) -> np.ndarray:
    """Read the ``value`` array of a SMIYC ``.hdf5`` file (as the toolkit does).

    Raises:
        DenseHybridError: the file is missing, not HDF5, or has no ``value`` dataset.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as handle:
            if "value" not in handle:
                raise DenseHybridError(
                    f"Expected {str(path)!r} to hold an HDF5 dataset 'value', but it holds {list(handle.keys())}."
                )
            return handle["value"][()]
    except OSError as err:
        raise DenseHybridError(
            f"Expected {str(path)!r} to be a readable HDF5 file, but reading failed ({err})."
        ) from err


class SmiycWriter:
    """Write many frames with one squash, fitted on the first frame unless given.

    Args:
        out_root, method, compression_level, check_float16: as in :func:`write_anomaly_map`.
        dataset: default persistence name for :meth:`write` (each call may override it).
        squash: None, ``"sigmoid"``, ``"rank"`` or a :class:`Squash`; a name is fitted on the first frame written and
            then applied unchanged to all later frames, so the ranking across frames is preserved.

    Only the first float16 problem is reported as a warning; :meth:`summary` counts all of them.

    Example:
        >>> writer = SmiycWriter("outputs", "DenseHybrid", "AnomalyTrack-all", squash="rank")  # doctest: +SKIP
        >>> for sample, scores in zip(dataset, score_maps):  # doctest: +SKIP
        ...     writer.write(sample["name"], scores)
    """

    def __init__(
        self,
        out_root: str | Path,
        method: str,
        dataset: str | None = None,
        squash: str | Squash | None = None,
        *,
        compression_level: int = 9,
        check_float16: bool = True,
    ) -> None:
        self.out_root = Path(out_root)
        self.method = _check_name("method", method)
        self.dataset = None if dataset is None else _check_name("dataset", dataset)
        self.squash = _resolve_squash(squash)
        self.compression_level = _check_level(compression_level)
        self.check_float16 = check_float16
        self.counts: dict[str, int] = {}
        self.float16_problems = 0
        self._warned_datasets: set[str] = set()

    def write(self, frame: str, scores: np.ndarray | torch.Tensor, dataset: str | None = None) -> Path:
        """Write one frame (see :func:`write_anomaly_map`); returns the path."""
        dataset = self.dataset if dataset is None else dataset
        if dataset is None:
            raise ValueError("Expected `dataset` (here or in SmiycWriter(...)), but got None.")
        path = anomaly_map_path(self.out_root, self.method, dataset, frame)
        if dataset not in self._warned_datasets:
            self._warned_datasets.add(dataset)
            _warn_unknown_dataset(dataset)
        values = _as_scores(scores)
        if self.squash is not None and not self.squash.fitted:
            self.squash.fit(values)
        data, check = _encode(values, self.squash, self.check_float16)
        if check is not None and not check.ok:
            self.float16_problems += 1
            if self.float16_problems == 1:
                warnings.warn(
                    _float16_warning(frame, check, self.squash) + " Further frames are counted in summary().",
                    UserWarning,
                    stacklevel=2,
                )
        _write_hdf5(path, data, self.compression_level)
        self.counts[dataset] = self.counts.get(dataset, 0) + 1
        return path

    def merge_ranks(self) -> None:
        """In a process group: the frames written and float16 problems of every rank, on every rank (datasets in
        frame order, as one process would list them); nothing otherwise."""
        from densehybrid.engine import distributed

        if not distributed.is_distributed():
            return
        counts: dict[str, int] = {}
        problems = 0
        for rank_counts, rank_problems in distributed.gather_to_all((self.counts, self.float16_problems)):
            for dataset, count in rank_counts.items():
                counts[dataset] = counts.get(dataset, 0) + count
            problems += rank_problems
        self.counts, self.float16_problems = counts, problems

    def summary(self) -> dict[str, object]:
        """What was written: the output root, frames per dataset, the squash parameters, float16 problems."""
        return {
            "out": str(self.out_root / "anomaly_p" / self.method),
            "method": self.method,
            "frames": sum(self.counts.values()),
            "datasets": dict(self.counts),
            "squash": None if self.squash is None else self.squash.params(),
            "float16_problem_frames": self.float16_problems,
        }


def write_smiyc_maps(
    open_set: OpenSetModel,
    dataset: Any,
    frames: Sequence[Any],
    targets: Sequence[str],
    writer: SmiycWriter,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "export",
) -> None:
    """Run the inference object on every frame and write its score map with ``writer`` (the loop of
    ``densehybrid export-smiyc``).

    Under ``torchrun`` every rank calls this with the same arguments and writes the maps of its contiguous block of
    ``frames`` (each file is written by exactly one rank, into the same ``writer`` folder); a squash to be fitted is
    fitted by rank 0 on the first frame and shared, and the writer's counts are merged over the ranks.

    Args:
        open_set: the :class:`~densehybrid.openset.OpenSetModel` (its score; no threshold is needed).
        dataset: a benchmark loader (``load_image(frame) -> (3, H, W)`` in [0, 1]).
        frames: the frames to export, in order.
        targets: the SMIYC dataset folder of each frame.
        writer: the :class:`SmiycWriter` of the export.
        device: where the model runs.
        progress: show a progress bar on stderr.
        desc: its label.

    Raises:
        NonFiniteError: the model gives NaN or infinite outputs (the frame is named).
    """
    import sys

    from tqdm import tqdm

    from densehybrid.engine import distributed

    def frame_scores(index: int) -> torch.Tensor:
        frame = frames[index]
        image = dataset.load_image(frame).unsqueeze(0).to(device)
        try:
            return open_set(image).scores[0]
        except NonFiniteError as exc:
            raise NonFiniteError(f"{exc} (frame {frame.name})") from exc

    open_set.to(device).eval()
    block = distributed.shard_range(len(frames))
    first = None
    with torch.inference_mode():
        if writer.squash is not None and not writer.squash.fitted and distributed.is_distributed():
            # One squash for all frames, fitted on the first frame as in one process: rank 0 fits it, all use it.
            if distributed.is_main() and len(frames):
                first = frame_scores(0)
                writer.squash.fit(_as_scores(first))
            writer.squash = distributed.broadcast_from_main(writer.squash)
        for index in tqdm(
            block, desc=desc, unit="frame", file=sys.stderr, disable=not progress or not distributed.is_main()
        ):
            scores = first if index == 0 and first is not None else frame_scores(index)
            writer.write(frames[index].name, scores, dataset=targets[index])
    writer.merge_ranks()

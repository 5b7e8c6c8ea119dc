"""Exception types. ``ValueError``/``TypeError`` cover bad arguments; these cover the environment."""

from __future__ import annotations


class DenseHybridError(Exception):
    """Base class for errors a user can fix (missing data, bad checkpoint, broken dataset tree)."""


class CheckpointError(DenseHybridError):
    """A checkpoint file cannot be read or does not fit the model."""


class DatasetError(DenseHybridError):
    """A dataset tree is missing, incomplete or encoded differently than expected."""


class OutputError(DenseHybridError):
    """An output path cannot be written, is in the way, or would overwrite an input or an earlier result."""


class ResourceError(DenseHybridError):
    """A request exceeds what this machine can give (memory, CPU cores)."""


class NonFiniteError(DenseHybridError):
    """A model or a training run produced NaN or infinite values."""

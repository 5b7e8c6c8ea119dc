"""Order-preserving integer keys for float scores and the bins built on them.

A float32 score is mapped to an int32 key whose integer order equals the float order: the IEEE-754 bit pattern
is read as sign and magnitude, and negative numbers get the negated magnitude. ``+0.0`` and ``-0.0`` share key 0,
``-inf``/``+inf`` get the smallest/largest keys, and equal scores always share a key. Dropping the low
``32 - bits`` bits of a key (an arithmetic shift) groups ``2 ** (32 - bits)`` consecutive float32 values into one bin,
so a bin's relative width is at most ``2 ** (9 - bits)`` (1 sign bit and 8 exponent bits sit above the mantissa).

Scores stored in float16 (10 mantissa bits) map to keys whose low 13 bits are zero, bfloat16 (7 mantissa bits) to
keys whose low 16 bits are zero: with ``bits >= 19`` (float16) or ``bits >= 16`` (bfloat16) every bin holds at most
one distinct score and binned metrics are exact.
"""

from __future__ import annotations

import torch


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Int32 keys whose integer order is the order of the scores rounded to float32.

    Args:
        scores: floating tensor of any shape, without NaN (float64 is rounded to float32).

    Returns:
        int32 tensor of the same shape: ``+|bits|`` for scores >= 0 and ``-|bits|`` for scores < 0, where ``|bits|``
        is the float32 bit pattern without its sign bit.
    """
    bits = scores.to(torch.float32).contiguous().view(torch.int32)
    sign = bits >> 31  # 0 for positive, -1 for negative (arithmetic shift)
    magnitude = bits & 0x7FFFFFFF
    # Two's complement: (m ^ -1) - (-1) == -m, (m ^ 0) - 0 == m.
    return (magnitude ^ sign) - sign


def keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`order_keys` for int32/int64 keys in the range of float32 bit magnitudes.

    Args:
        keys: integer tensor of keys.

    Returns:
        float64 tensor with the float32 values whose keys are ``keys`` (``-0.0`` decodes as ``+0.0``).
    """
    keys = keys.to(torch.int64)
    magnitude = keys.abs()
    bits = torch.where(keys < 0, magnitude | 0x80000000, magnitude)
    # Reinterpret the low 32 bits as float32 (values >= 2**31 wrap to the negative int32 with the same bits).
    bits32 = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    return bits32.view(torch.float32).to(torch.float64)

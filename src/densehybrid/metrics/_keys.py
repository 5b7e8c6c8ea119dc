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


# Spread keys: the float32 key space re-allotted so that [0, 1] is resolved like log(p) near 0 AND like -log1p(-p)
# near 1. Constants are magnitude bit patterns (exponent << 23 | mantissa) of |x|.
_MANTISSA = 1 << 23
#: Magnitudes in [1 - 2**-k, 1) are spread, k = SPREAD_FROM_EXPONENT (1: all of [0.5, 1), which resolves crowded
#: probabilities anywhere there; a larger k touches fewer histogram pages for scores that merely pass through).
SPREAD_FROM_EXPONENT = 1
#: The spread term is divided by 2**SPREAD_SHIFT: keys in [1 - 2**-k, 1) resolve ``1 - |x|`` to a relative
#: 2**SPREAD_SHIFT times coarser than other magnitudes (1.2e-4 with 24 bits instead of 3e-5), which keeps the
#: histogram pages that scores passing through [0.5, 1) touch close to plain float keys (+22% on the benchmark's
#: log-domain scores, against +74% without the shift) and the error on crowded probabilities below 1e-5.
SPREAD_SHIFT = 2
_HALF = 126 * _MANTISSA  # 0.5
_ONE = 127 * _MANTISSA  # 1.0
_SMALLEST_GAP = 103 * _MANTISSA  # 2**-24, the smallest non-zero 1 - |x| for |x| < 1
_SPREAD_GAP = (127 - SPREAD_FROM_EXPONENT) * _MANTISSA  # bits(2**-k): 1 - |x| below it is spread
_SPREAD_START = int(torch.tensor(1 - 2.0**-SPREAD_FROM_EXPONENT).view(torch.int32))  # bits(1 - 2**-k)
_EXTRA = (_SPREAD_GAP - _SMALLEST_GAP) >> SPREAD_SHIFT  # keys added by the expansion: (24 - k) / 2**shift binades
_HIGH = 2 * (256 * _MANTISSA - 1 - _EXTRA) - 255 * _MANTISSA  # from here on two float32 values share a key
_HIGH -= _HIGH % _MANTISSA
#: Smallest key magnitude of the compressed range (|x| >= 2**118).
SPREAD_HIGH_KEY = _HIGH + _EXTRA
#: Key of +inf, alone in its key.
SPREAD_INF_KEY = SPREAD_HIGH_KEY + ((255 * _MANTISSA - _HIGH) >> 1)


def spread_keys(scores: torch.Tensor) -> torch.Tensor:
    """Int32 keys in the order of the float32 scores, with the resolution moved to where probabilities need it.

    :func:`order_keys` gives every binade ``[2**e, 2**(e + 1))`` the same share of the key space, so probabilities
    crowded near 1 (one binade, ``[0.5, 1)``, of 2**23 values) get as few keys as ``[0.25, 0.5)``, and a histogram on
    the keys cannot tell 0.99999 from 0.999995. Here a magnitude ``|x|`` in ``[0.5, 1)`` gets the key
    ``bits(|x|) + ((bits(0.5) - bits(1 - |x|)) >> 2)`` (``1 - |x|`` is exact in float32 and ``bits(|x|)`` grows with
    every step, so the key is strictly increasing): the second term spreads ``[0.5, 1)`` over the 23 binades of
    ``1 - |x|`` in ``[2**-24, 0.5]``, the way ``-log1p(-p)`` does, at a quarter of the float resolution.
    Magnitudes below 0.5 keep their float key, which already spreads them like ``log(p)``; magnitudes from 1 on are
    shifted up by the added keys, and from ``2**118`` on (far beyond any score, inf excepted) two consecutive float32
    values share a key to make room (the infinities stay alone). So a histogram bin of ``2**(32 - bits)`` keys has a
    relative width of at most ``2**(9 - bits)`` in ``|x|`` outside [0.5, 1) and at most ``2**(11 - bits)`` in
    ``1 - |x|`` inside it (and never more than the plain float bin). Negative scores mirror the positive ones
    (``-0.0`` shares key 0). (With :data:`SPREAD_FROM_EXPONENT` = k > 1 only ``[1 - 2**-k, 1)`` is spread; the
    divisor is ``2**SPREAD_SHIFT``.)

    Args:
        scores: floating tensor of any shape, without NaN (float64 is rounded to float32).

    Returns:
        int32 tensor of the same shape, non-decreasing in the score; distinct scores get distinct keys below
        ``2**118`` in magnitude.
    """
    x = scores.to(torch.float32).contiguous()
    bits = x.view(torch.int32)
    sign = bits >> 31
    key = bits & 0x7FFFFFFF
    # bits(1 - |x|) clamped to [bits(2**-24), bits(2**-k)]: bits(2**-k) - that is 0 below 1 - 2**-k, the spread
    # inside [1 - 2**-k, 1) and its maximum from 1 on (1 - |x| <= 0 there: clamped up to the smallest gap).
    gap = torch.sub(1, x.abs()).view(torch.int32).clamp_(_SMALLEST_GAP, _SPREAD_GAP)
    if key.numel() and int(key.max()) >= _HIGH:  # a rare chunk: halve the resolution from 2**118 on
        above = (key - _HIGH).clamp_(min=0) >> 1
        key = key.clamp_(max=_HIGH).add_(above)
    key = key.add_(gap.neg_().add_(_SPREAD_GAP) >> SPREAD_SHIFT)
    return (key ^ sign) - sign


def spread_keys_to_float(keys: torch.Tensor) -> torch.Tensor:
    """The lowest float32 score with the given :func:`spread_keys` key, as float64.

    Args:
        keys: integer tensor of keys.

    Returns:
        float64 tensor of the same shape.
    """
    keys = keys.to(torch.int64)
    mag = keys.abs()
    negative = keys < 0
    # Compressed range: the pair (2j, 2j + 1) above _HIGH; the lower score is the smaller magnitude unless negative.
    pair = _HIGH + 2 * (mag - SPREAD_HIGH_KEY) + negative.to(torch.int64)
    m = torch.where(mag >= _ONE + _EXTRA, mag - _EXTRA, mag)
    m = torch.where(mag >= SPREAD_HIGH_KEY, pair.clamp(max=255 * _MANTISSA), m)
    expanded = (mag >= _SPREAD_START) & (mag < _ONE + _EXTRA)
    if bool(expanded.any()):
        m = m.clone()
        m[expanded] = _expanded_bits(mag[expanded])
    magnitude = keys_to_float(m)
    return torch.where(negative, -magnitude, magnitude)


def _expanded_bits(keys: torch.Tensor) -> torch.Tensor:
    """Bit patterns (int64) of the float32 magnitudes in the spread range [1 - 2**-k, 1) with the given spread keys.

    With ``1 - |x| = j * 2**-24`` (an integer ``j``) in the binade ``[2**e, 2**(e + 1))`` of ``j``,
    ``bits(|x|) = bits(0.5) + 2**23 - j`` and ``bits(2**-k) - bits(j * 2**-24) = A_e - j * 2**(23 - e)`` with
    ``A_e = bits(2**-k) - (e + 102) * 2**23``, so the key ``bits(|x|) + ((A_e - j * 2**(23 - e)) >> shift)`` is
    linear in ``j`` where ``2**(23 - e)`` is a multiple of ``2**shift``, and ``... - j - ceil(j / r)`` with
    ``r = 2**(shift - 23 + e)`` elsewhere. Each binade's solution is checked by recomputing its key.
    """
    base = _HALF + _MANTISSA  # bits(|x|) + j
    j = torch.zeros_like(keys)
    for e in range(24):
        step = 1 << (23 - e)
        offset = (_SPREAD_GAP - (e + 102) * _MANTISSA) >> SPREAD_SHIFT  # A_e / 2**shift, exact
        q = base + offset - keys
        if step >= 1 << SPREAD_SHIFT:
            slope = 1 + (step >> SPREAD_SHIFT)
            candidate = torch.where(q % slope == 0, q // slope, 0)
        else:
            r = 1 << (SPREAD_SHIFT - 23 + e)
            candidate = (q * r) // (r + 1)
        fits = (j == 0) & (candidate >= 1 << e) & (candidate < 2 << e)
        fits &= _expanded_key(candidate.clamp(1, 1 << 23)) == keys
        j = torch.where(fits, candidate, j)
    magnitude = (1 - j.to(torch.float64) * 2.0**-24).to(torch.float32)  # exact
    return magnitude.view(torch.int32).to(torch.int64)


def _expanded_key(j: torch.Tensor) -> torch.Tensor:
    """Spread key (int64) of the magnitude ``1 - j * 2**-24`` for integers ``j`` in [1, 2**23]."""
    gap = j.to(torch.float64).mul(2.0**-24).to(torch.float32)  # exact
    magnitude = torch.sub(1, gap.to(torch.float64)).to(torch.float32)  # exact
    spread = (_SPREAD_GAP - gap.view(torch.int32).to(torch.int64).clamp(_SMALLEST_GAP, _SPREAD_GAP)) >> SPREAD_SHIFT
    return magnitude.view(torch.int32).to(torch.int64) + spread

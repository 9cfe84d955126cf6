"""Scalar float helpers built from bit patterns: float16 <-> float32, C roundf, a vectorisable exp.

Owns the exact conversions the Q8_0/Q4_0 formats need (float16 scales, GGML's roundf) and the
exp of silu and softmax. Loops over _f16_bits, _f16_to_f32 and _exp_f32 compile to vector code
(numba has no SVML here, so np.exp stays scalar: a call per element), built on vector.py's
scalar bit casts _f32_from_bits and _bits_from_f32.

Imports numpy, numba and the package's vector.py only.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from mpillama.kernels.vector import _bits_from_f32, _f32_from_bits


_F16_MAGIC = np.float32(2.0**112)  # (f16 bits << 13) as f32 times 2^112 = the f16 value, subnormals included


@njit(cache=True)
def _f16_value(h: int) -> float:
    """float16 bits -> its value (float64, exact)."""
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1024 + m) * 2.0 ** (e - 25)
    return -v if h & 0x8000 else v


@njit(cache=True)
def _roundf(v: np.float32) -> np.float32:
    """C roundf (half away from zero), exact: floor(|v|) + floor(2 * frac(|v|))."""
    a = abs(v)
    f = np.floor(a)
    r = f + np.floor(np.float32(2.0) * (a - f))
    return -r if v < 0 else r


@njit(cache=True)
def _f16_bits(d):
    # float32 d >= 0, finite -> its float16 bits, rounded to nearest even (as numpy and vcvtps2ph)
    u = np.int64(_bits_from_f32(np.float32(d))) & 0x7FFFFFFF
    e = (u >> 23) - 127 + 15  # float16 exponent
    m = u & 0x7FFFFF
    if e >= 31:
        return 0x7C00
    if e <= 0:  # subnormal float16: the mantissa with its leading 1, shifted right by 14 - e
        if e < -10:
            return 0
        m |= 0x800000
        shift = 14 - e
        h = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        return h + 1 if rem > half or (rem == half and (h & 1)) else h
    h = (e << 10) | (m >> 13)
    rem = m & 0x1FFF
    return h + 1 if rem > 0x1000 or (rem == 0x1000 and (h & 1)) else h  # a carry may round up to inf


@njit(cache=True)
def _f16_to_f32(h):
    # float16 bits of a value >= 0 (inf included) -> that value as float32, exact
    e = (h >> 10) & 31
    if e == 0:
        return np.float32(h & 1023) * np.float32(2.0**-24)
    if e == 31:
        return np.float32(np.inf)
    return _f32_from_bits(((h & 0x7FFF) << 13) + (112 << 23))


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _exp_f32(x):
    # exp(x), x clamped to [-87, 88] (Cephes expf: x = n ln2 + r with |r| <= ln2/2, e^r by a
    # polynomial, 2^n by building the exponent bits); relative error < 3e-7
    y = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(y * np.float32(1.44269504088896341) + np.float32(0.5))
    r = y - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(n) + 127) << 23)

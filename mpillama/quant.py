"""Q40 / Q80 block formats in plain numpy, and the numpy reference ops the kernels are tested against.

Owns: the byte layout of GGML Q4_0 ("q40") and Q8_0 ("q80") blocks (quantize, dequantize,
split into scale and values), and short readable float references for every kernel in
mpillama.kernels (matmul, rmsnorm, rope, attention, silu*mul). Nothing here is on the hot path.

Imports numpy and mpillama.errors only: no numba, no mpi4py, nothing from kernels/, so the
references stay independent of the code they check.

Block formats (byte-for-byte GGML):
  Q40: 18 bytes per 32 values: float16 scale d (little-endian), then 16 bytes; byte j holds
       element j in its low nibble and element j+16 in its high nibble; value = (nibble - 8) * d.
       Quantize: d = (the value of largest magnitude, with its sign) / -8,
       nibble = min(15, trunc(x * (1/d) + 8.5)).
  Q80: 34 bytes per 32 values: float16 scale d, then 32 int8 q; value = q * d.
       Quantize: d = max|x| / 127 (float32), q = roundf(x * (1/d)) (half away from zero);
       d is stored rounded to float16.
"""

from __future__ import annotations

import math

import numpy as np

from mpillama.config import RopeScaling
from mpillama.errors import MpillamaError

QK = 32  # values per block
Q40_BLOCK_BYTES = 18  # f16 scale + 16 bytes of nibbles
Q80_BLOCK_BYTES = 34  # f16 scale + 32 int8


def _blocks_of(x: np.ndarray, what: str) -> np.ndarray:
    """(..., n) -> (..., n//32, 32) f32, or an error naming the fix when n is not a multiple of 32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0 or x.shape[-1] % QK:
        raise MpillamaError(
            f"{what}: last dimension {x.shape[-1] if x.ndim else 'scalar'} is not a multiple of {QK}: "
            f"pad or split the tensor into whole {QK}-value blocks"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // QK, QK)


def _bytes_blocks(b: np.ndarray, block_bytes: int, what: str) -> np.ndarray:
    """(..., nb*block_bytes) uint8 -> (..., nb, block_bytes), or an error naming the fix."""
    b = np.asarray(b)
    if b.dtype != np.uint8 or b.ndim == 0 or b.shape[-1] % block_bytes:
        raise MpillamaError(
            f"{what}: expected uint8 bytes with a last dimension that is a multiple of {block_bytes}, "
            f"got {b.dtype} {b.shape}: pass the raw block bytes of whole blocks"
        )
    return b.reshape(*b.shape[:-1], b.shape[-1] // block_bytes, block_bytes)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), exact in float32: floor(|v|) + floor(2 * frac)."""
    a = np.abs(v)
    f = np.floor(a)
    return np.sign(v) * (f + np.floor(np.float32(2) * (a - f)))


# ---------------------------------------------------------------- Q40


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//32*18): GGML Q4_0 bytes."""
    blocks = _blocks_of(x, "quantize_q40")  # (..., nb, 32) f32
    imax = np.abs(blocks).argmax(axis=-1)[..., None]
    d = np.take_along_axis(blocks, imax, axis=-1) / np.float32(-8)  # (..., nb, 1) f32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    nib = np.minimum(np.trunc(blocks * inv + np.float32(8.5)), 15).astype(np.uint8)  # (..., nb, 32)
    qs = nib[..., :16] | (nib[..., 16:] << np.uint8(4))  # (..., nb, 16) uint8
    dbytes = d.astype("<f2").view(np.uint8)  # (..., nb, 2) uint8
    out = np.concatenate([dbytes, qs], axis=-1)  # (..., nb, 18) uint8
    return out.reshape(*out.shape[:-2], -1)


def split_q40(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., nb*18) -> (d f32 (..., nb), nibbles uint8 (..., nb, 32) in 0..15, unsigned)."""
    blocks = _bytes_blocks(b, Q40_BLOCK_BYTES, "split_q40")  # (..., nb, 18)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    nib = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)  # (..., nb, 32)
    return d, nib


def dequantize_q40(b: np.ndarray) -> np.ndarray:
    """uint8 (..., nb*18) -> f32 (..., nb*32)."""
    d, nib = split_q40(b)
    x = (nib.astype(np.float32) - np.float32(8)) * d[..., None]  # (..., nb, 32)
    return x.reshape(*x.shape[:-2], -1)


# ---------------------------------------------------------------- Q80


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """f32 (..., n) -> uint8 (..., n//32*34): GGML Q8_0 bytes."""
    blocks = _blocks_of(x, "quantize_q80")  # (..., nb, 32) f32
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)  # (..., nb, 1) f32
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = _roundf(blocks * inv).astype(np.int8)  # (..., nb, 32)
    out = np.concatenate([d.astype("<f2").view(np.uint8), q.view(np.uint8)], axis=-1)  # (..., nb, 34)
    return out.reshape(*out.shape[:-2], -1)


def split_q80(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (..., nb*34) -> (d f32 (..., nb), q int8 (..., nb, 32))."""
    blocks = _bytes_blocks(b, Q80_BLOCK_BYTES, "split_q80")  # (..., nb, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view("<f2")[..., 0].astype(np.float32)
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8)
    return d, q


def dequantize_q80(b: np.ndarray) -> np.ndarray:
    """uint8 (..., nb*34) -> f32 (..., nb*32)."""
    d, q = split_q80(b)
    x = q.astype(np.float32) * d[..., None]
    return x.reshape(*x.shape[:-2], -1)


def worst_roundtrip_error(x: np.ndarray, kind: str) -> float:
    """Largest |x - dequant(quant(x))| for kind 'q40' or 'q80' (quantizers report it, STYLE 8)."""
    if kind == "q40":
        y = dequantize_q40(quantize_q40(x))
    elif kind == "q80":
        y = dequantize_q80(quantize_q80(x))
    else:
        raise MpillamaError(f"unknown block format {kind!r}: use 'q40' or 'q80'")
    return float(np.max(np.abs(np.asarray(x, np.float32) - y))) if y.size else 0.0


# ---------------------------------------------------------------- reference ops


def matmul_q40_ref(w_q40: np.ndarray, x_q80: np.ndarray) -> np.ndarray:
    """w (rows, nb*18) q40 @ x (T, nb*34) q80 -> (T, rows) f32.

    Exactly the arithmetic of the kernels: per block an integer dot product of the signed
    nibbles and the int8 activations, times (f16 weight scale * f16 activation scale),
    summed over blocks (here in float64, so only the kernels' summation order differs).
    """
    wd, nib = split_q40(w_q40)  # (rows, nb) f32, (rows, nb, 32) uint8
    xd, xq = split_q80(x_q80)  # (T, nb) f32, (T, nb, 32) int8
    assert wd.shape[1] == xd.shape[1], f"weights have {wd.shape[1]} blocks per row, activations {xd.shape[1]}"
    wi = nib.astype(np.int64) - 8
    idot = np.einsum("rbk,tbk->trb", wi, xq.astype(np.int64))  # (T, rows, nb) exact integers
    return np.einsum("trb,rb,tb->tr", idot.astype(np.float64), wd.astype(np.float64), xd.astype(np.float64)).astype(
        np.float32
    )


def matmul_q80w_ref(w_q80: np.ndarray, x_q80: np.ndarray) -> np.ndarray:
    """w (rows, nb*34) q80 weights @ x (T, nb*34) q80 -> (T, rows) f32, the Q8_0-weight kernels' arithmetic:
    per block an exact integer dot product, times (f16 weight scale * f16 activation scale), summed in float64."""
    wd, wq = split_q80(w_q80)  # (rows, nb) f32, (rows, nb, 32) int8
    xd, xq = split_q80(x_q80)  # (T, nb) f32, (T, nb, 32) int8
    assert wd.shape[1] == xd.shape[1], f"weights have {wd.shape[1]} blocks per row, activations {xd.shape[1]}"
    idot = np.einsum("rbk,tbk->trb", wq.astype(np.int64), xq.astype(np.int64))  # (T, rows, nb) exact integers
    return np.einsum("trb,rb,tb->tr", idot.astype(np.float64), wd.astype(np.float64), xd.astype(np.float64)).astype(
        np.float32
    )


def rmsnorm_ref(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, n) -> x / sqrt(mean(x^2) + eps) * weight, in float64, returned as f32."""
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * weight).astype(np.float32)


def rope_frequencies_ref(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """(head_dim//2,) f64 inverse frequencies, with the Llama 3.1 ('llama3' rope_type) remap if given."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if scaling is None:
        return freqs
    # Wavelengths shorter than high_freq_wavelen keep their frequency, longer than
    # low_freq_wavelen are divided by factor, and those between are interpolated.
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    out = np.empty_like(freqs)
    for i, f in enumerate(freqs):
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out[i] = f
        elif wavelen > low_wavelen:
            out[i] = f / scaling.factor
        else:
            smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
                scaling.high_freq_factor - scaling.low_freq_factor
            )
            out[i] = (1 - smooth) * f / scaling.factor + smooth * f
    return out


def rope_ref(
    x: np.ndarray, positions: np.ndarray, head_dim: int, theta: float, scaling: RopeScaling | None, halves: bool
) -> np.ndarray:
    """x (T, n_heads, head_dim) rotated by position, as a new f32 array (float64 inside).

    pairs: rotate (2i, 2i+1) by frequency i; halves: rotate (i, i + head_dim/2) by frequency i.
    """
    freqs = rope_frequencies_ref(head_dim, theta, scaling)  # (hd/2,)
    ang = np.asarray(positions, np.float64)[:, None] * freqs[None, :]  # (T, hd/2)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]  # (T, 1, hd/2)
    x64 = x.astype(np.float64)
    if halves:
        a, b = x64[..., : head_dim // 2], x64[..., head_dim // 2 :]
        return np.concatenate([a * c - b * s, a * s + b * c], axis=-1).astype(np.float32)
    a, b = x64[..., 0::2], x64[..., 1::2]
    out = np.empty_like(x64)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return out.astype(np.float32)


def attention_ref(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int) -> np.ndarray:
    """q (T, n_heads, hd); caches (>= pos0+T, n_kv, hd) -> (T, n_heads, hd) f32.

    Token t (at position pos0+t) attends causally to cache positions [0, pos0+t]; query head h
    reads kv head h // (n_heads // n_kv); softmax of q.k / sqrt(hd), in float64.
    """
    T, n_heads, hd = q.shape
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    out = np.empty((T, n_heads, hd), np.float64)
    for t in range(T):
        n = pos0 + t + 1
        for h in range(n_heads):
            k = k_cache[:n, h // group].astype(np.float64)  # (n, hd)
            v = v_cache[:n, h // group].astype(np.float64)
            s = k @ q[t, h].astype(np.float64) / math.sqrt(hd)
            p = np.exp(s - s.max())
            out[t, h] = (p / p.sum()) @ v
    return out.astype(np.float32)


def silu_mul_ref(h1: np.ndarray, h3: np.ndarray) -> np.ndarray:
    """silu(h1) * h3 = h1 / (1 + exp(-h1)) * h3, in float64, returned as f32."""
    a = h1.astype(np.float64)
    return (a / (1 + np.exp(-a)) * h3).astype(np.float32)

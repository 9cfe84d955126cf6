"""Q80 activations: f32 rows quantised as GGML Q8_0 for the Q40 matmuls, and Q8_0 bytes for sync payloads.

Owns Q80Activations (one batch of quantised rows in the forms the matmul kernels read, plus
their per-thread scratch), filling it from f32 rows or from received Q8_0 bytes, and the f32 <->
Q8_0 byte conversions of the sync payloads. Quantising follows GGML exactly (d = absmax / 127
rounded to float16, q = roundf(x / d)), so a rank that quantises and a rank that receives the
bytes hold identical activations.

Imports numpy, numba, mpillama.quant and the package's bits.py, vector.py (bit casts), target.py
(the kernel path), portable.py and groups.py (their scratch shapes) only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

from mpillama.kernels.bits import _f16_bits, _f16_to_f32, _f16_value, _roundf
from mpillama.kernels.portable import TILE
from mpillama.kernels.groups import VNNI_ROWS
from mpillama.kernels.target import PORTABLE, kernel_path
from mpillama.kernels.vector import _bits_from_f32, _f32_from_bits
from mpillama.quant import Q80_BLOCK_BYTES, QK


@dataclass
class Q80Activations:
    """Q80 activations for up to max_tokens rows of `cols` values, plus the matmul's scratch.

    Filled by quantize_activations (from f32) or activations_from_q80 (from received bytes);
    both give identical contents for the same data.
    """

    max_tokens: int
    cols: int
    qs: np.ndarray  # (max_tokens, nb, 32) int8: quantized values
    qs32: np.ndarray  # (max_tokens, nb, 8) uint32: the same bytes, 4 a word (the VNNI kernels' operand)
    d: np.ndarray  # (max_tokens, nb) f32: block scales (exact float16 values)
    corr: np.ndarray  # (max_tokens, nb) int32: 8 * sum of the block's qs (folds the Q40 -8 offset)
    # the Q40 matmul's scratch, one row per numba thread (slot). Tiles layout (portable.py):
    tile_dots: np.ndarray  # (slots, TILE) int16: one block's integer dot products, a row each
    tile_scales: np.ndarray  # (slots, TILE) f32: that block's weight scales, a row each
    tile_scale_bits: np.ndarray  # (slots, TILE) uint32: tile_scales as bits (the f16 -> f32 conversion writes them)
    tile_sums: np.ndarray  # (slots, max_tokens, TILE) f32: one tile's outputs, summed over its blocks
    # row-group layout (x86.py, arm.py), prefill (T > 1): one row group's nibbles split once for all tokens
    group_nibbles: np.ndarray  # (slots, nb*8*16) int32, or (slots, 0) on the portable kernel path
    group_scales: np.ndarray  # (slots, nb*16) f32: that row group's weight scales
    # threaded matmuls: the next chunk of rows to claim (threads take chunks until none are left)
    next_chunk: np.ndarray  # (1,) int64
    # the K-quant matmul (kquant.py): Q6_K's 16-value sub-blocks need each block's two half sums,
    # which its kernels fill from qs at the start of every call
    half_sums: np.ndarray  # (max_tokens, nb, 2) int32


def new_activations(max_tokens: int, cols: int) -> Q80Activations:
    """Buffers for up to max_tokens rows of `cols` values (cols a multiple of 32)."""
    assert max_tokens >= 1 and cols > 0 and cols % QK == 0, f"max_tokens={max_tokens} cols={cols}"
    nb = cols // QK
    slots = numba.config.NUMBA_NUM_THREADS  # the most threads any launch can use
    tile_scales = np.zeros((slots, TILE), np.float32)  # (slots, TILE) f32
    qs = np.zeros((max_tokens, nb, QK), np.int8)  # (max_tokens, nb, 32) int8
    vnni = 0 if kernel_path() == PORTABLE else nb * 8 * VNNI_ROWS
    return Q80Activations(
        max_tokens=max_tokens,
        cols=cols,
        qs=qs,
        qs32=qs.view(np.uint32),  # (max_tokens, nb, 8) uint32, same memory as qs
        d=np.zeros((max_tokens, nb), np.float32),  # (max_tokens, nb) f32
        corr=np.zeros((max_tokens, nb), np.int32),  # (max_tokens, nb) int32
        tile_dots=np.zeros((slots, TILE), np.int16),  # (slots, TILE) int16
        tile_scales=tile_scales,
        tile_scale_bits=tile_scales.view(np.uint32),  # (slots, TILE) uint32, same memory as tile_scales
        tile_sums=np.zeros((slots, max_tokens, TILE), np.float32),  # (slots, max_tokens, TILE) f32
        group_nibbles=np.zeros((slots, vnni), np.int32),  # (slots, nb*8*16) int32
        group_scales=np.zeros((slots, vnni // 8), np.float32),  # (slots, nb*16) f32
        next_chunk=np.zeros(1, np.int64),
        half_sums=np.zeros((max_tokens, nb, 2), np.int32),  # (max_tokens, nb, 2) int32
    )


@njit(cache=True, inline="always")
def _absmax32(x, t, o):
    # max |x[t, o:o+32]| as the max of the bit patterns without their sign bit (the same order as
    # the floats >= 0): an integer max, which LLVM vectorises, where a float max chain stays scalar
    m = np.int32(0)
    for k in range(QK):
        m = max(m, _bits_from_f32(x[t, o + k]) & np.int32(0x7FFFFFFF))
    return _f32_from_bits(m)


@njit(cache=True)
def _quantize_acts(qs, d, corr, x, T):
    # x (T, nb*32) f32 -> qs (T, nb, 32) int8, d (T, nb) f32, corr (T, nb) i32
    # No fastmath: q must be roundf(x * (1/d)) in float32 exactly as GGML computes it.
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            db = _absmax32(x, t, b * QK) / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            s = 0
            for k in range(QK):
                q = np.int32(_roundf(x[t, b * QK + k] * inv))
                qs[t, b, k] = q
                s += q
            d[t, b] = _f16_to_f32(_f16_bits(db))
            corr[t, b] = 8 * s


@njit(cache=True)
def _load_q80(qs, d, corr, payload, T):
    # payload (T, nb*34) q80 bytes -> qs (T, nb, 32) int8, d (T, nb) f32, corr (T, nb) i32
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            h = np.int64(payload[t, o]) | (np.int64(payload[t, o + 1]) << 8)
            d[t, b] = _f16_value(h)
            s = 0
            for k in range(QK):
                q = np.int64(payload[t, o + 2 + k])
                q = q - 256 if q > 127 else q
                qs[t, b, k] = q
                s += q
            corr[t, b] = 8 * s


def quantize_activations(acts: Q80Activations, x: np.ndarray) -> None:
    """x (T, cols) f32 -> rows [0, T) of acts, with GGML Q8_0 semantics exactly."""
    assert x.ndim == 2 and x.shape[1] == acts.cols and x.shape[0] <= acts.max_tokens, (
        f"x {x.shape} for activations of {acts.max_tokens} x {acts.cols}"
    )
    assert x.dtype == np.float32, f"x dtype {x.dtype}"
    _quantize_acts(acts.qs, acts.d, acts.corr, x, x.shape[0])


def activations_from_q80(acts: Q80Activations, payload: np.ndarray) -> None:
    """payload (T, cols//32*34) GGML Q8_0 bytes (e.g. received over MPI) -> rows [0, T) of acts."""
    nbytes = acts.cols // QK * Q80_BLOCK_BYTES
    assert payload.ndim == 2 and payload.shape[1] == nbytes and payload.shape[0] <= acts.max_tokens, (
        f"payload {payload.shape} for activations of {acts.max_tokens} x {acts.cols} ({nbytes} bytes a row)"
    )
    assert payload.dtype == np.uint8, f"payload dtype {payload.dtype}"
    _load_q80(acts.qs, acts.d, acts.corr, payload, payload.shape[0])


@njit(cache=True)
def _quantize_q80_into(payload, x):
    # x (T, nb*32) f32 -> payload (T, nb*34) q80 bytes (GGML Q8_0, byte for byte)
    T = x.shape[0]
    nb = x.shape[1] // QK
    for t in range(T):
        for b in range(nb):
            db = _absmax32(x, t, b * QK) / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            bits = _f16_bits(db)
            o = b * Q80_BLOCK_BYTES
            payload[t, o] = bits & 0xFF
            payload[t, o + 1] = bits >> 8
            for k in range(QK):
                payload[t, o + 2 + k] = np.int32(_roundf(x[t, b * QK + k] * inv)) & 0xFF


def quantize_q80_into(payload: np.ndarray, x: np.ndarray) -> None:
    """x (T, n) f32 -> payload (T, n//32*34) uint8 GGML Q8_0 bytes (sync payloads)."""
    assert x.ndim == 2 and x.dtype == np.float32 and x.shape[1] % QK == 0, f"x {x.dtype} {x.shape}"
    assert payload.dtype == np.uint8 and payload.shape == (x.shape[0], x.shape[1] // QK * Q80_BLOCK_BYTES), (
        f"payload {payload.dtype} {payload.shape} for x {x.shape}"
    )
    _quantize_q80_into(payload, x)


@njit(cache=True, fastmath=True)
def _dequantize_q80_add(acc, payload):
    # acc (T, nb*32) f32 += dequant(payload (T, nb*34) q80)
    T = acc.shape[0]
    nb = acc.shape[1] // QK
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            d = np.float32(_f16_value(np.int64(payload[t, o]) | (np.int64(payload[t, o + 1]) << 8)))
            for k in range(QK):
                q = np.int64(payload[t, o + 2 + k])
                q = q - 256 if q > 127 else q
                acc[t, b * QK + k] += np.float32(q) * d


def dequantize_q80_add(acc: np.ndarray, payload: np.ndarray) -> None:
    """acc (T, n) f32 += dequantize(payload (T, n//32*34) q80): rank 0 sums partial results."""
    assert acc.ndim == 2 and acc.dtype == np.float32 and acc.shape[1] % QK == 0, f"acc {acc.dtype} {acc.shape}"
    assert payload.dtype == np.uint8 and payload.shape == (acc.shape[0], acc.shape[1] // QK * Q80_BLOCK_BYTES), (
        f"payload {payload.dtype} {payload.shape} for acc {acc.shape}"
    )
    _dequantize_q80_add(acc, payload)

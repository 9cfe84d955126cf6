"""numba kernels: Q80 x Q40 matmul, f32 matmul, rmsnorm, rope, attention, silu*mul, Q80 (de)quantize.

Owns: the repacked Q40 weight layout (pack_q40 / unpack_q40, next to each other), the Q80
activation buffers the matmul reads, and every numeric kernel of the forward pass. Each kernel
has a numpy twin in quant.py and a test comparing the two (tests/test_kernels.py).

Imports numpy, numba and mpillama.{config, errors, quant} only: never mpi4py, never model.py.
Nothing is set at import time: the engine calls configure(nthreads) once at start-up.

Conventions: kernels are plain functions over whole arrays, output argument first, no
allocation on the hot path (scratch lives in the Q80Activations buffers), and each begins
with a one-line contract comment. Public wrappers assert the shapes callers could get wrong.

Q40 layout (Q40Matrix): rows are grouped in tiles of TILE = 256. Within a tile the nibble
bytes are ordered [block][byte j][row], so the innermost loop of the matmul runs over 256
rows of contiguous bytes and vectorises across rows; every byte is the unchanged Q4_0 byte
(low nibble = column j of the block, high nibble = column j+16). Scales stay float16 bit
patterns, ordered [tile][block][row], and are turned into float32 with integer bit operations
(numba has no float16 on CPU). Rows are padded up to a whole tile with zero blocks; padded
rows are computed but never written to the output. Still 4.5 bits per weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from mpillama.config import RopeScaling
from mpillama.errors import MpillamaError
from mpillama.quant import Q40_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, rope_frequencies_ref

TILE = 256  # weight rows per tile of the repacked Q40 layout
_F16_MAGIC = np.float32(2.0**112)  # (f16 bits << 13) as f32 times 2^112 = the f16 value, subnormals included


# ---------------------------------------------------------------- threads


def _omp_available() -> bool:
    """True when numba's OpenMP threading layer can load (libgomp present)."""
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (only probing that it loads)
    except ImportError:
        return False
    return True


def configure(nthreads: int) -> None:
    """Pick the omp threading layer when available (before any parallel launch) and set numba's threads.

    Under omp a parallel launch costs ~1-2 us against 20-40 us under numba's default workqueue.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if nthreads < 1 or nthreads > limit:
        raise MpillamaError(
            f"--nthreads {nthreads}: numba can run 1..{limit} threads here; "
            f"choose one in that range (or set NUMBA_NUM_THREADS to raise the limit)"
        )
    try:
        numba.threading_layer()  # raises ValueError until the first parallel launch
        started = True
    except ValueError:
        started = False
    if not started and _omp_available():
        numba.config.THREADING_LAYER = "omp"
    numba.set_num_threads(nthreads)


def _parallel() -> bool:
    """Whether to use the multi-threaded variant of a kernel (more than one numba thread set)."""
    return numba.get_num_threads() > 1


# ---------------------------------------------------------------- float16 scalars


@njit(cache=True)
def _f16_round(d: float) -> tuple[int, float]:
    """A finite d >= 0 -> (float16 bits, the value of that float16) with round-to-nearest-even.

    Done with exact float64 arithmetic (frexp, rint) because numba has no scalar bit casts.
    """
    if d == 0.0:
        return 0, 0.0
    m, e = math.frexp(d)  # d = m * 2**e, m in [0.5, 1)
    exp = e - 1  # d = (2m) * 2**exp, 2m in [1, 2)
    if exp < -14:  # float16 subnormal: multiples of 2**-24 (1024 rounds up to the smallest normal)
        k = np.rint(d * 2.0**24)
        return int(k), k * 2.0**-24
    mant = np.rint((2.0 * m - 1.0) * 1024.0)
    if mant == 1024.0:
        mant = 0.0
        exp += 1
    if exp > 15:
        return 0x7C00, np.inf
    return ((exp + 15) << 10) | int(mant), (1.0 + mant / 1024.0) * 2.0**exp


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


# ---------------------------------------------------------------- Q80 activations


@dataclass
class Q80Activations:
    """Q80 activations for up to max_tokens rows of `cols` values, plus the matmul's scratch.

    Filled by quantize_activations (from f32) or activations_from_q80 (from received bytes);
    both give identical contents for the same data.
    """

    max_tokens: int
    cols: int
    qs: np.ndarray  # (max_tokens, nb) x 32 int8: (max_tokens, nb, 32) int8 quantized values
    d: np.ndarray  # (max_tokens, nb) f32: block scales (exact float16 values)
    dbits: np.ndarray  # (max_tokens, nb) uint16: the same scales as float16 bit patterns
    corr: np.ndarray  # (max_tokens, nb) int32: 8 * sum of the block's qs (folds the Q40 -8 offset)
    isum: np.ndarray  # (slots, TILE) int16: per-thread integer block dot products
    wsf: np.ndarray  # (slots, TILE) f32: per-thread weight scales of one tile block
    wsu: np.ndarray  # (slots, TILE) uint32: wsf viewed as bits (written by the f16 -> f32 conversion)
    acc: np.ndarray  # (slots, max_tokens, TILE) f32: per-thread output accumulators of one tile


def new_activations(max_tokens: int, cols: int) -> Q80Activations:
    """Buffers for up to max_tokens rows of `cols` values (cols a multiple of 32)."""
    assert max_tokens >= 1 and cols > 0 and cols % QK == 0, f"max_tokens={max_tokens} cols={cols}"
    nb = cols // QK
    slots = numba.config.NUMBA_NUM_THREADS  # the most threads any launch can use
    wsf = np.zeros((slots, TILE), np.float32)  # (slots, TILE) f32
    return Q80Activations(
        max_tokens=max_tokens,
        cols=cols,
        qs=np.zeros((max_tokens, nb, QK), np.int8),  # (max_tokens, nb, 32) int8
        d=np.zeros((max_tokens, nb), np.float32),  # (max_tokens, nb) f32
        dbits=np.zeros((max_tokens, nb), np.uint16),  # (max_tokens, nb) uint16
        corr=np.zeros((max_tokens, nb), np.int32),  # (max_tokens, nb) int32
        isum=np.zeros((slots, TILE), np.int16),  # (slots, TILE) int16
        wsf=wsf,
        wsu=wsf.view(np.uint32),  # (slots, TILE) uint32, same memory as wsf
        acc=np.zeros((slots, max_tokens, TILE), np.float32),  # (slots, max_tokens, TILE) f32
    )


@njit(cache=True)
def _quantize_acts(qs, d, dbits, corr, x, T):
    # x (T, nb*32) f32 -> qs (T, nb, 32) int8, d (T, nb) f32, dbits (T, nb) u16, corr (T, nb) i32
    # No fastmath: q must be roundf(x * (1/d)) in float32 exactly as GGML computes it.
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            amax = np.float32(0.0)
            for k in range(QK):
                amax = max(amax, abs(x[t, b * QK + k]))
            db = amax / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            s = 0
            for k in range(QK):
                q = int(_roundf(x[t, b * QK + k] * inv))
                qs[t, b, k] = q
                s += q
            bits, val = _f16_round(db)
            dbits[t, b] = bits
            d[t, b] = val
            corr[t, b] = 8 * s


@njit(cache=True)
def _load_q80(qs, d, dbits, corr, payload, T):
    # payload (T, nb*34) q80 bytes -> qs (T, nb, 32) int8, d (T, nb) f32, dbits (T, nb) u16, corr (T, nb) i32
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            h = np.int64(payload[t, o]) | (np.int64(payload[t, o + 1]) << 8)
            dbits[t, b] = h
            d[t, b] = _f16_value(h)
            s = 0
            for k in range(QK):
                q = np.int64(payload[t, o + 2 + k])
                q = q - 256 if q > 127 else q
                qs[t, b, k] = q
                s += q
            corr[t, b] = 8 * s


@njit(cache=True)
def _store_q80(payload, qs, dbits, T):
    # qs (T, nb, 32) int8, dbits (T, nb) u16 -> payload (T, nb*34) q80 bytes
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            h = np.int64(dbits[t, b])
            payload[t, o] = h & 0xFF
            payload[t, o + 1] = h >> 8
            for k in range(QK):
                payload[t, o + 2 + k] = np.int64(qs[t, b, k]) & 0xFF


def quantize_activations(acts: Q80Activations, x: np.ndarray) -> None:
    """x (T, cols) f32 -> rows [0, T) of acts, with GGML Q8_0 semantics exactly."""
    assert x.ndim == 2 and x.shape[1] == acts.cols and x.shape[0] <= acts.max_tokens, (
        f"x {x.shape} for activations of {acts.max_tokens} x {acts.cols}"
    )
    assert x.dtype == np.float32, f"x dtype {x.dtype}"
    _quantize_acts(acts.qs, acts.d, acts.dbits, acts.corr, x, x.shape[0])


def activations_from_q80(acts: Q80Activations, payload: np.ndarray) -> None:
    """payload (T, cols//32*34) GGML Q8_0 bytes (e.g. received over MPI) -> rows [0, T) of acts."""
    nbytes = acts.cols // QK * Q80_BLOCK_BYTES
    assert payload.ndim == 2 and payload.shape[1] == nbytes and payload.shape[0] <= acts.max_tokens, (
        f"payload {payload.shape} for activations of {acts.max_tokens} x {acts.cols} ({nbytes} bytes a row)"
    )
    assert payload.dtype == np.uint8, f"payload dtype {payload.dtype}"
    _load_q80(acts.qs, acts.d, acts.dbits, acts.corr, payload, payload.shape[0])


def q80_bytes_from_activations(payload: np.ndarray, acts: Q80Activations, T: int) -> None:
    """rows [0, T) of acts -> payload (T, nb*34) GGML Q8_0 bytes (to send what was quantized)."""
    nbytes = acts.cols // QK * Q80_BLOCK_BYTES
    assert payload.dtype == np.uint8 and payload.shape == (T, nbytes), (
        f"payload {payload.dtype} {payload.shape}, expected uint8 ({T}, {nbytes})"
    )
    assert T <= acts.max_tokens, f"T={T} > max_tokens={acts.max_tokens}"
    _store_q80(payload, acts.qs, acts.dbits, T)


@njit(cache=True)
def _quantize_q80_into(payload, x):
    # x (T, nb*32) f32 -> payload (T, nb*34) q80 bytes (GGML Q8_0, byte for byte)
    T = x.shape[0]
    nb = x.shape[1] // QK
    for t in range(T):
        for b in range(nb):
            amax = np.float32(0.0)
            for k in range(QK):
                amax = max(amax, abs(x[t, b * QK + k]))
            db = amax / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            bits, _ = _f16_round(db)
            o = b * Q80_BLOCK_BYTES
            payload[t, o] = bits & 0xFF
            payload[t, o + 1] = bits >> 8
            for k in range(QK):
                payload[t, o + 2 + k] = int(_roundf(x[t, b * QK + k] * inv)) & 0xFF


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


# ---------------------------------------------------------------- Q40 weights


@dataclass
class Q40Matrix:
    """A (rows, cols) Q4_0 matrix in the tiled layout (see the module docstring)."""

    rows: int
    cols: int
    qs: np.ndarray  # (n_tiles, nb, 16, TILE) uint8: unchanged Q4_0 nibble bytes, [tile][block][j][row]
    d: np.ndarray  # (n_tiles, nb, TILE) uint16: float16 scale bits, [tile][block][row]; 0 in padded rows


def pack_q40(ggml: np.ndarray) -> Q40Matrix:
    """uint8 (rows, cols//32*18) GGML Q4_0 rows -> the tiled layout (a transpose; done once at load)."""
    assert ggml.ndim == 2 and ggml.dtype == np.uint8 and ggml.shape[1] % Q40_BLOCK_BYTES == 0, (
        f"ggml {ggml.dtype} {ggml.shape}: expected uint8 (rows, nb*18)"
    )
    rows, nb = ggml.shape[0], ggml.shape[1] // Q40_BLOCK_BYTES
    n_tiles = -(-rows // TILE)
    blocks = ggml.reshape(rows, nb, Q40_BLOCK_BYTES)
    qs = np.full((n_tiles * TILE, nb, 16), 0x88, np.uint8)  # (n_tiles*TILE, nb, 16); 0x88 = nibbles 8 = value 0
    qs[:rows] = blocks[:, :, 2:]
    d = np.zeros((n_tiles * TILE, nb), np.uint16)  # (n_tiles*TILE, nb) f16 bits
    d[:rows] = blocks[:, :, 0].astype(np.uint16) | (blocks[:, :, 1].astype(np.uint16) << 8)
    return Q40Matrix(
        rows=rows,
        cols=nb * QK,
        qs=np.ascontiguousarray(qs.reshape(n_tiles, TILE, nb, 16).transpose(0, 2, 3, 1)),
        d=np.ascontiguousarray(d.reshape(n_tiles, TILE, nb).transpose(0, 2, 1)),
    )


def unpack_q40(m: Q40Matrix) -> np.ndarray:
    """The inverse of pack_q40: -> uint8 (rows, cols//32*18) GGML Q4_0 rows."""
    n_tiles, nb = m.qs.shape[0], m.qs.shape[1]
    qs = m.qs.transpose(0, 3, 1, 2).reshape(n_tiles * TILE, nb, 16)[: m.rows]
    d = m.d.transpose(0, 2, 1).reshape(n_tiles * TILE, nb)[: m.rows]
    out = np.empty((m.rows, nb, Q40_BLOCK_BYTES), np.uint8)  # (rows, nb, 18)
    out[:, :, 0] = d & 0xFF
    out[:, :, 1] = d >> 8
    out[:, :, 2:] = qs
    return out.reshape(m.rows, nb * Q40_BLOCK_BYTES)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40_tiles(out, qs, wd, aq, ad, corr, T, rows, tile_lo, tile_hi, isum, wsf, wsu, acc):
    # w tiles [tile_lo, tile_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32 (rows of those tiles)
    # Per block, the integer dot of the unsigned nibbles with the int8 activations, minus the
    # correction 8*sum(acts) for the -8 offset, is the exact signed dot product and fits int16
    # (|dot| <= 32*8*127 = 32512). Everything before it may wrap: arithmetic mod 2^16 still ends
    # exact, so the int16 store lets LLVM use 16-bit lanes (vpmullw/vpaddw on zmm). The low nibble
    # needs no mask: byte*a_j + high*(a_j+16 - 16*a_j) = low*a_j + high*a_j+16.
    # The integer loop and the float loop stay separate: fused, the vectoriser picks float32's
    # lane count and the integer work runs at half width.
    nb = qs.shape[1]
    for tile in range(tile_lo, tile_hi):
        for t in range(T):
            for r in range(TILE):
                acc[t, r] = 0.0
        for b in range(nb):
            qb = qs[tile, b]  # (16, TILE) uint8
            db = wd[tile, b]  # (TILE,) f16 bits
            for r in range(TILE):  # f16 bits -> f32 bits, then scale by 2^112 (exact, subnormals too)
                h = np.uint32(db[r])
                wsu[r] = ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)
            for r in range(TILE):
                wsf[r] *= _F16_MAGIC
            for t in range(T):  # each weight tile block is decoded once for all T tokens
                ab = aq[t, b]
                a0, a1, a2, a3, a4, a5, a6, a7 = np.int32(ab[0]), np.int32(ab[1]), np.int32(ab[2]), np.int32(ab[3]), np.int32(ab[4]), np.int32(ab[5]), np.int32(ab[6]), np.int32(ab[7])  # noqa: E501
                a8, a9, a10, a11, a12, a13, a14, a15 = np.int32(ab[8]), np.int32(ab[9]), np.int32(ab[10]), np.int32(ab[11]), np.int32(ab[12]), np.int32(ab[13]), np.int32(ab[14]), np.int32(ab[15])  # noqa: E501
                a16, a17, a18, a19, a20, a21, a22, a23 = np.int32(ab[16]), np.int32(ab[17]), np.int32(ab[18]), np.int32(ab[19]), np.int32(ab[20]), np.int32(ab[21]), np.int32(ab[22]), np.int32(ab[23])  # noqa: E501
                a24, a25, a26, a27, a28, a29, a30, a31 = np.int32(ab[24]), np.int32(ab[25]), np.int32(ab[26]), np.int32(ab[27]), np.int32(ab[28]), np.int32(ab[29]), np.int32(ab[30]), np.int32(ab[31])  # noqa: E501
                e0, e1 = a16 - 16 * a0, a17 - 16 * a1
                e2, e3 = a18 - 16 * a2, a19 - 16 * a3
                e4, e5 = a20 - 16 * a4, a21 - 16 * a5
                e6, e7 = a22 - 16 * a6, a23 - 16 * a7
                e8, e9 = a24 - 16 * a8, a25 - 16 * a9
                e10, e11 = a26 - 16 * a10, a27 - 16 * a11
                e12, e13 = a28 - 16 * a12, a29 - 16 * a13
                e14, e15 = a30 - 16 * a14, a31 - 16 * a15
                c = corr[t, b]
                for r in range(TILE):
                    isum[r] = (
                        qb[0, r] * a0 + (qb[0, r] >> 4) * e0
                        + qb[1, r] * a1 + (qb[1, r] >> 4) * e1
                        + qb[2, r] * a2 + (qb[2, r] >> 4) * e2
                        + qb[3, r] * a3 + (qb[3, r] >> 4) * e3
                        + qb[4, r] * a4 + (qb[4, r] >> 4) * e4
                        + qb[5, r] * a5 + (qb[5, r] >> 4) * e5
                        + qb[6, r] * a6 + (qb[6, r] >> 4) * e6
                        + qb[7, r] * a7 + (qb[7, r] >> 4) * e7
                        + qb[8, r] * a8 + (qb[8, r] >> 4) * e8
                        + qb[9, r] * a9 + (qb[9, r] >> 4) * e9
                        + qb[10, r] * a10 + (qb[10, r] >> 4) * e10
                        + qb[11, r] * a11 + (qb[11, r] >> 4) * e11
                        + qb[12, r] * a12 + (qb[12, r] >> 4) * e12
                        + qb[13, r] * a13 + (qb[13, r] >> 4) * e13
                        + qb[14, r] * a14 + (qb[14, r] >> 4) * e14
                        + qb[15, r] * a15 + (qb[15, r] >> 4) * e15
                        - c
                    )
                xd = ad[t, b]
                for r in range(TILE):
                    acc[t, r] += np.float32(isum[r]) * wsf[r] * xd
        r0 = tile * TILE
        n = min(TILE, rows - r0)
        for t in range(T):
            for r in range(n):
                out[t, r0 + r] = acc[t, r]


@njit(cache=True, parallel=True)
def _q40_parallel(out, qs, wd, aq, ad, corr, T, rows, n_threads, isum, wsf, wsu, acc):
    # w (rows, cols) q40 @ x (T, cols) q80 -> out (T, rows) f32, row tiles split over n_threads
    # (n_threads is passed in: numba.get_num_threads() inside a kernel would stop it being cached)
    n_tiles = qs.shape[0]
    n_chunks = min(n_threads, n_tiles, isum.shape[0])
    for k in prange(n_chunks):
        lo = k * n_tiles // n_chunks
        hi = (k + 1) * n_tiles // n_chunks
        _q40_tiles(out, qs, wd, aq, ad, corr, T, rows, lo, hi, isum[k], wsf[k], wsu[k], acc[k])


def matmul_q40(out: np.ndarray, m: Q40Matrix, acts: Q80Activations, T: int) -> None:
    """out (T, rows) f32 = W (rows, cols) q40 @ x[t] (cols,) q80 for t < T (decode T=1, prefill T>1)."""
    assert acts.cols == m.cols, f"activations have {acts.cols} columns, the matrix {m.cols}"
    assert 1 <= T <= acts.max_tokens, f"T={T}, activations hold {acts.max_tokens}"
    assert out.dtype == np.float32 and out.shape == (T, m.rows) and out.flags.c_contiguous, (
        f"out {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous}), expected f32 ({T}, {m.rows})"
    )
    n_threads = numba.get_num_threads()
    if n_threads > 1:
        _q40_parallel(
            out, m.qs, m.d, acts.qs, acts.d, acts.corr, T, m.rows, n_threads,
            acts.isum, acts.wsf, acts.wsu, acts.acc,
        )  # fmt: skip
    else:
        _q40_tiles(
            out, m.qs, m.d, acts.qs, acts.d, acts.corr, T, m.rows, 0, m.qs.shape[0],
            acts.isum[0], acts.wsf[0], acts.wsu[0], acts.acc[0],
        )  # fmt: skip


# ---------------------------------------------------------------- f32 matmul


def matmul_f32(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out (T, rows) f32 = x (T, cols) @ w (rows, cols).T, via numpy's BLAS (memory-bound; as fast as numba)."""
    # w (rows, cols) f32 @ x (T, cols) f32 -> out (T, rows) f32
    assert w.ndim == 2 and x.ndim == 2 and x.shape[1] == w.shape[1], f"w {w.shape} x {x.shape}"
    assert out.dtype == np.float32 and out.shape == (x.shape[0], w.shape[0]), f"out {out.dtype} {out.shape}"
    np.matmul(x, w.T, out=out)


# ---------------------------------------------------------------- rmsnorm, silu*mul


@njit(cache=True)
def _rmsnorm(out, x, weight, eps):
    # x (T, n) f32, weight (n,) f32 -> out (T, n) f32 = x / sqrt(mean(x^2) + eps) * weight (out may be x)
    T, n = x.shape
    for t in range(T):
        ss = 0.0  # float64 sum: exact enough for any n
        for i in range(n):
            ss += np.float64(x[t, i]) * x[t, i]
        s = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * s * weight[i]


def rmsnorm(out: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """out (T, n) = x / sqrt(mean(x^2) + eps) * weight; out may alias x."""
    assert x.ndim == 2 and out.shape == x.shape and weight.shape == (x.shape[1],), (
        f"out {out.shape} x {x.shape} weight {weight.shape}"
    )
    assert out.dtype == x.dtype == weight.dtype == np.float32, f"{out.dtype} {x.dtype} {weight.dtype}"
    _rmsnorm(out, x, weight, eps)


@njit(cache=True)
def _silu_mul(h1, h3):
    # h1 (T, n) f32, h3 (T, n) f32 -> h1 = silu(h1) * h3
    T, n = h1.shape
    for t in range(T):
        for i in range(n):
            a = h1[t, i]
            h1[t, i] = a / (np.float32(1.0) + np.exp(-a)) * h3[t, i]


def silu_mul(h1: np.ndarray, h3: np.ndarray) -> None:
    """h1 (T, n) = silu(h1) * h3, in place."""
    assert h1.ndim == 2 and h1.shape == h3.shape, f"h1 {h1.shape} h3 {h3.shape}"
    assert h1.dtype == h3.dtype == np.float32, f"{h1.dtype} {h3.dtype}"
    _silu_mul(h1, h3)


# ---------------------------------------------------------------- rope


def rope_tables(head_dim: int, max_seq: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables, each f32 (max_seq, head_dim//2): angle = position * frequency i (float64 inside)."""
    assert head_dim % 2 == 0 and max_seq >= 1, f"head_dim={head_dim} max_seq={max_seq}"
    freqs = rope_frequencies_ref(head_dim, theta, scaling)  # (hd/2,) f64, Llama 3.1 remap if scaling
    ang = np.arange(max_seq, dtype=np.float64)[:, None] * freqs[None, :]  # (max_seq, hd/2) f64
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@njit(cache=True)
def _rope(x, positions, cos, sin, halves):
    # x (T, n_heads, hd) f32 rotated in place by positions (T,), tables (max_seq, hd/2) f32
    T, n_heads, hd = x.shape
    half = hd // 2
    for t in range(T):
        p = positions[t]
        for h in range(n_heads):
            for i in range(half):
                c = cos[p, i]
                s = sin[p, i]
                if halves:
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * c - b * s
                    x[t, h, i + half] = a * s + b * c
                else:
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * c - b * s
                    x[t, h, 2 * i + 1] = a * s + b * c


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, halves: bool) -> None:
    """Rotate x (T, n_heads, head_dim) in place: pairs (2i, 2i+1), or halves (i, i + hd/2) (NeoX)."""
    assert x.ndim == 3 and x.dtype == np.float32 and positions.shape == (x.shape[0],), (
        f"x {x.dtype} {x.shape} positions {positions.shape}"
    )
    assert cos.shape == sin.shape and cos.shape[1] * 2 == x.shape[2], f"tables {cos.shape} for head_dim {x.shape[2]}"
    assert positions.size == 0 or (0 <= positions.min() and positions.max() < cos.shape[0]), (
        f"positions {positions.min()}..{positions.max()} outside the tables' {cos.shape[0]}"
    )
    _rope(x, positions, cos, sin, halves)


# ---------------------------------------------------------------- attention


@njit(cache=True, fastmath=True)
def _attend(out, q, k_cache, v_cache, pos0, t, h, group):
    # q (T, n_heads, hd), caches (max_seq, n_kv, hd) -> out[t, h] (hd,) f32 over positions [0, pos0+t]
    # Online softmax: the output row itself is the accumulator, so no scores scratch is needed.
    hd = q.shape[2]
    kv = h // group
    scale = np.float32(1.0 / math.sqrt(hd))
    o = out[t, h]
    qr = q[t, h]
    s = np.float32(0.0)
    for i in range(hd):
        s += qr[i] * k_cache[0, kv, i]
    m = s * scale  # running max of the scores
    den = np.float32(1.0)  # running sum of exp(score - m)
    for i in range(hd):
        o[i] = v_cache[0, kv, i]
    for p in range(1, pos0 + t + 1):
        s = np.float32(0.0)
        for i in range(hd):
            s += qr[i] * k_cache[p, kv, i]
        s *= scale
        if s > m:  # a new max: rescale what was summed so far
            c = np.exp(m - s)
            den *= c
            for i in range(hd):
                o[i] *= c
            m = s
        w = np.exp(s - m)
        den += w
        for i in range(hd):
            o[i] += w * v_cache[p, kv, i]
    inv = np.float32(1.0) / den
    for i in range(hd):
        o[i] *= inv


@njit(cache=True)
def _attention_serial(out, q, k_cache, v_cache, pos0, T):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, causal
    n_heads = q.shape[1]
    group = n_heads // k_cache.shape[1]
    for j in range(T * n_heads):
        _attend(out, q, k_cache, v_cache, pos0, j // n_heads, j % n_heads, group)


@njit(cache=True, parallel=True)
def _attention_parallel(out, q, k_cache, v_cache, pos0, T):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, (token, head) over threads
    n_heads = q.shape[1]
    group = n_heads // k_cache.shape[1]
    for j in prange(T * n_heads):
        _attend(out, q, k_cache, v_cache, pos0, j // n_heads, j % n_heads, group)


def attention(
    out: np.ndarray, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, T: int
) -> None:
    """Causal grouped-query attention of T new tokens (positions pos0..pos0+T-1) over the KV cache.

    The caller has already written the T new k/v rows. Query head h reads kv head
    h // (n_heads // n_kv); scores are scaled by 1/sqrt(head_dim). Needs no scratch: the softmax
    is computed online (running max and sum) with out's own row as the accumulator.
    """
    assert q.ndim == 3 and q.shape[0] >= T and out.shape[1:] == q.shape[1:] and out.shape[0] >= T, (
        f"out {out.shape} q {q.shape} T={T}"
    )
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == q.shape[2], (
        f"k_cache {k_cache.shape} v_cache {v_cache.shape} q {q.shape}"
    )
    assert q.shape[1] % k_cache.shape[1] == 0, f"{q.shape[1]} query heads over {k_cache.shape[1]} kv heads"
    assert 0 <= pos0 and pos0 + T <= k_cache.shape[0], f"pos0={pos0} T={T} cache length {k_cache.shape[0]}"
    assert out.dtype == q.dtype == k_cache.dtype == v_cache.dtype == np.float32, "attention buffers must be f32"
    if _parallel():
        _attention_parallel(out, q, k_cache, v_cache, pos0, T)
    else:
        _attention_serial(out, q, k_cache, v_cache, pos0, T)

"""The Q80-weight x Q80-activation matmul over q80w.py's sdot layout with ARM's dot product (sdot).

The sdot layout is the vnni one (rows in groups of 16, a 64-byte vector holding 4 value bytes of
each of the 16 rows, then the 16 float16 scales) with the values stored as they are: sdot
multiplies signed bytes by signed bytes, so no offset and no correction. Per block: 8 sdot steps
(arm.py's _sdot: four `sdot v.4s` on the four 128-bit registers a 64-byte vector occupies), times
row scale x activation scale. Prefill runs two tokens per pass, for NEON's register budget (arm.py).

aarch64 only: imported by q80w.matmul_q80w only on the arm-sdot path (compiling sdot for a CPU
without dotprod aborts the process inside LLVM). Imports numba and the package's vector.py,
groups.py and arm.py only.
"""

from __future__ import annotations

from numba import njit, prange

from mpillama.kernels.arm import _sdot
from mpillama.kernels.groups import VNNI_CHUNK, VNNI_ROWS, _store_rows
from mpillama.kernels.vector import (
    _claim,
    _vbroadcast32,
    _vfma,
    _vload_f16,
    _vload_i32,
    _vmul,
    _vsplat_f32,
    _vsplat_i32,
    _vtofloat,
)

_BLOCK = 544  # q80w.Q80V_BLOCK_BYTES (not imported: q80w imports this module)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80s_one(out, w, xq, xd, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) of (n_groups, nb, 544) q80 @ x (1, cols) q80 -> out (1, rows) f32
    nb = w.shape[1]
    for g in range(g_lo, g_hi):
        acc = _vsplat_f32(0.0)
        for b in range(nb):
            o = (g * nb + b) * _BLOCK
            s = _vsplat_i32(0)
            for k in range(8):
                s = _sdot(s, _vload_i32(w, o + 64 * k), _vbroadcast32(xq, b * 8 + k))
            acc = _vfma(_vtofloat(s), _vmul(_vload_f16(w, o + 512), _vsplat_f32(xd[0, b])), acc)
        _store_rows(out, g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80s_pair(out, w, xq, xd, t, rows, g):
    # row group g of w q80 @ x rows t, t+1 q80 -> out rows t, t+1, lanes of group g
    nb = w.shape[1]
    a0 = _vsplat_f32(0.0)
    a1 = _vsplat_f32(0.0)
    st = nb * 8  # one token's row in xq (T, nb, 8), flat
    for b in range(nb):
        o = (g * nb + b) * _BLOCK
        s0 = _vsplat_i32(0)
        s1 = _vsplat_i32(0)
        x = (t * nb + b) * 8
        for k in range(8):
            v = _vload_i32(w, o + 64 * k)
            s0 = _sdot(s0, v, _vbroadcast32(xq, x + k))
            s1 = _sdot(s1, v, _vbroadcast32(xq, x + st + k))
        sc = _vload_f16(w, o + 512)
        a0 = _vfma(_vtofloat(s0), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(s1), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80s_single(out, w, xq, xd, t, rows, g):
    # row group g of w q80 @ x row t q80 -> out row t, lanes of group g (an odd T's last token)
    nb = w.shape[1]
    acc = _vsplat_f32(0.0)
    for b in range(nb):
        o = (g * nb + b) * _BLOCK
        s = _vsplat_i32(0)
        for k in range(8):
            s = _sdot(s, _vload_i32(w, o + 64 * k), _vbroadcast32(xq, (t * nb + b) * 8 + k))
        acc = _vfma(_vtofloat(s), _vmul(_vload_f16(w, o + 512), _vsplat_f32(xd[t, b])), acc)
    _store_rows(out, t * rows + g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80s_run(out, w, xq, xd, T, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) q80 @ x (T, cols) q80 -> out (T, rows) f32
    if T == 1:
        _q80s_one(out, w, xq, xd, rows, g_lo, g_hi)
        return
    for g in range(g_lo, g_hi):  # one row group (nb*544 bytes, in L1/L2) for all T tokens
        t = 0
        while t + 2 <= T:
            _q80s_pair(out, w, xq, xd, t, rows, g)
            t += 2
        if t < T:
            _q80s_single(out, w, xq, xd, t, rows, g)


@njit(cache=True, parallel=True)
def _q80s_parallel(out, w, xq, xd, T, rows, n_threads, next_chunk):
    # w (n_groups, nb, 544) q80 @ x (T, cols) q80 -> out (T, rows) f32, VNNI_CHUNK row groups at a
    # time to whichever of n_threads is free
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // VNNI_CHUNK)
    next_chunk[0] = 0
    for _ in prange(min(n_threads, n_chunks)):
        c = _claim(next_chunk)
        while c < n_chunks:
            _q80s_run(out, w, xq, xd, T, rows, c * VNNI_CHUNK, min(n_groups, (c + 1) * VNNI_CHUNK))
            c = _claim(next_chunk)

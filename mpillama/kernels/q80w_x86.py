"""The Q80-weight x Q80-activation matmul over q80w.py's vnni layout with AVX-512 VNNI (vpdpbusd).

One 64-byte load holds 4 value bytes of each of 16 rows (stored + 128, unsigned); vpdpbusd
multiplies them by 4 broadcast activation bytes (signed) and sums into the row's int32 lane.
Per block: 8 such steps, minus 128 * sum(activations) (16 * corr: corr holds 8 * sum), times
row scale x activation scale. The sums are exact: |sum| <= 32 * 255 * 128 < 2^20.

x86 only (it uses x86.py's _vdpbusd); imported by q80w.matmul_q80w only on the x86-vnni path.
Imports numba and the package's vector.py, groups.py and x86.py only.
"""

from __future__ import annotations

from numba import njit, prange

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
    _vsub,
    _vtofloat,
)
from mpillama.kernels.x86 import _vdpbusd

_BLOCK = 544  # q80w.Q80V_BLOCK_BYTES (not imported: q80w imports this module)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80v_one(out, w, xq, xd, corr, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) of (n_groups, nb, 544) q80 @ x (1, cols) q80 -> out (1, rows) f32
    # Four row groups side by side, four streams from memory (as x86.py's _q40v_one: one core keeps
    # more loads in flight than one stream gets), then the last 1-3 one at a time with two integer
    # chains (even and odd byte groups) that halve the vpdpbusd latency chain per block. Either way a
    # group's integer sums are exact and its float operations the same, in the same order.
    nb = w.shape[1]
    st = nb * _BLOCK  # one row group's bytes
    g = g_lo
    while g + 4 <= g_hi:
        z = _vsplat_f32(0.0)
        a0, a1, a2, a3 = z, z, z, z
        for b in range(nb):
            o = (g * nb + b) * _BLOCK
            zi = _vsplat_i32(0)
            s0, s1, s2, s3 = zi, zi, zi, zi
            for k in range(8):
                x = _vbroadcast32(xq, b * 8 + k)
                s0 = _vdpbusd(s0, _vload_i32(w, o + 64 * k), x)
                s1 = _vdpbusd(s1, _vload_i32(w, o + st + 64 * k), x)
                s2 = _vdpbusd(s2, _vload_i32(w, o + 2 * st + 64 * k), x)
                s3 = _vdpbusd(s3, _vload_i32(w, o + 3 * st + 64 * k), x)
            c, xs = _vsplat_i32(16 * corr[0, b]), _vsplat_f32(xd[0, b])  # 128 * sum(x), the +128 folded out
            a0 = _vfma(_vtofloat(_vsub(s0, c)), _vmul(_vload_f16(w, o + 512), xs), a0)
            a1 = _vfma(_vtofloat(_vsub(s1, c)), _vmul(_vload_f16(w, o + st + 512), xs), a1)
            a2 = _vfma(_vtofloat(_vsub(s2, c)), _vmul(_vload_f16(w, o + 2 * st + 512), xs), a2)
            a3 = _vfma(_vtofloat(_vsub(s3, c)), _vmul(_vload_f16(w, o + 3 * st + 512), xs), a3)
        _store_rows(out, g * VNNI_ROWS, a0, rows - g * VNNI_ROWS)
        _store_rows(out, (g + 1) * VNNI_ROWS, a1, rows - (g + 1) * VNNI_ROWS)
        _store_rows(out, (g + 2) * VNNI_ROWS, a2, rows - (g + 2) * VNNI_ROWS)
        _store_rows(out, (g + 3) * VNNI_ROWS, a3, rows - (g + 3) * VNNI_ROWS)
        g += 4
    while g < g_hi:
        acc = _vsplat_f32(0.0)
        for b in range(nb):
            o = (g * nb + b) * _BLOCK
            s0 = _vsplat_i32(0)
            s1 = _vsplat_i32(0)
            for k in range(0, 8, 2):
                s0 = _vdpbusd(s0, _vload_i32(w, o + 64 * k), _vbroadcast32(xq, b * 8 + k))
                s1 = _vdpbusd(s1, _vload_i32(w, o + 64 * k + 64), _vbroadcast32(xq, b * 8 + k + 1))
            dot = _vtofloat(_vsub(s0, _vsub(_vsplat_i32(16 * corr[0, b]), s1)))  # s0 + s1 - 128 * sum(x)
            acc = _vfma(dot, _vmul(_vload_f16(w, o + 512), _vsplat_f32(xd[0, b])), acc)
        _store_rows(out, g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)
        g += 1


# _q80v_four and _q80v_single are one kernel unrolled by hand for 4 and 1 tokens on purpose
# (register blocking: each weight vector loaded once feeds 4 dot products).


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80v_four(out, w, xq, xd, corr, t, rows, g):
    # row group g of w q80 @ x rows [t, t+4) q80 -> out rows [t, t+4), lanes of group g
    nb = w.shape[1]
    z = _vsplat_f32(0.0)
    a0, a1, a2, a3 = z, z, z, z
    st = nb * 8  # one token's row in xq (T, nb, 8), flat
    for b in range(nb):
        o = (g * nb + b) * _BLOCK
        zi = _vsplat_i32(0)
        s0, s1, s2, s3 = zi, zi, zi, zi
        x = (t * nb + b) * 8
        for k in range(8):
            v = _vload_i32(w, o + 64 * k)
            s0 = _vdpbusd(s0, v, _vbroadcast32(xq, x + k))
            s1 = _vdpbusd(s1, v, _vbroadcast32(xq, x + st + k))
            s2 = _vdpbusd(s2, v, _vbroadcast32(xq, x + 2 * st + k))
            s3 = _vdpbusd(s3, v, _vbroadcast32(xq, x + 3 * st + k))
        sc = _vload_f16(w, o + 512)
        a0 = _vfma(_vtofloat(_vsub(s0, _vsplat_i32(16 * corr[t, b]))), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(_vsub(s1, _vsplat_i32(16 * corr[t + 1, b]))), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
        a2 = _vfma(_vtofloat(_vsub(s2, _vsplat_i32(16 * corr[t + 2, b]))), _vmul(sc, _vsplat_f32(xd[t + 2, b])), a2)
        a3 = _vfma(_vtofloat(_vsub(s3, _vsplat_i32(16 * corr[t + 3, b]))), _vmul(sc, _vsplat_f32(xd[t + 3, b])), a3)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)
    _store_rows(out, (t + 2) * rows + r0, a2, n)
    _store_rows(out, (t + 3) * rows + r0, a3, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80v_single(out, w, xq, xd, corr, t, rows, g):
    # row group g of w q80 @ x row t q80 -> out row t, lanes of group g
    nb = w.shape[1]
    acc = _vsplat_f32(0.0)
    for b in range(nb):
        o = (g * nb + b) * _BLOCK
        s = _vsplat_i32(0)
        for k in range(8):
            s = _vdpbusd(s, _vload_i32(w, o + 64 * k), _vbroadcast32(xq, (t * nb + b) * 8 + k))
        sc = _vmul(_vload_f16(w, o + 512), _vsplat_f32(xd[t, b]))
        acc = _vfma(_vtofloat(_vsub(s, _vsplat_i32(16 * corr[t, b]))), sc, acc)
    _store_rows(out, t * rows + g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80v_run(out, w, xq, xd, corr, T, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) q80 @ x (T, cols) q80 -> out (T, rows) f32
    if T == 1:
        _q80v_one(out, w, xq, xd, corr, rows, g_lo, g_hi)
        return
    for g in range(g_lo, g_hi):  # one row group (nb*544 bytes, in L1/L2) for all T tokens
        t = 0
        while t + 4 <= T:
            _q80v_four(out, w, xq, xd, corr, t, rows, g)
            t += 4
        while t < T:
            _q80v_single(out, w, xq, xd, corr, t, rows, g)
            t += 1


@njit(cache=True, parallel=True)
def _q80v_parallel(out, w, xq, xd, corr, T, rows, n_threads, next_chunk):
    # w (n_groups, nb, 544) q80 @ x (T, cols) q80 -> out (T, rows) f32, VNNI_CHUNK row groups at a
    # time to whichever of n_threads is free
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // VNNI_CHUNK)
    next_chunk[0] = 0
    for _ in prange(min(n_threads, n_chunks)):
        c = _claim(next_chunk)
        while c < n_chunks:
            _q80v_run(out, w, xq, xd, corr, T, rows, c * VNNI_CHUNK, min(n_groups, (c + 1) * VNNI_CHUNK))
            c = _claim(next_chunk)

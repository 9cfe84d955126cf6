"""The Q40 x Q80 matmul over the row-group ("vnni") layout with x86's AVX-512 VNNI dot product (vpdpbusd).

The layout is groups.py's: one 64-byte load holds 4 bytes of each of 16 rows, so vpdpbusd
multiplies the low nibbles (columns 4k..4k+3) and, shifted, the high ones (16+4k..) by the
broadcast activation words and sums 4 products per row lane.

x86 only: _vdpbusd, the one x86 instruction, is defined here; the rest comes from vector.py's
generic layer and groups.py. The kernels compile on their first call, which happens only where
target.kernel_path() is x86-vnni (q40.matmul_q40 dispatches on it). The prefill scratch comes from
Q80Activations (group_nibbles, group_scales).

Imports numba, llvmlite and the package's vector.py and groups.py only.
"""

from __future__ import annotations

from llvmlite import ir as llvm_ir
from numba import njit, prange
from numba.core import cgutils
from numba.extending import intrinsic

from mpillama.kernels.vector import (
    _I32X16,
    _LL_VI,
    _claim,
    _vand,
    _vbroadcast32,
    _vfma,
    _vload_f16,
    _vload_f32,
    _vload_i32,
    _vmul,
    _vshr4,
    _vsplat_f32,
    _vsplat_i32,
    _vsub,
    _vtofloat,
)
from mpillama.kernels.groups import VNNI_BLOCK_BYTES, VNNI_CHUNK, VNNI_ROWS, _q40v_split, _store_rows


@intrinsic
def _vdpbusd(typingctx, acc, u, s):  # noqa: ANN001, ANN202
    """acc + (per int32 lane) the sum of 4 products unsigned byte of u x signed byte of s (x86 vpdpbusd)."""
    if acc == u == s == _I32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = llvm_ir.FunctionType(_LL_VI, [_LL_VI] * 3)
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, args)
        return _I32X16(acc, u, s), codegen


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_one(out, w, xq, xd, corr, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) of (n_groups, nb, 288) q40 @ x (1, cols) q80 -> out (1, rows) f32
    # Per block and 16 rows: 8 vpdpbusd (the low nibbles of byte group k with activation word k,
    # the high nibbles with word 4+k, xq (T, nb, 8) uint32), minus the -8 offset's correction,
    # times row scale x activation scale, added to 16 float32 accumulators that stay in a register.
    # Unsigned nibbles times int8 activations sum to int32 exactly (|sum| <= 32*15*128).
    # Four row groups go side by side, four streams from memory: one core keeps more loads in flight
    # than a single stream gets (from memory, 1 thread: 1.23-1.29x one group at a time, 95% of a
    # plain read of the same bytes). Each group's sums are made in the same order either way.
    nb = w.shape[1]
    low = _vsplat_i32(0x0F0F0F0F)
    st = nb * VNNI_BLOCK_BYTES  # one row group's bytes
    g = g_lo
    while g + 4 <= g_hi:
        z = _vsplat_f32(0.0)
        a0, a1, a2, a3 = z, z, z, z
        for b in range(nb):
            o = (g * nb + b) * VNNI_BLOCK_BYTES
            zi = _vsplat_i32(0)
            s0, s1, s2, s3 = zi, zi, zi, zi
            for k in range(4):
                xl, xh = _vbroadcast32(xq, b * 8 + k), _vbroadcast32(xq, b * 8 + 4 + k)
                v0, v1 = _vload_i32(w, o + 64 * k), _vload_i32(w, o + st + 64 * k)
                v2, v3 = _vload_i32(w, o + 2 * st + 64 * k), _vload_i32(w, o + 3 * st + 64 * k)
                s0 = _vdpbusd(_vdpbusd(s0, _vand(v0, low), xl), _vand(_vshr4(v0), low), xh)
                s1 = _vdpbusd(_vdpbusd(s1, _vand(v1, low), xl), _vand(_vshr4(v1), low), xh)
                s2 = _vdpbusd(_vdpbusd(s2, _vand(v2, low), xl), _vand(_vshr4(v2), low), xh)
                s3 = _vdpbusd(_vdpbusd(s3, _vand(v3, low), xl), _vand(_vshr4(v3), low), xh)
            c, xs = _vsplat_i32(corr[0, b]), _vsplat_f32(xd[0, b])
            a0 = _vfma(_vtofloat(_vsub(s0, c)), _vmul(_vload_f16(w, o + 256), xs), a0)
            a1 = _vfma(_vtofloat(_vsub(s1, c)), _vmul(_vload_f16(w, o + st + 256), xs), a1)
            a2 = _vfma(_vtofloat(_vsub(s2, c)), _vmul(_vload_f16(w, o + 2 * st + 256), xs), a2)
            a3 = _vfma(_vtofloat(_vsub(s3, c)), _vmul(_vload_f16(w, o + 3 * st + 256), xs), a3)
        _store_rows(out, g * VNNI_ROWS, a0, rows - g * VNNI_ROWS)
        _store_rows(out, (g + 1) * VNNI_ROWS, a1, rows - (g + 1) * VNNI_ROWS)
        _store_rows(out, (g + 2) * VNNI_ROWS, a2, rows - (g + 2) * VNNI_ROWS)
        _store_rows(out, (g + 3) * VNNI_ROWS, a3, rows - (g + 3) * VNNI_ROWS)
        g += 4
    while g < g_hi:  # the last 1-3 groups
        acc = _vsplat_f32(0.0)
        for b in range(nb):
            o = (g * nb + b) * VNNI_BLOCK_BYTES
            s = _vsplat_i32(0)
            for k in range(4):
                v = _vload_i32(w, o + 64 * k)
                s = _vdpbusd(s, _vand(v, low), _vbroadcast32(xq, b * 8 + k))
                s = _vdpbusd(s, _vand(_vshr4(v), low), _vbroadcast32(xq, b * 8 + 4 + k))
            dot = _vtofloat(_vsub(s, _vsplat_i32(corr[0, b])))
            acc = _vfma(dot, _vmul(_vload_f16(w, o + 256), _vsplat_f32(xd[0, b])), acc)
        _store_rows(out, g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)
        g += 1


# _q40v_eight, _q40v_four and _q40v_single are one kernel unrolled by hand for 8, 4 and 1 tokens
# on purpose (register blocking: up to 8 int32 sums and 8 float32 accumulators in 16 registers).


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_eight(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x rows [t, t+8) q80 -> out rows [t, t+8), lanes of group g
    # Eight tokens per pass: each nibble vector loaded once feeds eight dot products (16 registers).
    nb = xd.shape[1]
    z = _vsplat_f32(0.0)
    a0, a1, a2, a3, a4, a5, a6, a7 = z, z, z, z, z, z, z, z
    st = nb * 8  # one token's row in xq (T, nb, 8), flat
    for b in range(nb):
        zi = _vsplat_i32(0)
        s0, s1, s2, s3, s4, s5, s6, s7 = zi, zi, zi, zi, zi, zi, zi, zi
        x = (t * nb + b) * 8
        for k in range(8):
            u = _vload_i32(unp, (b * 8 + k) * 16)
            s0 = _vdpbusd(s0, u, _vbroadcast32(xq, x + k))
            s1 = _vdpbusd(s1, u, _vbroadcast32(xq, x + st + k))
            s2 = _vdpbusd(s2, u, _vbroadcast32(xq, x + 2 * st + k))
            s3 = _vdpbusd(s3, u, _vbroadcast32(xq, x + 3 * st + k))
            s4 = _vdpbusd(s4, u, _vbroadcast32(xq, x + 4 * st + k))
            s5 = _vdpbusd(s5, u, _vbroadcast32(xq, x + 5 * st + k))
            s6 = _vdpbusd(s6, u, _vbroadcast32(xq, x + 6 * st + k))
            s7 = _vdpbusd(s7, u, _vbroadcast32(xq, x + 7 * st + k))
        sc = _vload_f32(ws, b * 16)
        a0 = _vfma(_vtofloat(_vsub(s0, _vsplat_i32(corr[t, b]))), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(_vsub(s1, _vsplat_i32(corr[t + 1, b]))), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
        a2 = _vfma(_vtofloat(_vsub(s2, _vsplat_i32(corr[t + 2, b]))), _vmul(sc, _vsplat_f32(xd[t + 2, b])), a2)
        a3 = _vfma(_vtofloat(_vsub(s3, _vsplat_i32(corr[t + 3, b]))), _vmul(sc, _vsplat_f32(xd[t + 3, b])), a3)
        a4 = _vfma(_vtofloat(_vsub(s4, _vsplat_i32(corr[t + 4, b]))), _vmul(sc, _vsplat_f32(xd[t + 4, b])), a4)
        a5 = _vfma(_vtofloat(_vsub(s5, _vsplat_i32(corr[t + 5, b]))), _vmul(sc, _vsplat_f32(xd[t + 5, b])), a5)
        a6 = _vfma(_vtofloat(_vsub(s6, _vsplat_i32(corr[t + 6, b]))), _vmul(sc, _vsplat_f32(xd[t + 6, b])), a6)
        a7 = _vfma(_vtofloat(_vsub(s7, _vsplat_i32(corr[t + 7, b]))), _vmul(sc, _vsplat_f32(xd[t + 7, b])), a7)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)
    _store_rows(out, (t + 2) * rows + r0, a2, n)
    _store_rows(out, (t + 3) * rows + r0, a3, n)
    _store_rows(out, (t + 4) * rows + r0, a4, n)
    _store_rows(out, (t + 5) * rows + r0, a5, n)
    _store_rows(out, (t + 6) * rows + r0, a6, n)
    _store_rows(out, (t + 7) * rows + r0, a7, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_four(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x rows [t, t+4) q80 -> out rows [t, t+4), lanes of group g
    nb = xd.shape[1]
    z = _vsplat_f32(0.0)
    a0, a1, a2, a3 = z, z, z, z
    for b in range(nb):
        zi = _vsplat_i32(0)
        s0, s1, s2, s3 = zi, zi, zi, zi
        x = (t * nb + b) * 8  # xq (T, nb, 8) uint32, flat
        for k in range(8):
            u = _vload_i32(unp, (b * 8 + k) * 16)
            s0 = _vdpbusd(s0, u, _vbroadcast32(xq, x + k))
            s1 = _vdpbusd(s1, u, _vbroadcast32(xq, x + nb * 8 + k))
            s2 = _vdpbusd(s2, u, _vbroadcast32(xq, x + nb * 16 + k))
            s3 = _vdpbusd(s3, u, _vbroadcast32(xq, x + nb * 24 + k))
        sc = _vload_f32(ws, b * 16)
        a0 = _vfma(_vtofloat(_vsub(s0, _vsplat_i32(corr[t, b]))), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(_vsub(s1, _vsplat_i32(corr[t + 1, b]))), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
        a2 = _vfma(_vtofloat(_vsub(s2, _vsplat_i32(corr[t + 2, b]))), _vmul(sc, _vsplat_f32(xd[t + 2, b])), a2)
        a3 = _vfma(_vtofloat(_vsub(s3, _vsplat_i32(corr[t + 3, b]))), _vmul(sc, _vsplat_f32(xd[t + 3, b])), a3)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)
    _store_rows(out, (t + 2) * rows + r0, a2, n)
    _store_rows(out, (t + 3) * rows + r0, a3, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_single(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x row t q80 -> out row t, lanes of group g
    nb = xd.shape[1]
    acc = _vsplat_f32(0.0)
    for b in range(nb):
        s = _vsplat_i32(0)
        for k in range(8):
            s = _vdpbusd(s, _vload_i32(unp, (b * 8 + k) * 16), _vbroadcast32(xq, (t * nb + b) * 8 + k))
        sc = _vmul(_vload_f32(ws, b * 16), _vsplat_f32(xd[t, b]))
        acc = _vfma(_vtofloat(_vsub(s, _vsplat_i32(corr[t, b]))), sc, acc)
    _store_rows(out, t * rows + g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_many(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws):
    # w row groups [g_lo, g_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32, T > 1 (prefill)
    # Each row group's nibbles are split once (into unp, ws: nb*576 bytes, in L1 or L2) and reused by
    # all T tokens, 8 at a time, instead of unpacking every weight again for every token.
    for g in range(g_lo, g_hi):
        _q40v_split(unp, ws, w, g)
        t = 0
        while t + 8 <= T:
            _q40v_eight(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 8
        if t + 4 <= T:
            _q40v_four(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 4
        while t < T:
            _q40v_single(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_run(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws):
    # w row groups [g_lo, g_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32
    if T == 1:
        _q40v_one(out, w, xq, xd, corr, rows, g_lo, g_hi)
    else:
        _q40v_many(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws)


@njit(cache=True, parallel=True)
def _q40v_parallel(out, w, xq, xd, corr, T, rows, n_threads, unp, ws, next_chunk):
    # w (n_groups, nb, 288) q40 @ x (T, cols) q80 -> out (T, rows) f32, VNNI_CHUNK row groups at a
    # time to whichever of n_threads is free
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // VNNI_CHUNK)
    next_chunk[0] = 0
    for k in prange(min(n_threads, n_chunks, unp.shape[0])):
        c = _claim(next_chunk)
        while c < n_chunks:
            _q40v_run(out, w, xq, xd, corr, T, rows, c * VNNI_CHUNK, min(n_groups, (c + 1) * VNNI_CHUNK), unp[k], ws[k])
            c = _claim(next_chunk)

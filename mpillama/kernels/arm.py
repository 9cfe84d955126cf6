"""The Q40 x Q80 matmul over the row-group ("vnni") layout with ARM's dot product (sdot, Armv8.2 dotprod).

The layout is groups.py's, the same bytes x86.py reads: a 64-byte vector holds 4 bytes of each of
16 rows, which LLVM keeps in four 128-bit NEON registers (4 rows each). _sdot is four
`sdot v.4s, v.16b, v.16b`, one per register, in place of x86's one 512-bit vpdpbusd. sdot
multiplies signed bytes by signed bytes; the nibbles (0..15) are valid signed bytes, so the sums
are the same as vpdpbusd's (unsigned x signed) and the 8*sum(acts) correction stays exact.

Blocking differs from x86.py for the register budget (32 NEON registers of 128 bits, where x86 has
32 of 512): prefill runs two tokens per pass (8 int32 sums and 8 float32 accumulators in 16
registers, their activations and the split nibbles in about 8 more) instead of eight. The
activations are multiplied by lane (`sdot v.4s, v.16b, v.4b[k]`: one 16-byte load serves four
byte groups), a block's integer sums start at minus its correction instead of subtracting it
after, and a block's four byte groups are unrolled by hand (bench/kernels.py --asm shows the
loops). The integer sums are exact and the float arithmetic after them is x86.py's, in the same
order: the results are bitwise the same.

aarch64 only: the kernels compile on their first call, which happens only where
target.kernel_path() is arm-sdot (q40.matmul_q40 dispatches on it); compiling sdot for a CPU
without dotprod aborts the process inside LLVM. The prefill scratch comes from Q80Activations
(group_nibbles, group_scales).

Imports numba, llvmlite and the package's vector.py and groups.py only.
"""

from __future__ import annotations

from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from mpillama.kernels.groups import VNNI_BLOCK_BYTES, VNNI_CHUNK, VNNI_ROWS, _q40v_split, _store_rows
from mpillama.kernels.vector import (
    _I32X16,
    _LL_I32,
    _LL_VI,
    _claim,
    _elem_ptr,
    _is_c_array,
    _shuffle,
    _splat,
    _vand,
    _vbroadcast32,
    _vfma,
    _vload_f16,
    _vload_f32,
    _vload_i32,
    _vmul,
    _vsplat_f32,
    _vsplat_i32,
    _vtofloat,
)

_LL_V4I = llvm_ir.VectorType(_LL_I32, 4)
_LL_V16B = llvm_ir.VectorType(llvm_ir.IntType(8), 16)
_LL_V64B = llvm_ir.VectorType(llvm_ir.IntType(8), 64)


@intrinsic
def _sdot(typingctx, acc, a, b):  # noqa: ANN001, ANN202
    """acc + (per int32 lane) the sum of 4 products signed byte of a x signed byte of b (4 x ARM sdot)."""
    if acc == a == b == _I32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = llvm_ir.FunctionType(_LL_V4I, [_LL_V4I, _LL_V16B, _LL_V16B])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.aarch64.neon.sdot.v4i32.v16i8")
            quarters = []
            for q in range(4):  # the four 128-bit registers LLVM splits a 512-bit vector into
                lanes = list(range(4 * q, 4 * q + 4))
                acc_q, a_q, b_q = (_shuffle(builder, v, v, lanes) for v in args)
                a_q, b_q = builder.bitcast(a_q, _LL_V16B), builder.bitcast(b_q, _LL_V16B)
                quarters.append(builder.call(fn, [acc_q, a_q, b_q]))
            halves = [_shuffle(builder, quarters[i], quarters[i + 1], list(range(8))) for i in (0, 2)]
            return _shuffle(builder, halves[0], halves[1], list(range(16)))
        return _I32X16(acc, a, b), codegen


@intrinsic
def _vhigh_nibbles(typingctx, a):  # noqa: ANN001, ANN202
    """Each byte of a shifted right by 4 bits: its high nibble (one ushr v.16b; x86 has no byte shift)."""
    if a == _I32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            b = builder.bitcast(args[0], _LL_V64B)
            return builder.bitcast(builder.lshr(b, llvm_ir.Constant(_LL_V64B, [4] * 64)), _LL_VI)
        return _I32X16(a), codegen


@intrinsic
def _vsplat_word(typingctx, arr, i, k):  # noqa: ANN001, ANN202
    """Word k (0..3) of the 4 int32 at element i of arr, in all 16 lanes: with i the same for k = 0..3,
    LLVM loads the 16 bytes once and multiplies by a lane of that register (sdot v.4s, v.16b, v.4b[k])."""
    if _is_c_array(arr) and isinstance(i, types.Integer) and isinstance(k, types.Integer):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _LL_V4I)
            word = builder.extract_element(builder.load(p, align=1), context.cast(builder, args[2], sig.args[2],
                                                                                   types.int32))
            return _splat(builder, word, _LL_VI)
        return _I32X16(arr, i, k), codegen


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _dot_byte_group(s, w, o, xq, x, k, low):
    # s + the dot products of byte group k of a block's 16 rows (w at o, (4, 16, 4) bytes): its
    # low nibbles with activation word k of xq at x (8 words), its high nibbles with word 4+k
    v = _vload_i32(w, o + 64 * k)
    s = _sdot(s, _vand(v, low), _vsplat_word(xq, x, k))
    return _sdot(s, _vhigh_nibbles(v), _vsplat_word(xq, x + 4, k))


# The loops over a block's byte groups (k) are unrolled by hand on purpose: LLVM leaves them as
# loops (an add, a compare and a branch per 8 sdot) and, unrolled, the four lane-indexed sdot of
# one activation register need it loaded once.


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40s_one(out, w, xq, xd, corr, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) of (n_groups, nb, 288) q40 @ x (1, cols) q80 -> out (1, rows) f32
    # Per block and 16 rows: 8 x 4 sdot (the low nibbles of byte group k with activation word k,
    # the high nibbles with word 4+k, xq (T, nb, 8) uint32) summed onto minus the -8 offset's
    # correction, times row scale x activation scale, added to 16 float32 accumulators (4 registers).
    # The integer sums are exact: the same as x86.py's, and so is the float arithmetic after them.
    nb = w.shape[1]
    low = _vsplat_i32(0x0F0F0F0F)
    for g in range(g_lo, g_hi):
        acc = _vsplat_f32(0.0)
        for b in range(nb):
            o = (g * nb + b) * VNNI_BLOCK_BYTES
            s = _vsplat_i32(-corr[0, b])
            s = _dot_byte_group(s, w, o, xq, b * 8, 0, low)
            s = _dot_byte_group(s, w, o, xq, b * 8, 1, low)
            s = _dot_byte_group(s, w, o, xq, b * 8, 2, low)
            s = _dot_byte_group(s, w, o, xq, b * 8, 3, low)
            acc = _vfma(_vtofloat(s), _vmul(_vload_f16(w, o + 256), _vsplat_f32(xd[0, b])), acc)
        _store_rows(out, g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _dot_split(s0, s1, unp, i, xq, x0, x1, k):
    # s0, s1 + split nibble vector i of unp times activation word k (0..3) of xq at x0 and at x1
    u = _vload_i32(unp, i)
    return _sdot(s0, u, _vsplat_word(xq, x0, k)), _sdot(s1, u, _vsplat_word(xq, x1, k))


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40s_pair(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x rows t, t+1 q80 -> out rows t, t+1, lanes of group g
    # Two tokens per pass: each split nibble vector loaded once feeds both (8 int32 sums, 8 float32
    # accumulators, 4 activation registers and the nibbles in about 24 registers).
    nb = xd.shape[1]
    a0 = _vsplat_f32(0.0)
    a1 = a0
    for b in range(nb):
        s0 = _vsplat_i32(-corr[t, b])
        s1 = _vsplat_i32(-corr[t + 1, b])
        x0 = (t * nb + b) * 8  # xq (T, nb, 8) uint32, flat
        x1 = x0 + nb * 8
        u = b * 8 * 16  # unp (nb*8*16,): 8 vectors of 16 lanes per block
        s0, s1 = _dot_split(s0, s1, unp, u, xq, x0, x1, 0)
        s0, s1 = _dot_split(s0, s1, unp, u + 16, xq, x0, x1, 1)
        s0, s1 = _dot_split(s0, s1, unp, u + 32, xq, x0, x1, 2)
        s0, s1 = _dot_split(s0, s1, unp, u + 48, xq, x0, x1, 3)
        s0, s1 = _dot_split(s0, s1, unp, u + 64, xq, x0 + 4, x1 + 4, 0)
        s0, s1 = _dot_split(s0, s1, unp, u + 80, xq, x0 + 4, x1 + 4, 1)
        s0, s1 = _dot_split(s0, s1, unp, u + 96, xq, x0 + 4, x1 + 4, 2)
        s0, s1 = _dot_split(s0, s1, unp, u + 112, xq, x0 + 4, x1 + 4, 3)
        sc = _vload_f32(ws, b * 16)
        a0 = _vfma(_vtofloat(s0), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(s1), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40s_single(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x row t q80 -> out row t, lanes of group g (an odd T's last token)
    nb = xd.shape[1]
    acc = _vsplat_f32(0.0)
    for b in range(nb):
        s = _vsplat_i32(-corr[t, b])
        x = (t * nb + b) * 8
        for k in range(8):
            s = _sdot(s, _vload_i32(unp, (b * 8 + k) * 16), _vbroadcast32(xq, x + k))
        acc = _vfma(_vtofloat(s), _vmul(_vload_f32(ws, b * 16), _vsplat_f32(xd[t, b])), acc)
    _store_rows(out, t * rows + g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40s_many(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws):
    # w row groups [g_lo, g_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32, T > 1 (prefill)
    # Each row group's nibbles are split once (into unp, ws: nb*576 bytes, in L1 or L2) and reused by
    # all T tokens, two at a time.
    for g in range(g_lo, g_hi):
        _q40v_split(unp, ws, w, g)
        t = 0
        while t + 2 <= T:
            _q40s_pair(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 2
        if t < T:
            _q40s_single(out, xq, xd, corr, t, rows, g, unp, ws)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40s_run(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws):
    # w row groups [g_lo, g_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32
    if T == 1:
        _q40s_one(out, w, xq, xd, corr, rows, g_lo, g_hi)
    else:
        _q40s_many(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws)


@njit(cache=True, parallel=True)
def _q40s_parallel(out, w, xq, xd, corr, T, rows, n_threads, unp, ws, next_chunk):
    # w (n_groups, nb, 288) q40 @ x (T, cols) q80 -> out (T, rows) f32, VNNI_CHUNK row groups at a
    # time to whichever of n_threads is free
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // VNNI_CHUNK)
    next_chunk[0] = 0
    for k in prange(min(n_threads, n_chunks, unp.shape[0])):
        c = _claim(next_chunk)
        while c < n_chunks:
            _q40s_run(out, w, xq, xd, corr, T, rows, c * VNNI_CHUNK, min(n_groups, (c + 1) * VNNI_CHUNK), unp[k], ws[k])
            c = _claim(next_chunk)

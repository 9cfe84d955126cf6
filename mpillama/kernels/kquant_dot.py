"""The K-quant x Q80 matmuls over kquant.py's row-group layout with a dot-product instruction:
x86's AVX-512 VNNI vpdpbusd, or ARM's sdot (Armv8.2 dotprod).

One 64-byte load of a packed field holds 4 bytes of each of 16 rows (an int32 lane per row): the
quantized values come out of it with a few masks and shifts (4 values a lane, one byte each,
0..63), and _vdot multiplies them by 4 broadcast activation bytes and sums per row: vpdpbusd
(unsigned x signed bytes) on x86, four sdot (signed x signed) on aarch64; the values are below
128, so both give the same exact sums, and the float arithmetic after them is the same.
Per 32-value Q80 block the integer sums are scaled by the sub-block scales in integers and by the
activation scale in float32; the float16 super-block scales are applied once per super-block.
- Q4_K / Q5_K: value q (unsigned) with scale sc and min m: sum(d*sc*q*a) - dmin*m*sum(a), and
  sum(a) = corr/8 from the activations; the mins go through a float accumulator of their own.
- Q6_K: q6 = q + 32 is stored unsigned; per 16-value half, sc*(sum(q6*a) - 32*sum(a)), with the
  halves' activation sums from kquant.py's _half_sums (computed once per matmul call).
Decode (T = 1) keeps one row group's sums in registers over all super-blocks; prefill (T > 1)
walks the super-blocks of a row group once and adds each one's contribution for every token
into a per-thread (T, 16) float32 scratch (Q80Activations.tile_sums), so a block's bytes are
read from memory once for all tokens and from L1 after the first.

The kernels compile on first call, which happens only where target.kernel_path() is x86-vnni or
arm-sdot (kquant.py dispatches on it); _vdot picks the instruction of the machine it compiles on.
The blocking is x86's (32 registers of 512 bits): on ARM's 32 NEON registers of 128 bits the
prefill's 4-token blocks spill; correct there (tests/aarch64), not tuned. The few generic vector
operations the Q40 kernels did not need (byte loads widened to int32 lanes, or, variable shifts,
integer multiply, float add) are made here from vector.py's _vload and _vec_binop.

Imports numba, llvmlite and the package's vector.py, x86.py, arm.py and kquant_portable.py (offsets) only.
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir as llvm_ir
from numba import njit, prange
from numba.extending import intrinsic

from mpillama.kernels import arm, x86
from mpillama.kernels.groups import _store_rows
from mpillama.kernels.kquant_portable import (
    KQ_CHUNK,
    KQ_ROWS,
    Q4K_D,
    Q4K_DMIN,
    Q4K_M,
    Q4K_QS,
    Q4K_SC,
    Q5K_D,
    Q5K_DMIN,
    Q5K_M,
    Q5K_QH,
    Q5K_QS,
    Q5K_SC,
    Q6K_D,
    Q6K_QH,
    Q6K_QL,
    Q6K_SC,
)
from mpillama.kernels.vector import (
    _F32X16,
    _I32X16,
    _LL_VI,
    _claim,
    _vand,
    _vbroadcast32,
    _vec_binop,
    _vfma,
    _vload,
    _vload_f16,
    _vload_f32,
    _vload_i32,
    _vmul,
    _vsplat_f32,
    _vsplat_i32,
    _vstore,
    _vsub,
    _vtofloat,
)

_AARCH64 = platform.machine().lower() in ("aarch64", "arm64")


@intrinsic
def _vdot(typingctx, acc, u, s):  # noqa: ANN001, ANN202
    """acc + (per int32 lane) the sum of 4 byte products of u (bytes 0..127) and s (signed): x86's
    vpdpbusd, or on aarch64 arm.py's four sdot (the same sums for such u)."""
    return (arm._sdot if _AARCH64 else x86._vdpbusd)._defn(typingctx, acc, u, s)


_LL_V8 = llvm_ir.VectorType(llvm_ir.IntType(8), 16)
_vload_u8 = _vload(_LL_V8, _I32X16, "16 uint8 at element idx of arr, zero-extended to 16 int32 lanes.",
                   lambda builder, v: builder.zext(v, _LL_VI))
_vload_i8 = _vload(_LL_V8, _I32X16, "16 int8 at element idx of arr, sign-extended to 16 int32 lanes.",
                   lambda builder, v: builder.sext(v, _LL_VI))


_vor = _vec_binop("or_", _I32X16)
_vmuli = _vec_binop("mul", _I32X16)
_vaddi = _vec_binop("add", _I32X16)
_vshrv = _vec_binop("lshr", _I32X16)  # by a splat of the shift count
_vshlv = _vec_binop("shl", _I32X16)
_vaddf = _vec_binop("fadd", _F32X16)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q45k_block(w, o, xq, xd, corr, t, nb, s, five):
    # one super-block s at byte o of w (flat) q4_k/q5_k for 16 rows @ token t q80 -> 16 f32 lanes
    # (its contribution to each row's output, float16 super-block scales applied)
    low = _vsplat_i32(0x0F0F0F0F)
    ones = _vsplat_i32(0x01010101)
    o_sc, o_m, o_d, o_dmin = (Q5K_SC, Q5K_M, Q5K_D, Q5K_DMIN) if five else (Q4K_SC, Q4K_M, Q4K_D, Q4K_DMIN)
    o_qs = Q5K_QS if five else Q4K_QS
    zf = _vsplat_f32(0.0)
    acc_s, acc_m = zf, zf
    for c in range(4):  # sub-blocks 2c (low nibbles) and 2c+1 (high), Q80 blocks b, b+1
        b = s * 8 + 2 * c
        x0, x1 = (t * nb + b) * 8, (t * nb + b + 1) * 8  # xq (T, nb, 8) uint32, flat
        zi = _vsplat_i32(0)
        s0, s1 = zi, zi
        for k in range(8):
            v = _vload_i32(w, o + o_qs + (8 * c + k) * 64)
            q0, q1 = _vand(v, low), _vand(_vshrv(v, _vsplat_i32(4)), low)
            if five:
                h = _vload_i32(w, o + Q5K_QH + k * 64)
                q0 = _vor(q0, _vshlv(_vand(_vshrv(h, _vsplat_i32(2 * c)), ones), _vsplat_i32(4)))
                q1 = _vor(q1, _vshlv(_vand(_vshrv(h, _vsplat_i32(2 * c + 1)), ones), _vsplat_i32(4)))
            s0 = _vdot(s0, q0, _vbroadcast32(xq, x0 + k))
            s1 = _vdot(s1, q1, _vbroadcast32(xq, x1 + k))
        j = 2 * c
        acc_s = _vfma(_vtofloat(_vmuli(s0, _vload_u8(w, o + o_sc + 16 * j))), _vsplat_f32(xd[t, b]), acc_s)
        acc_s = _vfma(_vtofloat(_vmuli(s1, _vload_u8(w, o + o_sc + 16 * j + 16))), _vsplat_f32(xd[t, b + 1]), acc_s)
        # -dmin*m*sum(a)*d_act, sum(a) = corr/8
        acc_m = _vfma(_vtofloat(_vload_u8(w, o + o_m + 16 * j)), _vsplat_f32(xd[t, b] * np.float32(corr[t, b]) * np.float32(-0.125)), acc_m)
        acc_m = _vfma(_vtofloat(_vload_u8(w, o + o_m + 16 * j + 16)),
                      _vsplat_f32(xd[t, b + 1] * np.float32(corr[t, b + 1]) * np.float32(-0.125)), acc_m)
    return _vfma(_vload_f16(w, o + o_dmin), acc_m, _vmul(_vload_f16(w, o + o_d), acc_s))


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q6k_block(w, o, xq, xd, hs, t, nb, s):
    # one super-block s at byte o of w (flat) q6_k for 16 rows @ token t q80 -> 16 f32 lanes;
    # hs (T, nb, 2) int32: the activations' sums over each 16-value half of a Q80 block
    acc = _vsplat_f32(0.0)
    for h in range(2):  # values 128h .. 128h+127: Q80 blocks s*8 + 4h + k, k < 4
        zi = _vsplat_i32(0)
        a0, a1, a2, a3, b0, b1, b2, b3 = zi, zi, zi, zi, zi, zi, zi, zi  # per k: first half (a), second (b)
        x = (t * nb + s * 8 + 4 * h) * 8  # xq (T, nb, 8) uint32, flat: block s*8+4h, word 0
        for u in range(8):  # word u of each 32-value block: values 4u..4u+3
            l0 = _vload_i32(w, o + Q6K_QL + (16 * h + u) * 64)  # ql bytes 64h + 4u..: k = 0 (low nibble), 2 (high)
            l1 = _vload_i32(w, o + Q6K_QL + (16 * h + 8 + u) * 64)  # ql bytes 64h + 32 + 4u..: k = 1, 3
            hb = _vload_i32(w, o + Q6K_QH + (8 * h + u) * 64)  # qh bytes 32h + 4u..: bits 2k, 2k+1
            q0, q1, q2, q3 = _q6k_values(l0, l1, hb)
            if u < 4:
                a0 = _vdot(a0, q0, _vbroadcast32(xq, x + u))
                a1 = _vdot(a1, q1, _vbroadcast32(xq, x + 8 + u))
                a2 = _vdot(a2, q2, _vbroadcast32(xq, x + 16 + u))
                a3 = _vdot(a3, q3, _vbroadcast32(xq, x + 24 + u))
            else:
                b0 = _vdot(b0, q0, _vbroadcast32(xq, x + u))
                b1 = _vdot(b1, q1, _vbroadcast32(xq, x + 8 + u))
                b2 = _vdot(b2, q2, _vbroadcast32(xq, x + 16 + u))
                b3 = _vdot(b3, q3, _vbroadcast32(xq, x + 24 + u))
        acc = _q6k_pair(acc, a0, b0, w, o, xd, hs, t, s * 8 + 4 * h, 8 * h)
        acc = _q6k_pair(acc, a1, b1, w, o, xd, hs, t, s * 8 + 4 * h + 1, 8 * h + 2)
        acc = _q6k_pair(acc, a2, b2, w, o, xd, hs, t, s * 8 + 4 * h + 2, 8 * h + 4)
        acc = _q6k_pair(acc, a3, b3, w, o, xd, hs, t, s * 8 + 4 * h + 3, 8 * h + 6)
    return _vmul(_vload_f16(w, o + Q6K_D), acc)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q6k_values(l0, l1, hb):
    # ql words l0 (values k=0 low nibbles, k=2 high), l1 (k=1, k=3) and the qh word hb (bits 2k, 2k+1)
    # -> the 6-bit values (bytes 0..63) of k = 0..3: each the nibble | the two bits moved to bits 4-5
    # (shift, mask 0x30, then one and-or: vpternlogd on x86)
    low, m30 = _vsplat_i32(0x0F0F0F0F), _vsplat_i32(0x30303030)
    two, four = _vsplat_i32(2), _vsplat_i32(4)
    q0 = _vor(_vand(l0, low), _vand(_vshlv(hb, four), m30))
    q1 = _vor(_vand(l1, low), _vand(_vshlv(hb, two), m30))
    q2 = _vor(_vand(_vshrv(l0, four), low), _vand(hb, m30))
    q3 = _vor(_vand(_vshrv(l1, four), low), _vand(_vshrv(hb, two), m30))
    return q0, q1, q2, q3


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q6k_pair(acc, sa, sb, w, o, xd, hs, t, b, j):
    # acc + d_act(b) * (sc_j*(sa - 32*S_lo) + sc_j+1*(sb - 32*S_hi)) for the two halves of Q80 block b
    ta = _vmuli(_vsub(sa, _vsplat_i32(32 * hs[t, b, 0])), _vload_i8(w, o + Q6K_SC + 16 * j))
    tb = _vmuli(_vsub(sb, _vsplat_i32(32 * hs[t, b, 1])), _vload_i8(w, o + Q6K_SC + 16 * j + 16))
    return _vfma(_vtofloat(_vaddi(ta, tb)), _vsplat_f32(xd[t, b]), acc)


# _q45k_block4, _q6k_block4 and _q6k_block2 are _q45k_block and _q6k_block unrolled by hand for 4, 4 and 2 tokens
# on purpose (register blocking: each value vector decoded once feeds the dot products of all of them).


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q45k_block4(w, o, xq, xd, corr, t, nb, s, five):
    # one super-block s at byte o of w (flat) q4_k/q5_k for 16 rows @ tokens t..t+3 q80 -> 4 x 16 f32 lanes
    low = _vsplat_i32(0x0F0F0F0F)
    ones = _vsplat_i32(0x01010101)
    o_sc, o_m, o_d, o_dmin = (Q5K_SC, Q5K_M, Q5K_D, Q5K_DMIN) if five else (Q4K_SC, Q4K_M, Q4K_D, Q4K_DMIN)
    o_qs = Q5K_QS if five else Q4K_QS
    st = nb * 8  # one token's row in xq (T, nb, 8) uint32, flat
    zf = _vsplat_f32(0.0)
    f0, f1, f2, f3 = zf, zf, zf, zf  # d*sc part, per token
    n0, n1, n2, n3 = zf, zf, zf, zf  # dmin*m part, per token
    for c in range(4):
        b = s * 8 + 2 * c
        x = (t * nb + b) * 8
        zi = _vsplat_i32(0)
        p0, p1, p2, p3, r0, r1, r2, r3 = zi, zi, zi, zi, zi, zi, zi, zi  # sub-block 2c (p), 2c+1 (r), per token
        for k in range(8):
            v = _vload_i32(w, o + o_qs + (8 * c + k) * 64)
            q0, q1 = _vand(v, low), _vand(_vshrv(v, _vsplat_i32(4)), low)
            if five:
                h = _vload_i32(w, o + Q5K_QH + k * 64)
                q0 = _vor(q0, _vshlv(_vand(_vshrv(h, _vsplat_i32(2 * c)), ones), _vsplat_i32(4)))
                q1 = _vor(q1, _vshlv(_vand(_vshrv(h, _vsplat_i32(2 * c + 1)), ones), _vsplat_i32(4)))
            p0 = _vdot(p0, q0, _vbroadcast32(xq, x + k))
            r0 = _vdot(r0, q1, _vbroadcast32(xq, x + 8 + k))
            p1 = _vdot(p1, q0, _vbroadcast32(xq, x + st + k))
            r1 = _vdot(r1, q1, _vbroadcast32(xq, x + st + 8 + k))
            p2 = _vdot(p2, q0, _vbroadcast32(xq, x + 2 * st + k))
            r2 = _vdot(r2, q1, _vbroadcast32(xq, x + 2 * st + 8 + k))
            p3 = _vdot(p3, q0, _vbroadcast32(xq, x + 3 * st + k))
            r3 = _vdot(r3, q1, _vbroadcast32(xq, x + 3 * st + 8 + k))
        j = 2 * c
        sc0, sc1 = _vload_u8(w, o + o_sc + 16 * j), _vload_u8(w, o + o_sc + 16 * j + 16)
        m0, m1 = _vtofloat(_vload_u8(w, o + o_m + 16 * j)), _vtofloat(_vload_u8(w, o + o_m + 16 * j + 16))
        f0, n0 = _q45k_scale(f0, n0, p0, r0, sc0, sc1, m0, m1, xd, corr, t, b)
        f1, n1 = _q45k_scale(f1, n1, p1, r1, sc0, sc1, m0, m1, xd, corr, t + 1, b)
        f2, n2 = _q45k_scale(f2, n2, p2, r2, sc0, sc1, m0, m1, xd, corr, t + 2, b)
        f3, n3 = _q45k_scale(f3, n3, p3, r3, sc0, sc1, m0, m1, xd, corr, t + 3, b)
    d, dmin = _vload_f16(w, o + o_d), _vload_f16(w, o + o_dmin)
    return (_vfma(dmin, n0, _vmul(d, f0)), _vfma(dmin, n1, _vmul(d, f1)), _vfma(dmin, n2, _vmul(d, f2)),
            _vfma(dmin, n3, _vmul(d, f3)))


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q45k_scale(f, n, p, r, sc0, sc1, m0, m1, xd, corr, t, b):
    # token t's sums p, r of Q80 blocks b, b+1 -> (f + their scaled sums, n + their mins' terms)
    f = _vfma(_vtofloat(_vmuli(p, sc0)), _vsplat_f32(xd[t, b]), f)
    f = _vfma(_vtofloat(_vmuli(r, sc1)), _vsplat_f32(xd[t, b + 1]), f)
    n = _vfma(m0, _vsplat_f32(xd[t, b] * np.float32(corr[t, b]) * np.float32(-0.125)), n)
    n = _vfma(m1, _vsplat_f32(xd[t, b + 1] * np.float32(corr[t, b + 1]) * np.float32(-0.125)), n)
    return f, n


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q6k_block2(w, o, xq, xd, hs, t, nb, s):
    # one super-block s at byte o of w (flat) q6_k for 16 rows @ tokens t, t+1 q80 -> 2 x 16 f32 lanes
    # One 16-value half of the four Q80 blocks at a time (8 integer sums live, not 16).
    st = nb * 8
    acc0, acc1 = _vsplat_f32(0.0), _vsplat_f32(0.0)
    for h in range(2):
        x = (t * nb + s * 8 + 4 * h) * 8
        for half in range(2):
            zi = _vsplat_i32(0)
            a0, a1, a2, a3, c0, c1, c2, c3 = zi, zi, zi, zi, zi, zi, zi, zi
            for u in range(4 * half, 4 * half + 4):
                l0 = _vload_i32(w, o + Q6K_QL + (16 * h + u) * 64)
                l1 = _vload_i32(w, o + Q6K_QL + (16 * h + 8 + u) * 64)
                hb = _vload_i32(w, o + Q6K_QH + (8 * h + u) * 64)
                q0, q1, q2, q3 = _q6k_values(l0, l1, hb)
                a0 = _vdot(a0, q0, _vbroadcast32(xq, x + u))
                a1 = _vdot(a1, q1, _vbroadcast32(xq, x + 8 + u))
                a2 = _vdot(a2, q2, _vbroadcast32(xq, x + 16 + u))
                a3 = _vdot(a3, q3, _vbroadcast32(xq, x + 24 + u))
                c0 = _vdot(c0, q0, _vbroadcast32(xq, x + st + u))
                c1 = _vdot(c1, q1, _vbroadcast32(xq, x + st + 8 + u))
                c2 = _vdot(c2, q2, _vbroadcast32(xq, x + st + 16 + u))
                c3 = _vdot(c3, q3, _vbroadcast32(xq, x + st + 24 + u))
            b = s * 8 + 4 * h
            j = 8 * h + half
            acc0 = _q6k_half(acc0, a0, w, o, xd, hs, t, b, j, half)
            acc0 = _q6k_half(acc0, a1, w, o, xd, hs, t, b + 1, j + 2, half)
            acc0 = _q6k_half(acc0, a2, w, o, xd, hs, t, b + 2, j + 4, half)
            acc0 = _q6k_half(acc0, a3, w, o, xd, hs, t, b + 3, j + 6, half)
            acc1 = _q6k_half(acc1, c0, w, o, xd, hs, t + 1, b, j, half)
            acc1 = _q6k_half(acc1, c1, w, o, xd, hs, t + 1, b + 1, j + 2, half)
            acc1 = _q6k_half(acc1, c2, w, o, xd, hs, t + 1, b + 2, j + 4, half)
            acc1 = _q6k_half(acc1, c3, w, o, xd, hs, t + 1, b + 3, j + 6, half)
    d = _vload_f16(w, o + Q6K_D)
    return _vmul(d, acc0), _vmul(d, acc1)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q6k_block4(w, o, xq, xd, hs, t, nb, s):
    # one super-block s at byte o of w (flat) q6_k for 16 rows @ tokens t..t+3 q80 -> 4 x 16 f32 lanes
    # One 16-value half of the four Q80 blocks at a time (16 integer sums live).
    st = nb * 8
    z = _vsplat_f32(0.0)
    acc0, acc1, acc2, acc3 = z, z, z, z
    for h in range(2):
        x = (t * nb + s * 8 + 4 * h) * 8
        for half in range(2):
            zi = _vsplat_i32(0)
            a0, a1, a2, a3, c0, c1, c2, c3, e0, e1, e2, e3, f0, f1, f2, f3 = zi, zi, zi, zi, zi, zi, zi, zi, zi, zi, zi, zi, zi, zi, zi, zi
            for u in range(4 * half, 4 * half + 4):
                l0 = _vload_i32(w, o + Q6K_QL + (16 * h + u) * 64)
                l1 = _vload_i32(w, o + Q6K_QL + (16 * h + 8 + u) * 64)
                hb = _vload_i32(w, o + Q6K_QH + (8 * h + u) * 64)
                q0, q1, q2, q3 = _q6k_values(l0, l1, hb)
                a0 = _vdot(a0, q0, _vbroadcast32(xq, x + u))
                a1 = _vdot(a1, q1, _vbroadcast32(xq, x + 8 + u))
                a2 = _vdot(a2, q2, _vbroadcast32(xq, x + 16 + u))
                a3 = _vdot(a3, q3, _vbroadcast32(xq, x + 24 + u))
                c0 = _vdot(c0, q0, _vbroadcast32(xq, x + st + u))
                c1 = _vdot(c1, q1, _vbroadcast32(xq, x + st + 8 + u))
                c2 = _vdot(c2, q2, _vbroadcast32(xq, x + st + 16 + u))
                c3 = _vdot(c3, q3, _vbroadcast32(xq, x + st + 24 + u))
                e0 = _vdot(e0, q0, _vbroadcast32(xq, x + 2 * st + u))
                e1 = _vdot(e1, q1, _vbroadcast32(xq, x + 2 * st + 8 + u))
                e2 = _vdot(e2, q2, _vbroadcast32(xq, x + 2 * st + 16 + u))
                e3 = _vdot(e3, q3, _vbroadcast32(xq, x + 2 * st + 24 + u))
                f0 = _vdot(f0, q0, _vbroadcast32(xq, x + 3 * st + u))
                f1 = _vdot(f1, q1, _vbroadcast32(xq, x + 3 * st + 8 + u))
                f2 = _vdot(f2, q2, _vbroadcast32(xq, x + 3 * st + 16 + u))
                f3 = _vdot(f3, q3, _vbroadcast32(xq, x + 3 * st + 24 + u))
            b = s * 8 + 4 * h
            j = 8 * h + half
            acc0 = _q6k_half(acc0, a0, w, o, xd, hs, t, b, j, half)
            acc0 = _q6k_half(acc0, a1, w, o, xd, hs, t, b + 1, j + 2, half)
            acc0 = _q6k_half(acc0, a2, w, o, xd, hs, t, b + 2, j + 4, half)
            acc0 = _q6k_half(acc0, a3, w, o, xd, hs, t, b + 3, j + 6, half)
            acc1 = _q6k_half(acc1, c0, w, o, xd, hs, t + 1, b, j, half)
            acc1 = _q6k_half(acc1, c1, w, o, xd, hs, t + 1, b + 1, j + 2, half)
            acc1 = _q6k_half(acc1, c2, w, o, xd, hs, t + 1, b + 2, j + 4, half)
            acc1 = _q6k_half(acc1, c3, w, o, xd, hs, t + 1, b + 3, j + 6, half)
            acc2 = _q6k_half(acc2, e0, w, o, xd, hs, t + 2, b, j, half)
            acc2 = _q6k_half(acc2, e1, w, o, xd, hs, t + 2, b + 1, j + 2, half)
            acc2 = _q6k_half(acc2, e2, w, o, xd, hs, t + 2, b + 2, j + 4, half)
            acc2 = _q6k_half(acc2, e3, w, o, xd, hs, t + 2, b + 3, j + 6, half)
            acc3 = _q6k_half(acc3, f0, w, o, xd, hs, t + 3, b, j, half)
            acc3 = _q6k_half(acc3, f1, w, o, xd, hs, t + 3, b + 1, j + 2, half)
            acc3 = _q6k_half(acc3, f2, w, o, xd, hs, t + 3, b + 2, j + 4, half)
            acc3 = _q6k_half(acc3, f3, w, o, xd, hs, t + 3, b + 3, j + 6, half)
    d = _vload_f16(w, o + Q6K_D)
    return _vmul(d, acc0), _vmul(d, acc1), _vmul(d, acc2), _vmul(d, acc3)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _q6k_half(acc, sm, w, o, xd, hs, t, b, j, half):
    # acc + d_act(b) * sc_j * (sm - 32*S): half `half` of Q80 block b, sub-block j, token t
    v = _vmuli(_vsub(sm, _vsplat_i32(32 * hs[t, b, half])), _vload_i8(w, o + Q6K_SC + 16 * j))
    return _vfma(_vtofloat(v), _vsplat_f32(xd[t, b]), acc)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _kq_add(acc, t, v):
    # acc row t (the first 16 floats) += v
    i = t * acc.shape[1]
    _vstore(acc, i, _vaddf(_vload_f32(acc, i), v))


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _kq_block(w, o, xq, xd, corr, hs, t, nb, s, kind):
    if kind == 6:
        return _q6k_block(w, o, xq, xd, hs, t, nb, s)
    return _q45k_block(w, o, xq, xd, corr, t, nb, s, kind == 5)


@njit(cache=True, fastmath=True, error_model="numpy")
def _kqv_run(out, w, xq, xd, corr, hs, T, rows, g_lo, g_hi, acc, kind):
    # w row groups [g_lo, g_hi) of (n_groups, nsb, block) K-quant @ x (T, cols) q80 -> out (T, rows) f32
    # acc (>= T, >= 16) f32: prefill's per-token sums of one row group
    nsb, bb = w.shape[1], w.shape[2]
    nb = nsb * 8
    for g in range(g_lo, g_hi):
        n = rows - g * KQ_ROWS
        if T == 1:
            a = _vsplat_f32(0.0)
            for s in range(nsb):
                a = _vaddf(a, _kq_block(w, (g * nsb + s) * bb, xq, xd, corr, hs, 0, nb, s, kind))
            _store_rows(out, g * KQ_ROWS, a, n)
            continue
        for t in range(T):
            _vstore(acc, t * acc.shape[1], _vsplat_f32(0.0))
        for s in range(nsb):
            o = (g * nsb + s) * bb
            t = 0  # the block's bytes come from L1 for all tokens after the first
            if kind == 6:
                while t + 4 <= T:
                    v0, v1, v2, v3 = _q6k_block4(w, o, xq, xd, hs, t, nb, s)
                    _kq_add(acc, t, v0)
                    _kq_add(acc, t + 1, v1)
                    _kq_add(acc, t + 2, v2)
                    _kq_add(acc, t + 3, v3)
                    t += 4
                while t + 2 <= T:
                    v0, v1 = _q6k_block2(w, o, xq, xd, hs, t, nb, s)
                    _kq_add(acc, t, v0)
                    _kq_add(acc, t + 1, v1)
                    t += 2
            else:
                while t + 4 <= T:
                    v0, v1, v2, v3 = _q45k_block4(w, o, xq, xd, corr, t, nb, s, kind == 5)
                    _kq_add(acc, t, v0)
                    _kq_add(acc, t + 1, v1)
                    _kq_add(acc, t + 2, v2)
                    _kq_add(acc, t + 3, v3)
                    t += 4
            while t < T:
                _kq_add(acc, t, _kq_block(w, o, xq, xd, corr, hs, t, nb, s, kind))
                t += 1
        for t in range(T):
            _store_rows(out, t * rows + g * KQ_ROWS, _vload_f32(acc, t * acc.shape[1]), n)


@njit(cache=True)
def _half_sums(hs, qs, T):
    # qs (T, nb, 32) int8 -> hs (T, nb, 2) int32: the sums of each block's two 16-value halves (Q6_K's offset)
    for t in range(T):
        for b in range(qs.shape[1]):
            lo, hi = 0, 0
            for i in range(16):
                lo += qs[t, b, i]
                hi += qs[t, b, 16 + i]
            hs[t, b, 0], hs[t, b, 1] = lo, hi


@njit(cache=True)
def _kqv_serial(out, w, xq, xd, corr, qs, hs, T, rows, acc, kind):
    # w (n_groups, nsb, block) K-quant @ x (T, cols) q80 -> out (T, rows) f32 on this thread
    if kind == 6:
        _half_sums(hs, qs, T)
    _kqv_run(out, w, xq, xd, corr, hs, T, rows, 0, w.shape[0], acc, kind)


@njit(cache=True, parallel=True)
def _kqv_parallel(out, w, xq, xd, corr, qs, hs, T, rows, kind, n_threads, acc, next_chunk):
    # w (n_groups, nsb, block) K-quant @ x (T, cols) q80 -> out (T, rows) f32, KQ_CHUNK row groups
    # at a time to whichever of n_threads is free; acc (slots, >= T, >= 16) f32 per-thread scratch
    if kind == 6:
        _half_sums(hs, qs, T)
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // KQ_CHUNK)
    next_chunk[0] = 0
    for k in prange(min(n_threads, n_chunks, acc.shape[0])):
        c = _claim(next_chunk)
        while c < n_chunks:
            _kqv_run(out, w, xq, xd, corr, hs, T, rows, c * KQ_CHUNK, min(n_groups, (c + 1) * KQ_CHUNK), acc[k], kind)
            c = _claim(next_chunk)

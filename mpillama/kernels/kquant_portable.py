"""The K-quant x Q80 matmuls over the row-group layout in plain numba loops: any CPU.

The layout is kquant.py's (rows in groups of 16; per group and super-block the weights' bytes
interleaved 4 at a time across the 16 rows, then the unpacked sub-block scales and the float16
super-block scales). These loops read it one row at a time: they are the reference-shaped
fallback and the path where no dot-product instruction exists, not tuned for speed.
The offsets of each field inside a block (the O_* constants) are defined here and used by
kquant.py (packing) and kquant_dot.py (the dot-product kernels).

Imports numpy, numba and the package's bits.py and vector.py (the work counter) only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mpillama.kernels.bits import _f16_value
from mpillama.kernels.vector import _claim

KQ_ROWS = 16  # rows per group (one int32 lane each in the VNNI kernels)
KQ_CHUNK = 4  # row groups a thread claims at a time in a threaded matmul (64 rows)

# Per (row group, super-block) block: field offsets and the block's size (16 rows' bytes).
# [k][row][4] = 4-byte words interleaved by row; [j][row] = one byte per row and index; [row][2] = f16
# Scales first, then the values in the order the kernels read them: a block is read front to back.
Q4K_SC, Q4K_M, Q4K_D, Q4K_DMIN, Q4K_QS, Q4K_BYTES = 0, 128, 256, 288, 320, 2368
Q5K_SC, Q5K_M, Q5K_D, Q5K_DMIN, Q5K_QH, Q5K_QS, Q5K_BYTES = 0, 128, 256, 288, 320, 832, 2880
Q6K_SC, Q6K_D, Q6K_QL, Q6K_QH, Q6K_BYTES = 0, 256, 288, 2336, 3360


@njit(cache=True, inline="always")
def _word_byte(blk, o, r, idx):
    # byte idx of row r's field at offset o (a [k][row][4] field) of one block
    return np.int32(blk[o + (idx >> 2) * 64 + r * 4 + (idx & 3)])


@njit(cache=True, inline="always")
def _half(blk, o, r):
    # row r's float16 at offset o (a [row][2] field), as float32
    return np.float32(_f16_value(np.int64(blk[o + 2 * r]) | (np.int64(blk[o + 2 * r + 1]) << 8)))


@njit(cache=True, fastmath=True, error_model="numpy")
def _q45k_rows(out, w, xq, xd, corr, T, rows, g_lo, g_hi, five):
    # w row groups [g_lo, g_hi) of (n_groups, nsb, block) q4_k (five: q5_k) @ x (T, nb*32) q80 -> out (T, rows) f32
    # Sub-block j of a super-block is Q80 block 8s+j: d*sc*sum(q*a) - dmin*m*sum(a), times the block's d;
    # sum(a) = corr/8.
    nsb = w.shape[1]
    o_sc, o_m, o_d, o_dmin = (Q5K_SC, Q5K_M, Q5K_D, Q5K_DMIN) if five else (Q4K_SC, Q4K_M, Q4K_D, Q4K_DMIN)
    o_qs = Q5K_QS if five else Q4K_QS
    for g in range(g_lo, g_hi):
        for r in range(min(KQ_ROWS, rows - g * KQ_ROWS)):
            for t in range(T):
                acc = np.float32(0.0)
                for s in range(nsb):
                    blk = w[g, s]
                    d, dmin = _half(blk, o_d, r), _half(blk, o_dmin, r)
                    for j in range(8):
                        b = s * 8 + j
                        shift = 4 * (j & 1)
                        isum = np.int32(0)
                        for i in range(32):
                            q = (_word_byte(blk, o_qs, r, 32 * (j >> 1) + i) >> shift) & 15
                            if five:
                                q |= ((_word_byte(blk, Q5K_QH, r, i) >> j) & 1) << 4
                            isum += q * np.int32(xq[t, b, i])
                        sc, m = np.int32(blk[o_sc + 16 * j + r]), np.int32(blk[o_m + 16 * j + r])
                        acc += xd[t, b] * (d * np.float32(sc * isum) - dmin * np.float32(m) * np.float32(corr[t, b]) * np.float32(0.125))
                out[t, g * KQ_ROWS + r] = acc


@njit(cache=True, fastmath=True, error_model="numpy")
def _q6k_rows(out, w, xq, xd, T, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) of (n_groups, nsb, 3360) q6_k @ x (T, nb*32) q80 -> out (T, rows) f32
    # Element e = 128h + 32k + l of a super-block: low bits in ql byte 64h + 32(k&1) + l (nibble k>>1),
    # high bits in qh byte 32h + l (bits 2k..); 16-value sub-block e//16 has its own int8 scale.
    nsb = w.shape[1]
    for g in range(g_lo, g_hi):
        for r in range(min(KQ_ROWS, rows - g * KQ_ROWS)):
            for t in range(T):
                acc = np.float32(0.0)
                for s in range(nsb):
                    blk = w[g, s]
                    for sub in range(16):
                        isum = np.int32(0)
                        for e in range(sub * 16, sub * 16 + 16):
                            h, k, l = e >> 7, (e >> 5) & 3, e & 31
                            lo = (_word_byte(blk, Q6K_QL, r, 64 * h + 32 * (k & 1) + l) >> (4 * (k >> 1))) & 15
                            hi = (_word_byte(blk, Q6K_QH, r, 32 * h + l) >> (2 * k)) & 3
                            isum += ((lo | (hi << 4)) - 32) * np.int32(xq[t, s * 8 + (e >> 5), e & 31])
                        sc = np.int32(np.int8(blk[Q6K_SC + 16 * sub + r]))
                        acc += _half(blk, Q6K_D, r) * np.float32(sc * isum) * xd[t, s * 8 + (sub >> 1)]
                out[t, g * KQ_ROWS + r] = acc


@njit(cache=True)
def _kq_portable_run(out, w, xq, xd, corr, T, rows, g_lo, g_hi, kind):
    # kind 4, 5, 6: w row groups [g_lo, g_hi) of kind q{kind}_k @ x (T, cols) q80 -> out (T, rows) f32
    if kind == 6:
        _q6k_rows(out, w, xq, xd, T, rows, g_lo, g_hi)
    else:
        _q45k_rows(out, w, xq, xd, corr, T, rows, g_lo, g_hi, kind == 5)


@njit(cache=True, parallel=True)
def _kq_portable_parallel(out, w, xq, xd, corr, T, rows, kind, n_threads, next_chunk):
    # w (n_groups, nsb, block) @ x (T, cols) q80 -> out (T, rows) f32, KQ_CHUNK row groups at a time
    # to whichever of n_threads is free
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // KQ_CHUNK)
    next_chunk[0] = 0
    for _ in prange(min(n_threads, n_chunks)):
        c = _claim(next_chunk)
        while c < n_chunks:
            _kq_portable_run(out, w, xq, xd, corr, T, rows, c * KQ_CHUNK, min(n_groups, (c + 1) * KQ_CHUNK), kind)
            c = _claim(next_chunk)

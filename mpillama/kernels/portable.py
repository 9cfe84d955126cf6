"""The Q40 x Q80 matmul over the tiles layout: plain numba loops that LLVM vectorises, any CPU.

The layout (q40.py): rows in tiles of TILE = 256; nibble bytes ordered [block][byte j][row], so
the loops run over 256 rows of contiguous bytes and LLVM vectorises them across rows (16-bit
lanes, vpmullw on x86); scales ordered [tile][block][row], turned into float32 with integer bit
operations. The per-thread scratch comes from Q80Activations (its tile_* buffers).

Imports numpy, numba and the package's bits.py and vector.py (the work counter) only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from mpillama.kernels.bits import _F16_MAGIC
from mpillama.kernels.vector import _claim


TILE = 256  # weight rows per tile of the tiles layout


# _q40_tiles is unrolled by hand on purpose (register blocking: 32 activations and their 16
# high-nibble coefficients live in registers for a whole tile block), not duplicated code.


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
def _q40_parallel(out, qs, wd, aq, ad, corr, T, rows, n_threads, isum, wsf, wsu, acc, next_chunk):
    # w (rows, cols) q40 @ x (T, cols) q80 -> out (T, rows) f32, one tile at a time to whichever
    # of n_threads is free (n_threads is passed in: numba.get_num_threads() in a kernel stops caching)
    n_tiles = qs.shape[0]
    next_chunk[0] = 0
    for k in prange(min(n_threads, n_tiles, isum.shape[0])):
        c = _claim(next_chunk)
        while c < n_tiles:
            _q40_tiles(out, qs, wd, aq, ad, corr, T, rows, c, c + 1, isum[k], wsf[k], wsu[k], acc[k])
            c = _claim(next_chunk)

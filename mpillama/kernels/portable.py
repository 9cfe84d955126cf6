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


# _q40_tiles is unrolled by hand on purpose (register blocking: 8 activations and their 8
# high-nibble coefficients live in registers for a whole tile block), not duplicated code.


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _half_dots(qb, ab, j):
    # -> (the 8 coefficients a_j.. and e_j.. of bytes j..j+7 of a block, as int32): byte j of a row
    # holds columns j (low nibble) and j+16 (high), a_j = act j, e_j = act j+16 - 16*act j
    a0, a1, a2, a3 = np.int32(ab[j]), np.int32(ab[j + 1]), np.int32(ab[j + 2]), np.int32(ab[j + 3])
    a4, a5, a6, a7 = np.int32(ab[j + 4]), np.int32(ab[j + 5]), np.int32(ab[j + 6]), np.int32(ab[j + 7])
    e0, e1 = np.int32(ab[j + 16]) - 16 * a0, np.int32(ab[j + 17]) - 16 * a1
    e2, e3 = np.int32(ab[j + 18]) - 16 * a2, np.int32(ab[j + 19]) - 16 * a3
    e4, e5 = np.int32(ab[j + 20]) - 16 * a4, np.int32(ab[j + 21]) - 16 * a5
    e6, e7 = np.int32(ab[j + 22]) - 16 * a6, np.int32(ab[j + 23]) - 16 * a7
    return a0, a1, a2, a3, a4, a5, a6, a7, e0, e1, e2, e3, e4, e5, e6, e7


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40_tiles(out, qs, wd, aq, ad, corr, T, rows, tile_lo, tile_hi, isum, wsf, wsu, acc):
    # w tiles [tile_lo, tile_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32 (rows of those tiles)
    # Per block, the integer dot of the unsigned nibbles with the int8 activations, minus the
    # correction 8*sum(acts) for the -8 offset, is the exact signed dot product and fits int16
    # (|dot| <= 32*8*127 = 32512). Everything before it may wrap: arithmetic mod 2^16 still ends
    # exact, so the int16 store lets LLVM use 16-bit lanes (vpmullw/vpaddw on x86, mla .8h on ARM).
    # The low nibble needs no mask: byte*a_j + high*(a_j+16 - 16*a_j) = low*a_j + high*a_j+16.
    # The block's 16 bytes go in two passes of 8 over the tile: 16 coefficients (and 8 rows' loads)
    # fit the registers of AVX2 and NEON (32 coefficients did not: they were spilled and reloaded
    # every iteration), for one extra int16 load and store per row.
    # The integer loops and the float loop stay separate: fused, the vectoriser picks float32's
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
                a0, a1, a2, a3, a4, a5, a6, a7, e0, e1, e2, e3, e4, e5, e6, e7 = _half_dots(qb, ab, 0)
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
                        - c
                    )
                a0, a1, a2, a3, a4, a5, a6, a7, e0, e1, e2, e3, e4, e5, e6, e7 = _half_dots(qb, ab, 8)
                for r in range(TILE):
                    isum[r] += (
                        qb[8, r] * a0 + (qb[8, r] >> 4) * e0
                        + qb[9, r] * a1 + (qb[9, r] >> 4) * e1
                        + qb[10, r] * a2 + (qb[10, r] >> 4) * e2
                        + qb[11, r] * a3 + (qb[11, r] >> 4) * e3
                        + qb[12, r] * a4 + (qb[12, r] >> 4) * e4
                        + qb[13, r] * a5 + (qb[13, r] >> 4) * e5
                        + qb[14, r] * a6 + (qb[14, r] >> 4) * e6
                        + qb[15, r] * a7 + (qb[15, r] >> 4) * e7
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

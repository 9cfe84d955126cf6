"""Q80 weights (GGML Q8_0 kept at its own precision): the two layouts, pack_q80w / unpack_q80w, matmul_q80w.

Q8_0 weights x Q80 activations: per block of 32 columns an exact integer dot product of two int8
vectors, times (weight scale x activation scale). Two layouts (Q80Matrix.layout), picked by
pack_q80w for this CPU:
- vnni (kernel path x86-vnni): rows in groups of VNNI_ROWS = 16; per group and block 544 bytes:
  the 16 rows' 32 value bytes as [byte group k (8)][row (16)][4 bytes], each stored as q + 128
  (q ^ 0x80, an unsigned byte: vpdpbusd multiplies unsigned x signed), then the 16 rows' float16
  scales. The +128 is folded out per block as 128 * sum(activations) = 16 * acts.corr (corr is
  8 * sum, kept for the Q40 offset). Kernels: q80w_x86.py.
- sdot (kernel path arm-sdot): the vnni layout with the values stored as they are (sdot multiplies
  signed x signed: no offset). Kernels: q80w_arm.py.
- rows (any CPU): rows in tiles of TILE = 256 (as the Q40
  tiles layout), values ordered [tile][block][k][row] (int8, as in the file), scales
  [tile][block][row] as float32 (widened once at load: 36 bytes a block, not 34). Kernels: plain
  numba loops here, which LLVM vectorises across the tile's rows.
Rows of the vnni layout are padded to a whole group with zero blocks (bytes 0x80, scale 0).

Imports numpy, numba, mpillama.{errors, quant} and the package's kernel modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit, prange

from mpillama.errors import MpillamaError
from mpillama.kernels.groups import VNNI_ROWS
from mpillama.kernels.portable import TILE
from mpillama.kernels.q80 import Q80Activations
from mpillama.kernels.target import ARM_SDOT, X86_VNNI, kernel_path
from mpillama.kernels.vector import _claim
from mpillama.quant import Q80_BLOCK_BYTES, QK

LAYOUT_ROWS = "rows"  # int8 values and f32 scales in tiles of 256 rows, plain numba kernels: any CPU
LAYOUT_VNNI = "vnni"  # rows in groups of 16, values + 128, AVX-512 VNNI kernels (x86-vnni only)
LAYOUT_SDOT = "sdot"  # the same groups, values as stored, ARM sdot kernels (arm-sdot only)
_GROUP_PATHS = {LAYOUT_VNNI: X86_VNNI, LAYOUT_SDOT: ARM_SDOT}  # row-group layout -> the kernel path it needs
Q80V_BLOCK_BYTES = 544  # one block of a row group: 512 value bytes, then 16 float16 scales


@dataclass
class Q80Matrix:
    """A (rows, cols) Q8_0 weight matrix laid out for the kernels (see the module docstring)."""

    rows: int
    cols: int
    layout: str  # LAYOUT_ROWS or LAYOUT_VNNI
    # rows: (n_tiles, nb, 32, TILE) int8 values; vnni: (n_groups, nb, 544) uint8 [group][block]: value
    #       byte 4k+i of row r at k*64 + r*4 + i (stored + 128), then the 16 rows' float16 scales
    qs: np.ndarray
    # rows: (n_tiles, nb, TILE) f32 scales; vnni: (n_groups, nb, 16) uint16, a view of the scales inside qs
    d: np.ndarray


def default_layout() -> str:
    """The layout pack_q80w picks here: vnni on the x86-vnni kernel path, sdot on arm-sdot, else rows."""
    return {X86_VNNI: LAYOUT_VNNI, ARM_SDOT: LAYOUT_SDOT}.get(kernel_path(), LAYOUT_ROWS)


@njit(cache=True, nogil=True)
def _pack_group_rows(buf, ggml, row0, flip):
    # ggml (n, nb*34) Q8_0 rows (maybe a strided view of the mapped file) -> rows row0.. of buf
    # (n_groups, nb, 544), the vnni (flip 0x80: values + 128) or sdot (flip 0) layout; each byte is read once
    nb = buf.shape[1]
    for i in range(ggml.shape[0]):
        g, r = divmod(row0 + i, VNNI_ROWS)
        src, dst = ggml[i], buf[g]
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            dst[b, 512 + 2 * r] = src[o]
            dst[b, 513 + 2 * r] = src[o + 1]
            for k in range(8):
                for j in range(4):
                    dst[b, k * 64 + r * 4 + j] = src[o + 2 + 4 * k + j] ^ flip


@njit(cache=True, nogil=True)
def _pad_group_rows(buf, row0, flip):
    # rows row0.. of the last group: zero-valued blocks (values 0 stored as 0 ^ flip, scale 0)
    nb = buf.shape[1]
    for row in range(row0, buf.shape[0] * VNNI_ROWS):
        g, r = divmod(row, VNNI_ROWS)
        for b in range(nb):
            buf[g, b, 512 + 2 * r] = 0
            buf[g, b, 513 + 2 * r] = 0
            for k in range(8):
                for j in range(4):
                    buf[g, b, k * 64 + r * 4 + j] = flip


def pack_q80w(ggml: np.ndarray | Sequence[np.ndarray], layout: str | None = None) -> Q80Matrix:
    """uint8 (rows, cols//32*34) GGML Q8_0 rows (or a list of such row blocks, stacked in order) -> a Q80Matrix.

    layout None = default_layout(). The row blocks may be views of the mapped file."""
    parts = [ggml] if isinstance(ggml, np.ndarray) else list(ggml)
    for part in parts:
        assert part.ndim == 2 and part.dtype == np.uint8 and part.shape[1] % Q80_BLOCK_BYTES == 0, (
            f"ggml {part.dtype} {part.shape}: expected uint8 (rows, nb*34)"
        )
        assert part.shape[1] == parts[0].shape[1], "stacked Q80 blocks must have the same columns"
    layout = default_layout() if layout is None else layout
    if layout not in (LAYOUT_ROWS, LAYOUT_VNNI, LAYOUT_SDOT):
        raise MpillamaError(f"unknown Q80 weight layout {layout!r}: use {LAYOUT_ROWS!r}, {LAYOUT_VNNI!r} or "
                            f"{LAYOUT_SDOT!r}")
    if layout in _GROUP_PATHS and kernel_path() != _GROUP_PATHS[layout]:
        raise MpillamaError(f"the {layout} Q80 weight layout needs the {_GROUP_PATHS[layout]} kernel path and this "
                            f"process runs {kernel_path()}: use the default layout here ({default_layout()})")
    rows, nb = sum(p.shape[0] for p in parts), parts[0].shape[1] // Q80_BLOCK_BYTES
    if layout in _GROUP_PATHS:
        buf = np.empty((-(-rows // VNNI_ROWS), nb, Q80V_BLOCK_BYTES), np.uint8)
        flip = 0x80 if layout == LAYOUT_VNNI else 0
        row0 = 0
        for part in parts:
            _pack_group_rows(buf, np.asarray(part), row0, flip)
            row0 += part.shape[0]
        _pad_group_rows(buf, rows, flip)
        return Q80Matrix(rows=rows, cols=nb * QK, layout=layout, qs=buf, d=buf[:, :, 512:].view("<u2"))
    blocks = np.concatenate(parts).reshape(rows, nb, Q80_BLOCK_BYTES)
    n_tiles = -(-rows // TILE)
    qs = np.zeros((n_tiles * TILE, nb, QK), np.int8)  # padded rows: values 0, scale 0
    qs[:rows] = blocks[:, :, 2:].view(np.int8)
    d = np.zeros((n_tiles * TILE, nb), np.float32)
    d[:rows] = np.ascontiguousarray(blocks[:, :, :2]).view("<f2")[:, :, 0]
    return Q80Matrix(rows=rows, cols=nb * QK, layout=layout,
                     qs=np.ascontiguousarray(qs.reshape(n_tiles, TILE, nb, QK).transpose(0, 2, 3, 1)),
                     d=np.ascontiguousarray(d.reshape(n_tiles, TILE, nb).transpose(0, 2, 1)))


def unpack_q80w(m: Q80Matrix) -> np.ndarray:
    """The inverse of pack_q80w: -> uint8 (rows, cols//32*34) GGML Q8_0 rows."""
    nb = m.cols // QK
    out = np.empty((m.rows, nb, Q80_BLOCK_BYTES), np.uint8)  # (rows, nb, 34)
    if m.layout == LAYOUT_ROWS:
        n = m.qs.shape[0] * TILE
        d = m.d.transpose(0, 2, 1).reshape(n, nb)[: m.rows]
        out[:, :, :2] = np.ascontiguousarray(d.astype("<f2")).view(np.uint8).reshape(m.rows, nb, 2)
        out[:, :, 2:] = m.qs.transpose(0, 3, 1, 2).reshape(n, nb, QK)[: m.rows].view(np.uint8)
    else:
        n_groups = m.qs.shape[0]
        vals = m.qs[:, :, :512].reshape(n_groups, nb, 8, VNNI_ROWS, 4).transpose(0, 3, 1, 2, 4)
        vals = vals ^ 0x80 if m.layout == LAYOUT_VNNI else vals
        out[:, :, 2:] = vals.reshape(n_groups * VNNI_ROWS, nb, QK)[: m.rows]
        d = m.d.transpose(0, 2, 1).reshape(n_groups * VNNI_ROWS, nb)[: m.rows]
        out[:, :, 0] = d & 0xFF
        out[:, :, 1] = d >> 8
    return out.reshape(m.rows, nb * Q80_BLOCK_BYTES)


# ---------------------------------------------------------------- rows layout: plain numba loops


@njit(cache=True, fastmath=True, error_model="numpy")
def _q80w_tiles(out, qs, wd, aq, ad, T, rows, tile_lo, tile_hi, isum, acc):
    # w tiles [tile_lo, tile_hi) q80 (qs (n_tiles, nb, 32, TILE) int8, wd (n_tiles, nb, TILE) f32) @ x (T, cols)
    # q80 -> out (T, rows) f32 (rows of those tiles). isum (TILE,), acc (>= T, TILE) f32: the thread's scratch.
    # The loops run over TILE rows of contiguous bytes, which LLVM vectorises (int8 -> f32, fma). A block's
    # 32 products are summed in float32, which is exact: every partial sum is an integer of magnitude
    # <= 32 * 128 * 127 < 2^24 (numba widens int8 * int8 to int64, which did not vectorise: 0.8 G weights/s).
    nb = qs.shape[1]
    for tile in range(tile_lo, tile_hi):
        for t in range(T):
            for r in range(TILE):
                acc[t, r] = 0.0
        for b in range(nb):
            qb = qs[tile, b]  # (32, TILE) int8
            db = wd[tile, b]  # (TILE,) f32
            for t in range(T):  # the weight tile block stays in L1 for all T tokens
                ab = aq[t, b]
                for r in range(TILE):
                    isum[r] = 0.0
                for k in range(QK):
                    a = np.float32(ab[k])
                    for r in range(TILE):
                        isum[r] += np.float32(qb[k, r]) * a
                xd = ad[t, b]
                for r in range(TILE):
                    acc[t, r] += isum[r] * db[r] * xd
        r0 = tile * TILE
        for t in range(T):
            for r in range(min(TILE, rows - r0)):
                out[t, r0 + r] = acc[t, r]


@njit(cache=True, parallel=True)
def _q80w_tiles_parallel(out, qs, wd, aq, ad, T, rows, n_threads, isum, acc, next_chunk):
    # the same over all tiles, one tile at a time to whichever of n_threads is free
    n_tiles = qs.shape[0]
    next_chunk[0] = 0
    for k in prange(min(n_threads, n_tiles, isum.shape[0])):
        c = _claim(next_chunk)
        while c < n_tiles:
            _q80w_tiles(out, qs, wd, aq, ad, T, rows, c, c + 1, isum[k], acc[k])
            c = _claim(next_chunk)


def matmul_q80w(out: np.ndarray, m: Q80Matrix, acts: Q80Activations, T: int) -> None:
    """out (T, rows) f32 = W (rows, cols) q80 @ x[t] (cols,) q80 for t < T (decode T=1, prefill T>1)."""
    assert isinstance(m, Q80Matrix), f"{type(m).__name__}: use kernels.matmul_weights for any weight kind"
    assert acts.cols == m.cols, f"activations have {acts.cols} columns, the matrix {m.cols}"
    assert 1 <= T <= acts.max_tokens, f"T={T}, activations hold {acts.max_tokens}"
    assert out.dtype == np.float32 and out.shape == (T, m.rows) and out.flags.c_contiguous, (
        f"out {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous}), expected f32 ({T}, {m.rows})"
    )
    n_threads = numba.get_num_threads()
    if m.layout == LAYOUT_VNNI:
        from mpillama.kernels.q80w_x86 import _q80v_parallel, _q80v_run  # compiled only on the x86-vnni path

        if n_threads > 1:
            _q80v_parallel(out, m.qs, acts.qs32, acts.d, acts.corr, T, m.rows, n_threads, acts.next_chunk)
        else:
            _q80v_run(out, m.qs, acts.qs32, acts.d, acts.corr, T, m.rows, 0, m.qs.shape[0])
    elif m.layout == LAYOUT_SDOT:
        from mpillama.kernels.q80w_arm import _q80s_parallel, _q80s_run  # compiled only on the arm-sdot path

        if n_threads > 1:
            _q80s_parallel(out, m.qs, acts.qs32, acts.d, T, m.rows, n_threads, acts.next_chunk)
        else:
            _q80s_run(out, m.qs, acts.qs32, acts.d, T, m.rows, 0, m.qs.shape[0])
    elif n_threads > 1:  # the Q40 tiles' scratch (tile_scales, tile_sums) serves here too
        _q80w_tiles_parallel(out, m.qs, m.d, acts.qs, acts.d, T, m.rows, n_threads, acts.tile_scales, acts.tile_sums,
                             acts.next_chunk)
    else:
        _q80w_tiles(out, m.qs, m.d, acts.qs, acts.d, T, m.rows, 0, m.qs.shape[0], acts.tile_scales[0],
                    acts.tile_sums[0])


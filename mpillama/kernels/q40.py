"""Q40 weights: the two repacked layouts, pack_q40 / unpack_q40, and matmul_q40 (the layout's kernel).

Two layouts (Q40Matrix.layout), both 4.5 bits per weight, both the unchanged Q4_0 bytes (byte j
of a block: low nibble = column j, high nibble = column j+16) and float16 scale bits, only
reordered; pack_q40 picks the one for this CPU:
- vnni (the dot-product paths, target.kernel_path() x86-vnni or arm-sdot): rows in groups of 16.
  Per group and block, 288 bytes: the 16 rows' 16 bytes as [byte group k (4)][row (16)][4 bytes],
  then the 16 rows' float16 scales. Group and scales share one stream. Kernels: x86.py (AVX-512
  VNNI) or arm.py (sdot), whichever this process runs; shapes and shared kernels: groups.py.
- tiles (any CPU): rows in tiles of TILE = 256; nibble bytes ordered [block][byte j][row],
  scales ordered [tile][block][row]. Kernels: portable.py.
Rows are padded to a whole group or tile with zero blocks, computed but never written out.
Measured figures and the assembly check are in bench/kernels.py.

Imports numpy, numba, mpillama.{errors, quant} and the package's kernel modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

from mpillama.errors import MpillamaError
from mpillama.kernels.arm import _q40s_parallel, _q40s_run
from mpillama.kernels.groups import VNNI_BLOCK_BYTES, VNNI_ROWS
from mpillama.kernels.portable import TILE, _q40_parallel, _q40_tiles
from mpillama.kernels.q80 import Q80Activations
from mpillama.kernels.target import ARM_SDOT, PORTABLE, kernel_path
from mpillama.kernels.x86 import _q40v_parallel, _q40v_run
from mpillama.quant import Q40_BLOCK_BYTES, QK


LAYOUT_TILES = "tiles"  # rows in tiles of TILE, plain numba kernels: any CPU
LAYOUT_VNNI = "vnni"  # rows in groups of 16, dot-product kernels: where kernel_path() is x86-vnni or arm-sdot


@dataclass
class Q40Matrix:
    """A (rows, cols) Q4_0 matrix repacked for the kernels (see the module docstring)."""

    rows: int
    cols: int
    layout: str  # LAYOUT_TILES or LAYOUT_VNNI
    # tiles: (n_tiles, nb, 16, TILE) uint8, unchanged Q4_0 nibble bytes [tile][block][j][row]
    # vnni:  (n_groups, nb, 288) uint8, [group][block]: bytes [k][row][4] (byte 4k+i of a row's
    #        block at k*64 + row*4 + i), then the 16 rows' float16 scales
    qs: np.ndarray
    # tiles: (n_tiles, nb, TILE) uint16 float16 scale bits [tile][block][row]; 0 in padded rows
    # vnni:  (n_groups, nb, 16) uint16, a view of the scales inside qs
    d: np.ndarray


def default_layout() -> str:
    """The layout pack_q40 picks on this machine: vnni on a dot-product kernel path, else tiles."""
    return LAYOUT_TILES if kernel_path() == PORTABLE else LAYOUT_VNNI


@njit(cache=True, nogil=True)
def _pack_vnni_rows(buf, ggml, row0):
    # ggml (n, nb*18) Q4_0 rows -> rows row0..row0+n of buf (n_groups, nb, 288), the VNNI layout.
    # ggml may be a strided view of the mapped model file: the bytes are read once, here.
    # nogil: rank 0 builds the tokenizer in another thread meanwhile.
    nb = buf.shape[1]
    for i in range(ggml.shape[0]):
        g, r = divmod(row0 + i, VNNI_ROWS)
        src, dst = ggml[i], buf[g]  # (nb*18,), (nb, 288)
        for b in range(nb):
            o = b * Q40_BLOCK_BYTES
            dst[b, 256 + 2 * r] = src[o]
            dst[b, 257 + 2 * r] = src[o + 1]
            for k in range(4):
                for j in range(4):
                    dst[b, k * 64 + r * 4 + j] = src[o + 2 + 4 * k + j]


@njit(cache=True, nogil=True)
def _pad_vnni_rows(buf, row0):
    # rows row0.. of the last group: zero-valued blocks (scale 0, nibbles 8)
    nb = buf.shape[1]
    for row in range(row0, buf.shape[0] * VNNI_ROWS):
        g, r = divmod(row, VNNI_ROWS)
        for b in range(nb):
            buf[g, b, 256 + 2 * r] = 0
            buf[g, b, 257 + 2 * r] = 0
            for k in range(4):
                for j in range(4):
                    buf[g, b, k * 64 + r * 4 + j] = 0x88


def pack_q40(ggml: np.ndarray | Sequence[np.ndarray], layout: str | None = None) -> Q40Matrix:
    """uint8 (rows, cols//32*18) GGML Q4_0 rows -> a Q40Matrix (a transpose; done once at load).

    ggml may be a list of such row blocks (views of the mapped file, wq/wk/wv of one rank):
    they are stacked in order, read straight from the map without an intermediate copy.
    layout None = default_layout(). Padded rows hold zero-valued blocks (scale 0, nibbles 8).
    """
    parts = [ggml] if isinstance(ggml, np.ndarray) else list(ggml)
    for part in parts:
        assert part.ndim == 2 and part.dtype == np.uint8 and part.shape[1] % Q40_BLOCK_BYTES == 0, (
            f"ggml {part.dtype} {part.shape}: expected uint8 (rows, nb*18)"
        )
        assert part.shape[1] == parts[0].shape[1], "stacked Q40 blocks must have the same columns"
    layout = default_layout() if layout is None else layout
    if layout not in (LAYOUT_TILES, LAYOUT_VNNI):
        raise MpillamaError(f"unknown Q40 layout {layout!r}: use {LAYOUT_TILES!r} or {LAYOUT_VNNI!r}")
    if layout == LAYOUT_VNNI and kernel_path() == PORTABLE:
        raise MpillamaError(
            "the vnni weight layout needs a dot-product kernel path (x86 AVX-512 VNNI or ARM dotprod) and this "
            "process runs the portable kernels: use the tiles layout (the default here)"
        )
    rows, nb = sum(p.shape[0] for p in parts), parts[0].shape[1] // Q40_BLOCK_BYTES
    group = TILE if layout == LAYOUT_TILES else VNNI_ROWS
    n_groups = -(-rows // group)
    if layout == LAYOUT_VNNI:
        buf = np.empty((n_groups, nb, VNNI_BLOCK_BYTES), np.uint8)  # (n_groups, nb, 288)
        row0 = 0
        for part in parts:
            _pack_vnni_rows(buf, np.asarray(part), row0)
            row0 += part.shape[0]
        _pad_vnni_rows(buf, rows)
        return Q40Matrix(rows=rows, cols=nb * QK, layout=layout, qs=buf, d=buf[:, :, 256:].view("<u2"))
    ggml = parts[0] if len(parts) == 1 else np.concatenate(parts)
    blocks = ggml.reshape(rows, nb, Q40_BLOCK_BYTES)
    qs = np.full((n_groups * group, nb, 16), 0x88, np.uint8)  # (n_groups*group, nb, 16); 0x88 = nibbles 8 = value 0
    qs[:rows] = blocks[:, :, 2:]
    d = np.zeros((n_groups * group, nb), np.uint16)  # (n_groups*group, nb) f16 bits
    d[:rows] = blocks[:, :, 0].astype(np.uint16) | (blocks[:, :, 1].astype(np.uint16) << 8)
    return Q40Matrix(
        rows=rows,
        cols=nb * QK,
        layout=layout,
        qs=np.ascontiguousarray(qs.reshape(n_groups, TILE, nb, 16).transpose(0, 2, 3, 1)),
        d=np.ascontiguousarray(d.reshape(n_groups, TILE, nb).transpose(0, 2, 1)),
    )


def unpack_q40(m: Q40Matrix) -> np.ndarray:
    """The inverse of pack_q40: -> uint8 (rows, cols//32*18) GGML Q4_0 rows."""
    n_groups, nb = m.qs.shape[0], m.qs.shape[1]
    if m.layout == LAYOUT_TILES:
        qs = m.qs.transpose(0, 3, 1, 2).reshape(n_groups * TILE, nb, 16)[: m.rows]
        d = m.d.transpose(0, 2, 1).reshape(n_groups * TILE, nb)[: m.rows]
    else:
        nib = m.qs[:, :, :256].reshape(n_groups, nb, 4, VNNI_ROWS, 4).transpose(0, 3, 1, 2, 4)
        qs = nib.reshape(n_groups * VNNI_ROWS, nb, 16)[: m.rows]
        d = m.d.transpose(0, 2, 1).reshape(n_groups * VNNI_ROWS, nb)[: m.rows]
    out = np.empty((m.rows, nb, Q40_BLOCK_BYTES), np.uint8)  # (rows, nb, 18)
    out[:, :, 0] = d & 0xFF
    out[:, :, 1] = d >> 8
    out[:, :, 2:] = qs
    return out.reshape(m.rows, nb * Q40_BLOCK_BYTES)


def matmul_q40(out: np.ndarray, m: Q40Matrix, acts: Q80Activations, T: int) -> None:
    """out (T, rows) f32 = W (rows, cols) q40 @ x[t] (cols,) q80 for t < T (decode T=1, prefill T>1)."""
    assert isinstance(m, Q40Matrix), f"{type(m).__name__}: use kernels.matmul_weights for any weight kind"
    assert acts.cols == m.cols, f"activations have {acts.cols} columns, the matrix {m.cols}"
    assert 1 <= T <= acts.max_tokens, f"T={T}, activations hold {acts.max_tokens}"
    assert out.dtype == np.float32 and out.shape == (T, m.rows) and out.flags.c_contiguous, (
        f"out {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous}), expected f32 ({T}, {m.rows})"
    )
    kernel, args = _kernel_call(out, m, acts, T, numba.get_num_threads())
    kernel(*args)


def _kernel_call(out: np.ndarray, m: Q40Matrix, acts: Q80Activations, T: int, n_threads: int) -> tuple:
    """(the kernel, its arguments) that compute matmul_q40(out, m, acts, T) with n_threads numba threads.

    The kernel is the layout's and, for the row-group layout, the kernel path's: only the kernels
    of the path this process runs are ever compiled (target.py). bench/kernels.py --asm compiles
    a fresh copy of the kernel to read the assembly of what it calls.
    """
    if m.layout == LAYOUT_VNNI:
        assert acts.group_nibbles.shape[1] > 0, "these activations were made without the row-group scratch (portable)"
        run, parallel = (_q40s_run, _q40s_parallel) if kernel_path() == ARM_SDOT else (_q40v_run, _q40v_parallel)
        if n_threads > 1:
            return parallel, (out, m.qs, acts.qs32, acts.d, acts.corr, T, m.rows, n_threads, acts.group_nibbles,
                              acts.group_scales, acts.next_chunk)
        return run, (out, m.qs, acts.qs32, acts.d, acts.corr, T, m.rows, 0, m.qs.shape[0], acts.group_nibbles[0],
                     acts.group_scales[0])
    if n_threads > 1:
        return _q40_parallel, (
            out, m.qs, m.d, acts.qs, acts.d, acts.corr, T, m.rows, n_threads,
            acts.tile_dots, acts.tile_scales, acts.tile_scale_bits, acts.tile_sums, acts.next_chunk,
        )  # fmt: skip
    return _q40_tiles, (
        out, m.qs, m.d, acts.qs, acts.d, acts.corr, T, m.rows, 0, m.qs.shape[0],
        acts.tile_dots[0], acts.tile_scales[0], acts.tile_scale_bits[0], acts.tile_sums[0],
    )  # fmt: skip

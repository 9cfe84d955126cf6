"""K-quant weights (Q4_K, Q5_K, Q6_K): the row-group layout, pack_kquant / unpack_kquant, and matmul_kquant.

The layout (one for every kernel path): rows in groups of KQ_ROWS = 16; per group and 256-value
super-block one block of the 16 rows' data (field offsets in kquant_portable.py):
- the sub-block scales, one byte per row and sub-block ([j][row]): Q4_K/Q5_K's 6-bit scales and
  mins unpacked from their 12 bytes into 8 + 8 (4 bytes a row more than the file: 2.8% of Q4_K,
  2.3% of Q5_K); Q6_K's 16 int8 scales unchanged;
- the float16 super-block scales ([row][2]): d (and dmin for Q4_K/Q5_K);
- the quantized values' bytes, unchanged, as 4-byte words interleaved by row ([word][row][4]):
  one 64-byte load holds 4 bytes of each of the 16 rows (an int32 lane per row, vpdpbusd's
  operand). Q4_K: qs (128 bytes a row); Q5_K: qh (32), then qs; Q6_K: ql (128), then qh (64).
So in memory a row takes 148 (Q4_K), 180 (Q5_K) and 210 (Q6_K) bytes per super-block against
the file's 144, 176 and 210. Rows are padded to a whole group with zero bytes (scales 0: the
padded rows compute 0 and are never written out). unpack_kquant gives back the GGML bytes exactly.

The matmul takes Q80 activations (32-value blocks, as the Q40 matmul): a Q4_K/Q5_K sub-block is
one Q80 block, a Q6_K sub-block half of one. The kernels: kquant_dot.py (x86 vpdpbusd or ARM
sdot) where target.kernel_path() is x86-vnni or arm-sdot, else kquant_portable.py (plain loops).

Imports numpy, numba, mpillama.{errors, quant} and the package's kernel modules only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numba import njit

from mpillama.errors import MpillamaError
from mpillama.kernels import kquant_portable as kp
from mpillama.kernels.kquant_dot import _kqv_parallel, _kqv_serial
from mpillama.kernels.kquant_portable import KQ_ROWS, _kq_portable_parallel, _kq_portable_run
from mpillama.kernels.q80 import Q80Activations
from mpillama.kernels.target import ARM_SDOT, X86_VNNI, kernel_path
from mpillama.quant import KQUANT_BLOCK_BYTES, QK_K, _pack_scales_k

KQUANT_KINDS = ("q4_k", "q5_k", "q6_k")
PACKED_BLOCK_BYTES = {"q4_k": kp.Q4K_BYTES, "q5_k": kp.Q5K_BYTES, "q6_k": kp.Q6K_BYTES}  # per 16 rows
_KIND_CODE = {"q4_k": 4, "q5_k": 5, "q6_k": 6}

# Each kind's fields: (where in the GGML block (lo, hi) or "sc"/"m" (the unpacked 6-bit scales),
# offset in the packed block, unit: 4 = [word][row][4], 1 = [j][row], 2 = [row][2])
_FIELDS = {
    "q4_k": [((16, 144), kp.Q4K_QS, 4), ("sc", kp.Q4K_SC, 1), ("m", kp.Q4K_M, 1), ((0, 2), kp.Q4K_D, 2),
             ((2, 4), kp.Q4K_DMIN, 2)],
    "q5_k": [((48, 176), kp.Q5K_QS, 4), ((16, 48), kp.Q5K_QH, 4), ("sc", kp.Q5K_SC, 1), ("m", kp.Q5K_M, 1),
             ((0, 2), kp.Q5K_D, 2), ((2, 4), kp.Q5K_DMIN, 2)],
    "q6_k": [((0, 128), kp.Q6K_QL, 4), ((128, 192), kp.Q6K_QH, 4), ((192, 208), kp.Q6K_SC, 1),
             ((208, 210), kp.Q6K_D, 2)],
}  # fmt: skip


@dataclass
class KQuantMatrix:
    """A (rows, cols) Q4_K, Q5_K or Q6_K matrix repacked for the kernels (see the module docstring)."""

    kind: str  # "q4_k", "q5_k" or "q6_k"
    rows: int
    cols: int
    w: np.ndarray  # (n_groups, cols//256, PACKED_BLOCK_BYTES[kind]) uint8


def _field_view(buf: np.ndarray, offset: int, length: int, unit: int) -> np.ndarray:
    """The packed field of `length` bytes a row at offset, as (n_groups, nsb, length//unit, KQ_ROWS, unit)."""
    ng, nsb = buf.shape[:2]
    return buf[:, :, offset : offset + length * KQ_ROWS].reshape(ng, nsb, length // unit, KQ_ROWS, unit)


def _field_length(src: tuple[int, int] | str) -> int:
    return 8 if isinstance(src, str) else src[1] - src[0]


@njit(cache=True, nogil=True)
def _pack_rows(buf, ggml, row0, fields, bb):
    # ggml (n, nsb*bb) GGML K-quant rows (may be a strided view of the mapped file: read once, here)
    # -> rows row0..row0+n of buf (n_groups, nsb, packed block); fields (F, 4) int64 rows of
    # (source offset, or -1 = the 6-bit scales, -2 = the mins; length; packed offset; unit)
    nsb = buf.shape[1]
    for i in range(ggml.shape[0]):
        g, r = divmod(row0 + i, KQ_ROWS)
        for s in range(nsb):
            src, dst = ggml[i, s * bb : (s + 1) * bb], buf[g, s]
            for f in range(fields.shape[0]):
                lo, length, o, unit = fields[f, 0], fields[f, 1], fields[f, 2], fields[f, 3]
                if lo < 0:  # Q4_K/Q5_K: the 12 scale bytes b (quant.py) -> sc (lo -1) or m (lo -2), 6 bits each
                    b = src[4:16]
                    for j in range(8):
                        if j < 4:
                            v = b[j] & 63 if lo == -1 else b[j + 4] & 63
                        elif lo == -1:
                            v = (b[j + 4] & 15) | ((b[j - 4] >> 6) << 4)
                        else:
                            v = (b[j + 4] >> 4) | ((b[j] >> 6) << 4)
                        dst[o + j * KQ_ROWS + r] = v
                elif unit == 4:
                    for k in range(length // 4):
                        for b in range(4):
                            dst[o + k * 64 + r * 4 + b] = src[lo + 4 * k + b]
                elif unit == 1:
                    for j in range(length):
                        dst[o + j * KQ_ROWS + r] = src[lo + j]
                else:
                    dst[o + 2 * r] = src[lo]
                    dst[o + 2 * r + 1] = src[lo + 1]


def _field_table(kind: str) -> np.ndarray:
    """_FIELDS[kind] as _pack_rows's (F, 4) int64 table."""
    return np.array([(-1 if src == "sc" else -2 if src == "m" else src[0], _field_length(src), offset, unit)
                     for src, offset, unit in _FIELDS[kind]], np.int64)


def pack_kquant(kind: str, parts: np.ndarray | Sequence[np.ndarray]) -> KQuantMatrix:
    """uint8 (rows, cols//256*block) GGML K-quant rows (or a list of such row blocks with the same
    columns, stacked in order, e.g. strided views of the mapped file) -> a KQuantMatrix.

    The bytes are read straight from the parts, without an intermediate copy; padded rows are zeros.
    """
    if kind not in KQUANT_KINDS:
        raise MpillamaError(f"unknown K-quant weight kind {kind!r}: use one of {', '.join(KQUANT_KINDS)}")
    bb = KQUANT_BLOCK_BYTES[kind]
    parts = [parts] if isinstance(parts, np.ndarray) else list(parts)
    for part in parts:
        assert part.ndim == 2 and part.dtype == np.uint8 and part.shape[1] % bb == 0 and part.shape[1] > 0, (
            f"{kind} part {part.dtype} {part.shape}: expected uint8 (rows, nsb*{bb})"
        )
        assert part.shape[1] == parts[0].shape[1], "stacked K-quant blocks must have the same columns"
    rows, nsb = sum(p.shape[0] for p in parts), parts[0].shape[1] // bb
    buf = np.zeros((-(-rows // KQ_ROWS), nsb, PACKED_BLOCK_BYTES[kind]), np.uint8)  # (n_groups, nsb, packed block)
    fields, row0 = _field_table(kind), 0
    for part in parts:
        _pack_rows(buf, np.asarray(part), row0, fields, bb)
        row0 += part.shape[0]
    return KQuantMatrix(kind=kind, rows=rows, cols=nsb * QK_K, w=buf)


def unpack_kquant(m: KQuantMatrix) -> np.ndarray:
    """The inverse of pack_kquant: -> uint8 (rows, cols//256*block) GGML bytes, exactly the packed rows."""
    nsb, bb = m.cols // QK_K, KQUANT_BLOCK_BYTES[m.kind]
    idx = np.arange(m.rows)
    g, r = idx // KQ_ROWS, idx % KQ_ROWS
    out = np.empty((m.rows, nsb, bb), np.uint8)  # (rows, nsb, bb) uint8
    sc_m = {}
    for src, offset, unit in _FIELDS[m.kind]:
        length = _field_length(src)
        data = _field_view(m.w, offset, length, unit)[g, :, :, r, :].reshape(m.rows, nsb, length)
        if isinstance(src, str):
            sc_m[src] = data
        else:
            out[:, :, src[0] : src[1]] = data
    if sc_m:
        out[:, :, 4:16] = _pack_scales_k(sc_m["sc"], sc_m["m"])
    return out.reshape(m.rows, nsb * bb)


def matmul_kquant(out: np.ndarray, m: KQuantMatrix, acts: Q80Activations, T: int) -> None:
    """out (T, rows) f32 = W (rows, cols) K-quant @ x[t] (cols,) q80 for t < T (decode T=1, prefill T>1)."""
    assert acts.cols == m.cols, f"activations have {acts.cols} columns, the matrix {m.cols}"
    assert 1 <= T <= acts.max_tokens, f"T={T}, activations hold {acts.max_tokens}"
    assert out.dtype == np.float32 and out.shape == (T, m.rows) and out.flags.c_contiguous, (
        f"out {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous}), expected f32 ({T}, {m.rows})"
    )
    kernel, args = _kernel_call(out, m, acts, T, numba.get_num_threads())
    kernel(*args)


def _kernel_call(out: np.ndarray, m: KQuantMatrix, acts: Q80Activations, T: int, n_threads: int,
                 path: str | None = None) -> tuple:
    """(the kernel, its arguments) for matmul_kquant with n_threads numba threads on `path`
    (None: this process's kernel path; tests pass "portable" to run the plain kernels anywhere)."""
    path = kernel_path() if path is None else path
    code = _KIND_CODE[m.kind]
    if path in (X86_VNNI, ARM_SDOT):
        if n_threads > 1:
            return _kqv_parallel, (out, m.w, acts.qs32, acts.d, acts.corr, acts.qs, acts.half_sums, T, m.rows, code,
                                   n_threads, acts.tile_sums, acts.next_chunk)
        return _kqv_serial, (out, m.w, acts.qs32, acts.d, acts.corr, acts.qs, acts.half_sums, T, m.rows,
                             acts.tile_sums[0], code)
    if n_threads > 1:
        return _kq_portable_parallel, (out, m.w, acts.qs, acts.d, acts.corr, T, m.rows, code, n_threads, acts.next_chunk)
    return _kq_portable_run, (out, m.w, acts.qs, acts.d, acts.corr, T, m.rows, 0, m.w.shape[0], code)

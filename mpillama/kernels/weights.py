"""The registry of weight kinds kept in memory at their file's precision, and the one matmul dispatch.

Each kind ("q40", "q80"; the K-quants next) is a WeightKind: its GGML block (values, bytes), how
to pack a rank's row blocks of GGML bytes into the kernels' matrix, the matmul against Q80
activations, and the dequantizer of GGML rows (embedding lookups). Everything else (loading,
--weight-type auto, partitioning, `inspect`) asks this registry, so adding a kind is one call:

    register(WeightKind("q6_k", 256, 210, pack_q6k, matmul_q6k, Q6KMatrix, dequantize_q6k, quantize_q6k))

with pack(parts: list[uint8 (rows, row_bytes)], same columns) -> a matrix with .rows/.cols
stacked by rows, and matmul(out (T, rows) f32, m, acts: Q80Activations, T) -> None; quantize
(f32 (n, cols) -> GGML rows) is optional: with it, a model whose matrices are of this kind also
gets its other tensors (an f32 embedding, a stack of mixed types) requantized to it. Names are
the GGML type names in lower case (TensorInfo.kind "Q6_K" -> "q6_k"; "q40", "q80" as mpillama
has always called Q4_0 and Q8_0). An f32 ndarray is not a kind here: it stays model.py's f32 path.

Imports numpy, mpillama.quant and the package's q40.py, q80.py, q80w.py only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from functools import partial

from mpillama.kernels.kquant import KQuantMatrix, matmul_kquant, pack_kquant
from mpillama.kernels.q40 import Q40Matrix, matmul_q40, pack_q40
from mpillama.kernels.q80 import Q80Activations
from mpillama.kernels.q80w import Q80Matrix, matmul_q80w, pack_q80w
from mpillama.quant import (
    KQUANT_BLOCK_BYTES, Q40_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, QK_K, dequantize_kquant, dequantize_q40, dequantize_q80,
    quantize_kquant, quantize_q40, quantize_q80,
)


@dataclass(frozen=True)
class WeightKind:
    name: str  # "q40", "q80", "q4_k", ...
    block_values: int  # values per GGML block (a column slice must start and end on one)
    block_bytes: int  # bytes per GGML block
    pack: Callable[[list[np.ndarray]], Any]  # GGML row blocks -> the kernels' matrix
    matmul: Callable[[np.ndarray, Any, Q80Activations, int], None]  # out (T, rows) = m @ acts[:T]
    matrix_type: type  # what pack returns (matmul_weights dispatches on it)
    dequantize: Callable[[np.ndarray], np.ndarray]  # uint8 (n, row_bytes) GGML rows -> f32 (n, cols)
    quantize: Callable[[np.ndarray], np.ndarray] | None = None  # f32 (n, cols) -> uint8 (n, row_bytes) GGML rows

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_values * self.block_bytes


KINDS: dict[str, WeightKind] = {}
_BY_TYPE: dict[type, WeightKind] = {}


def register(kind: WeightKind) -> None:
    """Make a kind available to --weight-type auto (kept in memory as stored)."""
    KINDS[kind.name] = kind
    _BY_TYPE[kind.matrix_type] = kind


register(WeightKind("q40", QK, Q40_BLOCK_BYTES, pack_q40, matmul_q40, Q40Matrix, dequantize_q40, quantize_q40))
register(WeightKind("q80", QK, Q80_BLOCK_BYTES, pack_q80w, matmul_q80w, Q80Matrix, dequantize_q80, quantize_q80))
for _k in ("q4_k", "q5_k", "q6_k"):  # one matrix type and kernel entry for the three (KQuantMatrix.kind says which)
    register(WeightKind(_k, QK_K, KQUANT_BLOCK_BYTES[_k], partial(pack_kquant, _k), matmul_kquant, KQuantMatrix,
                        partial(dequantize_kquant, _k), partial(quantize_kquant, _k)))


def kind_name(stored: str) -> str:
    """A TensorInfo.kind ('q40', 'Q6_K', 'f16', ...) as a registry name ('q40', 'q6_k', 'f16')."""
    return stored.lower()


def registered(stored: str) -> WeightKind | None:
    """The registry entry that keeps tensors of this stored kind as they are, or None."""
    return KINDS.get(kind_name(stored))


def pack(kind: str, parts: list[np.ndarray]) -> Any:
    """Row blocks of GGML bytes of one kind, same columns -> that kind's matrix, stacked by rows."""
    return KINDS[kind].pack(parts)


@dataclass
class StackedMatrix:
    """Row blocks of different kinds stacked into one matrix (a Q4_K_M file keeps wq and wk in Q4_K and
    wv in Q6_K): each block runs its own kernel into its rows of the output."""

    parts: list[Any]  # registered kinds' matrices, same columns, in row order
    rows: int
    cols: int


def pack_stack(kinds: list[str], parts: list[np.ndarray]) -> Any:
    """Row blocks of GGML bytes, each of its own kind -> one matrix: the kind's own when they share
    one, else a StackedMatrix of consecutive same-kind blocks packed together."""
    runs: list[tuple[str, list[np.ndarray]]] = []
    for kind, part in zip(kinds, parts, strict=True):
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(part)
        else:
            runs.append((kind, [part]))
    packed = [pack(kind, blocks) for kind, blocks in runs]
    if len(packed) == 1:
        return packed[0]
    return StackedMatrix(packed, sum(p.rows for p in packed), packed[0].cols)


def matmul_weights(out: np.ndarray, m: Any, acts: Q80Activations, T: int) -> None:
    """out (T, rows) f32 = m (rows, cols) @ acts rows [0, T), with the kernel of m's kind."""
    if type(m) is not StackedMatrix:
        _BY_TYPE[type(m)].matmul(out, m, acts, T)
        return
    r0 = 0
    for part in m.parts:
        r1 = r0 + part.rows
        if T == 1:  # one row: its column range is contiguous, the kernel writes it in place
            matmul_weights(out[:, r0:r1], part, acts, T)
        else:
            block = np.empty((T, part.rows), np.float32)  # (T, part rows): prefill, where a copy is cheap
            matmul_weights(block, part, acts, T)
            out[:, r0:r1] = block
        r0 = r1


def is_quantized(m: Any) -> bool:
    """Whether m is a registered kind's matrix, or a stack of them (else an f32 ndarray)."""
    return type(m) in _BY_TYPE or type(m) is StackedMatrix

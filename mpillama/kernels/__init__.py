"""numba kernels of the forward pass, split by concern; this file only gathers their public names.

    target.py    kernel_path(): which Q40 kernels this process runs (x86-vnni, arm-sdot, portable),
                 decided before anything compiles; MPILLAMA_KERNELS forces one
    vector.py    numba's missing LLVM layer: a vector type, generic intrinsics, the x86 CPU check
    bits.py      float16 <-> float32 from bit patterns, C roundf, a vectorisable exp
    threads.py   configure(nthreads): numba's threading layer and thread count
    q80.py       Q80 activations: quantise f32 rows, Q8_0 bytes of the sync payloads
    q40.py       Q40 weights: the two layouts, pack/unpack, matmul_q40 (runs the path's kernel)
    q80w.py      Q80 (Q8_0) weights: rows / vnni layouts, pack/unpack, matmul_q80w (+ q80w_x86.py)
    weights.py   the registry of weight kinds kept as stored, and matmul_weights (one dispatch)
    kquant.py    Q4_K/Q5_K/Q6_K weights: the row-group layout, pack/unpack, matmul_kquant, whose kernels are
    kquant_portable.py (plain loops, any CPU) and kquant_dot.py (x86 VNNI or ARM sdot)
    portable.py  the tiles-layout Q40 x Q80 matmul: plain numba loops, any CPU
    groups.py    the row-group ("vnni") layout's shapes and generic kernels, shared by:
    x86.py       the row-group Q40 x Q80 matmul with AVX-512 VNNI (vpdpbusd)
    arm.py       the row-group Q40 x Q80 matmul with the Armv8.2 dot product (sdot)
    attn.py      causal grouped-query attention over the KV cache
    dense.py     f32 matmul, rmsnorm, swiglu, rope
    cache.py     one numba cache stamp for all these files

Each kernel has a numpy twin in quant.py and a test comparing the two (tests/test_kernels.py).
The package imports numpy, numba, llvmlite (numba's own) and mpillama.{config, errors, mpienv,
quant} only: never mpi4py, never model.py. Importing it compiles nothing and sets nothing
but numba registrations (the vector type, cache.py's locator) and, on aarch64, numba's target
features (target.py says why): the engine calls configure(nthreads) once at start-up.

Conventions: kernels are plain functions over whole arrays, output argument first, no
allocation on the hot path (the matmul's per-thread scratch lives in the Q80Activations
buffers, attention's in new_attention_scratch()), and each begins with a one-line contract
comment. Public wrappers assert the shapes callers could get wrong. Multi-threaded variants
run one launch per call and are used whenever more than one numba thread is set; the Q40
matmuls hand out small chunks of rows to whichever thread is free (an atomic counter), so a
thread that lost its core for a while (a busy host, a hypervisor) does not hold up the rest.
Names with a leading underscore are shared between the package's files (and read by tests and
bench/kernels.py), not part of its API.
"""

from __future__ import annotations

from mpillama.kernels import cache  # noqa: F401  (first: its locator must be in place before any kernel is decorated)
from mpillama.kernels import target  # noqa: F401  (before any kernel is decorated: it may set numba's target)
from mpillama.kernels.attn import ATT_MIN_CHUNK, AttentionScratch, attention, new_attention_scratch
from mpillama.kernels.dense import matmul_f32, rmsnorm, rope, rope_tables, swiglu
from mpillama.kernels.kquant import KQUANT_KINDS, KQuantMatrix, matmul_kquant, pack_kquant, unpack_kquant
from mpillama.kernels.portable import TILE
from mpillama.kernels.q40 import LAYOUT_TILES, LAYOUT_VNNI, Q40Matrix, default_layout, matmul_q40, pack_q40, unpack_q40
from mpillama.kernels.q80 import (
    Q80Activations,
    activations_from_q80,
    dequantize_q80_add,
    new_activations,
    quantize_activations,
    quantize_q80_into,
)
from mpillama.kernels.q80w import Q80Matrix, matmul_q80w, pack_q80w, unpack_q80w
from mpillama.kernels.weights import KINDS, WeightKind, matmul_weights, register
from mpillama.kernels.groups import VNNI_BLOCK_BYTES, VNNI_CHUNK, VNNI_ROWS
from mpillama.kernels.target import kernel_path
from mpillama.kernels.threads import configure, using_threads
from mpillama.kernels.vector import simd_available

__all__ = [
    "ATT_MIN_CHUNK",
    "KINDS",
    "Q80Matrix",
    "WeightKind",
    "matmul_q80w",
    "matmul_weights",
    "pack_q80w",
    "register",
    "unpack_q80w",
    "LAYOUT_TILES",
    "LAYOUT_VNNI",
    "TILE",
    "VNNI_BLOCK_BYTES",
    "VNNI_CHUNK",
    "VNNI_ROWS",
    "KQUANT_KINDS",
    "AttentionScratch",
    "KQuantMatrix",
    "Q40Matrix",
    "Q80Activations",
    "activations_from_q80",
    "attention",
    "configure",
    "default_layout",
    "dequantize_q80_add",
    "kernel_path",
    "matmul_f32",
    "matmul_kquant",
    "matmul_q40",
    "new_activations",
    "new_attention_scratch",
    "pack_kquant",
    "pack_q40",
    "quantize_activations",
    "quantize_q80_into",
    "rmsnorm",
    "rope",
    "rope_tables",
    "simd_available",
    "swiglu",
    "unpack_kquant",
    "unpack_q40",
    "using_threads",
]

"""numba kernels: Q80 x Q40 matmul, f32 matmul, rmsnorm, rope, attention, silu*mul, Q80 (de)quantize.

Owns: the repacked Q40 weight layouts (pack_q40 / unpack_q40, next to each other), the Q80
activation buffers the matmul reads, and every numeric kernel of the forward pass. Each
kernel has a numpy twin in quant.py and a test comparing the two (tests/test_kernels.py).

Imports numpy, numba, llvmlite (numba's own) and mpillama.{config, errors, quant} only: never
mpi4py, never model.py. Nothing is set at import time (registering the numba vector type below
only defines a type): the engine calls configure(nthreads) once at start-up.

Conventions: kernels are plain functions over whole arrays, output argument first, no
allocation on the hot path (the matmul's per-thread scratch lives in the Q80Activations
buffers, attention's in new_attention_scratch()), and each begins with a one-line contract
comment. Public wrappers assert the shapes callers could get wrong. Multi-threaded variants
run one launch per call and are used whenever more than one numba thread is set; the Q40
matmuls hand out small chunks of rows to whichever thread is free (an atomic counter), so a
thread that lost its core for a while (a busy host, a hypervisor) does not hold up the rest.

Two Q40 layouts (Q40Matrix.layout), both 4.5 bits per weight, both the unchanged Q4_0 bytes
(byte j of a block: low nibble = column j, high nibble = column j+16) and float16 scale bits,
only reordered; pack_q40 picks the one for this CPU:
- vnni (x86 with AVX-512 VNNI, simd_available()): rows in groups of 16. Per group and block,
  288 bytes: the 16 rows' 16 bytes as [byte group k (4)][row (16)][4 bytes], then the 16 rows'
  float16 scales. One 64-byte load holds 4 bytes of each of 16 rows, so vpdpbusd multiplies
  the low nibbles (columns 4k..4k+3) and, shifted, the high ones (16+4k..) by the broadcast
  activation words and sums 4 products per row lane. Group and scales share one stream.
- tiles (any CPU): rows in tiles of TILE = 256; nibble bytes ordered [block][byte j][row], so
  plain numba loops run over 256 rows of contiguous bytes and LLVM vectorises them across rows
  (16-bit lanes, vpmullw); scales ordered [tile][block][row], turned into float32 with integer
  bit operations.
Rows are padded to a whole group or tile with zero blocks, computed but never written out.
Measured figures and the assembly check are in bench/kernels.py.
"""

from __future__ import annotations

import functools
import math
import os
import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir as llvm_ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from mpillama.config import RopeScaling
from mpillama.errors import MpillamaError
from mpillama.mpienv import ranks_on_this_host
from mpillama.quant import Q40_BLOCK_BYTES, Q80_BLOCK_BYTES, QK, rope_frequencies_ref

TILE = 256  # weight rows per tile of the tiles layout
LAYOUT_TILES = "tiles"  # rows in tiles of TILE, plain numba kernels: any CPU
LAYOUT_VNNI = "vnni"  # rows in groups of 16, AVX-512 VNNI kernels: where simd_available()
VNNI_ROWS = 16  # rows per group of the VNNI layout (one int32 lane each)
VNNI_CHUNK = 8  # row groups a thread claims at a time in a threaded matmul (128 rows)
VNNI_BLOCK_BYTES = 288  # one block of a row group: 256 nibble bytes, then 16 float16 scales
_F16_MAGIC = np.float32(2.0**112)  # (f16 bits << 13) as f32 times 2^112 = the f16 value, subnormals included


# ---------------------------------------------------------------- threads


def _omp_available() -> bool:
    """True when numba's OpenMP threading layer can load (libgomp present)."""
    try:
        from numba.np.ufunc import omppool  # noqa: F401  (only probing that it loads)
    except ImportError:
        return False
    return True


def configure(nthreads: int) -> None:
    """Pick the omp threading layer when available (before any parallel launch) and set numba's threads.

    Under omp a parallel launch costs ~1-2 us against 20-40 us under numba's default workqueue.
    With more than one thread, and no more threads on this host (over all its ranks) than the
    CPUs this process may run on, OpenMP's threads busy-wait between parallel regions
    (OMP_WAIT_POLICY=ACTIVE, unless the environment sets it): a decode token opens ~80
    regions, and threads that sleep in between take so long to wake that 2 threads decoded
    only ~1.15x faster than 1 (~1.6x spinning). The price: the threads spin on their cores
    between regions, also while the program waits for input; set OMP_WAIT_POLICY=PASSIVE to
    trade speed for that. Ranks that share a host with more threads than cores always sleep:
    spinning there would take the cores the other ranks compute on.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if nthreads < 1 or nthreads > limit:
        raise MpillamaError(
            f"--nthreads {nthreads}: numba can run 1..{limit} threads here; "
            f"choose one in that range (or set NUMBA_NUM_THREADS to raise the limit)"
        )
    try:
        numba.threading_layer()  # raises ValueError until the first parallel launch
        started = True
    except ValueError:
        started = False
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not started and 1 < nthreads and nthreads * ranks_on_this_host() <= cpus:
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")  # libgomp reads it once, as it loads (below)
    if not started and _omp_available():
        numba.config.THREADING_LAYER = "omp"
    numba.set_num_threads(nthreads)
    # numba's one-off start-up (its runtime and type registries, ~0.4 s of Python) happens at the
    # first kernel call: have it here, before the loader runs the tokenizer in a second thread
    _f16_value(0)


# ---------------------------------------------------------------- float16 scalars


@njit(cache=True)
def _f16_value(h: int) -> float:
    """float16 bits -> its value (float64, exact)."""
    e = (h >> 10) & 31
    m = h & 1023
    if e == 0:
        v = m * 2.0**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = (1024 + m) * 2.0 ** (e - 25)
    return -v if h & 0x8000 else v


@njit(cache=True)
def _roundf(v: np.float32) -> np.float32:
    """C roundf (half away from zero), exact: floor(|v|) + floor(2 * frac(|v|))."""
    a = abs(v)
    f = np.floor(a)
    r = f + np.floor(np.float32(2.0) * (a - f))
    return -r if v < 0 else r


# ---------------------------------------------------------------- SIMD vectors
#
# numba has no vector type, and LLVM never turns a plain loop into the dot-product instruction
# that makes a Q40 kernel fast (bench/kernels.py --asm: the plain kernels top out at one 16-bit
# multiply per weight-pair lane, vpmullw), nor keeps 16 attention accumulators in registers. So
# the VNNI matmul and the attention kernels use a tiny vector type: _Vec is an LLVM vector
# (<16 x i32> or <16 x float>) held in ordinary numba variables (registers after LLVM's mem2reg),
# and each helper below is an @intrinsic emitting one LLVM instruction or two. All of it is
# generic LLVM IR, which LLVM lowers for any CPU (AVX-512 here, 4 NEON registers on ARM), except
# _vdpbusd: x86's AVX-512 VNNI vpdpbusd (64 u8 x s8 products summed 4 at a time into 16 int32
# lanes). A function using it is compiled only when first called, and is only called where
# simd_available() says the CPU has it.


class _Vec(types.Type):
    """An LLVM vector of `lanes` values of a numba scalar type (never a Python object)."""

    def __init__(self, dtype: types.Type, lanes: int) -> None:
        self.dtype, self.lanes = dtype, lanes
        super().__init__(name=f"Vec({dtype} x {lanes})")


@register_model(_Vec)
class _VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):  # noqa: ANN001 (numba's data-model protocol)
        elem = dmm.lookup(fe_type.dtype).get_value_type()
        super().__init__(dmm, fe_type, llvm_ir.VectorType(elem, fe_type.lanes))


_I32X16 = _Vec(types.int32, 16)
_F32X16 = _Vec(types.float32, 16)
_LL_I32 = llvm_ir.IntType(32)
_LL_VI = llvm_ir.VectorType(_LL_I32, 16)
_LL_VF = llvm_ir.VectorType(llvm_ir.FloatType(), 16)


@functools.cache
def simd_available() -> bool:
    """True when numba compiles for a CPU with AVX-512 VNNI (so the VNNI layout can be used).

    Follows NUMBA_CPU_NAME / NUMBA_CPU_FEATURES when they are set (e.g. for a portable cache).
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if numba.config.CPU_FEATURES is not None:
        on = {f[1:] for f in numba.config.CPU_FEATURES.split(",") if f.startswith("+")}
    elif numba.config.CPU_NAME is not None:
        return False  # a named target without a feature list: assume only the baseline
    else:
        features = llvm_binding.get_host_cpu_features()
        on = {name for name in features if features[name]}
    return {"avx512f", "avx512bw", "avx512vnni"} <= on


def _elem_ptr(context, builder, arrty, arr, idxty, idx, lltype):  # noqa: ANN001, ANN202
    """Pointer (as lltype*) to element idx of a C-contiguous array, counted over all its dimensions."""
    data = context.make_array(arrty)(context, builder, arr).data
    i = context.cast(builder, idx, idxty, types.intp)
    return builder.bitcast(builder.gep(data, [i]), lltype.as_pointer())


def _splat(builder, value, vtype):  # noqa: ANN001, ANN202
    undef = llvm_ir.Constant(vtype, llvm_ir.Undefined)
    one = builder.insert_element(undef, value, llvm_ir.Constant(_LL_I32, 0))
    zeros = llvm_ir.Constant(llvm_ir.VectorType(_LL_I32, vtype.count), [0] * vtype.count)
    return builder.shuffle_vector(one, undef, zeros)


def _is_c_array(a: types.Type) -> bool:
    return isinstance(a, types.Array) and a.layout == "C"


def _vload(element: Any, result: _Vec, doc: str, finish: Callable[[Any, Any], Any] | None = None):  # noqa: ANN202
    """An intrinsic loading one `element` (an LLVM type) at element idx of a C array, unaligned;
    finish(builder, value) turns it into the lanes of `result`."""

    @intrinsic
    def load(typingctx, arr, idx):  # noqa: ANN001, ANN202
        if _is_c_array(arr) and isinstance(idx, types.Integer):
            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], element)
                value = builder.load(p, align=1)
                return finish(builder, value) if finish is not None else value
            return result(arr, idx), codegen

    load.__doc__ = doc
    return load


_vload_i32 = _vload(_LL_VI, _I32X16, "The 64 bytes at element idx of arr, as 16 int32 lanes.")
_vload_f32 = _vload(_LL_VF, _F32X16, "The 64 bytes at element idx of arr, as 16 float32 lanes.")
_vload_f16 = _vload(llvm_ir.VectorType(llvm_ir.HalfType(), 16), _F32X16,
                    "16 float16 bit patterns (32 bytes) at element idx of arr, widened to float32 (vcvtph2ps).",
                    lambda builder, v: builder.fpext(v, _LL_VF))
_vbroadcast32 = _vload(_LL_I32, _I32X16, "The 4 bytes at element idx of arr in all 16 int32 lanes.",
                       lambda builder, v: _splat(builder, v, _LL_VI))


@intrinsic
def _claim(typingctx, counter):  # noqa: ANN001, ANN202
    """Atomically counter[0] += 1; returns the value before: the next chunk of work for this thread."""
    if _is_c_array(counter) and counter.dtype == types.int64:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            i64 = llvm_ir.IntType(64)
            p = _elem_ptr(context, builder, sig.args[0], args[0], types.intp, context.get_constant(types.intp, 0), i64)
            return builder.atomic_rmw("add", p, llvm_ir.Constant(i64, 1), "monotonic")
        return types.int64(counter), codegen


@intrinsic
def _vstore(typingctx, arr, idx, v):  # noqa: ANN001, ANN202
    """Store the 16 lanes of v at element idx of arr."""
    if _is_c_array(arr) and isinstance(idx, types.Integer) and isinstance(v, _Vec):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], args[2].type)
            builder.store(args[2], p, align=1)
            return context.get_dummy_value()
        return types.void(arr, idx, v), codegen


@intrinsic
def _vstore_first(typingctx, arr, idx, v, n):  # noqa: ANN001, ANN202
    """Store lanes [0, n) of the float32 vector v at element idx of arr (a masked store)."""
    if _is_c_array(arr) and isinstance(idx, types.Integer) and v == _F32X16 and isinstance(n, types.Integer):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _LL_VF)
            nv = _splat(builder, context.cast(builder, args[3], sig.args[3], types.int32), _LL_VI)
            mask = builder.icmp_signed("<", llvm_ir.Constant(_LL_VI, list(range(16))), nv)
            fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [_LL_VF, p.type, _LL_I32, mask.type])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v16f32.p0")
            builder.call(fn, [args[2], p, llvm_ir.Constant(_LL_I32, 4), mask])
            return context.get_dummy_value()
        return types.void(arr, idx, v, n), codegen


@intrinsic
def _vsplat_i32(typingctx, x):  # noqa: ANN001, ANN202
    if isinstance(x, types.Integer):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return _splat(builder, context.cast(builder, args[0], sig.args[0], types.int32), _LL_VI)
        return _I32X16(x), codegen


@intrinsic
def _vsplat_f32(typingctx, x):  # noqa: ANN001, ANN202
    if isinstance(x, (types.Float, types.Integer)):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return _splat(builder, context.cast(builder, args[0], sig.args[0], types.float32), _LL_VF)
        return _F32X16(x), codegen


def _vec_binop(instruction: str, vtype: _Vec):  # noqa: ANN202
    """An intrinsic applying one LLVM binary instruction lane by lane to two vectors of vtype."""

    @intrinsic
    def op(typingctx, a, b):  # noqa: ANN001, ANN202
        if a == vtype and b == vtype:
            def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
                return getattr(builder, instruction)(args[0], args[1])
            return vtype(a, b), codegen

    return op


_vand = _vec_binop("and_", _I32X16)
_vsub = _vec_binop("sub", _I32X16)
_vmul = _vec_binop("fmul", _F32X16)
_vadd = _vec_binop("fadd", _F32X16)


@intrinsic
def _vshr4(typingctx, a):  # noqa: ANN001, ANN202
    """Each int32 lane shifted right by 4 bits (logical): the high nibbles move down."""
    if a == _I32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return builder.lshr(args[0], llvm_ir.Constant(_LL_VI, [4] * 16))
        return _I32X16(a), codegen


@intrinsic
def _vtofloat(typingctx, a):  # noqa: ANN001, ANN202
    if a == _I32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return builder.sitofp(args[0], _LL_VF)
        return _F32X16(a), codegen


@intrinsic
def _vfma(typingctx, a, b, c):  # noqa: ANN001, ANN202
    """a * b + c, lane by lane (float32)."""
    if a == b == c == _F32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = llvm_ir.FunctionType(_LL_VF, [_LL_VF] * 3)
            return builder.call(cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.v16f32"), args)
        return _F32X16(a, b, c), codegen


@intrinsic
def _vdpbusd(typingctx, acc, u, s):  # noqa: ANN001, ANN202
    """acc + (per int32 lane) the sum of 4 products unsigned byte of u x signed byte of s (x86 vpdpbusd)."""
    if acc == u == s == _I32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            fnty = llvm_ir.FunctionType(_LL_VI, [_LL_VI] * 3)
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
            return builder.call(fn, args)
        return _I32X16(acc, u, s), codegen


def _item_ptr(context, builder, arrty, arr, idxtys, idxs, lltype):  # noqa: ANN001, ANN202
    """Pointer (as lltype*) to arr[idxs...] of an array of any layout (strides honoured)."""
    inds = [context.cast(builder, i, t, types.intp) for i, t in zip(idxs, idxtys)]
    ary = context.make_array(arrty)(context, builder, arr)
    p = cgutils.get_item_pointer(context, builder, arrty, ary, inds, wraparound=False)
    return builder.bitcast(p, lltype.as_pointer())


def _is_f32_3d(a: types.Type) -> bool:
    return isinstance(a, types.Array) and a.ndim == 3 and a.dtype == types.float32


@intrinsic
def _vload_row(typingctx, arr, i, j, c):  # noqa: ANN001, ANN202
    """arr[i, j, c:c+16] of a float32 3-D array of any layout whose last axis has unit stride."""
    if _is_f32_3d(arr):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _item_ptr(context, builder, sig.args[0], args[0], sig.args[1:], args[1:], _LL_VF)
            return builder.load(p, align=4)
        return _F32X16(arr, i, j, c), codegen


@intrinsic
def _vstore_row(typingctx, arr, i, j, c, v):  # noqa: ANN001, ANN202
    """arr[i, j, c:c+16] = v, for a float32 3-D array of any layout whose last axis has unit stride."""
    if _is_f32_3d(arr) and v == _F32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _item_ptr(context, builder, sig.args[0], args[0], sig.args[1:4], args[1:4], _LL_VF)
            builder.store(args[4], p, align=4)
            return context.get_dummy_value()
        return types.void(arr, i, j, c, v), codegen


def _shuffle(builder, a, b, lanes: list[int]):  # noqa: ANN001, ANN202
    return builder.shuffle_vector(a, b, llvm_ir.Constant(llvm_ir.VectorType(_LL_I32, len(lanes)), lanes))


@intrinsic
def _vsum4(typingctx, a0, a1, a2, a3):  # noqa: ANN001, ANN202
    """Lanes 0..3 = the sums of the 16 lanes of a0, a1, a2, a3 (lanes 4..15 unspecified).

    Four horizontal sums for the price of ~one: halve all four vectors together, 4 times.
    """
    if a0 == a1 == a2 == a3 == _F32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            a0, a1, a2, a3 = args
            lo, hi = list(range(8)) + list(range(16, 24)), list(range(8, 16)) + list(range(24, 32))
            x = builder.fadd(_shuffle(builder, a0, a1, lo), _shuffle(builder, a0, a1, hi))  # a0: 8 | a1: 8
            y = builder.fadd(_shuffle(builder, a2, a3, lo), _shuffle(builder, a2, a3, hi))  # a2: 8 | a3: 8
            lo = [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27]
            z = builder.fadd(_shuffle(builder, x, y, lo), _shuffle(builder, x, y, [i + 4 for i in lo]))  # 4 each
            lo = [0, 1, 4, 5, 8, 9, 12, 13] * 2
            w = builder.fadd(_shuffle(builder, z, z, lo), _shuffle(builder, z, z, [i + 2 for i in lo]))  # 2 each
            lo = [0, 2, 4, 6] * 4
            return builder.fadd(_shuffle(builder, w, w, lo), _shuffle(builder, w, w, [i + 1 for i in lo]))
        return _F32X16(a0, a1, a2, a3), codegen


@intrinsic
def _vstore4(typingctx, arr, i, j, v):  # noqa: ANN001, ANN202
    """arr[i, j:j+4] = lanes 0..3 of v (a masked store), for a float32 2-D array with unit last stride."""
    if isinstance(arr, types.Array) and arr.ndim == 2 and arr.dtype == types.float32 and v == _F32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _item_ptr(context, builder, sig.args[0], args[0], sig.args[1:3], args[1:3], _LL_VF)
            mask = llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(1), 16), [1] * 4 + [0] * 12)
            fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [_LL_VF, p.type, _LL_I32, mask.type])
            fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v16f32.p0")
            builder.call(fn, [args[3], p, llvm_ir.Constant(_LL_I32, 4), mask])
            return context.get_dummy_value()
        return types.void(arr, i, j, v), codegen


@intrinsic
def _vhsum(typingctx, a):  # noqa: ANN001, ANN202
    """The sum of the 16 lanes of a (float32)."""
    if a == _F32X16:
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            f32 = llvm_ir.FloatType()
            fn = cgutils.get_or_insert_function(
                builder.module, llvm_ir.FunctionType(f32, [f32, _LL_VF]), "llvm.vector.reduce.fadd.v16f32"
            )
            return builder.call(fn, [llvm_ir.Constant(f32, 0.0), args[0]])
        return types.float32(a), codegen


@intrinsic
def _f32_from_bits(typingctx, a):  # noqa: ANN001, ANN202
    """The float32 whose bit pattern is the int32 a (a scalar bit cast; LLVM vectorises it)."""
    if isinstance(a, types.Integer):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return builder.bitcast(context.cast(builder, args[0], sig.args[0], types.int32), llvm_ir.FloatType())
        return types.float32(a), codegen


@intrinsic
def _bits_from_f32(typingctx, a):  # noqa: ANN001, ANN202
    """The int32 bit pattern of the float32 a (a scalar bit cast; LLVM vectorises it)."""
    if isinstance(a, types.Float):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return builder.bitcast(context.cast(builder, args[0], sig.args[0], types.float32), _LL_I32)
        return types.int32(a), codegen


# ---------------------------------------------------------------- float32 scalars that vectorise
#
# Loops over these compile to vector code (numba has no SVML here, so np.exp and a float max
# chain stay scalar: a call or a compare per element).


@njit(cache=True)
def _f16_bits(d):
    # float32 d >= 0, finite -> its float16 bits, rounded to nearest even (as numpy and vcvtps2ph)
    u = np.int64(_bits_from_f32(np.float32(d))) & 0x7FFFFFFF
    e = (u >> 23) - 127 + 15  # float16 exponent
    m = u & 0x7FFFFF
    if e >= 31:
        return 0x7C00
    if e <= 0:  # subnormal float16: the mantissa with its leading 1, shifted right by 14 - e
        if e < -10:
            return 0
        m |= 0x800000
        shift = 14 - e
        h = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        return h + 1 if rem > half or (rem == half and (h & 1)) else h
    h = (e << 10) | (m >> 13)
    rem = m & 0x1FFF
    return h + 1 if rem > 0x1000 or (rem == 0x1000 and (h & 1)) else h  # a carry may round up to inf


@njit(cache=True)
def _f16_to_f32(h):
    # float16 bits of a value >= 0 (inf included) -> that value as float32, exact
    e = (h >> 10) & 31
    if e == 0:
        return np.float32(h & 1023) * np.float32(2.0**-24)
    if e == 31:
        return np.float32(np.inf)
    return _f32_from_bits(((h & 0x7FFF) << 13) + (112 << 23))


@njit(cache=True, inline="always")
def _absmax32(x, t, o):
    # max |x[t, o:o+32]| as the max of the bit patterns without their sign bit (the same order as
    # the floats >= 0): an integer max, which LLVM vectorises, where a float max chain stays scalar
    m = np.int32(0)
    for k in range(QK):
        m = max(m, _bits_from_f32(x[t, o + k]) & np.int32(0x7FFFFFFF))
    return _f32_from_bits(m)


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _exp_f32(x):
    # exp(x), x clamped to [-87, 88] (Cephes expf: x = n ln2 + r with |r| <= ln2/2, e^r by a
    # polynomial, 2^n by building the exponent bits); relative error < 3e-7
    y = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(y * np.float32(1.44269504088896341) + np.float32(0.5))
    r = y - n * np.float32(0.693359375) - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * _f32_from_bits((np.int32(n) + 127) << 23)


# ---------------------------------------------------------------- Q80 activations


@dataclass
class Q80Activations:
    """Q80 activations for up to max_tokens rows of `cols` values, plus the matmul's scratch.

    Filled by quantize_activations (from f32) or activations_from_q80 (from received bytes);
    both give identical contents for the same data.
    """

    max_tokens: int
    cols: int
    qs: np.ndarray  # (max_tokens, nb, 32) int8: quantized values
    qs32: np.ndarray  # (max_tokens, nb, 8) uint32: the same bytes, 4 a word (the VNNI kernels' operand)
    d: np.ndarray  # (max_tokens, nb) f32: block scales (exact float16 values)
    dbits: np.ndarray  # (max_tokens, nb) uint16: the same scales as float16 bit patterns
    corr: np.ndarray  # (max_tokens, nb) int32: 8 * sum of the block's qs (folds the Q40 -8 offset)
    # tiles layout, per numba thread:
    isum: np.ndarray  # (slots, TILE) int16: integer block dot products
    wsf: np.ndarray  # (slots, TILE) f32: weight scales of one tile block
    wsu: np.ndarray  # (slots, TILE) uint32: wsf viewed as bits (written by the f16 -> f32 conversion)
    acc: np.ndarray  # (slots, max_tokens, TILE) f32: output accumulators of one tile
    # VNNI layout, per numba thread (T > 1): one row group's nibbles split once for all tokens
    unp: np.ndarray  # (slots, nb*8*16) int32, or (slots, 0) where simd_available() is False
    ws: np.ndarray  # (slots, nb*16) f32: that row group's scales
    # threaded matmuls: the next chunk of rows to claim (threads take chunks until none are left)
    next_chunk: np.ndarray  # (1,) int64


def new_activations(max_tokens: int, cols: int) -> Q80Activations:
    """Buffers for up to max_tokens rows of `cols` values (cols a multiple of 32)."""
    assert max_tokens >= 1 and cols > 0 and cols % QK == 0, f"max_tokens={max_tokens} cols={cols}"
    nb = cols // QK
    slots = numba.config.NUMBA_NUM_THREADS  # the most threads any launch can use
    wsf = np.zeros((slots, TILE), np.float32)  # (slots, TILE) f32
    qs = np.zeros((max_tokens, nb, QK), np.int8)  # (max_tokens, nb, 32) int8
    vnni = nb * 8 * VNNI_ROWS if simd_available() else 0
    return Q80Activations(
        max_tokens=max_tokens,
        cols=cols,
        qs=qs,
        qs32=qs.view(np.uint32),  # (max_tokens, nb, 8) uint32, same memory as qs
        d=np.zeros((max_tokens, nb), np.float32),  # (max_tokens, nb) f32
        dbits=np.zeros((max_tokens, nb), np.uint16),  # (max_tokens, nb) uint16
        corr=np.zeros((max_tokens, nb), np.int32),  # (max_tokens, nb) int32
        isum=np.zeros((slots, TILE), np.int16),  # (slots, TILE) int16
        wsf=wsf,
        wsu=wsf.view(np.uint32),  # (slots, TILE) uint32, same memory as wsf
        acc=np.zeros((slots, max_tokens, TILE), np.float32),  # (slots, max_tokens, TILE) f32
        unp=np.zeros((slots, vnni), np.int32),  # (slots, nb*8*16) int32
        ws=np.zeros((slots, vnni // 8), np.float32),  # (slots, nb*16) f32
        next_chunk=np.zeros(1, np.int64),
    )


@njit(cache=True)
def _quantize_acts(qs, d, dbits, corr, x, T):
    # x (T, nb*32) f32 -> qs (T, nb, 32) int8, d (T, nb) f32, dbits (T, nb) u16, corr (T, nb) i32
    # No fastmath: q must be roundf(x * (1/d)) in float32 exactly as GGML computes it.
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            db = _absmax32(x, t, b * QK) / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            s = 0
            for k in range(QK):
                q = np.int32(_roundf(x[t, b * QK + k] * inv))
                qs[t, b, k] = q
                s += q
            h = _f16_bits(db)
            dbits[t, b] = h
            d[t, b] = _f16_to_f32(h)
            corr[t, b] = 8 * s


@njit(cache=True)
def _load_q80(qs, d, dbits, corr, payload, T):
    # payload (T, nb*34) q80 bytes -> qs (T, nb, 32) int8, d (T, nb) f32, dbits (T, nb) u16, corr (T, nb) i32
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            h = np.int64(payload[t, o]) | (np.int64(payload[t, o + 1]) << 8)
            dbits[t, b] = h
            d[t, b] = _f16_value(h)
            s = 0
            for k in range(QK):
                q = np.int64(payload[t, o + 2 + k])
                q = q - 256 if q > 127 else q
                qs[t, b, k] = q
                s += q
            corr[t, b] = 8 * s


@njit(cache=True)
def _store_q80(payload, qs, dbits, T):
    # qs (T, nb, 32) int8, dbits (T, nb) u16 -> payload (T, nb*34) q80 bytes
    nb = qs.shape[1]
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            h = np.int64(dbits[t, b])
            payload[t, o] = h & 0xFF
            payload[t, o + 1] = h >> 8
            for k in range(QK):
                payload[t, o + 2 + k] = np.int64(qs[t, b, k]) & 0xFF


def quantize_activations(acts: Q80Activations, x: np.ndarray) -> None:
    """x (T, cols) f32 -> rows [0, T) of acts, with GGML Q8_0 semantics exactly."""
    assert x.ndim == 2 and x.shape[1] == acts.cols and x.shape[0] <= acts.max_tokens, (
        f"x {x.shape} for activations of {acts.max_tokens} x {acts.cols}"
    )
    assert x.dtype == np.float32, f"x dtype {x.dtype}"
    _quantize_acts(acts.qs, acts.d, acts.dbits, acts.corr, x, x.shape[0])


def activations_from_q80(acts: Q80Activations, payload: np.ndarray) -> None:
    """payload (T, cols//32*34) GGML Q8_0 bytes (e.g. received over MPI) -> rows [0, T) of acts."""
    nbytes = acts.cols // QK * Q80_BLOCK_BYTES
    assert payload.ndim == 2 and payload.shape[1] == nbytes and payload.shape[0] <= acts.max_tokens, (
        f"payload {payload.shape} for activations of {acts.max_tokens} x {acts.cols} ({nbytes} bytes a row)"
    )
    assert payload.dtype == np.uint8, f"payload dtype {payload.dtype}"
    _load_q80(acts.qs, acts.d, acts.dbits, acts.corr, payload, payload.shape[0])


def q80_bytes_from_activations(payload: np.ndarray, acts: Q80Activations, T: int) -> None:
    """rows [0, T) of acts -> payload (T, nb*34) GGML Q8_0 bytes (to send what was quantized)."""
    nbytes = acts.cols // QK * Q80_BLOCK_BYTES
    assert payload.dtype == np.uint8 and payload.shape == (T, nbytes), (
        f"payload {payload.dtype} {payload.shape}, expected uint8 ({T}, {nbytes})"
    )
    assert T <= acts.max_tokens, f"T={T} > max_tokens={acts.max_tokens}"
    _store_q80(payload, acts.qs, acts.dbits, T)


@njit(cache=True)
def _quantize_q80_into(payload, x):
    # x (T, nb*32) f32 -> payload (T, nb*34) q80 bytes (GGML Q8_0, byte for byte)
    T = x.shape[0]
    nb = x.shape[1] // QK
    for t in range(T):
        for b in range(nb):
            db = _absmax32(x, t, b * QK) / np.float32(127.0)
            inv = np.float32(1.0) / db if db != 0 else np.float32(0.0)
            bits = _f16_bits(db)
            o = b * Q80_BLOCK_BYTES
            payload[t, o] = bits & 0xFF
            payload[t, o + 1] = bits >> 8
            for k in range(QK):
                payload[t, o + 2 + k] = np.int32(_roundf(x[t, b * QK + k] * inv)) & 0xFF


def quantize_q80_into(payload: np.ndarray, x: np.ndarray) -> None:
    """x (T, n) f32 -> payload (T, n//32*34) uint8 GGML Q8_0 bytes (sync payloads)."""
    assert x.ndim == 2 and x.dtype == np.float32 and x.shape[1] % QK == 0, f"x {x.dtype} {x.shape}"
    assert payload.dtype == np.uint8 and payload.shape == (x.shape[0], x.shape[1] // QK * Q80_BLOCK_BYTES), (
        f"payload {payload.dtype} {payload.shape} for x {x.shape}"
    )
    _quantize_q80_into(payload, x)


@njit(cache=True, fastmath=True)
def _dequantize_q80_add(acc, payload):
    # acc (T, nb*32) f32 += dequant(payload (T, nb*34) q80)
    T = acc.shape[0]
    nb = acc.shape[1] // QK
    for t in range(T):
        for b in range(nb):
            o = b * Q80_BLOCK_BYTES
            d = np.float32(_f16_value(np.int64(payload[t, o]) | (np.int64(payload[t, o + 1]) << 8)))
            for k in range(QK):
                q = np.int64(payload[t, o + 2 + k])
                q = q - 256 if q > 127 else q
                acc[t, b * QK + k] += np.float32(q) * d


def dequantize_q80_add(acc: np.ndarray, payload: np.ndarray) -> None:
    """acc (T, n) f32 += dequantize(payload (T, n//32*34) q80): rank 0 sums partial results."""
    assert acc.ndim == 2 and acc.dtype == np.float32 and acc.shape[1] % QK == 0, f"acc {acc.dtype} {acc.shape}"
    assert payload.dtype == np.uint8 and payload.shape == (acc.shape[0], acc.shape[1] // QK * Q80_BLOCK_BYTES), (
        f"payload {payload.dtype} {payload.shape} for acc {acc.shape}"
    )
    _dequantize_q80_add(acc, payload)


# ---------------------------------------------------------------- Q40 weights




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
    """The layout pack_q40 picks on this machine: VNNI where the CPU has it, else tiles."""
    return LAYOUT_VNNI if simd_available() else LAYOUT_TILES


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
    if layout == LAYOUT_VNNI and not simd_available():
        raise MpillamaError(
            "the VNNI weight layout needs a CPU with AVX-512 VNNI, which numba does not target here: "
            "use the tiles layout (the default on this machine)"
        )
    if layout not in (LAYOUT_TILES, LAYOUT_VNNI):
        raise MpillamaError(f"unknown Q40 layout {layout!r}: use {LAYOUT_TILES!r} or {LAYOUT_VNNI!r}")
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


# -- tiles layout: plain numba (vectorised by LLVM, any CPU)

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


# -- VNNI layout


@njit(cache=True, fastmath=True, error_model="numpy")
def _store_rows(out, i, v, n):
    # v (16,) f32 -> out.flat[i : i + min(n, 16)]: the last row group may hold padded rows
    if n >= VNNI_ROWS:
        _vstore(out, i, v)
    else:
        _vstore_first(out, i, v, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_one(out, w, xq, xd, corr, rows, g_lo, g_hi):
    # w row groups [g_lo, g_hi) of (n_groups, nb, 288) q40 @ x (1, cols) q80 -> out (1, rows) f32
    # Per block and 16 rows: 8 vpdpbusd (the low nibbles of byte group k with activation word k,
    # the high nibbles with word 4+k, xq (T, nb, 8) uint32), minus the -8 offset's correction,
    # times row scale x activation scale, added to 16 float32 accumulators that stay in a register.
    # Unsigned nibbles times int8 activations sum to int32 exactly (|sum| <= 32*15*128).
    nb = w.shape[1]
    low = _vsplat_i32(0x0F0F0F0F)
    for g in range(g_lo, g_hi):
        acc = _vsplat_f32(0.0)
        for b in range(nb):
            o = (g * nb + b) * VNNI_BLOCK_BYTES
            s = _vsplat_i32(0)
            for k in range(4):
                v = _vload_i32(w, o + 64 * k)
                s = _vdpbusd(s, _vand(v, low), _vbroadcast32(xq, b * 8 + k))
                s = _vdpbusd(s, _vand(_vshr4(v), low), _vbroadcast32(xq, b * 8 + 4 + k))
            dot = _vtofloat(_vsub(s, _vsplat_i32(corr[0, b])))
            acc = _vfma(dot, _vmul(_vload_f16(w, o + 256), _vsplat_f32(xd[0, b])), acc)
        _store_rows(out, g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_split(unp, ws, w, g):
    # row group g of w (n_groups, nb, 288) -> unp (nb*8*16,) int32: per block 8 vectors of 16 lanes,
    # each lane 4 nibbles (one byte each); ws (nb*16,) f32: the 16 row scales of each block
    nb = w.shape[1]
    low = _vsplat_i32(0x0F0F0F0F)
    for b in range(nb):
        o = (g * nb + b) * VNNI_BLOCK_BYTES
        for k in range(4):
            v = _vload_i32(w, o + 64 * k)
            _vstore(unp, (b * 8 + k) * 16, _vand(v, low))
            _vstore(unp, (b * 8 + 4 + k) * 16, _vand(_vshr4(v), low))
        _vstore(ws, b * 16, _vload_f16(w, o + 256))


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_eight(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x rows [t, t+8) q80 -> out rows [t, t+8), lanes of group g
    # Eight tokens per pass: each nibble vector loaded once feeds eight dot products (16 registers).
    nb = xd.shape[1]
    z = _vsplat_f32(0.0)
    a0, a1, a2, a3, a4, a5, a6, a7 = z, z, z, z, z, z, z, z
    st = nb * 8  # one token's row in xq (T, nb, 8), flat
    for b in range(nb):
        zi = _vsplat_i32(0)
        s0, s1, s2, s3, s4, s5, s6, s7 = zi, zi, zi, zi, zi, zi, zi, zi
        x = (t * nb + b) * 8
        for k in range(8):
            u = _vload_i32(unp, (b * 8 + k) * 16)
            s0 = _vdpbusd(s0, u, _vbroadcast32(xq, x + k))
            s1 = _vdpbusd(s1, u, _vbroadcast32(xq, x + st + k))
            s2 = _vdpbusd(s2, u, _vbroadcast32(xq, x + 2 * st + k))
            s3 = _vdpbusd(s3, u, _vbroadcast32(xq, x + 3 * st + k))
            s4 = _vdpbusd(s4, u, _vbroadcast32(xq, x + 4 * st + k))
            s5 = _vdpbusd(s5, u, _vbroadcast32(xq, x + 5 * st + k))
            s6 = _vdpbusd(s6, u, _vbroadcast32(xq, x + 6 * st + k))
            s7 = _vdpbusd(s7, u, _vbroadcast32(xq, x + 7 * st + k))
        sc = _vload_f32(ws, b * 16)
        a0 = _vfma(_vtofloat(_vsub(s0, _vsplat_i32(corr[t, b]))), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(_vsub(s1, _vsplat_i32(corr[t + 1, b]))), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
        a2 = _vfma(_vtofloat(_vsub(s2, _vsplat_i32(corr[t + 2, b]))), _vmul(sc, _vsplat_f32(xd[t + 2, b])), a2)
        a3 = _vfma(_vtofloat(_vsub(s3, _vsplat_i32(corr[t + 3, b]))), _vmul(sc, _vsplat_f32(xd[t + 3, b])), a3)
        a4 = _vfma(_vtofloat(_vsub(s4, _vsplat_i32(corr[t + 4, b]))), _vmul(sc, _vsplat_f32(xd[t + 4, b])), a4)
        a5 = _vfma(_vtofloat(_vsub(s5, _vsplat_i32(corr[t + 5, b]))), _vmul(sc, _vsplat_f32(xd[t + 5, b])), a5)
        a6 = _vfma(_vtofloat(_vsub(s6, _vsplat_i32(corr[t + 6, b]))), _vmul(sc, _vsplat_f32(xd[t + 6, b])), a6)
        a7 = _vfma(_vtofloat(_vsub(s7, _vsplat_i32(corr[t + 7, b]))), _vmul(sc, _vsplat_f32(xd[t + 7, b])), a7)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)
    _store_rows(out, (t + 2) * rows + r0, a2, n)
    _store_rows(out, (t + 3) * rows + r0, a3, n)
    _store_rows(out, (t + 4) * rows + r0, a4, n)
    _store_rows(out, (t + 5) * rows + r0, a5, n)
    _store_rows(out, (t + 6) * rows + r0, a6, n)
    _store_rows(out, (t + 7) * rows + r0, a7, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_four(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x rows [t, t+4) q80 -> out rows [t, t+4), lanes of group g
    nb = xd.shape[1]
    z = _vsplat_f32(0.0)
    a0, a1, a2, a3 = z, z, z, z
    for b in range(nb):
        zi = _vsplat_i32(0)
        s0, s1, s2, s3 = zi, zi, zi, zi
        x = (t * nb + b) * 8  # xq (T, nb, 8) uint32, flat
        for k in range(8):
            u = _vload_i32(unp, (b * 8 + k) * 16)
            s0 = _vdpbusd(s0, u, _vbroadcast32(xq, x + k))
            s1 = _vdpbusd(s1, u, _vbroadcast32(xq, x + nb * 8 + k))
            s2 = _vdpbusd(s2, u, _vbroadcast32(xq, x + nb * 16 + k))
            s3 = _vdpbusd(s3, u, _vbroadcast32(xq, x + nb * 24 + k))
        sc = _vload_f32(ws, b * 16)
        a0 = _vfma(_vtofloat(_vsub(s0, _vsplat_i32(corr[t, b]))), _vmul(sc, _vsplat_f32(xd[t, b])), a0)
        a1 = _vfma(_vtofloat(_vsub(s1, _vsplat_i32(corr[t + 1, b]))), _vmul(sc, _vsplat_f32(xd[t + 1, b])), a1)
        a2 = _vfma(_vtofloat(_vsub(s2, _vsplat_i32(corr[t + 2, b]))), _vmul(sc, _vsplat_f32(xd[t + 2, b])), a2)
        a3 = _vfma(_vtofloat(_vsub(s3, _vsplat_i32(corr[t + 3, b]))), _vmul(sc, _vsplat_f32(xd[t + 3, b])), a3)
    r0, n = g * VNNI_ROWS, rows - g * VNNI_ROWS
    _store_rows(out, t * rows + r0, a0, n)
    _store_rows(out, (t + 1) * rows + r0, a1, n)
    _store_rows(out, (t + 2) * rows + r0, a2, n)
    _store_rows(out, (t + 3) * rows + r0, a3, n)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_single(out, xq, xd, corr, t, rows, g, unp, ws):
    # split row group g (unp, ws) @ x row t q80 -> out row t, lanes of group g
    nb = xd.shape[1]
    acc = _vsplat_f32(0.0)
    for b in range(nb):
        s = _vsplat_i32(0)
        for k in range(8):
            s = _vdpbusd(s, _vload_i32(unp, (b * 8 + k) * 16), _vbroadcast32(xq, (t * nb + b) * 8 + k))
        sc = _vmul(_vload_f32(ws, b * 16), _vsplat_f32(xd[t, b]))
        acc = _vfma(_vtofloat(_vsub(s, _vsplat_i32(corr[t, b]))), sc, acc)
    _store_rows(out, t * rows + g * VNNI_ROWS, acc, rows - g * VNNI_ROWS)


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_many(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws):
    # w row groups [g_lo, g_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32, T > 1 (prefill)
    # Each row group's nibbles are split once (into unp, ws: nb*576 bytes, in L1 or L2) and reused by
    # all T tokens, 8 at a time, instead of unpacking every weight again for every token.
    for g in range(g_lo, g_hi):
        _q40v_split(unp, ws, w, g)
        t = 0
        while t + 8 <= T:
            _q40v_eight(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 8
        if t + 4 <= T:
            _q40v_four(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 4
        while t < T:
            _q40v_single(out, xq, xd, corr, t, rows, g, unp, ws)
            t += 1


@njit(cache=True, fastmath=True, error_model="numpy")
def _q40v_run(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws):
    # w row groups [g_lo, g_hi) q40 @ x (T, cols) q80 -> out (T, rows) f32
    if T == 1:
        _q40v_one(out, w, xq, xd, corr, rows, g_lo, g_hi)
    else:
        _q40v_many(out, w, xq, xd, corr, T, rows, g_lo, g_hi, unp, ws)


@njit(cache=True, parallel=True)
def _q40v_parallel(out, w, xq, xd, corr, T, rows, n_threads, unp, ws, next_chunk):
    # w (n_groups, nb, 288) q40 @ x (T, cols) q80 -> out (T, rows) f32, VNNI_CHUNK row groups at a
    # time to whichever of n_threads is free
    n_groups = w.shape[0]
    n_chunks = -(-n_groups // VNNI_CHUNK)
    next_chunk[0] = 0
    for k in prange(min(n_threads, n_chunks, unp.shape[0])):
        c = _claim(next_chunk)
        while c < n_chunks:
            _q40v_run(out, w, xq, xd, corr, T, rows, c * VNNI_CHUNK, min(n_groups, (c + 1) * VNNI_CHUNK), unp[k], ws[k])
            c = _claim(next_chunk)


def matmul_q40(out: np.ndarray, m: Q40Matrix, acts: Q80Activations, T: int) -> None:
    """out (T, rows) f32 = W (rows, cols) q40 @ x[t] (cols,) q80 for t < T (decode T=1, prefill T>1)."""
    assert acts.cols == m.cols, f"activations have {acts.cols} columns, the matrix {m.cols}"
    assert 1 <= T <= acts.max_tokens, f"T={T}, activations hold {acts.max_tokens}"
    assert out.dtype == np.float32 and out.shape == (T, m.rows) and out.flags.c_contiguous, (
        f"out {out.dtype} {out.shape} (contiguous={out.flags.c_contiguous}), expected f32 ({T}, {m.rows})"
    )
    n_threads = numba.get_num_threads()
    if m.layout == LAYOUT_VNNI:
        assert acts.unp.shape[1] > 0, "these activations were made without the VNNI scratch (simd_available() is False)"
        if n_threads > 1:
            _q40v_parallel(out, m.qs, acts.qs32, acts.d, acts.corr, T, m.rows, n_threads, acts.unp, acts.ws,
                           acts.next_chunk)
        else:
            _q40v_run(out, m.qs, acts.qs32, acts.d, acts.corr, T, m.rows, 0, m.qs.shape[0], acts.unp[0], acts.ws[0])
    elif n_threads > 1:
        _q40_parallel(
            out, m.qs, m.d, acts.qs, acts.d, acts.corr, T, m.rows, n_threads,
            acts.isum, acts.wsf, acts.wsu, acts.acc, acts.next_chunk,
        )  # fmt: skip
    else:
        _q40_tiles(
            out, m.qs, m.d, acts.qs, acts.d, acts.corr, T, m.rows, 0, m.qs.shape[0],
            acts.isum[0], acts.wsf[0], acts.wsu[0], acts.acc[0],
        )  # fmt: skip


# ---------------------------------------------------------------- f32 matmul


@njit(cache=True, fastmath=True)
def _f32_rows(out, w, x, lo, hi):
    # w rows [lo, hi) (rows, cols) f32 @ x (1, cols) f32 -> out (1, rows) f32
    cols = w.shape[1]
    for r in range(lo, hi):
        s = np.float32(0.0)
        for i in range(cols):
            s += w[r, i] * x[0, i]
        out[0, r] = s


@njit(cache=True, parallel=True)
def _f32_rows_parallel(out, w, x, n_threads):
    # w (rows, cols) f32 @ x (1, cols) f32 -> out (1, rows) f32, row chunks over n_threads
    rows = w.shape[0]
    n_chunks = min(n_threads, rows)
    for k in prange(n_chunks):
        _f32_rows(out, w, x, k * rows // n_chunks, (k + 1) * rows // n_chunks)


def matmul_f32(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    """out (T, rows) f32 = x (T, cols) @ w (rows, cols).T (for --weight-type f32).

    T = 1 (decode, memory-bound) runs a numba kernel on numba's threads: as fast as BLAS and it
    honours configure(). T > 1 (prefill, compute-bound) uses numpy's BLAS, several times faster
    than a plain numba loop there; its threads follow OPENBLAS_NUM_THREADS, not configure().
    """
    # w (rows, cols) f32 @ x (T, cols) f32 -> out (T, rows) f32
    assert w.ndim == 2 and x.ndim == 2 and x.shape[1] == w.shape[1], f"w {w.shape} x {x.shape}"
    assert out.dtype == np.float32 and out.shape == (x.shape[0], w.shape[0]), f"out {out.dtype} {out.shape}"
    assert w.dtype == x.dtype == np.float32, f"w {w.dtype} x {x.dtype}"
    if x.shape[0] != 1:
        np.matmul(x, w.T, out=out)
        return
    n_threads = numba.get_num_threads()
    if n_threads > 1:
        _f32_rows_parallel(out, w, x, n_threads)
    else:
        _f32_rows(out, w, x, 0, w.shape[0])


# ---------------------------------------------------------------- rmsnorm, silu*mul, swiglu


@njit(cache=True, fastmath=True)
def _rmsnorm(out, x, weight, eps):
    # x (T, n) f32, weight (n,) f32 -> out (T, n) f32 = x / sqrt(mean(x^2) + eps) * weight (out may be x)
    T, n = x.shape
    for t in range(T):
        ss = 0.0  # float64 sum: exact enough for any n (fastmath lets LLVM vectorise it)
        for i in range(n):
            ss += np.float64(x[t, i]) * x[t, i]
        s = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * s * weight[i]


def rmsnorm(out: np.ndarray, x: np.ndarray, weight: np.ndarray, eps: float) -> None:
    """out (T, n) = x / sqrt(mean(x^2) + eps) * weight; out may alias x."""
    assert x.ndim == 2 and out.shape == x.shape and weight.shape == (x.shape[1],), (
        f"out {out.shape} x {x.shape} weight {weight.shape}"
    )
    assert out.dtype == x.dtype == weight.dtype == np.float32, f"{out.dtype} {x.dtype} {weight.dtype}"
    _rmsnorm(out, x, weight, eps)


@njit(cache=True, fastmath=True, error_model="numpy")
def _silu_mul(h1, h3):
    # h1 (T, n) f32, h3 (T, n) f32 -> h1 = silu(h1) * h3 (a vectorised exp: np.exp is a call per element)
    T, n = h1.shape
    for t in range(T):
        for i in range(n):
            a = h1[t, i]
            h1[t, i] = a / (np.float32(1.0) + _exp_f32(-a)) * h3[t, i]


@njit(cache=True, fastmath=True, error_model="numpy")
def _swiglu(out, h13):
    # h13 (T, 2n) f32 = [w1 rows | w3 rows] outputs -> out (T, n) f32 = silu(h13[:, :n]) * h13[:, n:]
    T, n = out.shape
    for t in range(T):
        for i in range(n):
            a = h13[t, i]
            out[t, i] = a / (np.float32(1.0) + _exp_f32(-a)) * h13[t, n + i]


def swiglu(out: np.ndarray, h13: np.ndarray) -> None:
    """out (T, n) = silu(h13[:, :n]) * h13[:, n:]: silu_mul straight from the stacked w1/w3 output."""
    assert h13.ndim == 2 and out.ndim == 2 and h13.shape == (out.shape[0], 2 * out.shape[1]), (
        f"out {out.shape} h13 {h13.shape}"
    )
    assert out.dtype == h13.dtype == np.float32, f"{out.dtype} {h13.dtype}"
    _swiglu(out, h13)


def silu_mul(h1: np.ndarray, h3: np.ndarray) -> None:
    """h1 (T, n) = silu(h1) * h3, in place."""
    assert h1.ndim == 2 and h1.shape == h3.shape, f"h1 {h1.shape} h3 {h3.shape}"
    assert h1.dtype == h3.dtype == np.float32, f"{h1.dtype} {h3.dtype}"
    _silu_mul(h1, h3)


# ---------------------------------------------------------------- rope


def rope_tables(
    head_dim: int, max_seq: int, theta: float, scaling: RopeScaling | None
) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables, each f32 (max_seq, head_dim//2): angle = position * frequency i (float64 inside)."""
    assert head_dim % 2 == 0 and max_seq >= 1, f"head_dim={head_dim} max_seq={max_seq}"
    freqs = rope_frequencies_ref(head_dim, theta, scaling)  # (hd/2,) f64, Llama 3.1 remap if scaling
    ang = np.arange(max_seq, dtype=np.float64)[:, None] * freqs[None, :]  # (max_seq, hd/2) f64
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


@njit(cache=True, fastmath=True)
def _rope(x, positions, cos, sin, halves):
    # x (T, n_heads, hd) f32 rotated in place by positions (T,), tables (max_seq, hd/2) f32
    # (the two layouts in separate loops, so that each vectorises)
    T, n_heads, hd = x.shape
    half = hd // 2
    for t in range(T):
        p = positions[t]
        for h in range(n_heads):
            if halves:
                for i in range(half):
                    a = x[t, h, i]
                    b = x[t, h, i + half]
                    x[t, h, i] = a * cos[p, i] - b * sin[p, i]
                    x[t, h, i + half] = a * sin[p, i] + b * cos[p, i]
            else:
                for i in range(half):
                    a = x[t, h, 2 * i]
                    b = x[t, h, 2 * i + 1]
                    x[t, h, 2 * i] = a * cos[p, i] - b * sin[p, i]
                    x[t, h, 2 * i + 1] = a * sin[p, i] + b * cos[p, i]


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray, halves: bool) -> None:
    """Rotate x (T, n_heads, head_dim) in place: pairs (2i, 2i+1), or halves (i, i + hd/2) (NeoX)."""
    assert x.ndim == 3 and x.dtype == np.float32 and positions.shape == (x.shape[0],), (
        f"x {x.dtype} {x.shape} positions {positions.shape}"
    )
    assert cos.shape == sin.shape and cos.shape[1] * 2 == x.shape[2], f"tables {cos.shape} for head_dim {x.shape[2]}"
    assert positions.size == 0 or (0 <= positions.min() and positions.max() < cos.shape[0]), (
        f"positions {positions.min()}..{positions.max()} outside the tables' {cos.shape[0]}"
    )
    _rope(x, positions, cos, sin, halves)


# ---------------------------------------------------------------- attention
#
# One token's attention reads every cached K and V row of its heads. The cache is (max_seq, n_kv,
# head_dim) per layer, so a row of all KV heads is contiguous and the memory is read at full speed
# only in position order: reading one KV head's column of the cache (stride n_kv*head_dim, the
# previous kernels' order) ran at ~6 GB/s here against ~29 in order, and neither software
# prefetch nor blocking by positions helped. So the kernels go position by position over all
# heads, taking 4 positions at once from the 4 quarters of the range (4 sequential streams; each
# K/V vector loaded once feeds up to 4 query heads x 4 positions, in registers), in three passes:
# scores, softmax (a vectorised exp), values. Threads split the positions of one decode token
# (each sums its share of the values, added up at the end) or the tokens of a prefill.
ATT_MIN_CHUNK = 256  # fewest positions per thread in a decode token worth a parallel launch


@njit(cache=True, fastmath=True, error_model="numpy", inline="always")
def _exp_neg(x):
    # exp(x) for x <= 0, and exactly 0 below -87 (where float32 exp is about to underflow)
    return _exp_f32(x) if x >= np.float32(-87.0) else np.float32(0.0)


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_scores(sc, q, k, t, a, b):
    # q[t] (n_heads, hd) . k[p] (n_kv, hd) for p in [a, b) -> sc (n_heads, >= b) f32, raw dot products
    # Position p = a + i + s*L (L = (b-a)//4, s = stream 0..3) goes to slot a + 4i + s; the last
    # (b-a) % 4 positions to their own slot. Query head h reads kv head h // group.
    nh, hd = q.shape[1], q.shape[2]
    nkv = k.shape[1]
    group = nh // nkv
    L = (b - a) // 4
    z = _vsplat_f32(0.0)
    for i in range(L):
        p = a + i
        for kv in range(nkv):
            for h0 in range(kv * group, kv * group + group, 4):  # up to 4 query heads of this kv head
                ng = min(4, kv * group + group - h0)
                a00, a01, a02, a03, a10, a11, a12, a13 = z, z, z, z, z, z, z, z
                a20, a21, a22, a23, a30, a31, a32, a33 = z, z, z, z, z, z, z, z
                for c in range(0, hd, 16):
                    k0 = _vload_row(k, p, kv, c)
                    k1 = _vload_row(k, p + L, kv, c)
                    k2 = _vload_row(k, p + 2 * L, kv, c)
                    k3 = _vload_row(k, p + 3 * L, kv, c)
                    x = _vload_row(q, t, h0, c)
                    a00, a01, a02, a03 = _vfma(x, k0, a00), _vfma(x, k1, a01), _vfma(x, k2, a02), _vfma(x, k3, a03)
                    if ng > 1:
                        x = _vload_row(q, t, h0 + 1, c)
                        a10, a11, a12, a13 = _vfma(x, k0, a10), _vfma(x, k1, a11), _vfma(x, k2, a12), _vfma(x, k3, a13)
                    if ng > 2:
                        x = _vload_row(q, t, h0 + 2, c)
                        a20, a21, a22, a23 = _vfma(x, k0, a20), _vfma(x, k1, a21), _vfma(x, k2, a22), _vfma(x, k3, a23)
                    if ng > 3:
                        x = _vload_row(q, t, h0 + 3, c)
                        a30, a31, a32, a33 = _vfma(x, k0, a30), _vfma(x, k1, a31), _vfma(x, k2, a32), _vfma(x, k3, a33)
                _vstore4(sc, h0, a + 4 * i, _vsum4(a00, a01, a02, a03))
                if ng > 1:
                    _vstore4(sc, h0 + 1, a + 4 * i, _vsum4(a10, a11, a12, a13))
                if ng > 2:
                    _vstore4(sc, h0 + 2, a + 4 * i, _vsum4(a20, a21, a22, a23))
                if ng > 3:
                    _vstore4(sc, h0 + 3, a + 4 * i, _vsum4(a30, a31, a32, a33))
    for p in range(a + 4 * L, b):
        for h in range(nh):
            acc = z
            for c in range(0, hd, 16):
                acc = _vfma(_vload_row(q, t, h, c), _vload_row(k, p, h // group, c), acc)
            sc[h, p] = _vhsum(acc)


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_softmax(sc, n, scale, h_lo, h_hi):
    # rows [h_lo, h_hi) of sc: raw scores in slots [0, n) -> softmax(scale * scores) weights
    for h in range(h_lo, h_hi):
        row = sc[h]
        m = row[0]
        for f in range(1, n):
            m = max(m, row[f])
        den = np.float32(0.0)
        for f in range(n):
            e = _exp_neg((row[f] - m) * scale)
            row[f] = e
            den += e
        inv = np.float32(1.0) / den
        for f in range(n):
            row[f] *= inv


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_values(dst, d, sc, v, a, b):
    # dst[d] (n_heads, hd) f32 += sum over p in [a, b) of weight(h, p) * v[p, h // group] (slots as in _att_scores)
    nh, hd = dst.shape[1], dst.shape[2]
    nkv = v.shape[1]
    group = nh // nkv
    L = (b - a) // 4
    z = _vsplat_f32(0.0)
    for i in range(L):
        p, f = a + i, a + 4 * i
        for kv in range(nkv):
            for h0 in range(kv * group, kv * group + group, 4):
                ng = min(4, kv * group + group - h0)
                w00, w01, w02, w03 = _vsplat_f32(sc[h0, f]), _vsplat_f32(sc[h0, f + 1]), _vsplat_f32(sc[h0, f + 2]), _vsplat_f32(sc[h0, f + 3])  # noqa: E501
                w10, w11, w12, w13, w20, w21, w22, w23, w30, w31, w32, w33 = z, z, z, z, z, z, z, z, z, z, z, z
                if ng > 1:
                    w10, w11, w12, w13 = _vsplat_f32(sc[h0 + 1, f]), _vsplat_f32(sc[h0 + 1, f + 1]), _vsplat_f32(sc[h0 + 1, f + 2]), _vsplat_f32(sc[h0 + 1, f + 3])  # noqa: E501
                if ng > 2:
                    w20, w21, w22, w23 = _vsplat_f32(sc[h0 + 2, f]), _vsplat_f32(sc[h0 + 2, f + 1]), _vsplat_f32(sc[h0 + 2, f + 2]), _vsplat_f32(sc[h0 + 2, f + 3])  # noqa: E501
                if ng > 3:
                    w30, w31, w32, w33 = _vsplat_f32(sc[h0 + 3, f]), _vsplat_f32(sc[h0 + 3, f + 1]), _vsplat_f32(sc[h0 + 3, f + 2]), _vsplat_f32(sc[h0 + 3, f + 3])  # noqa: E501
                for c in range(0, hd, 16):
                    v0 = _vload_row(v, p, kv, c)
                    v1 = _vload_row(v, p + L, kv, c)
                    v2 = _vload_row(v, p + 2 * L, kv, c)
                    v3 = _vload_row(v, p + 3 * L, kv, c)
                    o = _vload_row(dst, d, h0, c)
                    _vstore_row(dst, d, h0, c, _vfma(w03, v3, _vfma(w02, v2, _vfma(w01, v1, _vfma(w00, v0, o)))))
                    if ng > 1:
                        o = _vload_row(dst, d, h0 + 1, c)
                        _vstore_row(dst, d, h0 + 1, c, _vfma(w13, v3, _vfma(w12, v2, _vfma(w11, v1, _vfma(w10, v0, o)))))  # noqa: E501
                    if ng > 2:
                        o = _vload_row(dst, d, h0 + 2, c)
                        _vstore_row(dst, d, h0 + 2, c, _vfma(w23, v3, _vfma(w22, v2, _vfma(w21, v1, _vfma(w20, v0, o)))))  # noqa: E501
                    if ng > 3:
                        o = _vload_row(dst, d, h0 + 3, c)
                        _vstore_row(dst, d, h0 + 3, c, _vfma(w33, v3, _vfma(w32, v2, _vfma(w31, v1, _vfma(w30, v0, o)))))  # noqa: E501
    for p in range(a + 4 * L, b):
        for h in range(nh):
            w = _vsplat_f32(sc[h, p])
            for c in range(0, hd, 16):
                _vstore_row(dst, d, h, c, _vfma(w, _vload_row(v, p, h // group, c), _vload_row(dst, d, h, c)))


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_zero(dst, d):
    # dst[d] (n_heads, hd) = 0
    for h in range(dst.shape[1]):
        for c in range(0, dst.shape[2], 16):
            _vstore_row(dst, d, h, c, _vsplat_f32(0.0))


@njit(cache=True, fastmath=True, error_model="numpy")
def _att_token(out, q, k_cache, v_cache, t, n, sc):
    # q[t] (n_heads, hd) over cache positions [0, n) -> out[t] (n_heads, hd) f32; sc (n_heads, >= n) scratch
    _att_scores(sc, q, k_cache, t, 0, n)
    _att_softmax(sc, n, np.float32(1.0 / math.sqrt(q.shape[2])), 0, q.shape[1])
    _att_zero(out, t)
    _att_values(out, t, sc, v_cache, 0, n)


@njit(cache=True)
def _att_serial(out, q, k_cache, v_cache, pos0, T, sc):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, causal
    # sc (slots, n_heads, >= max_seq) scratch
    for t in range(T):
        _att_token(out, q, k_cache, v_cache, t, pos0 + t + 1, sc[0])


@njit(cache=True, parallel=True)
def _att_tokens_parallel(out, q, k_cache, v_cache, pos0, T, sc, n_chunks):
    # as _att_serial, tokens dealt round-robin to n_chunks threads (prefill)
    for c in prange(n_chunks):
        for t in range(c, T, n_chunks):
            _att_token(out, q, k_cache, v_cache, t, pos0 + t + 1, sc[c])


@njit(cache=True, parallel=True)
def _att_positions_parallel(out, q, k_cache, v_cache, t, n, sc, parts, n_chunks):
    # one token (decode): positions [0, n) split in n_chunks ranges over threads; each range's share of
    # the values goes to parts[c], summed at the end. sc (slots, n_heads, >= n): only sc[0] is used.
    s = sc[0]
    for c in prange(n_chunks):
        _att_scores(s, q, k_cache, t, c * n // n_chunks, (c + 1) * n // n_chunks)
    nh = q.shape[1]
    for c in prange(n_chunks):
        _att_softmax(s, n, np.float32(1.0 / math.sqrt(q.shape[2])), c * nh // n_chunks, (c + 1) * nh // n_chunks)
    for c in prange(n_chunks):
        _att_zero(parts, c)
        _att_values(parts, c, s, v_cache, c * n // n_chunks, (c + 1) * n // n_chunks)
    for h in range(nh):
        for i in range(q.shape[2]):
            acc = np.float32(0.0)
            for c in range(n_chunks):
                acc += parts[c, h, i]
            out[t, h, i] = acc


@dataclass
class AttentionScratch:
    """Scores and per-thread partial outputs for attention(), sized once from the slice."""

    scores: np.ndarray  # (slots, n_heads, max_seq) f32: one set of score rows per thread
    parts: np.ndarray  # (slots, n_heads, head_dim) f32: per-thread partial outputs of one decode token


def new_attention_scratch(max_seq: int, n_heads: int, head_dim: int) -> AttentionScratch:
    """Scratch for attention() over a cache of max_seq positions, for this rank's n_heads query heads."""
    assert max_seq >= 1 and n_heads >= 1 and head_dim >= 1, f"max_seq={max_seq} n_heads={n_heads} hd={head_dim}"
    slots = numba.get_num_threads()  # configure() has set the threads this run uses
    return AttentionScratch(
        scores=np.zeros((slots, n_heads, max_seq), np.float32),  # (slots, n_heads, max_seq) f32
        parts=np.zeros((slots, n_heads, head_dim), np.float32),  # (slots, n_heads, head_dim) f32
    )


# -- the online-softmax kernels: any head_dim (the vector kernels need multiples of 16)

@njit(cache=True, fastmath=True)
def _attend(out, q, k_cache, v_cache, pos0, t, h, group):
    # q (T, n_heads, hd), caches (max_seq, n_kv, hd) -> out[t, h] (hd,) f32 over positions [0, pos0+t]
    # Online softmax: the output row itself is the accumulator, so no scores scratch is needed.
    hd = q.shape[2]
    kv = h // group
    scale = np.float32(1.0 / math.sqrt(hd))
    o = out[t, h]
    qr = q[t, h]
    s = np.float32(0.0)
    for i in range(hd):
        s += qr[i] * k_cache[0, kv, i]
    m = s * scale  # running max of the scores
    den = np.float32(1.0)  # running sum of exp(score - m)
    for i in range(hd):
        o[i] = v_cache[0, kv, i]
    for p in range(1, pos0 + t + 1):
        s = np.float32(0.0)
        for i in range(hd):
            s += qr[i] * k_cache[p, kv, i]
        s *= scale
        if s > m:  # a new max: rescale what was summed so far
            c = np.exp(m - s)
            den *= c
            for i in range(hd):
                o[i] *= c
            m = s
        w = np.exp(s - m)
        den += w
        for i in range(hd):
            o[i] += w * v_cache[p, kv, i]
    inv = np.float32(1.0) / den
    for i in range(hd):
        o[i] *= inv


@njit(cache=True)
def _attention_serial(out, q, k_cache, v_cache, pos0, T):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, causal
    n_heads = q.shape[1]
    group = n_heads // k_cache.shape[1]
    for j in range(T * n_heads):
        _attend(out, q, k_cache, v_cache, pos0, j // n_heads, j % n_heads, group)


@njit(cache=True, parallel=True)
def _attention_parallel(out, q, k_cache, v_cache, pos0, T):
    # q (T, n_heads, hd) x caches (max_seq, n_kv, hd) -> out (T, n_heads, hd) f32, (token, head) over threads
    n_heads = q.shape[1]
    group = n_heads // k_cache.shape[1]
    for j in prange(T * n_heads):
        _attend(out, q, k_cache, v_cache, pos0, j // n_heads, j % n_heads, group)


def attention(
    out: np.ndarray,
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    pos0: int,
    T: int,
    scratch: AttentionScratch | None = None,
) -> None:
    """Causal grouped-query attention of T new tokens (positions pos0..pos0+T-1) over the KV cache.

    The caller has already written the T new k/v rows. Query head h reads kv head
    h // (n_heads // n_kv); scores are scaled by 1/sqrt(head_dim). Arrays may be views (e.g. a
    range of heads) as long as their last axis is contiguous. scratch =
    new_attention_scratch(max_seq, n_heads, head_dim), allocated once; without it each call
    allocates its own. head_dim not a multiple of 16 takes the slower online-softmax kernels.
    """
    assert q.ndim == 3 and q.shape[0] >= T and out.shape[1:] == q.shape[1:] and out.shape[0] >= T, (
        f"out {out.shape} q {q.shape} T={T}"
    )
    assert k_cache.shape == v_cache.shape and k_cache.shape[2] == q.shape[2], (
        f"k_cache {k_cache.shape} v_cache {v_cache.shape} q {q.shape}"
    )
    assert q.shape[1] % k_cache.shape[1] == 0, f"{q.shape[1]} query heads over {k_cache.shape[1]} kv heads"
    assert 0 <= pos0 and pos0 + T <= k_cache.shape[0], f"pos0={pos0} T={T} cache length {k_cache.shape[0]}"
    assert out.dtype == q.dtype == k_cache.dtype == v_cache.dtype == np.float32, "attention buffers must be f32"
    n_heads, hd = q.shape[1], q.shape[2]
    n_threads = numba.get_num_threads()
    unit = all(a.strides[2] == 4 for a in (out, q, k_cache, v_cache))
    if hd % 16 or not unit:
        kernel = _attention_parallel if n_threads > 1 else _attention_serial
        kernel(out, q, k_cache, v_cache, pos0, T)
        return
    if scratch is None:
        scratch = new_attention_scratch(pos0 + T, n_heads, hd)
    sc, parts = scratch.scores, scratch.parts
    assert sc.ndim == 3 and sc.shape[1] >= n_heads and sc.shape[2] >= pos0 + T and parts.shape[1:] == (n_heads, hd), (
        f"scratch {sc.shape} {parts.shape} for {n_heads} heads of {hd}, positions up to {pos0 + T}: "
        "use new_attention_scratch(max_seq, n_heads, head_dim)"
    )
    slots = min(n_threads, sc.shape[0])
    if T == 1 and slots > 1 and pos0 + 1 >= 2 * ATT_MIN_CHUNK:
        n_chunks = min(slots, (pos0 + 1) // ATT_MIN_CHUNK)
        _att_positions_parallel(out, q, k_cache, v_cache, 0, pos0 + 1, sc, parts, n_chunks)
    elif T > 1 and slots > 1:
        _att_tokens_parallel(out, q, k_cache, v_cache, pos0, T, sc, min(slots, T))
    else:
        _att_serial(out, q, k_cache, v_cache, pos0, T, sc)

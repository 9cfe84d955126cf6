"""numba's missing LLVM layer: a vector type, generic intrinsics on it, and the CPU check for x86's VNNI.

numba has no vector type, and LLVM never turns a plain loop into the dot-product instruction
that makes a Q40 kernel fast (bench/kernels.py --asm: the plain kernels top out at one 16-bit
multiply per weight-pair lane, vpmullw), nor keeps 16 attention accumulators in registers. So
the VNNI matmul and the attention kernels use a tiny vector type: _Vec is an LLVM vector
(<16 x i32> or <16 x float>) held in ordinary numba variables (registers after LLVM's mem2reg),
and each helper below is an @intrinsic emitting one LLVM instruction or two.

Everything here is generic LLVM IR, which LLVM lowers for any CPU (AVX-512 here, 4 NEON
registers on ARM). An architecture's own instructions live in that architecture's kernel file
(x86.py: vpdpbusd, arm.py: sdot), next to the kernels that use them: such a kernel is compiled
only when first called, and is only called where target.kernel_path() says the CPU has them
(for x86 from the check here, simd_available).
Also here: two scalar bit casts (float32 <-> int32, for bits.py) and _claim, the atomic counter
the threaded matmuls take their chunks of rows from.

Imports numba and llvmlite only. Registering the vector type's data model only defines a type.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from typing import Any

import numba
from llvmlite import binding as llvm_binding
from llvmlite import ir as llvm_ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model


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
    """True when numba compiles for an x86 CPU with AVX-512 VNNI (so the x86-vnni path can run, target.py).

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


def _masked_store(builder, v, p, mask):  # noqa: ANN001, ANN202
    """Store the lanes of the float32 vector v where mask (16 x i1) is set, at p (4-byte aligned)."""
    fnty = llvm_ir.FunctionType(llvm_ir.VoidType(), [_LL_VF, p.type, _LL_I32, mask.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.masked.store.v16f32.p0")
    builder.call(fn, [v, p, llvm_ir.Constant(_LL_I32, 4), mask])


@intrinsic
def _vstore_first(typingctx, arr, idx, v, n):  # noqa: ANN001, ANN202
    """Store lanes [0, n) of the float32 vector v at element idx of arr (a masked store)."""
    if _is_c_array(arr) and isinstance(idx, types.Integer) and v == _F32X16 and isinstance(n, types.Integer):
        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1], _LL_VF)
            nv = _splat(builder, context.cast(builder, args[3], sig.args[3], types.int32), _LL_VI)
            first_n = builder.icmp_signed("<", llvm_ir.Constant(_LL_VI, list(range(16))), nv)
            _masked_store(builder, args[2], p, first_n)
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
            first4 = llvm_ir.Constant(llvm_ir.VectorType(llvm_ir.IntType(1), 16), [1] * 4 + [0] * 12)
            _masked_store(builder, args[3], p, first4)
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

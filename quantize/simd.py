"""Sixteen-lane integer and float vectors inside numba kernels, for the dot products of the quant
formats.

LLVM's loop vectorizer turns the kernels' per-row loops into vector code, but it cannot form the one
instruction these formats want: VNNI's vpdpbusd, which multiplies four unsigned bytes by four signed
bytes in each 32-bit lane and adds the four products to the lane (llama.cpp's AVX-512 dot products
are built on it, or on vpmaddubsw where VNNI is missing). The types and intrinsics here let a kernel
say it directly, the way C code uses <immintrin.h>:

    acc = dpbusd(acc, band(w, LOW4), splat_i(x4))   # 16 rows x 4 values each

`VI` is <16 x i32>, `VF` is <16 x float>; they live in registers and never reach Python. `dpbusd`
compiles to vpdpbusd where the CPU has AVX512-VNNI; on an AVX2 CPU to vpmaddubsw and vpmaddwd on
each 256-bit half (llama.cpp's AVX2 dot products; `dpbusd_small` where a's bytes are below 128, one
pair of them, else two), and to plain vector IR (widen, multiply, add groups of four) elsewhere,
with the same result. Loads and stores take an array and a flat element index into it
(C-contiguous arrays only).

VNNI_KERNELS decides which kernels the formats compute with (registry.QuantFormat): their VNNI set
where it is true (a VNNI or AVX2 CPU), their portable set otherwise; HAVE_VNNI, whether dpbusd is
the vpdpbusd instruction. EDGESEEK_PORTABLE_KERNELS=1 makes both false, to run (or time) the
portable kernels on any CPU.
"""
from __future__ import annotations

import os

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LANES = 16
_FEATURES = ll.get_host_cpu_features()
CPU_HAS_VNNI = bool(_FEATURES.get("avx512vnni", False))
CPU_HAS_AVX2 = bool(_FEATURES.get("avx2", False))
# 32 vector registers of 512 bits: kernels with sixteen VF sums in flight fit them (AVX2's sixteen 256-bit
# registers hold four)
WIDE_VECTORS = bool(_FEATURES.get("avx512f", False))
PORTABLE_KERNELS = os.environ.get("EDGESEEK_PORTABLE_KERNELS", "").strip() not in ("", "0")
HAVE_VNNI = CPU_HAS_VNNI and not PORTABLE_KERNELS
# The formats' VNNI kernel set runs on AVX2 too, dpbusd made of vpmaddubsw and vpmaddwd there:
# 2-3.5x the portable kernels' speed on an AVX2 CPU (bench_kernels.py)
VNNI_KERNELS = (CPU_HAS_VNNI or CPU_HAS_AVX2) and not PORTABLE_KERNELS

_I32 = ir.IntType(32)
_F32 = ir.FloatType()
_VI = ir.VectorType(_I32, LANES)
_VF = ir.VectorType(_F32, LANES)


class VIType(types.Type):
    def __init__(self):
        super().__init__(name="VI16")


class VFType(types.Type):
    def __init__(self):
        super().__init__(name="VF16")


VI = VIType()
VF = VFType()


@register_model(VIType)
class _VIModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI)


@register_model(VFType)
class _VFModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _lane_ptr(context, builder, aryty, ary, index, vecty):
    """Pointer to element `index` (flat) of a C-contiguous array, cast to a vector pointer."""
    a = context.make_array(aryty)(context, builder, ary)
    p = builder.gep(a.data, [index])
    return builder.bitcast(p, vecty.as_pointer())


def _check_array(ary, kinds):
    if not isinstance(ary, types.Array) or ary.layout != "C" or ary.dtype not in kinds:
        raise TypeError(f"simd: needs a C-contiguous array of {kinds}, got {ary}")


_INTS = (types.int32, types.uint32)


@intrinsic
def load_i(typingctx, ary, index):
    """Lanes ary.flat[index : index + 16] of an int32 / uint32 array."""
    _check_array(ary, _INTS)

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(_lane_ptr(context, builder, sig.args[0], args[0], idx, _VI), align=4)

    return VI(ary, index), codegen


@intrinsic
def prefetch(typingctx, ary, index):
    """A hint that ary.flat[index]'s cache line is read soon (prefetcht0): a kernel streaming its
    weights asks for the lines a few blocks ahead, so that memory is read while it computes. The
    index may run past the array's end (a prefetch never faults)."""
    if not isinstance(ary, types.Array) or ary.layout != "C":
        raise TypeError(f"simd: prefetch needs a C-contiguous array, got {ary}")

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        a = context.make_array(sig.args[0])(context, builder, args[0])
        p = builder.bitcast(builder.gep(a.data, [idx]), cgutils.voidptr_t)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, _I32, _I32, _I32]),
                                            "llvm.prefetch.p0i8")
        builder.call(fn, [p, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
        return context.get_dummy_value()

    return types.none(ary, index), codegen


@intrinsic
def load_u8_pairs(typingctx, ary, index):
    """Bytes ary.flat[index : index + 32] of a uint8 array, zero-extended to 16-bit halves (vpmovzxbw):
    lane i holds byte 2i in its low half and byte 2i + 1 in its high half, as dpwssd reads them."""
    _check_array(ary, (types.uint8,))

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        v = builder.load(_lane_ptr(context, builder, sig.args[0], args[0], idx, ir.VectorType(ir.IntType(8), 2 * LANES)),
                         align=1)
        return builder.bitcast(builder.zext(v, ir.VectorType(ir.IntType(16), 2 * LANES)), _VI)

    return VI(ary, index), codegen


def _byte_loader(dtype, extend: str, doc: str):
    @intrinsic
    def load(typingctx, ary, index):
        _check_array(ary, (dtype,))

        def codegen(context, builder, sig, args):
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            v = builder.load(_lane_ptr(context, builder, sig.args[0], args[0], idx,
                                       ir.VectorType(ir.IntType(8), LANES)), align=1)
            return getattr(builder, extend)(v, _VI)

        return VI(ary, index), codegen

    load.__doc__ = doc
    return load


load_u8 = _byte_loader(types.uint8, "zext", "Bytes ary.flat[index : index + 16] of a uint8 array, zero-extended "
                                            "to 16 int32 lanes.")
load_i8 = _byte_loader(types.int8, "sext", "Bytes ary.flat[index : index + 16] of an int8 array, sign-extended "
                                           "to 16 int32 lanes.")


@intrinsic
def load_f(typingctx, ary, index):
    """Lanes ary.flat[index : index + 16] of a float32 array."""
    _check_array(ary, (types.float32,))

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(_lane_ptr(context, builder, sig.args[0], args[0], idx, _VF), align=4)

    return VF(ary, index), codegen


def _storer(kinds, vecty, doc: str):
    @intrinsic
    def store(typingctx, ary, index, v):
        _check_array(ary, kinds)

        def codegen(context, builder, sig, args):
            idx = context.cast(builder, args[1], sig.args[1], types.intp)
            builder.store(args[2], _lane_ptr(context, builder, sig.args[0], args[0], idx, vecty), align=4)
            return context.get_dummy_value()

        return types.none(ary, index, v), codegen

    store.__doc__ = doc
    return store


store_f = _storer((types.float32,), _VF, "ary.flat[index : index + 16] = v (float32 array).")
store_i = _storer(_INTS, _VI, "ary.flat[index : index + 16] = v (int32 / uint32 array).")


def _splat(builder, scalar, vecty):
    undef = ir.Constant(vecty, ir.Undefined)
    v = builder.insert_element(undef, scalar, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, undef, ir.Constant(ir.VectorType(_I32, LANES), [0] * LANES))


@intrinsic
def splat_i(typingctx, x):
    """All 16 lanes = the 32-bit integer x (its bits: an int8 quadruple packed in an int32 stays so)."""
    if not isinstance(x, types.Integer):
        raise TypeError("splat_i takes an integer")

    def codegen(context, builder, sig, args):
        v = args[0]
        if v.type.width != 32:
            v = builder.trunc(v, _I32) if v.type.width > 32 else builder.sext(v, _I32)
        return _splat(builder, v, _VI)

    return VI(x), codegen


@intrinsic
def splat_f(typingctx, x):
    """All 16 lanes = the float x (converted to float32)."""
    if not isinstance(x, types.Float):
        raise TypeError("splat_f takes a float")

    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return _splat(builder, v, _VF)

    return VF(x), codegen


@intrinsic
def zero_i(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VI, [0] * LANES)

    return VI(), codegen


@intrinsic
def zero_f(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF, [0.0] * LANES)

    return VF(), codegen


def _binary_i(op):
    @intrinsic
    def fn(typingctx, a, b):
        if a != VI or b != VI:
            raise TypeError(f"simd.{op} takes two VI vectors")

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(*args)

        return VI(a, b), codegen

    return fn


add_i = _binary_i("add")
sub_i = _binary_i("sub")
mul_i = _binary_i("mul")  # vpmulld: low 32 bits of each product
band = _binary_i("and_")
bor = _binary_i("or_")


def _shift(op):
    @intrinsic
    def fn(typingctx, a, n):
        if a != VI or not isinstance(n, types.Integer):
            raise TypeError(f"simd.{op} takes a VI vector and an integer shift")

        def codegen(context, builder, sig, args):
            count = context.cast(builder, args[1], sig.args[1], types.int32)
            return getattr(builder, op)(args[0], _splat(builder, count, _VI))

        return VI(a, n), codegen

    return fn


srl = _shift("lshr")  # logical shift right of each lane by a constant
sra = _shift("ashr")  # arithmetic shift right (a signed lane's sign kept)
sll = _shift("shl")


@intrinsic
def dpbusd(typingctx, acc, a, b):
    """acc + sum over the 4 bytes of each lane of (unsigned byte of a) * (signed byte of b)."""
    if acc != VI or a != VI or b != VI:
        raise TypeError("dpbusd takes three VI vectors")

    def codegen(context, builder, sig, args):
        return _dpbusd_ir(builder, *args)

    return VI(acc, a, b), codegen


def _dpbusd_ir(builder, acc_, a_, b_):
    if HAVE_VNNI:
        fnty = ir.FunctionType(_VI, [_VI, _VI, _VI])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")
        return builder.call(fn, [acc_, a_, b_])
    if CPU_HAS_AVX2:  # a's bytes as their low seven bits plus 128 times the top one: two exact halves
        seven = ir.Constant(_VI, [7] * LANES)
        top = builder.and_(builder.lshr(a_, seven), ir.Constant(_VI, [0x01010101] * LANES))
        high = _maddubs_ir(builder, ir.Constant(_VI, [0] * LANES), top, b_)
        low = builder.and_(a_, ir.Constant(_VI, [0x7F7F7F7F] * LANES))
        return _maddubs_ir(builder, builder.add(acc_, builder.shl(high, seven)), low, b_)
    # Portable: widen the 64 bytes to int32, multiply, add each lane's group of four.
    v64i8, v64i32 = ir.VectorType(ir.IntType(8), 64), ir.VectorType(_I32, 64)
    return _widened_ir(builder, acc_, builder.zext(builder.bitcast(a_, v64i8), v64i32),
                       builder.sext(builder.bitcast(b_, v64i8), v64i32))


def _widened_ir(builder, acc_, a32, b32):
    # acc + the four products of each lane's bytes, a and b already widened to <64 x i32>
    prod = builder.mul(a32, b32)
    undef = ir.Constant(prod.type, ir.Undefined)
    out = acc_
    for j in range(4):
        part = builder.shuffle_vector(prod, undef, ir.Constant(ir.VectorType(_I32, LANES),
                                                               [4 * i + j for i in range(LANES)]))
        out = builder.add(out, part)
    return out


# Q8_0's bytes (stored q + 128) multiply best as q on AVX2 without VNNI (dpbusd_centered)
Q8_CENTERED = CPU_HAS_AVX2 and not HAVE_VNNI


@intrinsic
def dpbusd_centered(typingctx, acc, a, b):
    """acc + sum over the 4 bytes of each lane of (unsigned byte of a - 128) * (signed byte of b),
    b's bytes in -127..127 (quantize_q8's): on AVX2 a's byte back to q = a ^ 0x80, then llama.cpp's
    AVX2 product of two signed bytes, vpmaddubsw of |q| with b's sign moved onto q's (vpsignb), then
    vpmaddwd by ones (2 x 128 x 127 < 2^15: exact); widened elsewhere."""
    if acc != VI or a != VI or b != VI:
        raise TypeError("dpbusd_centered takes three VI vectors")

    def codegen(context, builder, sig, args):
        acc_, a_, b_ = args
        v64i8 = ir.VectorType(ir.IntType(8), 64)
        q = builder.xor(builder.bitcast(a_, v64i8), ir.Constant(v64i8, [-128] * 64))
        b8 = builder.bitcast(b_, v64i8)
        if not CPU_HAS_AVX2:
            v64i32 = ir.VectorType(_I32, 64)
            return _widened_ir(builder, acc_, builder.sext(q, v64i32), builder.sext(b8, v64i32))
        v32i8 = ir.VectorType(ir.IntType(8), 32)
        sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32i8, [v32i8, v32i8]),
                                              "llvm.x86.avx2.psign.b")
        absq = builder.select(builder.icmp_signed("<", q, ir.Constant(v64i8, [0] * 64)), builder.neg(q), q)
        undef = ir.Constant(v64i8, ir.Undefined)
        halves = []
        for h in range(2):
            pick = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32)))
            halves.append(builder.call(sign, [builder.shuffle_vector(b8, undef, pick), builder.shuffle_vector(q, undef, pick)]))
        signed_b = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, 64), list(range(64))))
        return _maddubs_ir(builder, acc_, builder.bitcast(absq, _VI), builder.bitcast(signed_b, _VI))

    return VI(acc, a, b), codegen


@intrinsic
def dpbusd_small(typingctx, acc, a, b):
    """dpbusd where every byte of a is below 128 (nibbles, 5- and 6-bit levels): vpdpbusd on a VNNI
    CPU; on AVX2 vpmaddubsw (pairs of byte products summed into int16, which such bytes cannot
    overflow: 2 x 127 x 128 < 2^15) then vpmaddwd by ones (pairs of those into int32), on each
    256-bit half, as llama.cpp's AVX2 dot products do; the same result."""
    if acc != VI or a != VI or b != VI:
        raise TypeError("dpbusd_small takes three VI vectors")

    def codegen(context, builder, sig, args):
        if HAVE_VNNI or not CPU_HAS_AVX2:
            return _dpbusd_ir(builder, *args)
        return _maddubs_ir(builder, *args)

    return VI(acc, a, b), codegen


NIBBLE_PRODUCTS = 8  # dpbusd16 products of 4-bit bytes a partial sum holds before sum16: 8 x 2 x 15 x 128 < 2^15


@intrinsic
def dpbusd16(typingctx, t, a, b):
    """dpbusd into a partial sum t (from zero_i(), read only through sum16) where every byte of a
    is below 16 (nibbles), at most NIBBLE_PRODUCTS of them: on an AVX2 CPU without VNNI one
    vpmaddubsw into t's int16 pairs (which those products cannot overflow), the vpmaddwd that
    dpbusd_small makes of every product left to sum16, once for all of them; elsewhere dpbusd
    (t's lanes are then the int32 sums)."""
    if t != VI or a != VI or b != VI:
        raise TypeError("dpbusd16 takes three VI vectors")

    def codegen(context, builder, sig, args):
        t_, a_, b_ = args
        if HAVE_VNNI or not CPU_HAS_AVX2:
            return _dpbusd_ir(builder, t_, a_, b_)
        v64i8, v32i8 = ir.VectorType(ir.IntType(8), 64), ir.VectorType(ir.IntType(8), 32)
        v16i16, v32i16 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(ir.IntType(16), 32)
        maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i16, [v32i8, v32i8]),
                                                 "llvm.x86.avx2.pmadd.ub.sw")
        a8, b8, undef = builder.bitcast(a_, v64i8), builder.bitcast(b_, v64i8), ir.Constant(v64i8, ir.Undefined)
        pairs = [builder.call(maddubs, [builder.shuffle_vector(a8, undef, pick),
                                        builder.shuffle_vector(b8, undef, pick)])
                 for pick in (ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32))) for h in range(2))]
        both = builder.shuffle_vector(pairs[0], pairs[1], ir.Constant(ir.VectorType(_I32, 32), list(range(32))))
        return builder.bitcast(builder.add(builder.bitcast(t_, v32i16), both), _VI)

    return VI(t, a, b), codegen


@intrinsic
def sum16(typingctx, acc, t):
    """acc + the lane sums held by dpbusd16's partial sum t: on AVX2 without VNNI t's int16 pairs
    added into int32 by one vpmaddwd by ones; elsewhere acc + t."""
    if acc != VI or t != VI:
        raise TypeError("sum16 takes two VI vectors")

    def codegen(context, builder, sig, args):
        acc_, t_ = args
        if HAVE_VNNI or not CPU_HAS_AVX2:
            return builder.add(acc_, t_)
        return _maddwd_ir(builder, acc_, t_, ir.Constant(_VI, [0x00010001] * LANES))  # pairs times ones

    return VI(acc, t), codegen


@intrinsic
def dpwssd(typingctx, acc, a, b):
    """acc + in each lane the two products of a's and b's signed 16-bit halves (low by low, high by
    high): vpdpwssd where the CPU has AVX512-VNNI, vpmaddwd and an add on each 256-bit half on AVX2,
    widened vector IR elsewhere."""
    if acc != VI or a != VI or b != VI:
        raise TypeError("dpwssd takes three VI vectors")

    def codegen(context, builder, sig, args):
        acc_, a_, b_ = args
        if HAVE_VNNI:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VI, [_VI, _VI, _VI]),
                                                "llvm.x86.avx512.vpdpwssd.512")
            return builder.call(fn, [acc_, a_, b_])
        if CPU_HAS_AVX2:
            return _maddwd_ir(builder, acc_, a_, b_)
        v32i16 = ir.VectorType(ir.IntType(16), 2 * LANES)
        a16, b16 = builder.bitcast(a_, v32i16), builder.bitcast(b_, v32i16)
        v32i32 = ir.VectorType(_I32, 2 * LANES)
        prod = builder.mul(builder.sext(a16, v32i32), builder.sext(b16, v32i32))
        undef = ir.Constant(v32i32, ir.Undefined)
        even, odd = (builder.shuffle_vector(prod, undef, ir.Constant(ir.VectorType(_I32, LANES), list(range(h, 2 * LANES, 2))))
                     for h in range(2))
        return builder.add(acc_, builder.add(even, odd))

    return VI(acc, a, b), codegen


def _maddwd_ir(builder, acc_, a_, b_):
    # acc + the two products of each lane's signed 16-bit halves of a and b, by vpmaddwd on each
    # 256-bit half (AVX2): sum16's and dpwssd's
    v32i16, v16i16, v8i32 = (ir.VectorType(ir.IntType(16), 2 * LANES), ir.VectorType(ir.IntType(16), LANES),
                             ir.VectorType(_I32, LANES // 2))
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [v16i16, v16i16]),
                                            "llvm.x86.avx2.pmadd.wd")
    a16, b16, undef = builder.bitcast(a_, v32i16), builder.bitcast(b_, v32i16), ir.Constant(v32i16, ir.Undefined)
    halves = []
    for h in range(2):  # lanes 8h .. 8h + 7: halves 16h .. 16h + 15
        pick = ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES * h, LANES * h + LANES)))
        halves.append(builder.call(maddwd, [builder.shuffle_vector(a16, undef, pick),
                                            builder.shuffle_vector(b16, undef, pick)]))
    return builder.add(acc_, builder.shuffle_vector(halves[0], halves[1],
                                                    ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES)))))


def _maddubs_ir(builder, acc_, a_, b_):
    # acc + dpbusd's lane sums by vpmaddubsw and vpmaddwd (AVX2): exact where a's bytes are below 128
    v64i8, v32i8 = ir.VectorType(ir.IntType(8), 64), ir.VectorType(ir.IntType(8), 32)
    v16i16, v8i32 = ir.VectorType(ir.IntType(16), 16), ir.VectorType(_I32, 8)
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i16, [v32i8, v32i8]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    maddwd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [v16i16, v16i16]),
                                            "llvm.x86.avx2.pmadd.wd")
    a8, b8 = builder.bitcast(a_, v64i8), builder.bitcast(b_, v64i8)
    undef, ones = ir.Constant(v64i8, ir.Undefined), ir.Constant(v16i16, [1] * 16)
    halves = []
    for h in range(2):  # lanes 8h .. 8h + 7: bytes 32h .. 32h + 31
        pick = ir.Constant(ir.VectorType(_I32, 32), list(range(32 * h, 32 * h + 32)))
        pairs = builder.call(maddubs, [builder.shuffle_vector(a8, undef, pick), builder.shuffle_vector(b8, undef, pick)])
        halves.append(builder.call(maddwd, [pairs, ones]))
    both = builder.shuffle_vector(halves[0], halves[1], ir.Constant(ir.VectorType(_I32, LANES), list(range(LANES))))
    return builder.add(acc_, both)


def _cast(name: str, src, dst, op: str, doc: str):
    @intrinsic
    def fn(typingctx, a):
        if a != src:
            raise TypeError(f"simd.{name} takes a {src} vector")

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], _VF if dst is VF else _VI)

        return dst(a), codegen

    fn.__doc__ = doc
    return fn


to_f = _cast("to_f", VI, VF, "sitofp", "int32 lanes -> float32 lanes.")
to_i = _cast("to_i", VF, VI, "fptosi", "float32 lanes holding integers -> int32 lanes.")
as_f = _cast("as_f", VI, VF, "bitcast", "int32 lanes reinterpreted as the bits of float32 lanes.")


def _binary_f(op):
    @intrinsic
    def fn(typingctx, a, b):
        if a != VF or b != VF:
            raise TypeError(f"simd.{op} takes two VF vectors")

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(*args)

        return VF(a, b), codegen

    return fn


add_f = _binary_f("fadd")
sub_f = _binary_f("fsub")
mul_f = _binary_f("fmul")
div_f = _binary_f("fdiv")


@intrinsic
def rint_f(typingctx, a):
    """Each lane rounded to the nearest integer, ties to even (still float32)."""
    if a != VF:
        raise TypeError("rint_f takes a VF vector")

    def codegen(context, builder, sig, args):
        f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VF, [_VF]), "llvm.rint.v16f32")
        return builder.call(f, args)

    return VF(a), codegen


@intrinsic
def max_f(typingctx, a, b):
    """The larger of each pair of lanes (b where either is NaN)."""
    if a != VF or b != VF:
        raise TypeError("max_f takes two VF vectors")

    def codegen(context, builder, sig, args):
        return builder.select(builder.fcmp_ordered(">", args[0], args[1]), args[0], args[1])

    return VF(a, b), codegen


@intrinsic
def zero_below(typingctx, x, t, y):
    """y's lanes where x's lane is at least the float32 t, 0 where it is below (or NaN)."""
    if x != VF or y != VF or not isinstance(t, types.Float):
        raise TypeError("zero_below takes a VF vector, a float and a VF vector")

    def codegen(context, builder, sig, args):
        return _select_ge(context, builder, sig, args[0], args[1], args[2], ir.Constant(_VF, None))

    return VF(x, t, y), codegen


def _select_ge(context, builder, sig, x, t, a, b):
    # a's lanes where x's lane >= the float t (the intrinsic's second argument, sig.args[1]), else b's
    limit = _splat(builder, context.cast(builder, t, sig.args[1], types.float32), _VF)
    return builder.select(builder.fcmp_ordered(">=", x, limit), a, b)


@intrinsic
def pick_ge(typingctx, x, t, a, b):
    """a's lanes where x's lane is at least the float32 t, b's where it is below (or NaN)."""
    if x != VF or a != VF or b != VF or not isinstance(t, types.Float):
        raise TypeError("pick_ge takes a VF vector, a float and two VF vectors")

    def codegen(context, builder, sig, args):
        return _select_ge(context, builder, sig, *args)

    return VF(x, t, a, b), codegen


_U16 = (types.uint16,)


@intrinsic
def load_h(typingctx, ary, index):
    """Lanes ary.flat[index : index + 16] of a uint16 array holding IEEE half floats (a float16
    array's view), widened to float32 (vcvtph2ps where the CPU has F16C or AVX-512)."""
    _check_array(ary, _U16)

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        v = builder.load(_lane_ptr(context, builder, sig.args[0], args[0], idx,
                                   ir.VectorType(ir.IntType(16), LANES)), align=2)
        return builder.fpext(builder.bitcast(v, ir.VectorType(ir.HalfType(), LANES)), _VF)

    return VF(ary, index), codegen


@intrinsic
def store_h(typingctx, ary, index, v):
    """ary.flat[index : index + 16] = v rounded to IEEE half floats (nearest, ties to even: numpy's
    float32 -> float16), into a uint16 array (a float16 array's view); vcvtps2ph where the CPU has
    F16C or AVX-512."""
    _check_array(ary, _U16)
    if v != VF:
        raise TypeError("store_h stores a VF vector")

    def codegen(context, builder, sig, args):
        idx = context.cast(builder, args[1], sig.args[1], types.intp)
        halves = builder.bitcast(builder.fptrunc(args[2], ir.VectorType(ir.HalfType(), LANES)),
                                 ir.VectorType(ir.IntType(16), LANES))
        builder.store(halves, _lane_ptr(context, builder, sig.args[0], args[0], idx, ir.VectorType(ir.IntType(16), LANES)),
                      align=2)
        return context.get_dummy_value()

    return types.none(ary, index, v), codegen


@intrinsic
def hsum_f(typingctx, a):
    """The sum of the 16 lanes (a float32), pairwise: the upper half of the lanes added to the lower
    half until one is left (4 dependent adds where a lane-by-lane chain takes 15: a one-token
    attention's score takes one sum per head and position)."""
    if a != VF:
        raise TypeError("hsum_f takes a VF vector")

    def codegen(context, builder, sig, args):
        v, n = args[0], LANES
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(_I32, 0))

    return types.float32(a), codegen


@intrinsic
def at_address(typingctx, addr):
    """An int64 address (numpy's `a.ctypes.data`) as a void pointer, for numba.carray: a kernel can
    then take any number of arrays of one kind as a table of addresses (a tuple of arrays compiles
    one kernel per length). The caller keeps the arrays alive for the call."""
    if addr != types.int64:
        return None

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


EXP_LOW = np.float32(-87.3)  # exp_f's lanes below this are 0


@njit(fastmath=True, cache=True, inline="always")
def exp_f(x):
    """e**x in each lane, for a softmax's shifted scores (x <= 0), 16 at a time where numba calls
    libm's expf lane by lane (no SVML here): Cephes' expf, x = n ln2 + r, a degree-6 polynomial in r,
    2**n built in the exponent bits; within 3e-7 of e**x relative (numpy's float32 exp: 2e-7), and 0
    below EXP_LOW, where float32 turns subnormal."""
    c = max_f(x, splat_f(EXP_LOW))
    n = rint_f(mul_f(c, splat_f(np.float32(1.44269504088896341))))
    r = sub_f(sub_f(c, mul_f(n, splat_f(np.float32(0.693359375)))), mul_f(n, splat_f(np.float32(-2.12194440e-4))))
    p = splat_f(np.float32(1.9875691500e-4))
    p = add_f(mul_f(p, r), splat_f(np.float32(1.3981999507e-3)))
    p = add_f(mul_f(p, r), splat_f(np.float32(8.3334519073e-3)))
    p = add_f(mul_f(p, r), splat_f(np.float32(4.1665795894e-2)))
    p = add_f(mul_f(p, r), splat_f(np.float32(1.6666665459e-1)))
    p = add_f(mul_f(p, r), splat_f(np.float32(5.0000001201e-1)))
    y = add_f(add_f(mul_f(mul_f(p, r), r), r), splat_f(np.float32(1.0)))
    return zero_below(x, EXP_LOW, mul_f(y, as_f(sll(add_i(to_i(n), splat_i(np.int32(127))), 23))))

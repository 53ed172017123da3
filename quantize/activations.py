"""8-bit activations for the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), as llama.cpp's
CPU backend quantizes them before every integer dot product (ggml-cpu/arch/x86/quants.c,
quantize_row_q8_0 / quantize_row_q8_1): per block of 32 values, amax = max|x|, d = amax / 127,
q = round-half-even(x * (127 / amax)), d stored as fp16; Q8_1 adds s = fp16(d * sum(q)) for the
formats with a min (d unrounded there, as in llama.cpp). Multiplying with the same activations
keeps edgeseek's results within float rounding of llama.cpp's.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

QK = 32  # values per block
F32 = np.float32


@intrinsic
def f32_from_bits(typingctx, bits):
    """uint32 bit pattern -> float32 (numba has no scalar view)."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


class Q8Activations(NamedTuple):
    q: np.ndarray  # (T, K) int8 (int32 for the kernels: a broadcast load per value, no widening)
    d: np.ndarray  # (T, K/32) float32: fp16-rounded scale of each block
    sums: np.ndarray  # (T, K/32) int32: sum(q) of each block, exact (offsets of Q4_0, Q5_0)
    s: np.ndarray  # (T, K/32) float32: Q8_1's fp16(d * sum(q)) (min terms of Q4_1, Q5_1)


@intrinsic
def fp16_round(typingctx, f):
    """float32 -> the nearest fp16 value (round half to even, overflow to inf), as float32:
    LLVM's fptrunc to half and back (vcvtps2ph / vcvtph2ps with F16C)."""
    if f != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.float32), codegen


@njit(cache=True, inline="always")
def _quantize_row(x, q, d, sums, s):
    # x (K,) float32 -> q (K,) int8 or int32; d, sums, s (K/32,)
    bits = x.view(np.uint32)
    for b in range(x.shape[0] // QK):
        top = np.uint32(0)  # max |x| through the bits: ordered as integers, and an integer max vectorizes
        for j in range(QK * b, QK * b + QK):
            top = max(top, np.uint32(bits[j] & np.uint32(0x7FFFFFFF)))
        amax = f32_from_bits(top)
        db = amax / F32(127.0)
        idn = F32(127.0) / amax if amax != 0 else F32(0.0)
        tot = np.int32(0)
        for j in range(QK * b, QK * b + QK):
            v = np.int32(np.rint(x[j] * idn))
            q[j] = v
            tot = np.int32(tot + v)
        d[b] = fp16_round(db)
        sums[b] = tot
        s[b] = fp16_round(db * F32(tot))


@njit(parallel=True, cache=True)
def _quantize_rows(x, dtype):
    # x (T, K)
    nb = x.shape[1] // QK
    q = np.empty(x.shape, dtype)
    d, sums, s = np.empty((x.shape[0], nb), np.float32), np.empty((x.shape[0], nb), np.int32), np.empty((x.shape[0], nb), np.float32)
    for t in prange(x.shape[0]):
        _quantize_row(x[t], q[t], d[t], sums[t], s[t])
    return q, d, sums, s


@njit(cache=True, inline="always")
def rms_norm_row(x, w, eps, out):
    """out = x / rms(x) * w for one row of float32 (eps float32): the mean of squares summed in
    float64 as llama.cpp's ggml_compute_forward_rms_norm does, the scale applied in float32. The
    CPU backend's norm and the norm made with the activations (quantize_q8's norm) both run it."""
    k = x.shape[0]
    s = 0.0
    for i in range(k):
        s += np.float64(x[i]) * np.float64(x[i])
    scale = F32(1.0) / F32(np.sqrt(F32(s / k) + eps))
    for i in range(k):
        out[i] = x[i] * scale * w[i]


@njit(cache=True)
def q8_rows(x, norm_w, eps, dtype):
    """A few rows' 8-bit activations inside a kernel's own call (the formats' row kernels: the
    activations and the product in one call): quantize_q8's, row by row on one core, of
    rms_norm(x) * norm_w where norm_w has values (the rows' norm), else of x (T, K)."""
    T, K = x.shape
    nb = K // QK
    q = np.empty((T, K), dtype)
    d, sums, s = np.empty((T, nb), np.float32), np.empty((T, nb), np.int32), np.empty((T, nb), np.float32)
    y = np.empty(K, np.float32)
    for t in range(T):
        if norm_w.shape[0] == 0:
            _quantize_row(x[t], q[t], d[t], sums[t], s[t])
        else:
            rms_norm_row(x[t], norm_w, eps, y)
            _quantize_row(y, q[t], d[t], sums[t], s[t])
    return q, d, sums, s


NO_NORM = np.zeros(0, np.float32)  # a row kernel's norm weight where the product has no norm
FEW_ROWS = 4  # rows up to which the row kernels run (a speculative verification's)
FEW_VALUES = 8192  # values up to which quantize_q8 quantizes rows on one core (a verification's four rows of
# V2-Lite's 2048; its per-head products' 4 x 16 rows of 128)


def quantize_q8(x: np.ndarray, dtype=np.int8, norm=None) -> Q8Activations:
    """x (T, K) or (K,) float32 -> Q8Activations with leading dimension T (1 for a vector).
    dtype int32 gives the values widened, as the kernels read them. x may come with its norm,
    norm = (weight, eps): the activations of rms_norm(x) * weight, made in the same call (a decode
    step's vector, or a verification's few rows)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"activation length {x.shape[-1]} is not a multiple of {QK}")
    if norm is None and x.ndim == 2 and x.size > FEW_VALUES:  # a prompt's rows, on both cores
        return Q8Activations(*_quantize_rows(x, np.dtype(dtype)))
    # a vector, a verification's rows (or its heads'), or rows with their norm: on one core, where
    # a parallel region costs more than the work
    w, eps = norm if norm is not None else (NO_NORM, 0.0)
    return Q8Activations(*q8_rows(x.reshape(-1, x.shape[-1]), np.ascontiguousarray(w, dtype=np.float32), F32(eps),
                                  np.dtype(dtype)))


# --- the activation arguments of the kernels (registry.TileKernels) ----------------------------


# Each takes quantize_q8's prologue (norm=) for a vector: PROLOGUES.


def ints(x: np.ndarray, **prologue) -> tuple:
    """The portable kernels' (q (T, K) int32, d, sums, s)."""
    return tuple(quantize_q8(x, np.int32, **prologue))


def words(x: np.ndarray, **prologue) -> tuple:
    """The simd.dpbusd kernels' (q as int32 words of four int8 (T, K / 4), d, sums): formats with
    an offset (Q4_0, Q5_0)."""
    a = quantize_q8(x, np.int8, **prologue)
    return a.q.view(np.int32), a.d, a.sums


def words_min(x: np.ndarray, **prologue) -> tuple:
    """As words, with Q8_1's s in place of the sums: formats with a min (Q5_1)."""
    a = quantize_q8(x, np.int8, **prologue)
    return a.q.view(np.int32), a.d, a.s


PROLOGUES = frozenset({ints, words, words_min})  # the activation makers that take a prologue


@njit(cache=True, inline="always")
def x16(xq, k, j):
    """Activation j of row k of xq (T, K) int32, through int16: tells LLVM the int8 values fit
    vpmaddwd."""
    return np.int32(np.int16(xq[k, j]))

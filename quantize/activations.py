"""8-bit activations for the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), as llama.cpp's
CPU backend quantizes them before every integer dot product (ggml-cpu/arch/x86/quants.c,
quantize_row_q8_0 / quantize_row_q8_1): per block of 32 values, amax = max|x|, d = amax / 127,
q = round-half-even(x * (127 / amax)), d stored as fp16; Q8_1 adds s = fp16(d * sum(q)) for the
formats with a min (d unrounded there, as in llama.cpp). Multiplying with the same activations
keeps edgeseek's results within float rounding of llama.cpp's.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

QK = 32  # values per block
F32 = np.float32


class Q8Activations(NamedTuple):
    q: np.ndarray  # (T, K) int8 (int32 for the kernels: a broadcast load per value, no widening)
    d: np.ndarray  # (T, K/32) float32: fp16-rounded scale of each block
    sums: np.ndarray  # (T, K/32) int32: sum(q) of each block, exact (offsets of Q4_0, Q5_0)
    s: np.ndarray  # (T, K/32) float32: Q8_1's fp16(d * sum(q)) (min terms of Q4_1, Q5_1)


@njit(cache=True, inline="always")
def fp16_round(f):
    """float32 -> the nearest fp16 value (round half to even, overflow to inf), as float32."""
    a = abs(np.float64(f))
    if not a < 65520.0:  # rounds to infinity (or is nan)
        return F32(f * np.inf) if a == a else F32(f)
    if a < 6.103515625e-05:  # fp16 subnormal: steps of 2**-24
        step = 5.960464477539063e-08
    else:
        step = math.ldexp(1.0, math.frexp(a)[1] - 11)  # 11 significant bits
    return F32(math.copysign(np.rint(a / step) * step, f))


@njit(cache=True, inline="always")
def _quantize_row(x, q, d, sums, s):
    # x (K,) float32 -> q (K,) int8 or int32; d, sums, s (K/32,)
    for b in range(x.shape[0] // QK):
        amax = F32(0.0)
        for j in range(QK * b, QK * b + QK):
            amax = max(amax, abs(x[j]))
        db = amax / F32(127.0)
        idn = F32(127.0) / amax if amax != 0 else F32(0.0)
        tot = 0
        for j in range(QK * b, QK * b + QK):
            v = np.int32(np.rint(x[j] * idn))
            q[j] = v
            tot += v
        d[b] = fp16_round(db)
        sums[b] = tot
        s[b] = fp16_round(db * F32(tot))


@njit(cache=True)
def _quantize_one(x, q, d, sums, s):
    _quantize_row(x[0], q[0], d[0], sums[0], s[0])


@njit(parallel=True, cache=True)
def _quantize_rows(x, q, d, sums, s):
    for t in prange(x.shape[0]):
        _quantize_row(x[t], q[t], d[t], sums[t], s[t])


def quantize_q8(x: np.ndarray, dtype=np.int8) -> Q8Activations:
    """x (T, K) or (K,) float32 -> Q8Activations with leading dimension T (1 for a vector).
    dtype int32 gives the values widened, as the kernels read them."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    x = x.reshape(1, -1) if x.ndim == 1 else x
    t, k = x.shape
    if k % QK:
        raise ValueError(f"activation length {k} is not a multiple of {QK}")
    q = np.empty((t, k), dtype)
    d = np.empty((t, k // QK), np.float32)
    sums = np.empty((t, k // QK), np.int32)
    s = np.empty((t, k // QK), np.float32)
    (_quantize_one if t == 1 else _quantize_rows)(x, q, d, sums, s)
    return Q8Activations(q, d, sums, s)

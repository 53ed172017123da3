"""8-bit activations for the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), as llama.cpp's
CPU backend quantizes them before every integer dot product (ggml-cpu quantize_row_q8_0 / q8_1,
x86 path): per 32 values, id = 127 / max|x|, q = round-to-nearest-even(x * id), the scale
d = max|x| / 127 stored as fp16, and for Q8_1 s = fp16(d * sum(q)) for the formats with a min.
Multiplying with the same activations keeps edgeseek's results close to llama.cpp's.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquants import f16_to_f32, f32_to_f16

QK = 32


@njit(cache=True)
def _quantize_block(x, q):
    # x (32,) float32 -> q (32,) int8; returns (d as fp16-rounded float32, d * sum(q) fp16-rounded)
    amax = np.float32(0.0)
    for j in range(QK):
        a = abs(x[j])
        if a > amax:
            amax = a
    d = amax / np.float32(127.0)
    idn = np.float32(127.0) / amax if amax != 0 else np.float32(0.0)
    s = 0
    for j in range(QK):
        v = np.int32(np.rint(x[j] * idn))
        q[j] = v
        s += v
    return f16_to_f32(f32_to_f16(d)), f16_to_f32(f32_to_f16(d * np.float32(s)))


@njit(cache=True)
def _quantize_rows(x, q, d, s):
    # one vector (decode) is a few microseconds of work: no thread hand-off
    nb = x.shape[1] // QK
    for i in range(x.shape[0] * nb):
        t, b = i // nb, i % nb
        d[t, b], s[t, b] = _quantize_block(x[t, QK * b: QK * (b + 1)], q[t, QK * b: QK * (b + 1)])


@njit(parallel=True, cache=True)
def _quantize_rows_parallel(x, q, d, s):
    nb = x.shape[1] // QK
    for i in prange(x.shape[0] * nb):
        t, b = i // nb, i % nb
        d[t, b], s[t, b] = _quantize_block(x[t, QK * b: QK * (b + 1)], q[t, QK * b: QK * (b + 1)])


def quantize_q8(x: np.ndarray):
    """x (T, K) float32 -> q (T, K) int8, d (T, K/32) float32, s (T, K/32) float32 (Q8_1's d*sum)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    t, k = x.shape
    if k % QK:
        raise ValueError(f"activation length {k} is not a multiple of {QK}")
    q = np.empty((t, k), np.int8)
    d = np.empty((t, k // QK), np.float32)
    s = np.empty((t, k // QK), np.float32)
    (_quantize_rows_parallel if t * k >= 65536 else _quantize_rows)(x, q, d, s)
    return q, d, s

"""Q8_K: the 8-bit activations the K-quant kernels multiply with, as llama.cpp's CPU backend does.

llama.cpp quantizes the activation vector to Q8_K before every Q4_K/Q5_K/Q6_K dot product
(ggml-quants.c quantize_row_q8_K_ref; ggml-cpu uses it unchanged on x86): per 256 values one
float32 d = max / -127 of the value of largest magnitude, int8 q = nearest(x / d) (at most 127), and
the sum of every 16 q (int16 `bsums`), which the kernels use for the min term of Q4_K/Q5_K and the
-32 offset of Q6_K. Computing with the same activations keeps edgeseek's products close to
llama.cpp's.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquants import F32, QK_K, nearest_int


@njit(cache=True)
def _quantize_block(x, qs, bsums):
    # x (256,) float32 -> qs (256,) int8, bsums (16,) int32; returns d
    amax = F32(0.0)
    xmax = F32(0.0)
    for j in range(QK_K):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            xmax = x[j]
    if amax == 0:
        qs[:] = 0
        bsums[:] = 0
        return F32(0.0)
    iscale = F32(-127.0) / xmax
    for j in range(QK_K):
        qs[j] = min(127, nearest_int(iscale * x[j]))
    for j in range(QK_K // 16):
        s = 0
        for i in range(16):
            s += qs[16 * j + i]
        bsums[j] = s
    return F32(1.0) / iscale


@njit(parallel=True, cache=True)
def _quantize_rows(x, qs, d, bsums):
    # x (T, K) float32 -> qs (T, K) int8, d (T, K // 256) float32, bsums (T, K // 16) int32
    nb = x.shape[1] // QK_K
    for t in prange(x.shape[0] * nb):
        r, i = t // nb, t % nb
        d[r, i] = _quantize_block(x[r, QK_K * i: QK_K * (i + 1)], qs[r, QK_K * i: QK_K * (i + 1)],
                                  bsums[r, 16 * i: 16 * (i + 1)])


@njit(cache=True)
def _quantize_row(x, qs, d, bsums):
    # _quantize_rows of one row, on one core: a decode step's vector is a few blocks, and a
    # parallel region costs more than they do (a V2-Lite step quantizes some 130 of them)
    nb = x.shape[1] // QK_K
    for i in range(nb):
        d[0, i] = _quantize_block(x[0, QK_K * i: QK_K * (i + 1)], qs[0, QK_K * i: QK_K * (i + 1)],
                                  bsums[0, 16 * i: 16 * (i + 1)])


def quantize(x: np.ndarray):
    """Activations (T, K) float32 -> (qs (T, K) int8, d (T, K // 256) float32,
    bsums (T, K // 16) int32), llama.cpp's Q8_K fields."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] % QK_K:
        raise ValueError(f"Q8_K: activations of shape {x.shape}, expected rows of a multiple of {QK_K} values")
    t, k = x.shape
    qs = np.empty((t, k), np.int8)
    d = np.empty((t, k // QK_K), np.float32)
    bsums = np.empty((t, k // 16), np.int32)
    (_quantize_row if t == 1 else _quantize_rows)(x, qs, d, bsums)
    return qs, d, bsums


# --- the activation arguments of the K-quant kernels (registry.TileKernels) ---------------------


def ints(x: np.ndarray) -> tuple:
    """x (T, K), or (K,) as one row -> (qs (T, K) int8, d (T, nb), bsums (T, nb, 16))."""
    x = x.reshape(-1, x.shape[-1])
    qs, d, bsums = quantize(x)
    return qs, d, bsums.reshape(x.shape[0], -1, 16)


def words(x: np.ndarray) -> tuple:
    """As ints, qs as int32 words of four int8 (T, K / 4): the simd.dpbusd kernels'."""
    qs, d, bsums = ints(x)
    return qs.view(np.int32), d, bsums


def vector(x: np.ndarray) -> tuple:
    """x (K,) -> (qs (K,) int8, d (nb,), bsums (nb, 16)): the portable matvec kernels'."""
    qs, d, bsums = quantize(x.reshape(1, -1))
    return qs[0], d[0], bsums.reshape(-1, 16)

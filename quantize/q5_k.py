"""Q5_K: 256-value super-blocks of 176 bytes, Q4_K plus a fifth bit per value.

Block (ggml-common.h block_q5_K):
    d, dmin fp16; scales [12] uint8 (as Q4_K)
    qh [32] uint8  bit j of qh[l] is the fifth bit of value 32j + l
    qs [128] uint8 low 4 bits, laid out as Q4_K's qs
Value l of sub-block j: x = d * sc_j * (q4 + 16 * bit) - dmin * m_j.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .kquants import (F32, QK_K, check_rows, f16_to_f32, f32_to_f16, make_qkx2_quants,
                      nearest_int, pack_scale_min_k4, scale_min_k4)
from .registry import QuantFormat

TYPE_SIZE = 176
QH, QS = 16, 48  # byte offsets of qh and qs in a block


# --- dequantize -------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _dequantize(blocks, out):
    # blocks (n, 176) uint8 -> out (n, 256) float32; same float order as gguf-py and ggml
    for i in prange(blocks.shape[0]):
        b = blocks[i]
        d = f16_to_f32(b[0] | (b[1] << 8))
        dmin = f16_to_f32(b[2] | (b[3] << 8))
        s = b[4:16]
        for j in range(8):
            sc, m = scale_min_k4(j, s)
            dj = d * F32(sc)
            mj = dmin * F32(m)
            g, shift = j // 2, 4 * (j % 2)
            for l in range(32):
                q = ((b[QS + 32 * g + l] >> shift) & 0xF) | (((b[QH + l] >> j) & 1) << 4)
                out[i, 32 * j + l] = dj * F32(q) - mj


# --- quantize (quantize_row_q5_K_ref, no importance matrix) ------------------------------------


@njit(cache=True)
def _quantize_block(x, y, L, Laux, weights, scales, mins, ls, lm):
    # x (256,) float32 -> y (176,) uint8
    max_scale = F32(0.0)
    max_min = F32(0.0)
    for j in range(8):
        xs = x[32 * j: 32 * j + 32]
        sum_x2 = F32(0.0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / F32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        scales[j], mins[j] = make_qkx2_quants(31, xs, weights, L[32 * j: 32 * j + 32], Laux,
                                              F32(-0.5), F32(0.1), 15)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    inv_scale = F32(63.0) / max_scale if max_scale > 0 else F32(0.0)
    inv_min = F32(63.0) / max_min if max_min > 0 else F32(0.0)
    for j in range(8):
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C stores into uint8 first
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    pack_scale_min_k4(ls, lm, y[4:16])
    hd = f32_to_f16(max_scale / F32(63.0))
    hm = f32_to_f16(max_min / F32(63.0))
    y[0], y[1], y[2], y[3] = hd & 0xFF, hd >> 8, hm & 0xFF, hm >> 8
    d = f16_to_f32(hd)
    dmin = f16_to_f32(hm)
    for j in range(8):
        sc, m = scale_min_k4(j, y[4:16])
        dj = d * F32(sc)
        if dj == 0:
            continue  # keeps the levels make_qkx2_quants chose, as llama.cpp does
        dm = dmin * F32(m)
        for l in range(32):
            L[32 * j + l] = min(max(nearest_int((x[32 * j + l] + dm) / dj), 0), 31)
    y[QH: QH + 32] = 0
    for g in range(4):
        for l in range(32):
            lo, hi = L[64 * g + l], L[64 * g + 32 + l]
            y[QS + 32 * g + l] = (lo & 0xF) | ((hi & 0xF) << 4)
            y[QH + l] |= ((lo >> 4) << (2 * g)) | ((hi >> 4) << (2 * g + 1))


@njit(parallel=True, cache=True)
def _quantize_rows(x, out):
    # x (n, K) float32 -> out (n, K // 256, 176) uint8
    for r in prange(x.shape[0]):
        L = np.empty(QK_K, np.uint8)
        Laux = np.empty(32, np.uint8)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        ls = np.empty(8, np.uint8)
        lm = np.empty(8, np.uint8)
        for i in range(out.shape[1]):
            _quantize_block(x[r, QK_K * i: QK_K * (i + 1)], out[r, i], L, Laux, weights, scales,
                            mins, ls, lm)


class Q5_K(QuantFormat):
    qtype = GGMLQuantizationType.Q5_K

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, TYPE_SIZE)
        out = np.empty((blocks.shape[0], QK_K), np.float32)
        _dequantize(blocks, out)
        return out.reshape(-1)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """(..., K) float32 rows -> (..., K // 256 * 176) uint8, bit-identical to llama.cpp."""
        x = check_rows(x, "Q5_K")
        rows = x.reshape(-1, x.shape[-1])
        out = np.empty((rows.shape[0], rows.shape[1] // QK_K, TYPE_SIZE), np.uint8)
        _quantize_rows(rows, out)
        return out.reshape(*x.shape[:-1], -1)

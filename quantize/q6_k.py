"""Q6_K: 256-value super-blocks of 210 bytes, 6-bit values with an int8 scale per 16.

Block (ggml-common.h block_q6_K):
    ql [128] uint8  low 4 bits; in half h (128 values), byte l < 32 holds values l (low nibble) and
                    l + 64 (high), byte 32 + l holds l + 32 and l + 96
    qh [64] uint8   high 2 bits; in half h, byte l holds values l, l + 32, l + 64, l + 96 (bits 0-1,
                    2-3, 4-5, 6-7)
    scales [16] int8, one per 16 values
    d fp16
Value i of sub-block j: x = d * sc_j * (q - 32), q in 0..63.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from .kquants import (F32, GROUP_MAX_EPS, QK_K, check_rows, f16_to_f32, f32_to_f16,
                      make_qx_quants, nearest_int)
from .registry import QuantFormat

TYPE_SIZE = 210
QL, QH, SC, D = 0, 128, 192, 208  # byte offsets in a block


@njit(cache=True, inline="always")
def _level(b, i):
    """Unsigned 6-bit level (0..63) of value i of block b."""
    h, v = i // 128, i % 128
    shift = 2 * (v // 32)
    lo = (b[QL + 64 * h + v % 64] >> (4 * (v // 64))) & 0xF
    hi = (b[QH + 32 * h + v % 32] >> shift) & 3
    return lo | (hi << 4)


# --- dequantize -------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _dequantize(blocks, out):
    # blocks (n, 210) uint8 -> out (n, 256) float32: (d * sc) * q, the order of gguf-py and ggml
    for i in prange(blocks.shape[0]):
        b = blocks[i]
        d = f16_to_f32(b[D] | (b[D + 1] << 8))
        for j in range(16):
            dj = d * F32(np.int8(b[SC + j]))
            for l in range(16):
                out[i, 16 * j + l] = dj * F32(_level(b, 16 * j + l) - 32)


# --- quantize (quantize_row_q6_K_ref, no importance matrix) ------------------------------------


@njit(cache=True)
def _quantize_block(x, y, L, scales):
    # x (256,) float32 -> y (210,) uint8
    max_scale = F32(0.0)
    max_abs_scale = F32(0.0)
    for j in range(16):
        scales[j] = make_qx_quants(32, x[16 * j: 16 * j + 16], L[16 * j: 16 * j + 16])
        if abs(scales[j]) > max_abs_scale:
            max_abs_scale = abs(scales[j])
            max_scale = scales[j]
    y[:] = 0
    if max_abs_scale < GROUP_MAX_EPS:
        return
    iscale = F32(-128.0) / max_scale
    hd = f32_to_f16(F32(1.0) / iscale)
    y[D], y[D + 1] = hd & 0xFF, hd >> 8
    d = f16_to_f32(hd)
    for j in range(16):
        y[SC + j] = np.uint8(min(127, nearest_int(iscale * scales[j])) & 0xFF)
    for j in range(16):
        dj = d * F32(np.int8(y[SC + j]))
        if dj == 0:
            continue  # keeps the levels make_qx_quants chose, as llama.cpp does
        for l in range(16):
            L[16 * j + l] = min(max(nearest_int(x[16 * j + l] / dj), -32), 31) + 32
    for h in range(2):
        for l in range(32):
            q1, q2 = L[128 * h + l], L[128 * h + l + 32]
            q3, q4 = L[128 * h + l + 64], L[128 * h + l + 96]
            y[QL + 64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            y[QL + 64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            y[QH + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@njit(parallel=True, cache=True)
def _quantize_rows(x, out):
    # x (n, K) float32 -> out (n, K // 256, 210) uint8
    for r in prange(x.shape[0]):
        L = np.empty(QK_K, np.uint8)
        scales = np.empty(16, np.float32)
        for i in range(out.shape[1]):
            _quantize_block(x[r, QK_K * i: QK_K * (i + 1)], out[r, i], L, scales)


class Q6_K(QuantFormat):
    qtype = GGMLQuantizationType.Q6_K

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, TYPE_SIZE)
        out = np.empty((blocks.shape[0], QK_K), np.float32)
        _dequantize(blocks, out)
        return out.reshape(-1)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """(..., K) float32 rows -> (..., K // 256 * 210) uint8, bit-identical to llama.cpp."""
        x = check_rows(x, "Q6_K")
        rows = x.reshape(-1, x.shape[-1])
        out = np.empty((rows.shape[0], rows.shape[1] // QK_K, TYPE_SIZE), np.uint8)
        _quantize_rows(rows, out)
        return out.reshape(*x.shape[:-1], -1)

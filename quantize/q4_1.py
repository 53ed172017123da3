"""Q4_1: 32 values per 20-byte block: fp16 d, fp16 m, qs[16] (nibbles as Q4_0); x = d * q + m
(ggml-common.h block_q4_1). The min term uses Q8_1's per-block d * sum(q) of the activations."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import int32, njit, prange

from . import tiles
from .activations import QK
from .tiles import TILE, qh_at, scale_add
from .kquants import f16_to_f32
from .registry import QuantFormat


@njit(parallel=True, cache=True)
def _dequantize(blocks, out):
    for i in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[i, 0] | (np.uint16(blocks[i, 1]) << 8))
        m = f16_to_f32(blocks[i, 2] | (np.uint16(blocks[i, 3]) << 8))
        for j in range(16):
            q = blocks[i, 4 + j]
            out[i, j] = d * np.float32(q & 15) + m
            out[i, j + 16] = d * np.float32(q >> 4) + m


@njit(cache=True)
def dot(qs, qh, xq, isum):
    isum[:] = 0
    for j in range(16):
        lo, hi = int32(xq[j]), int32(xq[j + 16])
        for r in range(isum.shape[0]):
            q = int32(qs[j, r])
            isum[r] += (q & int32(15)) * lo + (q >> int32(4)) * hi


@njit(parallel=True, cache=True)
def _matvec(qs, qh, d, m, has_min, xq, xd, xs, y):
    # qs (nt, nb, bytes, TILE), qh (nt, nb, TILE) or placeholder, d/m (nt, nb, TILE); y (nt, TILE)
    for t in prange(qs.shape[0]):
        acc = np.zeros(TILE, np.float32)
        isum = np.empty(TILE, np.int32)
        for b in range(qs.shape[1]):
            dot(qs[t, b], qh_at(qh, t, b), xq[QK * b: QK * (b + 1)], isum)
            scale_add(acc, isum, d[t, b], m[t, b], xd[b], xs[b], has_min)
        y[t] = acc


@njit(parallel=True, cache=True)
def _matmul(qs, qh, d, m, has_min, xq, xd, xs, y):
    # xq (T, K), xd/xs (T, nb); y (nt, T, TILE): each block of a tile serves all T tokens from L1
    for t in prange(qs.shape[0]):
        acc = np.zeros((xq.shape[0], TILE), np.float32)
        isum = np.empty(TILE, np.int32)
        for b in range(qs.shape[1]):
            for k in range(xq.shape[0]):
                dot(qs[t, b], qh_at(qh, t, b), xq[k, QK * b: QK * (b + 1)], isum)
                scale_add(acc[k], isum, d[t, b], m[t, b], xd[k, b], xs[k, b], has_min)
        y[t] = acc


class Q4_1(QuantFormat):
    qtype = GGMLQuantizationType.Q4_1

    def dequantize(self, blocks):
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, self.type_size)
        out = np.empty((blocks.shape[0], 32), np.float32)
        _dequantize(blocks, out)
        return out.reshape(-1)

    def pack(self, raw):
        b = raw.reshape(raw.shape[0], -1, self.type_size)  # (N, nb, 20)
        qs = tiles.to_tiles(np.ascontiguousarray(b[..., 4:]))  # (nt, nb, 16, TILE)
        d, m = tiles.to_tiles(tiles.fp16_field(b, 0)), tiles.to_tiles(tiles.fp16_field(b, 2))
        return qs, tiles.NO_QH, d, m, raw.shape[0]

    def matvec(self, packed, x):
        return tiles.matvec(_matvec, packed, x)

    def matmul(self, packed, x):
        return tiles.matmul(_matmul, packed, x)

"""Q5_0 and Q5_1: 32 values per block with a 5th bit per value in qh (uint32, bit j for value j):
Q5_0 (22 bytes): fp16 d, qh[4], qs[16]; x = d * (q - 16). Q5_1 (24 bytes): fp16 d, fp16 m, qh[4],
qs[16]; x = d * q + m. Nibbles as Q4_0 (ggml-common.h block_q5_0 / block_q5_1). Q5_1 is where
llama-quantize's Q4_K_M puts Q5_K tensors whose rows are not a multiple of 256."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import int32, njit, prange, uint32

from . import tiles
from .activations import QK
from .tiles import TILE, qh_at, scale_add
from .kquants import f16_to_f32
from .registry import QuantFormat


@njit(parallel=True, cache=True)
def _dequantize(blocks, out, has_min):
    o = 4 if has_min else 2  # offset of qh
    for i in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[i, 0] | (np.uint16(blocks[i, 1]) << 8))
        m = f16_to_f32(blocks[i, 2] | (np.uint16(blocks[i, 3]) << 8)) if has_min else np.float32(0.0)
        qh = (np.uint32(blocks[i, o]) | (np.uint32(blocks[i, o + 1]) << 8)
              | (np.uint32(blocks[i, o + 2]) << 16) | (np.uint32(blocks[i, o + 3]) << 24))
        for j in range(16):
            q = blocks[i, o + 4 + j]
            lo = np.int32(q & 15) | np.int32(((qh >> j) & 1) << 4)
            hi = np.int32(q >> 4) | np.int32(((qh >> (j + 16)) & 1) << 4)
            if has_min:
                out[i, j] = d * np.float32(lo) + m
                out[i, j + 16] = d * np.float32(hi) + m
            else:
                out[i, j] = d * np.float32(lo - 16)
                out[i, j + 16] = d * np.float32(hi - 16)


@njit(cache=True)
def _dot5(qs, qh, xq, isum, offset):
    isum[:] = 0
    for j in range(16):
        lo, hi = int32(xq[j]), int32(xq[j + 16])
        for r in range(isum.shape[0]):
            q = int32(qs[j, r])
            h = qh[r]
            wl = (q & int32(15)) | int32(((h >> uint32(j)) & uint32(1)) << uint32(4))
            wh = (q >> int32(4)) | int32(((h >> uint32(j + 16)) & uint32(1)) << uint32(4))
            isum[r] += (wl - offset) * lo + (wh - offset) * hi


@njit(cache=True)
def dot_q5_0(qs, qh, xq, isum):
    _dot5(qs, qh, xq, isum, int32(16))


@njit(cache=True)
def dot_q5_1(qs, qh, xq, isum):
    _dot5(qs, qh, xq, isum, int32(0))


@njit(parallel=True, cache=True)
def _matvec_q5_0(qs, qh, d, m, has_min, xq, xd, xs, y):
    # qs (nt, nb, bytes, TILE), qh (nt, nb, TILE) or placeholder, d/m (nt, nb, TILE); y (nt, TILE)
    for t in prange(qs.shape[0]):
        acc = np.zeros(TILE, np.float32)
        isum = np.empty(TILE, np.int32)
        for b in range(qs.shape[1]):
            dot_q5_0(qs[t, b], qh_at(qh, t, b), xq[QK * b: QK * (b + 1)], isum)
            scale_add(acc, isum, d[t, b], m[t, b], xd[b], xs[b], has_min)
        y[t] = acc


@njit(parallel=True, cache=True)
def _matmul_q5_0(qs, qh, d, m, has_min, xq, xd, xs, y):
    # xq (T, K), xd/xs (T, nb); y (nt, T, TILE): each block of a tile serves all T tokens from L1
    for t in prange(qs.shape[0]):
        acc = np.zeros((xq.shape[0], TILE), np.float32)
        isum = np.empty(TILE, np.int32)
        for b in range(qs.shape[1]):
            for k in range(xq.shape[0]):
                dot_q5_0(qs[t, b], qh_at(qh, t, b), xq[k, QK * b: QK * (b + 1)], isum)
                scale_add(acc[k], isum, d[t, b], m[t, b], xd[k, b], xs[k, b], has_min)
        y[t] = acc


@njit(parallel=True, cache=True)
def _matvec_q5_1(qs, qh, d, m, has_min, xq, xd, xs, y):
    for t in prange(qs.shape[0]):
        acc = np.zeros(TILE, np.float32)
        isum = np.empty(TILE, np.int32)
        for b in range(qs.shape[1]):
            dot_q5_1(qs[t, b], qh_at(qh, t, b), xq[QK * b: QK * (b + 1)], isum)
            scale_add(acc, isum, d[t, b], m[t, b], xd[b], xs[b], has_min)
        y[t] = acc


@njit(parallel=True, cache=True)
def _matmul_q5_1(qs, qh, d, m, has_min, xq, xd, xs, y):
    for t in prange(qs.shape[0]):
        acc = np.zeros((xq.shape[0], TILE), np.float32)
        isum = np.empty(TILE, np.int32)
        for b in range(qs.shape[1]):
            for k in range(xq.shape[0]):
                dot_q5_1(qs[t, b], qh_at(qh, t, b), xq[k, QK * b: QK * (b + 1)], isum)
                scale_add(acc[k], isum, d[t, b], m[t, b], xd[k, b], xs[k, b], has_min)
        y[t] = acc


class _Q5(QuantFormat):
    qtype = GGMLQuantizationType.Q5_0  # block and byte sizes; each subclass names its own type
    has_min = False
    kernels = (_matvec_q5_0, _matmul_q5_0)

    def dequantize(self, blocks):
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, self.type_size)
        out = np.empty((blocks.shape[0], 32), np.float32)
        _dequantize(blocks, out, self.has_min)
        return out.reshape(-1)

    def pack(self, raw):
        b = raw.reshape(raw.shape[0], -1, self.type_size)  # (N, nb, 22 or 24)
        o = 4 if self.has_min else 2
        qh = tiles.to_tiles(np.ascontiguousarray(b[..., o:o + 4]).view(np.uint32)[..., 0])  # (nt, nb, TILE)
        qs = tiles.to_tiles(np.ascontiguousarray(b[..., o + 4:]))  # (nt, nb, 16, TILE)
        m = tiles.to_tiles(tiles.fp16_field(b, 2)) if self.has_min else None
        return qs, qh, tiles.to_tiles(tiles.fp16_field(b, 0)), m, raw.shape[0]

    def matvec(self, packed, x):
        return tiles.matvec(self.kernels[0], packed, x)

    def matmul(self, packed, x):
        return tiles.matmul(self.kernels[1], packed, x)


class Q5_0(_Q5):
    qtype = GGMLQuantizationType.Q5_0


class Q5_1(_Q5):
    qtype = GGMLQuantizationType.Q5_1
    has_min = True
    kernels = (_matvec_q5_1, _matmul_q5_1)

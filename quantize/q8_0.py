"""Q8_0: 32 values per 34-byte block: fp16 d, int8 qs[32]; x = d * q (ggml-common.h block_q8_0)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import int32, njit, prange

from . import tiles
from .kquants import f16_to_f32
from .registry import QuantFormat


@njit(parallel=True, cache=True)
def _dequantize(blocks, out):
    for i in prange(blocks.shape[0]):
        d = f16_to_f32(blocks[i, 0] | (np.uint16(blocks[i, 1]) << 8))
        q = blocks[i, 2:34]
        for j in range(32):
            out[i, j] = d * np.float32(np.int8(q[j]))


@njit(cache=True)
def dot(qs, qh, xq, isum):
    # qs (32, TILE) int8: byte j of each row's block
    isum[:] = 0
    for j in range(32):
        x = int32(xq[j])
        for r in range(isum.shape[0]):
            isum[r] += int32(qs[j, r]) * x


class Q8_0(QuantFormat):
    qtype = GGMLQuantizationType.Q8_0

    def dequantize(self, blocks):
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, self.type_size)
        out = np.empty((blocks.shape[0], 32), np.float32)
        _dequantize(blocks, out)
        return out.reshape(-1)

    def pack(self, raw):
        b = raw.reshape(raw.shape[0], -1, self.type_size)  # (N, nb, 34)
        qs = tiles.to_tiles(np.ascontiguousarray(b[..., 2:]).view(np.int8))  # (nt, nb, 32, TILE)
        return qs, tiles.NO_QH, tiles.to_tiles(tiles.fp16_field(b, 0)), None, raw.shape[0]

    def matvec(self, packed, x):
        return tiles.matvec(dot, packed, x)

    def matmul(self, packed, x):
        return tiles.matmul(dot, packed, x)

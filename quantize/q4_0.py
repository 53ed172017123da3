"""Q4_0: 32 values per 18-byte block: fp16 d, qs[16]; value j is the low nibble of qs[j], value
j + 16 the high nibble; x = d * (q - 8) (ggml-common.h block_q4_0)."""
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
        for j in range(16):
            q = blocks[i, 2 + j]
            out[i, j] = d * np.float32(np.int32(q & 15) - 8)
            out[i, j + 16] = d * np.float32(np.int32(q >> 4) - 8)


@njit(cache=True)
def dot(qs, qh, xq, isum):
    # qs (16, TILE) uint8: byte j of each row's block holds values j and j + 16
    isum[:] = 0
    for j in range(16):
        lo, hi = int32(xq[j]), int32(xq[j + 16])
        for r in range(isum.shape[0]):
            q = int32(qs[j, r])
            isum[r] += ((q & int32(15)) - int32(8)) * lo + ((q >> int32(4)) - int32(8)) * hi


class Q4_0(QuantFormat):
    qtype = GGMLQuantizationType.Q4_0

    def dequantize(self, blocks):
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, self.type_size)
        out = np.empty((blocks.shape[0], 32), np.float32)
        _dequantize(blocks, out)
        return out.reshape(-1)

    def pack(self, raw):
        b = raw.reshape(raw.shape[0], -1, self.type_size)  # (N, nb, 18)
        qs = tiles.to_tiles(np.ascontiguousarray(b[..., 2:]))  # (nt, nb, 16, TILE)
        return qs, tiles.NO_QH, tiles.to_tiles(tiles.fp16_field(b, 0)), None, raw.shape[0]

    def matvec(self, packed, x):
        return tiles.matvec(dot, packed, x)

    def matmul(self, packed, x):
        return tiles.matmul(dot, packed, x)

"""Words of 4-bit quants in the tile layout of Q4_0 and Q4_1, and their dot products with the int8
activations in the portable kernels.

The 16 quant bytes of a 32-value block (qs[j]: value j in the low nibble, value j + 16 in the high
one, ggml-common.h block_q4_0 / block_q4_1) are kept as 4 little-endian uint32 words per row
(tiles.tile_words): word g holds the nibbles of values 4g..4g+3 (low) and 16+4g..16+4g+3 (high).
"""
from __future__ import annotations

import numpy as np
from numba import njit, uint32

from .activations import QK, x16


@njit(cache=True, inline="always")
def nibble(v, shift):
    """Bits shift..shift+3 of the uint32 v, as an int32 the kernels can multiply in 16 bits."""
    return np.int32((v >> uint32(shift)) & uint32(15))


@njit(cache=True, inline="always")
def _word(v, xq, k, o, g):
    # the 8 nibbles of word g of one row: values 4g..4g+3 (low nibbles), 16+4g..16+4g+3 (high);
    # o = 32 * block: where the block's activations start
    s = np.int32(0)
    for i in range(4):
        s = np.int32(s + nibble(v, 8 * i) * x16(xq, k, o + 4 * g + i)
                     + nibble(v, 8 * i + 4) * x16(xq, k, o + 16 + 4 * g + i))
    return s


@njit(cache=True, inline="always")
def row_dot(qs, t, b, r, xq, k):
    """sum_j nibble_j * x_j over block b of row r of tile t, activation row k: qs (n_tiles, nb, 4,
    TILE) uint32, xq (T, K) int32. The four words are written out (not a loop) so that LLVM sees
    constant shifts and vectorizes the callers' loops over r."""
    o = QK * b
    return np.int32(np.int32(_word(qs[t, b, 0, r], xq, k, o, 0) + _word(qs[t, b, 1, r], xq, k, o, 1))
                    + np.int32(_word(qs[t, b, 2, r], xq, k, o, 2) + _word(qs[t, b, 3, r], xq, k, o, 3)))

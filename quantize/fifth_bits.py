"""The fifth bits of Q5_0 and Q5_1 in the tile layout, and the 5-bit dot products of both formats.

A block keeps the fifth bit of value j in bit j of qh (a little-endian uint32; ggml-common.h
block_q5_0 / block_q5_1); the low four bits are nibbles as in Q4_0 (nibbles.py). The kernel layout
holds qh as one uint32 per row and block, (n_tiles, nb, TILE), with its bits permuted so that two
shifts and masks put the fifth bits of a word's 8 values beside their nibbles: bit 8k + 2g <- value
4g + k, bit 8k + 2g + 1 <- value 16 + 4g + k. Shifting by 2g - 4 (2g - 3) and masking 0x10101010
then lines up bit 4 of byte k with the low (high) nibbles of word g.
"""
from __future__ import annotations

import numpy as np
from numba import njit, uint32

from . import tiles
from .activations import QK, x16
from .simd import band, bor, dpbusd_small, load_i, sll, splat_i, srl


@njit(cache=True, inline="always")
def bit(h, j):
    """Bit j of the uint32 h, as an int32."""
    return np.int32((h >> uint32(j)) & uint32(1))


@njit(cache=True, inline="always")
def qh_word(blocks, i, o):
    """The little-endian uint32 at byte o of block i of blocks (n, type_size) uint8."""
    return (np.uint32(blocks[i, o]) | (np.uint32(blocks[i, o + 1]) << 8)
            | (np.uint32(blocks[i, o + 2]) << 16) | (np.uint32(blocks[i, o + 3]) << 24))


def _spread_positions() -> np.ndarray:
    # bit j of qh goes to bit 8k + 2g (+1 for j >= 16) with g = (j mod 16) // 4, k = j mod 4
    j = np.arange(32)
    return 8 * (j % 4) + 2 * ((j % 16) // 4) + j // 16


# SPREAD[i, v]: the spread bits of byte i of qh when that byte holds v; (4, 256) uint32
SPREAD = np.array([[sum(1 << int(_spread_positions()[8 * i + n]) for n in range(8) if v >> n & 1)
                    for v in range(256)] for i in range(4)], np.uint32)


@njit(cache=True, nogil=True)
def _tile_fifth_bits(blocks, o, spread, out):
    n = blocks.shape[0]
    for t in range(out.shape[0]):
        for b in range(blocks.shape[1]):
            for i in range(min(tiles.TILE, n - t * tiles.TILE)):
                r = t * tiles.TILE + i
                out[t, b, i] = (spread[0, blocks[r, b, o]] | spread[1, blocks[r, b, o + 1]]
                                | spread[2, blocks[r, b, o + 2]] | spread[3, blocks[r, b, o + 3]])


def tile_fifth_bits(blocks: np.ndarray, o: int, out: np.ndarray) -> None:
    """out[t, b, i] = the qh word at byte o of block b of row t * TILE + i, its bits spread:
    blocks (N, nb, type_size) uint8, out (n_tiles, nb, TILE) uint32 (zeroed padding rows)."""
    _tile_fifth_bits(blocks, o, SPREAD, out)


def pack5(b: np.ndarray, qh: int, qs: int, m: int | None = None, halves: bool = False) -> tiles.Packed:
    """File blocks (N, nb, type_size) of Q5_0 / Q5_1 -> the kernels' tiles: nibbles as words, fifth
    bits spread, d (fp16 at byte 0) and, for Q5_1, m (fp16 at byte m) as float32, or with `halves`
    as their fp16 bits (the VNNI layout); qh, qs: the byte offsets of the fifth bits and the nibbles
    in a block."""
    n, nb = b.shape[:2]
    words, fifth = tiles.tiled(n, nb, 4), tiles.tiled(n, nb)  # (n_tiles, nb, 4, TILE), (n_tiles, nb, TILE)
    tiles.tile_words(b, qs, words)
    tile_fifth_bits(b, qh, fifth)
    d = tiles.tile_scales(n, b, 0, halves)  # (n_tiles, nb, TILE)
    mins = tiles.NONE if m is None else tiles.tile_scales(n, b, m, halves)
    return tiles.Packed(words, fifth, d, mins, n)


# --- portable kernels ---------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _shift(h, a):
    return (h >> uint32(a)) if a >= 0 else (h << uint32(-a))


@njit(cache=True, inline="always")
def _byte(v, k):
    return np.int32((v >> uint32(8 * k)) & uint32(255))


@njit(cache=True, inline="always")
def _word5(v, h, xq, k, o, g):
    # word g of one row: 5-bit values 4g..4g+3 in the bytes of lo, 16+4g..16+4g+3 in those of hi
    lo = (v & uint32(0x0F0F0F0F)) | (_shift(h, 2 * g - 4) & uint32(0x10101010))
    hi = ((v >> uint32(4)) & uint32(0x0F0F0F0F)) | (_shift(h, 2 * g - 3) & uint32(0x10101010))
    s = np.int32(0)
    for i in range(4):
        s = np.int32(s + _byte(lo, i) * x16(xq, k, o + 4 * g + i) + _byte(hi, i) * x16(xq, k, o + 16 + 4 * g + i))
    return s


@njit(cache=True, inline="always")
def row_dot5(p, t, b, r, xq, k):
    """sum_j q5_j * x_j over block b of row r of tile t: p.qs (n_tiles, nb, 4, TILE) uint32
    nibbles, p.qh (n_tiles, nb, TILE) uint32 spread fifth bits; xq (T, K) int32."""
    o = QK * b
    qs, h = p.qs, p.qh[t, b, r]
    return np.int32(np.int32(_word5(qs[t, b, 0, r], h, xq, k, o, 0) + _word5(qs[t, b, 1, r], h, xq, k, o, 1))
                    + np.int32(_word5(qs[t, b, 2, r], h, xq, k, o, 2) + _word5(qs[t, b, 3, r], h, xq, k, o, 3)))


# --- kernels on simd.dpbusd ---------------------------------------------------------------------


@njit(cache=True, inline="always")
def chunk5(qs, qh, o, oh, xw, k, b, s):
    """s + sum_j q5_j * x_j for the 16 rows of a chunk of block b, four values at a time
    (simd.dpbusd): o = flat index of word 0 of the chunk in qs, oh of its fifth bits in qh;
    xw (T, K / 4) int32 words of int8 activations."""
    low, five = splat_i(0x0F0F0F0F), splat_i(0x10101010)
    h = load_i(qh, oh)
    xo = 8 * b
    v = load_i(qs, o)
    s = dpbusd_small(s, bor(band(v, low), band(sll(h, 4), five)), splat_i(xw[k, xo]))
    s = dpbusd_small(s, bor(band(srl(v, 4), low), band(sll(h, 3), five)), splat_i(xw[k, xo + 4]))
    v = load_i(qs, o + tiles.TILE)
    s = dpbusd_small(s, bor(band(v, low), band(sll(h, 2), five)), splat_i(xw[k, xo + 1]))
    s = dpbusd_small(s, bor(band(srl(v, 4), low), band(sll(h, 1), five)), splat_i(xw[k, xo + 5]))
    v = load_i(qs, o + 2 * tiles.TILE)
    s = dpbusd_small(s, bor(band(v, low), band(h, five)), splat_i(xw[k, xo + 2]))
    s = dpbusd_small(s, bor(band(srl(v, 4), low), band(srl(h, 1), five)), splat_i(xw[k, xo + 6]))
    v = load_i(qs, o + 3 * tiles.TILE)
    s = dpbusd_small(s, bor(band(v, low), band(srl(h, 2), five)), splat_i(xw[k, xo + 3]))
    s = dpbusd_small(s, bor(band(srl(v, 4), low), band(srl(h, 3), five)), splat_i(xw[k, xo + 7]))
    return s

"""Q5_K: 256-value super-blocks of 176 bytes, Q4_K plus a fifth bit per value.

Block (ggml-common.h block_q5_K):
    d, dmin fp16; scales [12] uint8 (as Q4_K)
    qh [32] uint8  bit j of qh[l] is the fifth bit of value 32j + l
    qs [128] uint8 low 4 bits, laid out as Q4_K's qs
Value l of sub-block j: x = d * sc_j * (q4 + 16 * bit) - dmin * m_j.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import q8_k, tiles
from .kquants import F32, QK_K, dot_levels32, f16_to_f32, quantize_scale_min, scale_min_k4
from .q4_k import pack_scales, pack_tiles, ahead_scales
from .registry import QuantFormat, TileKernels
from .simd import (add_f, add_i, band, bor, dpbusd16, load_h, load_i, load_u8, mul_f, mul_i, splat_f, splat_i, sll, srl,
                   store_f, sub_f, sum16, to_f, zero_f, zero_i)

# Rows per kernel tile: the kernels' vector loops run across the rows of a tile. Kept in this
# module so that numba's cache of the kernels follows it.
TILE = 128
# The VNNI kernel's tiles: 16 rows, one vector; a tile's bytes lie in the order the kernel reads them.
VTILE = 16
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


# --- kernels ----------------------------------------------------------------------------------
# As Q4_K's (see q4_k.py), with the qh bytes of every row of the tile side by side as well.


class PackedQ5K(NamedTuple):
    qs: np.ndarray  # (n_tiles, nb, 4, 32, TILE) uint8: byte l of group g of each row
    #                 VNNI: (n_tiles, nb, 4, 8, VTILE) uint32, bytes 4w..4w+3 of group g in word w
    qh: np.ndarray  # (n_tiles, nb, 32, TILE) uint8: fifth bits, bit j for sub-block j
    #                 VNNI: (n_tiles, nb, 8, VTILE) uint32, qh bytes 4w..4w+3 in word w
    sc: np.ndarray  # (n_tiles, nb, 8, TILE) uint8: 6-bit scale of sub-block j
    mn: np.ndarray  # (n_tiles, nb, 8, TILE) uint8: 6-bit min of sub-block j
    d: np.ndarray  # (n_tiles, nb, TILE) float32; VNNI: uint16 fp16 bits
    dmin: np.ndarray  # (n_tiles, nb, TILE) as d
    n: int  # rows of the matrix (the last tile is padded with zero rows)


@njit(parallel=True, cache=True)
def _pack(raw3, qs, qh, sc, mn, d, dmin):
    # raw3 (N, nb, 176) file blocks -> the PackedQ5K arrays; rows past N are left as they are
    n = raw3.shape[0]
    for t in prange(qs.shape[0]):
        for b in range(qs.shape[1]):
            for i in range(min(TILE, n - t * TILE)):
                blk = raw3[t * TILE + i, b]
                pack_scales(blk, t, b, i, sc, mn, d, dmin)  # the same first 16 bytes as Q4_K's
                for l in range(32):
                    qh[t, b, l, i] = blk[QH + l]
                for g in range(4):
                    for l in range(32):
                        qs[t, b, g, l, i] = blk[QS + 32 * g + l]


def pack(raw3: np.ndarray) -> PackedQ5K:
    """raw3 (N, nb, 176) file blocks -> tiles of TILE rows."""
    sc, mn, d, dmin = pack_tiles(raw3, TILE)
    n_tiles, nb = d.shape[:2]
    qs = tiles.zeros((n_tiles, nb, 4, 32, TILE), np.uint8)
    qh = tiles.zeros((n_tiles, nb, 32, TILE), np.uint8)
    _pack(raw3, qs, qh, sc, mn, d, dmin)
    return PackedQ5K(qs=qs, qh=qh, sc=sc, mn=mn, d=d, dmin=dmin, n=raw3.shape[0])


@njit(cache=True, nogil=True)
def _pack_words(raw3, qs, qh, sc, mn, d, dmin):
    # the VNNI layout: qs (n_tiles, nb, 4, 8, VTILE, 4) uint8, word w of group g of each row (as
    # Q4_K's); qh (n_tiles, nb, 8, VTILE, 4), word w of the fifth bits (bytes 4w..4w+3 of qh)
    n = raw3.shape[0]
    for t in range(qs.shape[0]):
        for b in range(qs.shape[1]):
            for i in range(min(VTILE, n - t * VTILE)):
                blk = raw3[t * VTILE + i, b]
                pack_scales(blk, t, b, i, sc, mn, d, dmin)
                for w in range(8):
                    for u in range(4):
                        qh[t, b, w, i, u] = blk[QH + 4 * w + u]
                        for g in range(4):
                            qs[t, b, g, w, i, u] = blk[QS + 32 * g + 4 * w + u]


def pack_words(raw3: np.ndarray) -> PackedQ5K:
    """The VNNI kernels' layout: tiles of VTILE rows, qs and qh as uint32 words, d and dmin as fp16
    bits (simd.load_h widens them as the kernels read them)."""
    n = raw3.shape[0]
    sc, mn, d, dmin = pack_tiles(raw3, VTILE)
    n_tiles, nb = d.shape[:2]
    qs = tiles.zeros((n_tiles, nb, 4, 8, VTILE, 4), np.uint8)
    qh = tiles.zeros((n_tiles, nb, 8, VTILE, 4), np.uint8)
    _pack_words(raw3, qs, qh, sc, mn, d, dmin)
    qs = qs.view(np.uint32).reshape(n_tiles, nb, 4, 8, VTILE)
    qh = qh.view(np.uint32).reshape(n_tiles, nb, 8, VTILE)
    d, dmin = (tiles.aligned(a, np.float16).view(np.uint16) for a in (d, dmin))  # fp16 bits again, exactly
    return PackedQ5K(qs=qs, qh=qh, sc=sc, mn=mn, d=d, dmin=dmin, n=n)


@njit(cache=True)
def _block_dot(w, wh, sc, x, isum):
    # isum[r] = sum_j sc[j, r] * sum_l q(r, 32j + l) * x[32j + l] over one super-block of a tile.
    # w (4, 32, TILE), wh (32, TILE), sc (8, TILE) uint8, x (256,) int8, isum (TILE,) int32.
    # Loops over l are 8 long so that LLVM unrolls them and vectorizes across the rows
    # (see q4_k._block_dot).
    isum[:] = 0
    for g in range(4):
        wg = w[g]
        bit_lo = np.int32(1 << (2 * g))  # fifth bits of sub-blocks 2g and 2g + 1
        bit_hi = np.int32(2 << (2 * g))
        for l0 in range(0, 32, 8):
            xl = x[64 * g + l0: 64 * g + l0 + 8]  # values of sub-block 2g (low nibbles)
            xh = x[64 * g + 32 + l0: 64 * g + 40 + l0]  # sub-block 2g + 1 (high nibbles)
            for r in range(TILE):
                lo = 0
                hi = 0
                for l in range(8):
                    q = np.int32(wg[l0 + l, r])
                    h = np.int32(wh[l0 + l, r])
                    lo += ((q & 0xF) + (16 if h & bit_lo else 0)) * np.int32(xl[l])
                    hi += ((q >> 4) + (16 if h & bit_hi else 0)) * np.int32(xh[l])
                isum[r] += (np.int32(lo) * np.int32(sc[2 * g, r])
                            + np.int32(hi) * np.int32(sc[2 * g + 1, r]))


@njit(cache=True)
def _accumulate(acc, isum, mn, d, dmin, xd, bsums):
    # acc (TILE,) += xd * (d * isum - dmin * sum_j mn_j * (sum of x8 over sub-block j)) for one
    # super-block; bsums (16,) are Q8_K's sums per 16 values
    for r in range(TILE):
        msum = 0
        for j in range(8):
            msum += np.int32(mn[j, r]) * (bsums[2 * j] + bsums[2 * j + 1])
        acc[r] += xd * (d[r] * F32(isum[r]) - dmin[r] * F32(msum))


@njit(parallel=True, cache=True)
def _matvec(qs, qh, sc, mn, d, dmin, xq, xd, bsums, y):
    # xq (K,) int8, xd (nb,) float32, bsums (nb, 16) int32 sums per 16 values; y (n_tiles, TILE)
    for t in prange(qs.shape[0]):
        isum = np.empty(TILE, np.int32)
        acc = np.zeros(TILE, np.float32)
        for b in range(qs.shape[1]):
            _block_dot(qs[t, b], qh[t, b], sc[t, b], xq[QK_K * b: QK_K * (b + 1)], isum)
            _accumulate(acc, isum, mn[t, b], d[t, b], dmin[t, b], xd[b], bsums[b])
        for r in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            y[t, r] = acc[r]  # shape-error path, seconds on a first run


@njit(cache=True)
def _levels(w, wh, lv):
    # w (4, 32, TILE), wh (32, TILE) -> lv (256, TILE) uint8 levels 0..31 in value order
    for g in range(4):
        bit_lo = np.uint8(1 << (2 * g))  # fifth bits of sub-blocks 2g and 2g + 1
        bit_hi = np.uint8(2 << (2 * g))
        for l in range(32):
            for r in range(TILE):
                q = w[g, l, r]
                h = wh[l, r]
                lv[64 * g + l, r] = (q & 0xF) + (16 if h & bit_lo else 0)
                lv[64 * g + 32 + l, r] = (q >> 4) + (16 if h & bit_hi else 0)


@njit(parallel=True, cache=True)
def _matmul(qs, qh, sc, mn, d, dmin, xq, xd, bsums, y):
    # xq (T, K) int8, xd (T, nb), bsums (T, nb, 16); y (n_tiles, T, TILE). Each super-block of a
    # tile is read once from memory, unpacked once, and used for all T tokens.
    n_tok = xq.shape[0]
    for t in prange(qs.shape[0]):
        lv = np.empty((QK_K, TILE), np.uint8)
        isum = np.empty(TILE, np.int32)
        acc = np.zeros((n_tok, TILE), np.float32)
        for b in range(qs.shape[1]):
            _levels(qs[t, b], qh[t, b], lv)
            for k in range(n_tok):
                dot_levels32(lv, sc[t, b], xq[k, QK_K * b: QK_K * (b + 1)], isum)
                _accumulate(acc[k], isum, mn[t, b], d[t, b], dmin[t, b], xd[k, b], bsums[k, b])
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


@njit(cache=True, inline="always")
def block_total(acc, isum, mn, d, dmin, tb, xd, bsums):
    # acc + xd * (d * isum - dmin * sum_j mn_j * (Q8_K's sum over sub-block j)) for block tb of a
    # VTILE-row tile, isum its scaled integer sums; bsums (16,) per 16 values
    msum = zero_i()
    for j in range(8):
        bs = splat_i(bsums[2 * j] + bsums[2 * j + 1])
        msum = add_i(msum, mul_i(load_u8(mn, (tb * 8 + j) * VTILE), bs))
    part = sub_f(mul_f(load_h(d, tb * VTILE), to_f(isum)), mul_f(load_h(dmin, tb * VTILE), to_f(msum)))
    return add_f(acc, mul_f(splat_f(xd), part))


@njit(cache=True, inline="always")
def _tile_vnni(qs, qh, sc, mn, d, dmin, t, xw, xd, bsums, k, y, yo, fetch):
    # Tile t (16 rows, one vector) times activation row k into y.flat[yo : yo + 16], as Q4_K's
    # _tile_vnni with each value's fifth bit put in as bit 4 of its byte: word w of the qh words
    # holds, in bit 2g (2g + 1) of byte i, the fifth bit of value 64g + 4w + i (64g + 32 + 4w + i),
    # shifted down by 2g and up to bit 4 (no bit of a neighbouring byte lands there). Levels up
    # to 31: four products a partial sum keep dpbusd16's int16 pairs in range (4 x 2 x 31 x 128).
    nb = qs.shape[1]
    low, five = splat_i(0x0F0F0F0F), splat_i(0x10101010)
    acc = zero_f()
    for b in range(nb):
        if fetch:  # the first row over this tile: its next blocks (tiles.ahead)
            tiles.ahead(qs, (t * nb + b) * 32 * VTILE, 32 * VTILE)
            tiles.ahead(qh, (t * nb + b) * 8 * VTILE, 8 * VTILE)
            ahead_scales(sc, mn, d, dmin, t * nb + b)
        isum = zero_i()
        ho = (t * nb + b) * 8 * VTILE
        for g in range(4):
            lo32, hi32 = zero_i(), zero_i()
            o = ((t * nb + b) * 4 + g) * 8 * VTILE
            xo = 64 * b + 16 * g
            for half in range(2):
                lo, hi = zero_i(), zero_i()
                for w in range(4 * half, 4 * half + 4):
                    v = load_i(qs, o + w * VTILE)
                    h = srl(load_i(qh, ho + w * VTILE), 2 * g)
                    lo = dpbusd16(lo, bor(band(v, low), band(sll(h, 4), five)), splat_i(xw[k, xo + w]))
                    hi = dpbusd16(hi, bor(band(srl(v, 4), low), band(sll(h, 3), five)), splat_i(xw[k, xo + 8 + w]))
                lo32, hi32 = sum16(lo32, lo), sum16(hi32, hi)
            so = ((t * nb + b) * 8 + 2 * g) * VTILE
            isum = add_i(isum, add_i(mul_i(lo32, load_u8(sc, so)), mul_i(hi32, load_u8(sc, so + VTILE))))
        acc = block_total(acc, isum, mn, d, dmin, t * nb + b, xd[k, b], bsums[k, b])
    store_f(y, yo, acc)


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, qh, sc, mn, d, dmin, xw, xd, bsums, y):
    # y (n_tiles, T, 16)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            _tile_vnni(qs, qh, sc, mn, d, dmin, t, xw, xd, bsums, k, y, (t * n_tok + k) * VTILE, k == 0)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qss, qhs, scs, mns, ds, dmins, rows, xw, xd, bsums, y):
    # matrix j times activation row rows[j] -> y[j] (n_tiles, 16); the arguments are tuples of arrays
    nt = qss[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qss[j], qhs[j], scs[j], mns[j], ds[j], dmins[j], t, xw, xd, bsums, rows[j], y[j], t * VTILE, True)


_WEIGHTS = ("qs", "qh", "sc", "mn", "d", "dmin")


class Q5_K(QuantFormat):
    qtype = GGMLQuantizationType.Q5_K
    portable = TileKernels(pack, _WEIGHTS, q8_k.ints, _matmul, _matvec, q8_k.vector)
    vnni = TileKernels(pack_words, _WEIGHTS, q8_k.words, _matmul_vnni, many_kernel=_matmul_vnni_many)

    def quantize_blocks(self, x):
        """Bit-identical to llama.cpp."""
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        quantize_scale_min(x, out, 31, F32(-0.5), 15)
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK_K), np.float32)
        _dequantize(blocks, out)
        return out

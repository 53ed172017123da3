"""Q4_K: 256-value super-blocks of 144 bytes, 4-bit values with a 6-bit scale and min per 32.

Block (ggml-common.h block_q4_K):
    d      fp16        super-block scale of the scales
    dmin   fp16        super-block scale of the mins
    scales [12] uint8  8 x (6-bit scale, 6-bit min), packed as scale_min_k4 reads them
    qs     [128] uint8 byte l of group g (0..3) holds value 64g + l (low nibble) and
                       64g + 32 + l (high nibble)
Value i of sub-block j: x = d * sc_j * q - dmin * m_j.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import q8_k, tiles
from .kquants import F32, QK_K, f16_to_f32, quantize_scale_min, scale_min_k4
from .registry import QuantFormat, TileKernels
from .simd import (HAVE_VNNI, add_f, add_i, band, dpbusd16, dpwssd, load_h, load_i, load_u8, load_u8_pairs, mul_f,
                   mul_i, splat_f, splat_i, sra, srl, store_f, sub_f, sum16, to_f, zero_f, zero_i)

# Rows per kernel tile: the kernels' vector loops run across the rows of a tile. Kept in this
# module so that numba's cache of the kernels follows it.
TILE = 128
# The VNNI kernel's tiles: 16 rows, one vector; a tile's bytes lie in the order the kernel reads them.
VTILE = 16
# Independent sums a group's eight words of products go into: with vpdpbusd each sum is a chain of
# dependent instructions, and two chains of four read a decode step's experts at 116-127 GB/s where
# one of eight read them at 101-116 (16 threads of an AVX-512 Xeon; bench/bench_experts.py's step
# over 104 layers of gate and up, 2 GB). On AVX2 a chain is one vpaddw a product and a second sum
# would cost a vpmaddwd: one.
CHAINS = 2 if HAVE_VNNI else 1


# --- dequantize -------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _dequantize(blocks, out):
    # blocks (n, 144) uint8 -> out (n, 256) float32; same float order as gguf-py and ggml
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
                q = (b[16 + 32 * g + l] >> shift) & 0xF
                out[i, 32 * j + l] = dj * F32(q) - mj


# --- kernels ----------------------------------------------------------------------------------
# Rows are repacked into tiles of TILE rows with the rows innermost, so that the vector loops run
# across the rows of a tile (DESIGN.md, kernels): byte l of group g of super-block b of every row
# of the tile lies side by side. Scales and mins are decoded at pack time; activations are Q8_K;
# products accumulate in int32 per super-block: sum_j sc_j * sum_l q * x8 for the scales,
# sum_j m_j * (sum of x8 over sub-block j) for the mins, as ggml_vec_dot_q4_K_q8_K does.


class PackedQ4K(NamedTuple):
    qs: np.ndarray  # (n_tiles, nb, 4, 32, TILE) uint8: byte l of group g of each row
    #                 VNNI: (n_tiles, nb, 4, 8, TILE) uint32, bytes 4w..4w+3 of group g in word w
    sc: np.ndarray  # (n_tiles, nb, 8, TILE) uint8: 6-bit scale of sub-block j
    mn: np.ndarray  # (n_tiles, nb, 8, TILE) uint8: 6-bit min of sub-block j
    #                 VNNI: the same bytes in pairs, the mins of sub-blocks 2q and 2q + 1 of row i at
    #                 bytes 2i and 2i + 1 of the q-th 2 * TILE (the 16-bit halves simd.dpwssd multiplies)
    d: np.ndarray  # (n_tiles, nb, TILE) float32; VNNI: uint16 fp16 bits
    dmin: np.ndarray  # (n_tiles, nb, TILE) as d
    n: int  # rows of the matrix (the last tile is padded with zero rows)


@njit(cache=True, inline="always")
def pack_scales(blk, t, b, i, sc, mn, d, dmin):
    # a block's d, dmin and 6-bit scales and mins into row i of tile t (either layout)
    d[t, b, i] = f16_to_f32(blk[0] | (blk[1] << 8))
    dmin[t, b, i] = f16_to_f32(blk[2] | (blk[3] << 8))
    for j in range(8):
        sc[t, b, j, i], mn[t, b, j, i] = scale_min_k4(j, blk[4:16])


@njit(parallel=True, cache=True)
def _pack(raw3, qs, sc, mn, d, dmin):
    # raw3 (N, nb, 144) file blocks -> the PackedQ4K arrays; rows past N are left as they are
    n = raw3.shape[0]
    for t in prange(qs.shape[0]):
        for b in range(qs.shape[1]):
            for i in range(min(TILE, n - t * TILE)):
                blk = raw3[t * TILE + i, b]
                pack_scales(blk, t, b, i, sc, mn, d, dmin)
                for g in range(4):
                    for l in range(32):
                        qs[t, b, g, l, i] = blk[16 + 32 * g + l]


@njit(cache=True, nogil=True)
def _pack_words(raw3, qs, sc, mn, d, dmin):
    # as _pack, with qs (n_tiles, nb, 4, 8, VTILE, 4) uint8: word w of group g of each row; mn
    # (n_tiles, nb, 4, VTILE, 2): the mins in pairs
    n = raw3.shape[0]
    for t in range(qs.shape[0]):
        for b in range(qs.shape[1]):
            for i in range(min(VTILE, n - t * VTILE)):
                blk = raw3[t * VTILE + i, b]
                d[t, b, i] = f16_to_f32(blk[0] | (blk[1] << 8))
                dmin[t, b, i] = f16_to_f32(blk[2] | (blk[3] << 8))
                for j in range(8):
                    sc[t, b, j, i], mn[t, b, j // 2, i, j % 2] = scale_min_k4(j, blk[4:16])
                for g in range(4):
                    for w in range(8):
                        for u in range(4):
                            qs[t, b, g, w, i, u] = blk[16 + 32 * g + 4 * w + u]


def pack_tiles(raw3, tile):
    # raw3 (N, nb, block bytes) -> zeroed sc, mn, d, dmin for tiles of `tile` rows (Q4_K's and Q5_K's
    # layouts; zero rows pad the last tile), the quants' arrays left to the caller
    n, nb = raw3.shape[:2]
    n_tiles = -(-n // tile)
    sc = tiles.zeros((n_tiles, nb, 8, tile), np.uint8)
    mn = tiles.zeros((n_tiles, nb, 8, tile), np.uint8)
    d = tiles.zeros((n_tiles, nb, tile), np.float32)  # zero rows pad the last tile
    dmin = tiles.zeros((n_tiles, nb, tile), np.float32)
    return sc, mn, d, dmin


def pack(raw3: np.ndarray) -> PackedQ4K:
    """The portable kernels' layout of raw3 (N, nb, 144) file blocks: tiles of TILE rows."""
    sc, mn, d, dmin = pack_tiles(raw3, TILE)
    qs = tiles.zeros((d.shape[0], d.shape[1], 4, 32, TILE), np.uint8)
    _pack(raw3, qs, sc, mn, d, dmin)
    return PackedQ4K(qs=qs, sc=sc, mn=mn, d=d, dmin=dmin, n=raw3.shape[0])


def pack_words(raw3: np.ndarray) -> PackedQ4K:
    """The VNNI kernels' layout: tiles of VTILE rows, qs as uint32 words, d and dmin as fp16 bits
    (simd.load_h widens them as the kernels read them)."""
    sc, mn, d, dmin = pack_tiles(raw3, VTILE)
    n_tiles, nb = d.shape[:2]
    qs = tiles.zeros((n_tiles, nb, 4, 8, VTILE, 4), np.uint8)
    mn = mn.reshape(n_tiles, nb, 4, VTILE, 2)
    _pack_words(raw3, qs, sc, mn, d, dmin)
    qs = qs.view(np.uint32).reshape(n_tiles, nb, 4, 8, VTILE)
    mn = mn.reshape(n_tiles, nb, 8, VTILE)
    d, dmin = (tiles.aligned(a, np.float16).view(np.uint16) for a in (d, dmin))  # fp16 bits again, exactly
    return PackedQ4K(qs=qs, sc=sc, mn=mn, d=d, dmin=dmin, n=raw3.shape[0])


@njit(cache=True)
def _block_dot(w, sc, x, isum):
    # isum[r] = sum_j sc[j, r] * sum_l q(r, 32j + l) * x[32j + l] over one super-block of a tile.
    # w (4, 32, TILE) uint8, sc (8, TILE) uint8, x (256,) int8, isum (TILE,) int32.
    # The 32 products per sub-block are written as four loops of 8: LLVM unrolls each and
    # vectorizes across the rows with the sums in registers (one 32-long loop it vectorizes
    # along l instead, with a horizontal sum per row).
    isum[:] = 0
    for g in range(4):
        wg = w[g]
        xl = x[64 * g: 64 * g + 32]  # values of sub-block 2g (low nibbles)
        xh = x[64 * g + 32: 64 * g + 64]  # sub-block 2g + 1 (high nibbles)
        for r in range(TILE):
            lo = 0
            hi = 0
            for l in range(0, 8):
                q = np.int32(wg[l, r])
                lo += (q & 0xF) * np.int32(xl[l])
                hi += (q >> 4) * np.int32(xh[l])
            for l in range(8, 16):
                q = np.int32(wg[l, r])
                lo += (q & 0xF) * np.int32(xl[l])
                hi += (q >> 4) * np.int32(xh[l])
            for l in range(16, 24):
                q = np.int32(wg[l, r])
                lo += (q & 0xF) * np.int32(xl[l])
                hi += (q >> 4) * np.int32(xh[l])
            for l in range(24, 32):
                q = np.int32(wg[l, r])
                lo += (q & 0xF) * np.int32(xl[l])
                hi += (q >> 4) * np.int32(xh[l])
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
def _matvec(qs, sc, mn, d, dmin, xq, xd, bsums, y):
    # xq (K,) int8, xd (nb,) float32, bsums (nb, 16) int32 sums per 16 values; y (n_tiles, TILE)
    for t in prange(qs.shape[0]):
        isum = np.empty(TILE, np.int32)
        acc = np.zeros(TILE, np.float32)
        for b in range(qs.shape[1]):
            _block_dot(qs[t, b], sc[t, b], xq[QK_K * b: QK_K * (b + 1)], isum)
            _accumulate(acc, isum, mn[t, b], d[t, b], dmin[t, b], xd[b], bsums[b])
        for r in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            y[t, r] = acc[r]  # shape-error path, seconds on a first run


@njit(parallel=True, cache=True)
def _matmul(qs, sc, mn, d, dmin, xq, xd, bsums, y):
    # xq (T, K) int8, xd (T, nb), bsums (T, nb, 16); y (n_tiles, T, TILE). Each super-block of a
    # tile is read once from memory and used for all T tokens. (Unpacking the nibbles once per
    # super-block for all tokens, as q6_k does, measured slower here.)
    n_tok = xq.shape[0]
    for t in prange(qs.shape[0]):
        isum = np.empty(TILE, np.int32)
        acc = np.zeros((n_tok, TILE), np.float32)
        for b in range(qs.shape[1]):
            for k in range(n_tok):
                _block_dot(qs[t, b], sc[t, b], xq[k, QK_K * b: QK_K * (b + 1)], isum)
                _accumulate(acc[k], isum, mn[t, b], d[t, b], dmin[t, b], xd[k, b], bsums[k, b])
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


@njit(cache=True, inline="always")
def _tile_vnni(qs, sc, mn, d, dmin, t, xw, xd, bsums, k, y, yo, fetch):
    # Tile t (16 rows, one vector) times activation row k into y.flat[yo : yo + 16]. The products
    # four values at a time (simd.dpbusd): word w of group g holds values 64g + 4w + i (low nibbles,
    # sub-block 2g) and 64g + 32 + 4w + i (high nibbles, sub-block 2g + 1); int32 sums per
    # sub-block, times the 6-bit scales; the mins' products with Q8_K's sums over their sub-blocks
    # as 16-bit pairs (simd.dpwssd). With vpdpbusd the high nibbles are masked in place (16 times
    # their value: the sub-block's sum is shifted down once); dpbusd16's int16 pairs on AVX2 need
    # them shifted first. qs (n_tiles, nb, 4, 8, 16) uint32; sc (n_tiles, nb, 8, 16) uint8; mn
    # paired (PackedQ4K); d, dmin (n_tiles, nb, 16) fp16 bits; xw (T, K / 4) int32 words of int8;
    # bsums (T, nb, 16).
    nb = qs.shape[1]
    low = splat_i(0x0F0F0F0F)
    high = splat_i(-0x0F0F0F10)  # 0xF0F0F0F0
    acc = zero_f()
    for b in range(nb):
        tb = t * nb + b
        if fetch:  # the first row over this tile: its next blocks (tiles.ahead)
            tiles.ahead(qs, tb * 32 * VTILE, 32 * VTILE)
            ahead_scales(sc, mn, d, dmin, tb)
        isum = zero_i()
        for g in range(4):
            lo, hi = zero_i(), zero_i()
            o = (tb * 4 + g) * 8 * VTILE
            xo = 64 * b + 16 * g
            for c in range(CHAINS):
                lc, hc = zero_i(), zero_i()
                for w in range(c * 8 // CHAINS, (c + 1) * 8 // CHAINS):
                    v = load_i(qs, o + w * VTILE)
                    lc = dpbusd16(lc, band(v, low), splat_i(xw[k, xo + w]))  # 8 nibble products each: dpbusd16's bound
                    if HAVE_VNNI:
                        hc = dpbusd16(hc, band(v, high), splat_i(xw[k, xo + 8 + w]))
                    else:
                        hc = dpbusd16(hc, band(srl(v, 4), low), splat_i(xw[k, xo + 8 + w]))
                lo, hi = sum16(lo, lc), sum16(hi, hc)
            if HAVE_VNNI:
                hi = sra(hi, 4)
            so = (tb * 8 + 2 * g) * VTILE
            isum = add_i(isum, add_i(mul_i(lo, load_u8(sc, so)), mul_i(hi, load_u8(sc, so + VTILE))))
        msum = zero_i()
        for q in range(4):  # Q8_K's sums over sub-blocks 2q and 2q + 1 (each within +-32 * 127) as int16 halves
            s0 = (bsums[k, b, 4 * q] + bsums[k, b, 4 * q + 1]) & 0xFFFF
            s1 = bsums[k, b, 4 * q + 2] + bsums[k, b, 4 * q + 3]
            msum = dpwssd(msum, load_u8_pairs(mn, (tb * 4 + q) * 2 * VTILE), splat_i(s0 | (s1 << 16)))
        part = sub_f(mul_f(load_h(d, tb * VTILE), to_f(isum)), mul_f(load_h(dmin, tb * VTILE), to_f(msum)))
        acc = add_f(acc, mul_f(splat_f(xd[k, b]), part))
    store_f(y, yo, acc)


@njit(cache=True, inline="always")
def ahead_scales(sc, mn, d, dmin, tb):
    # the scales' share of tiles.ahead for block tb (t * nb + b) of a VTILE-row tile (Q4_K, Q5_K)
    tiles.ahead(sc, tb * 8 * VTILE, 8 * VTILE)
    tiles.ahead(mn, tb * 8 * VTILE, 8 * VTILE)
    tiles.ahead(d, tb * VTILE, VTILE)
    tiles.ahead(dmin, tb * VTILE, VTILE)


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, sc, mn, d, dmin, xw, xd, bsums, y):
    # y (n_tiles, T, 16)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            _tile_vnni(qs, sc, mn, d, dmin, t, xw, xd, bsums, k, y, (t * n_tok + k) * VTILE, k == 0)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qss, scs, mns, ds, dmins, rows, xw, xd, bsums, y):
    # matrix j times activation row rows[j] -> y[j] (n_tiles, 16); the arguments are tuples of arrays
    nt = qss[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qss[j], scs[j], mns[j], ds[j], dmins[j], t, xw, xd, bsums, rows[j], y[j], t * VTILE, True)


_WEIGHTS = ("qs", "sc", "mn", "d", "dmin")


class Q4_K(QuantFormat):
    qtype = GGMLQuantizationType.Q4_K
    portable = TileKernels(pack, _WEIGHTS, q8_k.ints, _matmul, _matvec, q8_k.vector)
    vnni = TileKernels(pack_words, _WEIGHTS, q8_k.words, _matmul_vnni, many_kernel=_matmul_vnni_many)

    def quantize_blocks(self, x):
        """Bit-identical to llama.cpp."""
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        quantize_scale_min(x, out, 15, F32(-1.0), 20)
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK_K), np.float32)
        _dequantize(blocks, out)
        return out

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

from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import q8_k, tiles
from .kquants import F32, GROUP_MAX_EPS, QK_K, dot_levels16, f16_to_f32, f32_to_f16, make_qx_quants, nearest_int
from .registry import QuantFormat, TileKernels
from .simd import (add_f, add_i, band, bor, dpbusd_small, load_h, load_i, load_i8, mul_f, mul_i, sll, splat_f, splat_i, srl,
                   store_f, store_i, sub_i, to_f, zero_f, zero_i)

# Rows per kernel tile: the kernels' vector loops run across the rows of a tile. Kept in this
# module so that numba's cache of the kernels follows it.
TILE = 128
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
def _quantize(x, out):
    # x (n, 256) float32 -> out (n, 210) uint8
    n = x.shape[0]
    for c in prange((n + 15) // 16):  # 16 blocks per task: the scratch arrays once per task
        L = np.empty(QK_K, np.uint8)
        scales = np.empty(16, np.float32)
        for i in range(16 * c, min(16 * c + 16, n)):
            _quantize_block(x[i], out[i], L, scales)


# --- kernels ----------------------------------------------------------------------------------
# Tiles of TILE rows with the rows innermost (see q4_k.py). The four 6-bit values that the file
# spreads over two ql nibbles and one qh byte (values l, l + 32, l + 64, l + 96 of a half) are
# repacked into three bytes, a = v1 | v4[0:2] << 6, b = v2 | v4[2:4] << 6, c = v3 | v4[4:6] << 6,
# which take fewer operations to take apart. Int8 scales and d are decoded at pack time. With
# Q8_K activations the unsigned levels q (0..63) accumulate in int32, and the -32 offset is taken
# off once per super-block with the sums of 16 activations: sum_j sc_j * (sum_l q * x8 - 32 *
# bsum_j), as ggml_vec_dot_q6_K_q8_K does.


class PackedQ6K(NamedTuple):
    q3: np.ndarray  # (n_tiles, nb, 3, 64, TILE) uint8: bytes a, b, c of triplet 32h + l
    sc: np.ndarray  # (n_tiles, nb, 16, TILE) int8
    d: np.ndarray  # (n_tiles, nb, TILE) float32
    n: int  # rows of the matrix (the last tile is padded with zero rows)


@njit(parallel=True, cache=True)
def _pack(raw3, q3, sc, d):
    # raw3 (N, nb, 210) file blocks -> the PackedQ6K arrays; rows past N are left as they are
    n = raw3.shape[0]
    for t in prange(q3.shape[0]):
        for b in range(q3.shape[1]):
            for i in range(min(TILE, n - t * TILE)):
                blk = raw3[t * TILE + i, b]
                d[t, b, i] = f16_to_f32(blk[D] | (blk[D + 1] << 8))
                for j in range(16):
                    sc[t, b, j, i] = np.int8(blk[SC + j])
                for h in range(2):
                    for l in range(32):
                        lo = blk[QL + 64 * h + l]
                        hi = blk[QL + 64 * h + 32 + l]
                        qh = blk[QH + 32 * h + l]
                        v4 = (hi >> 4) | ((qh >> 2) & 0x30)  # values l + {0, 32, 64, 96} of half h
                        q3[t, b, 0, 32 * h + l, i] = (lo & 0xF) | ((qh & 3) << 4) | ((v4 & 3) << 6)
                        q3[t, b, 1, 32 * h + l, i] = ((hi & 0xF) | ((qh & 0xC) << 2)
                                                      | (((v4 >> 2) & 3) << 6))
                        q3[t, b, 2, 32 * h + l, i] = (lo >> 4) | (qh & 0x30) | ((v4 >> 4) << 6)


def pack(raw3: np.ndarray) -> PackedQ6K:
    """The portable kernels' layout of raw3 (N, nb, 210) file blocks: tiles of TILE rows."""
    n, nb = raw3.shape[:2]
    n_tiles = -(-n // TILE)
    q3 = tiles.zeros((n_tiles, nb, 3, 64, TILE), np.uint8)
    sc = tiles.zeros((n_tiles, nb, 16, TILE), np.int8)
    d = tiles.zeros((n_tiles, nb, TILE), np.float32)  # zero rows pad the last tile
    _pack(raw3, q3, sc, d)
    return PackedQ6K(q3=q3, sc=sc, d=d, n=n)


# VNNI layout: tiles of VTILE = 16 rows (one vector), the file's 210 bytes a row and block. Level word
# w of a block (the 6-bit levels 0..63 of values 4w .. 4w + 3, a byte each, as vpdpbusd takes them) is
# made from two uint32 words of the tile: the low four bits of words w and w + 32 as the low and high
# nibbles of nibble word w % 32, the high two bits of words p, p + 16, p + 32 and p + 48 as bits 0-1,
# 2-3, 4-5 and 6-7 of high word p. Per block, for p = 0..15 in turn: nibble words p and p + 16 and
# high word p, rows side by side, so that a block is read front to back. Levels one a byte (256 bytes,
# no masks or shifts) took 22% more memory and 1.3x the time of this layout on the 102400-row output
# head (6.0-6.3 against 4.7-4.8 ms a product on 2 cores).
VTILE = 16
WORDS = 48  # uint32 words of a row and block: 32 nibble words, 16 high words


class PackedQ6KWords(NamedTuple):
    q: np.ndarray  # (n_tiles, nb, WORDS, VTILE) uint32
    sc: np.ndarray  # (n_tiles, nb, 16, VTILE) int8
    d: np.ndarray  # (n_tiles, nb, VTILE) uint16: fp16 bits, widened by simd.load_h
    n: int


@njit(parallel=True, cache=True)
def _level_bytes(raw3, out):
    # raw3 (N, nb, 210) file blocks -> out (N, nb, 256) uint8 levels
    for r in prange(raw3.shape[0]):
        for b in range(raw3.shape[1]):
            blk = raw3[r, b]
            for i in range(QK_K):
                out[r, b, i] = _level(blk, i)


@njit(parallel=True, cache=True)
def _words(levels, q):
    # levels (nt, VTILE, nb, 64, 4) uint8 -> q (nt, nb, WORDS, VTILE) uint32 in the layout above
    for t in prange(levels.shape[0]):
        for b in range(levels.shape[2]):
            for r in range(VTILE):
                lv = levels[t, r, b]
                for p in range(16):
                    n0 = np.uint32(0)
                    n1 = np.uint32(0)
                    hb = np.uint32(0)
                    for i in range(4):
                        a, c = np.uint32(lv[p, i]), np.uint32(lv[p + 16, i])
                        e, f = np.uint32(lv[p + 32, i]), np.uint32(lv[p + 48, i])
                        n0 |= ((a & 15) | ((e & 15) << 4)) << (8 * i)
                        n1 |= ((c & 15) | ((f & 15) << 4)) << (8 * i)
                        hb |= ((a >> 4) | ((c >> 4) << 2) | ((e >> 4) << 4) | ((f >> 4) << 6)) << (8 * i)
                    q[t, b, 3 * p, r] = n0
                    q[t, b, 3 * p + 1, r] = n1
                    q[t, b, 3 * p + 2, r] = hb


def pack_words(b: np.ndarray) -> PackedQ6KWords:
    """The VNNI kernel's layout of b (N, nb, 210) file blocks."""
    n, nb = b.shape[:2]
    nt = -(-n // VTILE)
    pad = np.zeros((nt * VTILE,) + b.shape[1:], np.uint8)
    pad[:n] = b
    levels = np.empty((nt * VTILE, nb, QK_K), np.uint8)
    _level_bytes(pad, levels)
    q = tiles.zeros((nt, nb, WORDS, VTILE), np.uint32)
    _words(levels.reshape(nt, VTILE, nb, 64, 4), q)
    pad = pad.reshape(nt, VTILE, nb, b.shape[2])
    sc = pad[..., SC:D].view(np.int8)  # (nt, VTILE, nb, 16)
    d = np.ascontiguousarray(pad[..., D:D + 2]).view(np.uint16)[..., 0]  # (nt, VTILE, nb) fp16 bits
    return PackedQ6KWords(q=q, sc=tiles.aligned(sc.transpose(0, 2, 3, 1)), d=tiles.aligned(d.transpose(0, 2, 1)), n=n)


@njit(cache=True, inline="always")
def _scaled(isum, s0, s1, s2, s3, bsums, k, b, j, sc, so):
    # isum plus sub-blocks j, j + 4, j + 8 and j + 12's sums (s0..s3), each less its levels' offset
    # of 32 (32 * the activations' sum over the sub-block) and times its scale
    for i, s in enumerate((s0, s1, s2, s3)):
        isum = add_i(isum, mul_i(sub_i(s, splat_i(32 * bsums[k, b, j + 4 * i])), load_i8(sc, so + (j + 4 * i) * VTILE)))
    return isum


@njit(cache=True, inline="always")
def _level_words(q, o, m4, m2):
    # step p of a block (its three words at q.flat[o:]): level words p, p + 16, p + 32 and p + 48
    n0, n1, hb = load_i(q, o), load_i(q, o + VTILE), load_i(q, o + 2 * VTILE)
    return (bor(band(n0, m4), band(sll(hb, 4), m2)), bor(band(n1, m4), band(sll(hb, 2), m2)),
            bor(band(srl(n0, 4), m4), band(hb, m2)), bor(band(srl(n1, 4), m4), band(srl(hb, 2), m2)))


@njit(cache=True, inline="always")
def _tile_vnni(q, sc, d, t, xw, xd, bsums, k, y, yo):
    # Tile t (16 rows, one vector) times activation row k into y.flat[yo : yo + 16]. q (n_tiles, nb,
    # WORDS, 16) uint32 in the layout above; sc (n_tiles, nb, 16, 16) int8; d (n_tiles, nb, 16);
    # xw (T, K / 4) int32 words of Q8_K int8; xd (T, nb); bsums (T, nb, 16). High word p = 4j + i
    # completes level words p, p + 16, p + 32 and p + 48, which belong to sub-blocks j, j + 4, j + 8
    # and j + 12: four sums, each over its sub-block's four words, then scaled.
    nb = q.shape[1]
    m4, m2 = splat_i(0x0F0F0F0F), splat_i(0x30303030)
    acc = zero_f()
    for b in range(nb):
        base = (t * nb + b) * WORDS * VTILE
        so = (t * nb + b) * 16 * VTILE
        isum = zero_i()
        for j in range(4):
            s0, s1, s2, s3 = zero_i(), zero_i(), zero_i(), zero_i()
            for i in range(4):
                p = 4 * j + i
                l0, l1, l2, l3 = _level_words(q, base + 3 * p * VTILE, m4, m2)
                w = 64 * b + p
                s0 = dpbusd_small(s0, l0, splat_i(xw[k, w]))
                s1 = dpbusd_small(s1, l1, splat_i(xw[k, w + 16]))
                s2 = dpbusd_small(s2, l2, splat_i(xw[k, w + 32]))
                s3 = dpbusd_small(s3, l3, splat_i(xw[k, w + 48]))
            isum = _scaled(isum, s0, s1, s2, s3, bsums, k, b, j, sc, so)
        dd = mul_f(splat_f(xd[k, b]), load_h(d, (t * nb + b) * VTILE))
        acc = add_f(acc, mul_f(dd, to_f(isum)))
    store_f(y, yo, acc)


@njit(cache=True, inline="always")
def _unpack_tile(q, t, lv):
    # the level words of tile t, every block: lv (nb * 64 * VTILE,) uint32, word w of block b at
    # (64 * b + w) * VTILE (a prompt's rows then read them as they are, as many times as there are rows)
    nb = q.shape[1]
    m4, m2 = splat_i(0x0F0F0F0F), splat_i(0x30303030)
    for b in range(nb):
        base = (t * nb + b) * WORDS * VTILE
        for p in range(16):
            l0, l1, l2, l3 = _level_words(q, base + 3 * p * VTILE, m4, m2)
            w = (64 * b + p) * VTILE
            store_i(lv, w, l0)
            store_i(lv, w + 16 * VTILE, l1)
            store_i(lv, w + 32 * VTILE, l2)
            store_i(lv, w + 48 * VTILE, l3)


@njit(cache=True, inline="always")
def _levels_row(lv, sc, d, t, xw, xd, bsums, k, y, yo):
    # _tile_vnni's sums for activation row k from the unpacked level words lv (_unpack_tile): the
    # same integer sums, added in the same order, so the same results
    nb = sc.shape[1]
    acc = zero_f()
    for b in range(nb):
        so = (t * nb + b) * 16 * VTILE
        isum = zero_i()
        for j in range(4):
            s0, s1, s2, s3 = zero_i(), zero_i(), zero_i(), zero_i()
            for i in range(4):
                w = 64 * b + 4 * j + i
                s0 = dpbusd_small(s0, load_i(lv, w * VTILE), splat_i(xw[k, w]))
                s1 = dpbusd_small(s1, load_i(lv, (w + 16) * VTILE), splat_i(xw[k, w + 16]))
                s2 = dpbusd_small(s2, load_i(lv, (w + 32) * VTILE), splat_i(xw[k, w + 32]))
                s3 = dpbusd_small(s3, load_i(lv, (w + 48) * VTILE), splat_i(xw[k, w + 48]))
            isum = _scaled(isum, s0, s1, s2, s3, bsums, k, b, j, sc, so)
        dd = mul_f(splat_f(xd[k, b]), load_h(d, (t * nb + b) * VTILE))
        acc = add_f(acc, mul_f(dd, to_f(isum)))
    store_f(y, yo, acc)


@njit(parallel=True, cache=True)
def _matmul_vnni(q, sc, d, xw, xd, bsums, y):
    # y (n_tiles, T, 16). One row (a decode step's) unpacks as it goes; several unpack each tile once
    # into a scratch of its level words (nb * 4 KiB) and read that for every row.
    nt, nb, n_tok = q.shape[0], q.shape[1], xw.shape[0]
    if n_tok == 1:
        for t in prange(nt):
            _tile_vnni(q, sc, d, t, xw, xd, bsums, 0, y, t * VTILE)
        return
    for t in prange(nt):
        lv = np.empty(nb * 64 * VTILE, np.uint32)
        _unpack_tile(q, t, lv)
        for k in range(n_tok):
            _levels_row(lv, sc, d, t, xw, xd, bsums, k, y, (t * n_tok + k) * VTILE)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qs, scs, ds, rows, xw, xd, bsums, y):
    # matrix j times activation row rows[j] -> y[j] (n_tiles, 16); the arguments are tuples of
    # arrays (MLA's per-head k_b / v_b of a Q4_K_M mix: a decode step's 16 heads in one call)
    nt = qs[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qs[j], scs[j], ds[j], t, xw, xd, bsums, rows[j], y[j], t * VTILE)


@njit(cache=True)
def _block_dot(q3, sc, x, isum):
    # isum[r] = sum_j sc[j, r] * sum_l q(r, 16j + l) * x[16j + l] over one super-block of a tile,
    # q unsigned. q3 (3, 64, TILE) uint8, sc (16, TILE) int8, x (256,) int8.
    # Triplet 32h + l holds values 128h + l + {0, 32, 64, 96}: four sub-blocks at a time. The
    # loops over l are 8 long so that LLVM unrolls them and vectorizes across the rows (see
    # q4_k._block_dot).
    isum[:] = 0
    pa, pb, pc = q3[0], q3[1], q3[2]
    for h in range(2):
        for l0 in range(0, 32, 8):
            j = 8 * h + l0 // 16  # sub-block of value 128h + l; +2, +4, +6 for the three others
            x1 = x[128 * h + l0: 128 * h + l0 + 8]
            x2 = x[128 * h + 32 + l0: 128 * h + 40 + l0]
            x3 = x[128 * h + 64 + l0: 128 * h + 72 + l0]
            x4 = x[128 * h + 96 + l0: 128 * h + 104 + l0]
            for r in range(TILE):
                a1 = 0
                a2 = 0
                a3 = 0
                a4 = 0
                for l in range(8):
                    a = np.int32(pa[32 * h + l0 + l, r])
                    b = np.int32(pb[32 * h + l0 + l, r])
                    c = np.int32(pc[32 * h + l0 + l, r])
                    a1 += (a & 63) * np.int32(x1[l])
                    a2 += (b & 63) * np.int32(x2[l])
                    a3 += (c & 63) * np.int32(x3[l])
                    a4 += ((a >> 6) | ((b >> 4) & 0xC) | ((c >> 2) & 0x30)) * np.int32(x4[l])
                isum[r] += (np.int32(a1) * np.int32(sc[j, r])
                            + np.int32(a2) * np.int32(sc[j + 2, r])
                            + np.int32(a3) * np.int32(sc[j + 4, r])
                            + np.int32(a4) * np.int32(sc[j + 6, r]))


@njit(cache=True)
def _accumulate(acc, isum, sc, d, xd, bsums):
    # acc (TILE,) += xd * d * (isum - 32 * sum_j sc_j * bsums_j) for one super-block
    for r in range(TILE):
        corr = 0
        for j in range(16):
            corr += np.int32(sc[j, r]) * bsums[j]
        acc[r] += xd * d[r] * F32(isum[r] - 32 * corr)


@njit(parallel=True, cache=True)
def _matvec(q3, sc, d, xq, xd, bsums, y):
    # xq (K,) int8, xd (nb,) float32, bsums (nb, 16) int32 sums per 16 values; y (n_tiles, TILE)
    for t in prange(q3.shape[0]):
        isum = np.empty(TILE, np.int32)
        acc = np.zeros(TILE, np.float32)
        for b in range(q3.shape[1]):
            _block_dot(q3[t, b], sc[t, b], xq[QK_K * b: QK_K * (b + 1)], isum)
            _accumulate(acc, isum, sc[t, b], d[t, b], xd[b], bsums[b])
        for r in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            y[t, r] = acc[r]  # shape-error path, seconds on a first run


@njit(cache=True)
def _levels(q3, lv):
    # q3 (3, 64, TILE) -> lv (256, TILE) uint8 levels 0..63 in value order
    for h in range(2):
        for l in range(32):
            for r in range(TILE):
                a = q3[0, 32 * h + l, r]
                b = q3[1, 32 * h + l, r]
                c = q3[2, 32 * h + l, r]
                lv[128 * h + l, r] = a & 63
                lv[128 * h + 32 + l, r] = b & 63
                lv[128 * h + 64 + l, r] = c & 63
                lv[128 * h + 96 + l, r] = (a >> 6) | ((b >> 4) & 0xC) | ((c >> 2) & 0x30)


@njit(parallel=True, cache=True)
def _matmul(q3, sc, d, xq, xd, bsums, y):
    # xq (T, K) int8, xd (T, nb), bsums (T, nb, 16); y (n_tiles, T, TILE). Each super-block of a
    # tile is read once from memory, unpacked once, and used for all T tokens.
    n_tok = xq.shape[0]
    for t in prange(q3.shape[0]):
        lv = np.empty((QK_K, TILE), np.uint8)
        isum = np.empty(TILE, np.int32)
        acc = np.zeros((n_tok, TILE), np.float32)
        for b in range(q3.shape[1]):
            _levels(q3[t, b], lv)
            for k in range(n_tok):
                dot_levels16(lv, sc[t, b], xq[k, QK_K * b: QK_K * (b + 1)], isum)
                _accumulate(acc[k], isum, sc[t, b], d[t, b], xd[k, b], bsums[k, b])
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


class Q6_K(QuantFormat):
    qtype = GGMLQuantizationType.Q6_K
    portable = TileKernels(pack, ("q3", "sc", "d"), q8_k.ints, _matmul, _matvec, q8_k.vector)
    vnni = TileKernels(pack_words, ("q", "sc", "d"), q8_k.words, _matmul_vnni, many_kernel=_matmul_vnni_many)

    def quantize_blocks(self, x):
        """Bit-identical to llama.cpp."""
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        _quantize(x, out)
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK_K), np.float32)
        _dequantize(blocks, out)
        return out

"""Q4_0: 32 values per 18-byte block: fp16 d, qs[16]; value j is the low nibble of qs[j], value
j + 16 the high nibble; x = d * (q - 8) (ggml-common.h block_q4_0, ggml-quants.c).

Kernel layout (tiles.py, nibbles.py): the 16 quant bytes of a block as 4 uint32 words per row;
word g holds the nibbles of values 4g..4g+3 (low) and 16+4g..16+4g+3 (high). The -8 offset is
applied once per block through the exact sum of the int8 activations. Both kernel sets read that
layout: the portable one through nibbles.row_dot, the VNNI one four values at a time with
simd.dpbusd.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from gguf import GGMLQuantizationType
from numba import carray, njit, prange

from . import activations, tiles
from .nibbles import row_dot
from .registry import QuantFormat, TileKernels
from .simd import (HAVE_VNNI, add_f, at_address, band, dpbusd16, load_f, load_h, load_i, mul_f, splat_f, splat_i, srl, store_f,
                   sum16, to_f, zero_f, zero_i)

F32 = np.float32
QK = 32


@njit(parallel=True, cache=True)
def _matmul(p, xq, xd, xsum, xs, y):
    # xq (T, K) int32; xd, xsum, xs (T, nb); y (n_tiles, T, TILE)
    for t in prange(p.qs.shape[0]):
        acc = np.zeros((xq.shape[0], tiles.TILE), np.float32)
        for b in range(p.qs.shape[1]):
            for k in range(xq.shape[0]):
                off = np.int32(8) * xsum[k, b]  # the -8 of every quant
                dx = xd[k, b]
                for r in range(tiles.TILE):
                    acc[k, r] += F32(np.int32(row_dot(p.qs, t, b, r, xq, k) - off)) * (p.d[t, b, r] * dx)
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


@njit(cache=True, inline="always")
def _tile_vnni(qs, d, t, xw, xd, xsum, k, y, yo, fetch):
    # Tile t times activation row k into y.flat[yo : yo + TILE]. Byte i of word g holds values
    # 4g + i (low nibble) and 16 + 4g + i (high nibble), so masking the word gives four unsigned
    # bytes that vpdpbusd multiplies with the four int8 activations of an int32 word of xw and adds
    # into each row's lane. qs (n_tiles, nb, 4, TILE) uint32, d (n_tiles, nb, TILE) uint16 halves
    # (widened exactly, so the products are those of float32 scales); xw (T, K / 4)
    # int32 words of int8 activations; xd, xsum (T, nb). TILE = 64: four 16-lane chunks. fetch: the
    # first row over this tile asks for its blocks ahead (tiles.ahead); the rows after it find them in cache.
    nb = qs.shape[1]
    low = splat_i(0x0F0F0F0F)
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
    for b in range(nb):
        if fetch:
            tiles.ahead(qs, (t * nb + b) * 4 * tiles.TILE, 4 * tiles.TILE)
            tiles.ahead(d, (t * nb + b) * tiles.TILE, tiles.TILE)
        s0 = splat_i(np.int32(-8) * xsum[k, b])  # the -8 of every quant
        t0, t1, t2, t3 = zero_i(), zero_i(), zero_i(), zero_i()  # a block's 8 nibble products: dpbusd16's bound
        for g in range(4):
            lo, hi = splat_i(xw[k, 8 * b + g]), splat_i(xw[k, 8 * b + 4 + g])
            o = ((t * nb + b) * 4 + g) * tiles.TILE
            v = load_i(qs, o)
            t0 = dpbusd16(dpbusd16(t0, band(v, low), lo), band(srl(v, 4), low), hi)
            v = load_i(qs, o + 16)
            t1 = dpbusd16(dpbusd16(t1, band(v, low), lo), band(srl(v, 4), low), hi)
            v = load_i(qs, o + 32)
            t2 = dpbusd16(dpbusd16(t2, band(v, low), lo), band(srl(v, 4), low), hi)
            v = load_i(qs, o + 48)
            t3 = dpbusd16(dpbusd16(t3, band(v, low), lo), band(srl(v, 4), low), hi)
        s0, s1, s2, s3 = sum16(s0, t0), sum16(s0, t1), sum16(s0, t2), sum16(s0, t3)
        dx = splat_f(xd[k, b])
        o = (t * nb + b) * tiles.TILE
        a0 = add_f(a0, mul_f(to_f(s0), mul_f(load_h(d, o), dx)))
        a1 = add_f(a1, mul_f(to_f(s1), mul_f(load_h(d, o + 16), dx)))
        a2 = add_f(a2, mul_f(to_f(s2), mul_f(load_h(d, o + 32), dx)))
        a3 = add_f(a3, mul_f(to_f(s3), mul_f(load_h(d, o + 48), dx)))
    store_f(y, yo, a0)
    store_f(y, yo + 16, a1)
    store_f(y, yo + 32, a2)
    store_f(y, yo + 48, a3)


# Several activation rows through a tile: four (then two) at a time where dpbusd16 is AVX2's
# vpmaddubsw, each block's nibbles unpacked once for them and their four sums in registers (a 16-row
# chunk of the tile at a time: 15 of AVX2's 16 vector registers); row by row elsewhere (measured on
# AVX2 only). A V2-Lite layer's 64 experts' gate over a 32-sequence step's 192 rows: 7.8 -> 6.7 ms;
# over a prompt's 2240 rows 64.6 -> 62.3 ms.
ROW_BLOCKS = not HAVE_VNNI


@njit(cache=True, inline="always")
def _fold(s, k, b, xd, xsum, dr, y, i):
    # a block's int16 partial sums s of activation row k (with the -8 of every quant), scaled and
    # added to the row's float32 sums at y.flat[i:i + 16] (zeroed before the first block: the adds
    # from zero that _tile_vnni makes in registers)
    s = sum16(splat_i(np.int32(-8) * xsum[k, b]), s)
    store_f(y, i, add_f(load_f(y, i), mul_f(to_f(s), mul_f(dr, splat_f(xd[k, b])))))


@njit(cache=True, inline="always")
def _tile_vnni4(qs, d, t, xw, xd, xsum, k, n, y, yo, N):
    # _tile_vnni for activation rows k..k+n-1 (n = 4 or 2, a constant where inlined) into
    # y.flat[yo + r * N ...]: the same int32 sums and float32 steps per row, so the same results
    nb = qs.shape[1]
    low = splat_i(0x0F0F0F0F)
    for b in range(nb):
        tiles.ahead(qs, (t * nb + b) * 4 * tiles.TILE, 4 * tiles.TILE)
        tiles.ahead(d, (t * nb + b) * tiles.TILE, tiles.TILE)
        for c in range(0, tiles.TILE, 16):
            s0, s1, s2, s3 = zero_i(), zero_i(), zero_i(), zero_i()
            for g in range(4):
                v = load_i(qs, ((t * nb + b) * 4 + g) * tiles.TILE + c)
                lo, hi = band(v, low), band(srl(v, 4), low)
                w = 8 * b + g
                s0 = dpbusd16(dpbusd16(s0, lo, splat_i(xw[k, w])), hi, splat_i(xw[k, w + 4]))
                s1 = dpbusd16(dpbusd16(s1, lo, splat_i(xw[k + 1, w])), hi, splat_i(xw[k + 1, w + 4]))
                if n == 4:
                    s2 = dpbusd16(dpbusd16(s2, lo, splat_i(xw[k + 2, w])), hi, splat_i(xw[k + 2, w + 4]))
                    s3 = dpbusd16(dpbusd16(s3, lo, splat_i(xw[k + 3, w])), hi, splat_i(xw[k + 3, w + 4]))
            dr = load_h(d, (t * nb + b) * tiles.TILE + c)
            _fold(s0, k, b, xd, xsum, dr, y, yo + c)
            _fold(s1, k + 1, b, xd, xsum, dr, y, yo + N + c)
            if n == 4:
                _fold(s2, k + 2, b, xd, xsum, dr, y, yo + 2 * N + c)
                _fold(s3, k + 3, b, xd, xsum, dr, y, yo + 3 * N + c)


@njit(cache=True, inline="always")
def _tile_run(qs, d, t, xw, xd, xsum, r0, r1, y, yo, N):
    # activation rows r0..r1-1 through tile t into y.flat[yo + (k - r0) * N ...], zeroed (ROW_BLOCKS)
    k = r0
    if ROW_BLOCKS:
        while k + 4 <= r1:
            _tile_vnni4(qs, d, t, xw, xd, xsum, k, 4, y, yo + (k - r0) * N, N)
            k += 4
        if k + 2 <= r1:
            _tile_vnni4(qs, d, t, xw, xd, xsum, k, 2, y, yo + (k - r0) * N, N)
            k += 2
    for k in range(k, r1):
        _tile_vnni(qs, d, t, xw, xd, xsum, k, y, yo + (k - r0) * N, True)


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, d, xw, xd, xsum, y):
    # y (n_tiles, T, TILE)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        if ROW_BLOCKS and n_tok > 1:
            y[t] = 0.0  # _tile_run's blocks of rows add into their rows
        _tile_run(qs, d, t, xw, xd, xsum, 0, n_tok, y, t * n_tok * tiles.TILE, tiles.TILE)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qss, ds, rows, xw, xd, xsum, y):
    # Several matrices of one shape in one parallel region: matrix j (qss[j], ds[j]) times
    # activation row rows[j] -> y[j] (n_tiles, TILE). qss, ds: tuples of arrays.
    nt = qss[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qss[j], ds[j], t, xw, xd, xsum, rows[j], y[j], t * tiles.TILE, True)


@njit(parallel=True, cache=True)
def _matmul_vnni_groups(at, nt, nb, spans, xw, xd, xsum, y):
    # Matrix j (its qs and d arrays at addresses at[j, 0], at[j, 1], laid out as _tile_vnni reads
    # them) times activation rows spans[j, 0]..spans[j, 1]-1 -> rows spans[j, 2].. of y
    # (R, nt * TILE), zeroed: a layer's routed experts, each with the rows routed to it, as
    # _tile_run takes rows.
    N = y.shape[1]
    for job in prange(at.shape[0] * nt):  # tile-major: the threads' shares match, however the runs differ
        j, t = job % at.shape[0], job // at.shape[0]
        qs = carray(at_address(at[j, 0]), (nt, nb, 4, tiles.TILE), np.uint32)
        d = carray(at_address(at[j, 1]), (nt, nb, tiles.TILE), np.uint16)
        r0, r1, yo = spans[j, 0], spans[j, 1], spans[j, 2] * N + t * tiles.TILE
        _tile_run(qs, d, t, xw, xd, xsum, r0, r1, y, yo, N)


@njit(parallel=True, cache=True)
def _dequantize(blocks, d, out):
    # blocks (n, 18) uint8, d (n,) float32 -> out (n, 32)
    for i in prange(blocks.shape[0]):
        for j in range(16):
            q = blocks[i, 2 + j]
            out[i, j] = d[i] * F32(np.int32(q & 15) - 8)
            out[i, j + 16] = d[i] * F32(np.int32(q >> 4) - 8)


@njit(parallel=True, cache=True)
def _quantize(x, d, qs):
    # x (n, 32) float32 -> d (n,) float32 (stored as fp16 by the caller), qs (n, 16) uint8.
    # gguf-py's Q4_0.quantize_blocks = ggml-quants.c quantize_row_q4_0_ref: the value of largest
    # magnitude (first one on ties) maps to -8.
    for i in prange(x.shape[0]):
        amax = F32(0.0)
        vmax = F32(0.0)
        for j in range(QK):
            if abs(x[i, j]) > amax:
                amax = abs(x[i, j])
                vmax = x[i, j]
        di = vmax / F32(-8.0)
        idi = F32(1.0) / di if di != 0 else F32(0.0)
        d[i] = di
        for j in range(16):
            lo = min(np.int32(x[i, j] * idi + F32(8.5)), 15)
            hi = min(np.int32(x[i, j + 16] * idi + F32(8.5)), 15)
            qs[i, j] = np.uint8(lo | (hi << 4))


def _pack(b, halves=False):
    # b (N, nb, 18) file blocks -> tiles.Packed; halves: the scales as fp16 bits (the VNNI layout)
    n, nb = b.shape[:2]
    qs = tiles.tiled(n, nb, 4)  # (n_tiles, nb, 4, TILE) uint32
    tiles.tile_words(b, 2, qs)
    return tiles.Packed(qs, tiles.NONE, tiles.tile_scales(n, b, 0, halves), tiles.NONE, n)


@njit(cache=True)
def _row_vnni(qs, d, x, norm_w, eps, y):
    # a few rows' product, their activations (and norm) made in the same call (TileKernels.row_kernel)
    q, xd, xsum, _ = activations.q8_rows(x, norm_w, eps, np.int8)
    _matmul_vnni(qs, d, q.view(np.int32), xd, xsum, y)


@njit(cache=True)
def _row(p, x, norm_w, eps, y):
    # the portable kernel's row_kernel
    q, xd, xsum, xs = activations.q8_rows(x, norm_w, eps, np.int32)
    _matmul(p, q, xd, xsum, xs, y)


class Q4_0(QuantFormat):
    qtype = GGMLQuantizationType.Q4_0
    portable = TileKernels(_pack, (), activations.ints, _matmul, row_kernel=_row)
    vnni = TileKernels(partial(_pack, halves=True),
                       ("qs", "d"), activations.words, _matmul_vnni, many_kernel=_matmul_vnni_many,
                       groups_kernel=_matmul_vnni_groups, row_kernel=_row_vnni)

    def quantize_blocks(self, x):
        """Bit-identical to gguf-py."""
        d = np.empty(x.shape[0], np.float32)
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        _quantize(x, d, out[:, 2:])
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK), np.float32)
        _dequantize(blocks, tiles.fp16_field(blocks, 0), out)
        return out

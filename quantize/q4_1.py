"""Q4_1: 32 values per 20-byte block: fp16 d, fp16 m, qs[16] (nibbles as Q4_0); x = d * q + m
(ggml-common.h block_q4_1, ggml-quants.c).

Kernel layout as Q4_0 (nibbles.py: 4 uint32 words of nibbles per row and block). The min term
uses Q8_1's s = fp16(d * sum(q)) of the activations, as ggml_vec_dot_q4_1_q8_1 does. The VNNI
kernels multiply the unsigned nibbles by the int8 activations four at a time (simd.dpbusd; no
offset to take out) and add the scaled block in the portable kernel's order: the same bits.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import activations, tiles
from .nibbles import row_dot
from .registry import QuantFormat, TileKernels
from .simd import (add_f, band, dpbusd16, load_h, load_i, mul_f, splat_f, splat_i, srl, store_f, sum16, to_f, zero_f,
                   zero_i)

F32 = np.float32
QK = 32


@njit(parallel=True, cache=True)
def _matmul(p, xq, xd, xsum, xs, y):
    # xq (T, K) int32; xd, xsum, xs (T, nb); y (n_tiles, T, TILE)
    for t in prange(p.qs.shape[0]):
        acc = np.zeros((xq.shape[0], tiles.TILE), np.float32)
        for b in range(p.qs.shape[1]):
            for k in range(xq.shape[0]):
                dx, sx = xd[k, b], xs[k, b]
                for r in range(tiles.TILE):
                    acc[k, r] += F32(row_dot(p.qs, t, b, r, xq, k)) * (p.d[t, b, r] * dx) + p.m[t, b, r] * sx
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


@njit(cache=True, inline="always")
def _tile_vnni(qs, d, m, t, xw, xd, xs, k, y, yo, fetch):
    # Tile t times activation row k into y.flat[yo : yo + TILE]; qs (n_tiles, nb, 4, TILE) uint32
    # words of nibbles, d, m (n_tiles, nb, TILE); xw (T, K / 4) int32 words of int8 activations,
    # xd, xs (T, nb) (Q8_1's scale and d * sum).
    nb = qs.shape[1]
    low = splat_i(0x0F0F0F0F)
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
    for b in range(nb):
        if fetch:  # the first row over this tile: its next blocks (tiles.ahead)
            tiles.ahead(qs, (t * nb + b) * 4 * tiles.TILE, 4 * tiles.TILE)
            tiles.ahead(d, (t * nb + b) * tiles.TILE, tiles.TILE)
            tiles.ahead(m, (t * nb + b) * tiles.TILE, tiles.TILE)
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
        zero = zero_i()
        s0, s1, s2, s3 = sum16(zero, t0), sum16(zero, t1), sum16(zero, t2), sum16(zero, t3)
        dx, sx = splat_f(xd[k, b]), splat_f(xs[k, b])
        o = (t * nb + b) * tiles.TILE
        a0 = add_f(a0, add_f(mul_f(to_f(s0), mul_f(load_h(d, o), dx)), mul_f(load_h(m, o), sx)))
        a1 = add_f(a1, add_f(mul_f(to_f(s1), mul_f(load_h(d, o + 16), dx)), mul_f(load_h(m, o + 16), sx)))
        a2 = add_f(a2, add_f(mul_f(to_f(s2), mul_f(load_h(d, o + 32), dx)), mul_f(load_h(m, o + 32), sx)))
        a3 = add_f(a3, add_f(mul_f(to_f(s3), mul_f(load_h(d, o + 48), dx)), mul_f(load_h(m, o + 48), sx)))
    store_f(y, yo, a0)
    store_f(y, yo + 16, a1)
    store_f(y, yo + 32, a2)
    store_f(y, yo + 48, a3)


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, d, m, xw, xd, xs, y):
    # y (n_tiles, T, TILE)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            _tile_vnni(qs, d, m, t, xw, xd, xs, k, y, (t * n_tok + k) * tiles.TILE, k == 0)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qss, ds, ms, rows, xw, xd, xs, y):
    # matrix j times activation row rows[j] -> y[j] (n_tiles, TILE), one parallel region
    nt = qss[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qss[j], ds[j], ms[j], t, xw, xd, xs, rows[j], y[j], t * tiles.TILE, True)


@njit(parallel=True, cache=True)
def _dequantize(blocks, d, m, out):
    # blocks (n, 20) uint8, d, m (n,) float32 -> out (n, 32)
    for i in prange(blocks.shape[0]):
        for j in range(16):
            q = blocks[i, 4 + j]
            out[i, j] = d[i] * F32(q & 15) + m[i]
            out[i, j + 16] = d[i] * F32(q >> 4) + m[i]


@njit(parallel=True, cache=True)
def _quantize(x, d, m, qs):
    # x (n, 32) float32 -> d, m (n,) float32 (stored as fp16 by the caller), qs (n, 16) uint8.
    # gguf-py's Q4_1.quantize_blocks = ggml-quants.c quantize_row_q4_1_ref.
    for i in prange(x.shape[0]):
        lo = x[i, 0]
        hi = x[i, 0]
        for j in range(1, QK):
            lo = min(lo, x[i, j])
            hi = max(hi, x[i, j])
        di = (hi - lo) / F32(15.0)
        idi = F32(1.0) / di if di != 0 else F32(0.0)
        d[i] = di
        m[i] = lo
        for j in range(16):
            a = min(np.int32((x[i, j] - lo) * idi + F32(0.5)), 15)
            c = min(np.int32((x[i, j + 16] - lo) * idi + F32(0.5)), 15)
            qs[i, j] = np.uint8(a | (c << 4))


def _pack(b, halves=False):
    # b (N, nb, 20) file blocks -> tiles.Packed; halves: d and m as fp16 bits (the VNNI layout)
    n, nb = b.shape[:2]
    qs = tiles.tiled(n, nb, 4)  # (n_tiles, nb, 4, TILE) uint32
    tiles.tile_words(b, 4, qs)
    return tiles.Packed(qs, tiles.NONE, tiles.tile_scales(n, b, 0, halves), tiles.tile_scales(n, b, 2, halves), n)


@njit(cache=True)
def _row_vnni(qs, d, m, x, norm_w, eps, y):
    # a few rows' product, their activations (and norm) made in the same call (TileKernels.row_kernel)
    q, xd, _, xs = activations.q8_rows(x, norm_w, eps, np.int8)
    _matmul_vnni(qs, d, m, q.view(np.int32), xd, xs, y)


@njit(cache=True)
def _row(p, x, norm_w, eps, y):
    # the portable kernel's row_kernel
    q, xd, xsum, xs = activations.q8_rows(x, norm_w, eps, np.int32)
    _matmul(p, q, xd, xsum, xs, y)


class Q4_1(QuantFormat):
    qtype = GGMLQuantizationType.Q4_1
    portable = TileKernels(_pack, (), activations.ints, _matmul, row_kernel=_row)
    vnni = TileKernels(partial(_pack, halves=True),
                       ("qs", "d", "m"), activations.words_min, _matmul_vnni, many_kernel=_matmul_vnni_many,
                       row_kernel=_row_vnni)

    def quantize_blocks(self, x):
        """Bit-identical to gguf-py."""
        d = np.empty(x.shape[0], np.float32)
        m = np.empty(x.shape[0], np.float32)
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        _quantize(x, d, m, out[:, 4:])
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:4] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK), np.float32)
        _dequantize(blocks, tiles.fp16_field(blocks, 0), tiles.fp16_field(blocks, 2), out)
        return out

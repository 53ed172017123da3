"""Q5_0: 32 values per 22-byte block: fp16 d, qh[4], qs[16]; the low four bits of the values as
Q4_0's nibbles, the fifth bit of value j in bit j of qh (a little-endian uint32); x = d * (q - 16)
(ggml-common.h block_q5_0, ggml-quants.c). llama-quantize falls back to Q5_0 (Q4_K_M) for K-quant
tensors whose rows are not a multiple of 256: DeepSeek-V2-Lite's 1408-wide expert down projections.

Kernel layout: the nibbles as Q4_0's 4 uint32 words per row and block, qh as one uint32 per row
with its bits spread beside them (fifth_bits.py). The -16 offset enters through the exact sum of
the int8 activations.
"""
from __future__ import annotations

from functools import partial

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange

from . import activations, tiles
from .fifth_bits import bit, chunk5, pack5, qh_word, row_dot5
from .registry import QuantFormat, TileKernels
from .simd import add_f, load_h, mul_f, splat_f, splat_i, store_f, to_f, zero_f

F32 = np.float32
QK = 32
QH, QS = 2, 6  # byte offsets of qh and qs in a block


@njit(parallel=True, cache=True)
def _matmul(p, xq, xd, xsum, xs, y):
    # xq (T, K) int32; xd, xsum, xs (T, nb); y (n_tiles, T, TILE)
    for t in prange(p.qs.shape[0]):
        acc = np.zeros((xq.shape[0], tiles.TILE), np.float32)
        for b in range(p.qs.shape[1]):
            for k in range(xq.shape[0]):
                off = np.int32(16) * xsum[k, b]  # the -16 of every quant
                dx = xd[k, b]
                for r in range(tiles.TILE):
                    acc[k, r] += F32(np.int32(row_dot5(p, t, b, r, xq, k) - off)) * (p.d[t, b, r] * dx)
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


@njit(cache=True, inline="always")
def _scaled(acc, s, d, o, dx):
    return add_f(acc, mul_f(to_f(s), mul_f(load_h(d, o), dx)))


@njit(cache=True, inline="always")
def _tile_vnni(qs, qh, d, t, xw, xd, xsum, k, y, yo, fetch):
    # tile t times activation row k into y.flat[yo : yo + TILE]; the four 16-row chunks of the
    # tile advance together, so that the tile's bytes are read in order
    nb = qs.shape[1]
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
    for b in range(nb):
        o, oh = (t * nb + b) * 4 * tiles.TILE, (t * nb + b) * tiles.TILE
        if fetch:  # the first row over this tile: its next blocks (tiles.ahead)
            tiles.ahead(qs, o, 4 * tiles.TILE)
            tiles.ahead(qh, oh, tiles.TILE)
            tiles.ahead(d, oh, tiles.TILE)
        s = splat_i(np.int32(-16) * xsum[k, b])  # the -16 of every quant
        dx = splat_f(xd[k, b])
        a0 = _scaled(a0, chunk5(qs, qh, o, oh, xw, k, b, s), d, oh, dx)
        a1 = _scaled(a1, chunk5(qs, qh, o + 16, oh + 16, xw, k, b, s), d, oh + 16, dx)
        a2 = _scaled(a2, chunk5(qs, qh, o + 32, oh + 32, xw, k, b, s), d, oh + 32, dx)
        a3 = _scaled(a3, chunk5(qs, qh, o + 48, oh + 48, xw, k, b, s), d, oh + 48, dx)
    store_f(y, yo, a0)
    store_f(y, yo + 16, a1)
    store_f(y, yo + 32, a2)
    store_f(y, yo + 48, a3)


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, qh, d, xw, xd, xsum, y):
    # _matmul on simd.dpbusd; xw (T, K / 4) int32 words of int8; y (n_tiles, T, TILE)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            _tile_vnni(qs, qh, d, t, xw, xd, xsum, k, y, (t * n_tok + k) * tiles.TILE, k == 0)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qss, qhs, ds, rows, xw, xd, xsum, y):
    # matrix j times activation row rows[j] -> y[j] (n_tiles, TILE); the arguments are tuples of arrays
    nt = qss[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qss[j], qhs[j], ds[j], t, xw, xd, xsum, rows[j], y[j], t * tiles.TILE, True)


@njit(parallel=True, cache=True)
def _dequantize(blocks, d, out):
    # blocks (n, 22) uint8, d (n,) float32 -> out (n, 32)
    for i in prange(blocks.shape[0]):
        qh = qh_word(blocks, i, QH)
        for j in range(16):
            q = blocks[i, QS + j]
            lo = np.int32(q & 15) | (bit(qh, j) << 4)
            hi = np.int32(q >> 4) | (bit(qh, j + 16) << 4)
            out[i, j] = d[i] * F32(lo - 16)
            out[i, j + 16] = d[i] * F32(hi - 16)


@njit(parallel=True, cache=True)
def _quantize(x, d, qh, qs):
    # x (n, 32) float32 -> d (n,) float32 (stored as fp16 by the caller), qh (n,) uint32,
    # qs (n, 16) uint8. gguf-py's Q5_0.quantize_blocks = ggml-quants.c quantize_row_q5_0_ref: the
    # value of largest magnitude (first one on ties) maps to -16.
    for i in prange(x.shape[0]):
        amax = F32(0.0)
        vmax = F32(0.0)
        for j in range(QK):
            if abs(x[i, j]) > amax:
                amax = abs(x[i, j])
                vmax = x[i, j]
        di = vmax / F32(-16.0)
        idi = F32(1.0) / di if di != 0 else F32(0.0)
        d[i] = di
        h = np.uint32(0)
        for j in range(QK):
            q = min(np.int32(x[i, j] * idi + F32(16.5)), 31)
            h |= np.uint32(q >> 4) << np.uint32(j)
            if j < 16:
                qs[i, j] = np.uint8(q & 15)
            else:
                qs[i, j - 16] |= np.uint8((q & 15) << 4)
        qh[i] = h


def _pack(b, halves=False):
    return pack5(b, QH, QS, halves=halves)  # b (N, nb, 22) file blocks


@njit(cache=True)
def _row_vnni(qs, qh, d, x, norm_w, eps, y):
    # a few rows' product, their activations (and norm) made in the same call (TileKernels.row_kernel)
    q, xd, xsum, _ = activations.q8_rows(x, norm_w, eps, np.int8)
    _matmul_vnni(qs, qh, d, q.view(np.int32), xd, xsum, y)


@njit(cache=True)
def _row(p, x, norm_w, eps, y):
    # the portable kernel's row_kernel
    q, xd, xsum, xs = activations.q8_rows(x, norm_w, eps, np.int32)
    _matmul(p, q, xd, xsum, xs, y)


class Q5_0(QuantFormat):
    qtype = GGMLQuantizationType.Q5_0
    portable = TileKernels(_pack, (), activations.ints, _matmul, row_kernel=_row)
    vnni = TileKernels(partial(_pack, halves=True),
                       ("qs", "qh", "d"), activations.words, _matmul_vnni, many_kernel=_matmul_vnni_many,
                       row_kernel=_row_vnni)

    def quantize_blocks(self, x):
        """Bit-identical to gguf-py."""
        n = x.shape[0]
        d, qh, qs = np.empty(n, np.float32), np.empty(n, np.uint32), np.empty((n, 16), np.uint8)
        _quantize(x, d, qh, qs)
        out = np.empty((n, self.type_size), np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, QH:QS] = qh.view(np.uint8).reshape(-1, 4)
        out[:, QS:] = qs
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK), np.float32)
        _dequantize(blocks, tiles.fp16_field(blocks, 0), out)
        return out

"""Q5_1: 32 values per 24-byte block: fp16 d, fp16 m, qh[4], qs[16]; 5-bit values as Q5_0's (the
low four bits in the nibbles of qs, the fifth bit of value j in bit j of qh); x = d * q + m
(ggml-common.h block_q5_1, ggml-quants.c). llama-quantize falls back to Q5_1 (Q5_K_M) for K-quant
tensors whose rows are not a multiple of 256.

Kernel layout as Q5_0's (fifth_bits.py), plus the mins. The min term uses Q8_1's s = fp16(d *
sum(q)) of the activations, as ggml_vec_dot_q5_1_q8_1 does.
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
QH, QS = 4, 8  # byte offsets of qh and qs in a block


@njit(parallel=True, cache=True)
def _matmul(p, xq, xd, xsum, xs, y):
    # xq (T, K) int32; xd, xsum, xs (T, nb); y (n_tiles, T, TILE)
    for t in prange(p.qs.shape[0]):
        acc = np.zeros((xq.shape[0], tiles.TILE), np.float32)
        for b in range(p.qs.shape[1]):
            for k in range(xq.shape[0]):
                dx, sx = xd[k, b], xs[k, b]
                for r in range(tiles.TILE):
                    acc[k, r] += F32(row_dot5(p, t, b, r, xq, k)) * (p.d[t, b, r] * dx) + p.m[t, b, r] * sx
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


@njit(cache=True, inline="always")
def _scaled_min(acc, s, d, m, o, dx, sx):
    return add_f(acc, add_f(mul_f(to_f(s), mul_f(load_h(d, o), dx)), mul_f(load_h(m, o), sx)))


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, qh, d, m, xw, xd, xs, y):
    # _matmul on simd.dpbusd; xw (T, K / 4) int32 words of int8; y (n_tiles, T, TILE)
    nt, nb, n_tok = qs.shape[0], qs.shape[1], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
            for b in range(nb):
                o, oh = (t * nb + b) * 4 * tiles.TILE, (t * nb + b) * tiles.TILE
                s = splat_i(0)
                dx, sx = splat_f(xd[k, b]), splat_f(xs[k, b])
                a0 = _scaled_min(a0, chunk5(qs, qh, o, oh, xw, k, b, s), d, m, oh, dx, sx)
                a1 = _scaled_min(a1, chunk5(qs, qh, o + 16, oh + 16, xw, k, b, s), d, m, oh + 16, dx, sx)
                a2 = _scaled_min(a2, chunk5(qs, qh, o + 32, oh + 32, xw, k, b, s), d, m, oh + 32, dx, sx)
                a3 = _scaled_min(a3, chunk5(qs, qh, o + 48, oh + 48, xw, k, b, s), d, m, oh + 48, dx, sx)
            o = (t * n_tok + k) * tiles.TILE
            store_f(y, o, a0)
            store_f(y, o + 16, a1)
            store_f(y, o + 32, a2)
            store_f(y, o + 48, a3)


@njit(parallel=True, cache=True)
def _dequantize(blocks, d, m, out):
    # blocks (n, 24) uint8, d, m (n,) float32 -> out (n, 32)
    for i in prange(blocks.shape[0]):
        qh = qh_word(blocks, i, QH)
        for j in range(16):
            q = blocks[i, QS + j]
            lo = np.int32(q & 15) | (bit(qh, j) << 4)
            hi = np.int32(q >> 4) | (bit(qh, j + 16) << 4)
            out[i, j] = d[i] * F32(lo) + m[i]
            out[i, j + 16] = d[i] * F32(hi) + m[i]


@njit(parallel=True, cache=True)
def _quantize(x, d, m, qh, qs):
    # x (n, 32) float32 -> d, m (n,) float32 (stored as fp16 by the caller), qh (n,) uint32,
    # qs (n, 16) uint8. gguf-py's Q5_1.quantize_blocks = ggml-quants.c quantize_row_q5_1_ref.
    for i in prange(x.shape[0]):
        lo = x[i, 0]
        hi = x[i, 0]
        for j in range(1, QK):
            lo = min(lo, x[i, j])
            hi = max(hi, x[i, j])
        di = (hi - lo) / F32(31.0)
        idi = F32(1.0) / di if di != 0 else F32(0.0)
        d[i] = di
        m[i] = lo
        h = np.uint32(0)
        for j in range(QK):
            q = min(np.int32((x[i, j] - lo) * idi + F32(0.5)), 31)
            h |= np.uint32(q >> 4) << np.uint32(j)
            if j < 16:
                qs[i, j] = np.uint8(q & 15)
            else:
                qs[i, j - 16] |= np.uint8((q & 15) << 4)
        qh[i] = h


def _pack(b, halves=False):
    return pack5(b, QH, QS, m=2, halves=halves)  # b (N, nb, 24) file blocks


@njit(cache=True)
def _row_vnni(qs, qh, d, m, x, norm_w, eps, y):
    # a few rows' product, their activations (and norm) made in the same call (TileKernels.row_kernel)
    q, xd, _, xs = activations.q8_rows(x, norm_w, eps, np.int8)
    _matmul_vnni(qs, qh, d, m, q.view(np.int32), xd, xs, y)


@njit(cache=True)
def _row(p, x, norm_w, eps, y):
    # the portable kernel's row_kernel
    q, xd, xsum, xs = activations.q8_rows(x, norm_w, eps, np.int32)
    _matmul(p, q, xd, xsum, xs, y)


class Q5_1(QuantFormat):
    qtype = GGMLQuantizationType.Q5_1
    portable = TileKernels(_pack, (), activations.ints, _matmul, row_kernel=_row)
    vnni = TileKernels(partial(_pack, halves=True), ("qs", "qh", "d", "m"), activations.words_min, _matmul_vnni,
                       row_kernel=_row_vnni)

    def quantize_blocks(self, x):
        """Bit-identical to gguf-py."""
        n = x.shape[0]
        d, m = np.empty(n, np.float32), np.empty(n, np.float32)
        qh, qs = np.empty(n, np.uint32), np.empty((n, 16), np.uint8)
        _quantize(x, d, m, qh, qs)
        out = np.empty((n, self.type_size), np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, 2:4] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, QH:QS] = qh.view(np.uint8).reshape(-1, 4)
        out[:, QS:] = qs
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK), np.float32)
        _dequantize(blocks, tiles.fp16_field(blocks, 0), tiles.fp16_field(blocks, 2), out)
        return out

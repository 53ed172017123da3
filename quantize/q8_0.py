"""Q8_0: 32 values per 34-byte block: fp16 d, int8 qs[32]; x = d * q (ggml-common.h block_q8_0,
ggml-quants.c).

Kernel layouts (tiles.py), both storing q + 128 (unsigned bytes), the +128 taken back out through
the exact activation sum:
- portable: byte j of every row of a tile side by side, (n_tiles, nb, 32, TILE) uint8: zero-extended
  bytes let LLVM multiply in 16 bits (vpmaddwd / vpdpwssd);
- VNNI: the 32 bytes of a row's block as 8 uint32 words, (n_tiles, nb, 8, TILE): simd.dpbusd
  multiplies four unsigned weight bytes by four int8 activations per lane; the scales stay fp16
  (uint16 bits, widened by simd.load_h as the kernels read them). Both give the same
  integer per block and the same float arithmetic after it, so the same bits.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import carray, njit, prange

from . import activations, tiles
from .activations import x16
from .registry import QuantFormat, TileKernels
from .simd import Q8_CENTERED, WIDE_VECTORS, add_f, at_address, dpbusd, dpbusd_centered, load_f, load_h, load_i, mul_f, splat_f, splat_i, store_f, to_f, zero_f

F32 = np.float32
QK = 32


@njit(cache=True, inline="always")
def _part(qs, t, b, r, xq, k, j0):
    # 8 products of one row: bytes j0..j0+7; loops of 8 unroll fully, so LLVM vectorizes over r
    s = np.int32(0)
    for j in range(j0, j0 + 8):
        s = np.int32(s + np.int32(qs[t, b, j, r]) * x16(xq, k, QK * b + j))
    return s


@njit(parallel=True, cache=True)
def _matmul(p, xq, xd, xsum, xs, y):
    # xq (T, K) int32; xd, xsum, xs (T, nb); y (n_tiles, T, TILE)
    for t in prange(p.qs.shape[0]):
        acc = np.zeros((xq.shape[0], tiles.TILE), np.float32)
        qs = p.qs  # (n_tiles, nb, 32, TILE) uint8: q + 128
        for b in range(qs.shape[1]):
            for k in range(xq.shape[0]):
                off = np.int32(128) * xsum[k, b]
                dx = xd[k, b]
                for r in range(tiles.TILE):
                    s = np.int32(np.int32(_part(qs, t, b, r, xq, k, 0) + _part(qs, t, b, r, xq, k, 8))
                                 + np.int32(_part(qs, t, b, r, xq, k, 16) + _part(qs, t, b, r, xq, k, 24)))
                    acc[k, r] += F32(np.int32(s - off)) * (p.d[t, b, r] * dx)
        for k in range(acc.shape[0]):  # element by element: y[t] = acc compiles numba's
            for r in range(acc.shape[1]):  # shape-error path, seconds on a first run
                y[t, k, r] = acc[k, r]


# The VNNI kernels' product of a word of four stored bytes (q + 128) with four activations, and
# what each block's sum starts from per unit of the activations' sum: vpdpbusd on q + 128, the +128
# taken back through the exact activation sum; on AVX2 without VNNI the bytes back to q, one
# vpmaddubsw pair a word instead of two (simd.dpbusd_centered). The same integers.
_DOT = dpbusd_centered if Q8_CENTERED else dpbusd
_START = np.int32(0 if Q8_CENTERED else -128)
# Rows two at a time (_tile_vnni2: each weight word loaded once for both) where the CPU has 32 vector
# registers; with AVX2's 16 its two rows' sums and accumulators spill, and one row after another runs
# 17-30% faster (the output head of edgeseek-mini over 2-4 rows, a layer's products over 16-64)
PAIRS = WIDE_VECTORS


@njit(cache=True, inline="always")
def _tile_vnni(qs, d, t, xw, xd, xsum, k, y, yo):
    # Tile t times activation row k into y.flat[yo : yo + TILE]: qs (n_tiles, nb, 8, TILE) uint32
    # words of four q + 128 bytes, d (n_tiles, nb, TILE); xw (T, K / 4) int32 words of int8
    # activations, xd, xsum (T, nb). TILE = 64: four 16-lane chunks.
    nb = qs.shape[1]
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
    for b in range(nb):
        s0 = splat_i(_START * xsum[k, b])  # the +128 of every stored byte
        s1, s2, s3 = s0, s0, s0
        for g in range(8):
            x = splat_i(xw[k, 8 * b + g])
            o = ((t * nb + b) * 8 + g) * tiles.TILE
            s0 = _DOT(s0, load_i(qs, o), x)
            s1 = _DOT(s1, load_i(qs, o + 16), x)
            s2 = _DOT(s2, load_i(qs, o + 32), x)
            s3 = _DOT(s3, load_i(qs, o + 48), x)
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


@njit(cache=True, inline="always")
def _tile_vnni2(qs, d, t, xw, xd, xsum, k, y, yo, stride):
    # _tile_vnni for activation rows k and k + 1 into y.flat[yo ...] and y.flat[yo + stride ...]: each
    # weight word loaded once for both rows (a verification's two tokens through the output head);
    # per row the same int32 sums and float32 steps as _tile_vnni, so the same results.
    nb = qs.shape[1]
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
    b0, b1, b2, b3 = zero_f(), zero_f(), zero_f(), zero_f()
    for b in range(nb):
        s0 = splat_i(_START * xsum[k, b])
        s1, s2, s3 = s0, s0, s0
        r0 = splat_i(_START * xsum[k + 1, b])
        r1, r2, r3 = r0, r0, r0
        for g in range(8):
            x = splat_i(xw[k, 8 * b + g])
            z = splat_i(xw[k + 1, 8 * b + g])
            o = ((t * nb + b) * 8 + g) * tiles.TILE
            w0, w1, w2, w3 = load_i(qs, o), load_i(qs, o + 16), load_i(qs, o + 32), load_i(qs, o + 48)
            s0, s1, s2, s3 = _DOT(s0, w0, x), _DOT(s1, w1, x), _DOT(s2, w2, x), _DOT(s3, w3, x)
            r0, r1, r2, r3 = _DOT(r0, w0, z), _DOT(r1, w1, z), _DOT(r2, w2, z), _DOT(r3, w3, z)
        dx, dz = splat_f(xd[k, b]), splat_f(xd[k + 1, b])
        o = (t * nb + b) * tiles.TILE
        d0, d1, d2, d3 = load_h(d, o), load_h(d, o + 16), load_h(d, o + 32), load_h(d, o + 48)
        a0 = add_f(a0, mul_f(to_f(s0), mul_f(d0, dx)))
        a1 = add_f(a1, mul_f(to_f(s1), mul_f(d1, dx)))
        a2 = add_f(a2, mul_f(to_f(s2), mul_f(d2, dx)))
        a3 = add_f(a3, mul_f(to_f(s3), mul_f(d3, dx)))
        b0 = add_f(b0, mul_f(to_f(r0), mul_f(d0, dz)))
        b1 = add_f(b1, mul_f(to_f(r1), mul_f(d1, dz)))
        b2 = add_f(b2, mul_f(to_f(r2), mul_f(d2, dz)))
        b3 = add_f(b3, mul_f(to_f(r3), mul_f(d3, dz)))
    store_f(y, yo, a0)
    store_f(y, yo + 16, a1)
    store_f(y, yo + 32, a2)
    store_f(y, yo + 48, a3)
    yo += stride
    store_f(y, yo, b0)
    store_f(y, yo + 16, b1)
    store_f(y, yo + 32, b2)
    store_f(y, yo + 48, b3)


@njit(cache=True, inline="always")
def _tile_run(qs, d, t, xw, xd, xsum, r0, r1, y, yo, N):
    # activation rows r0..r1-1 through tile t into y.flat[yo + (k - r0) * N ...]: two at a time
    # (PAIRS; an odd last alone), else one after another
    k = r0
    if PAIRS:
        while k + 2 <= r1:
            _tile_vnni2(qs, d, t, xw, xd, xsum, k, y, yo + (k - r0) * N, N)
            k += 2
    for k in range(k, r1):
        _tile_vnni(qs, d, t, xw, xd, xsum, k, y, yo + (k - r0) * N)


@njit(parallel=True, cache=True)
def _matmul_vnni(qs, d, xw, xd, xsum, y):
    # y (n_tiles, T, TILE)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        _tile_run(qs, d, t, xw, xd, xsum, 0, n_tok, y, t * n_tok * tiles.TILE, tiles.TILE)


@njit(cache=True)
def _row_vnni(qs, d, x, norm_w, eps, y):
    # a few rows' product, their activations (and norm) made in the same call (TileKernels.row_kernel)
    q, xd, xsum, _ = activations.q8_rows(x, norm_w, eps, np.int8)
    _matmul_vnni(qs, d, q.view(np.int32), xd, xsum, y)


@njit(parallel=True, cache=True)
def _matmul_vnni_many(qss, ds, rows, xw, xd, xsum, y):
    # matrix j (qss[j], ds[j]) times activation row rows[j] -> y[j] (n_tiles, TILE), one parallel region
    nt = qss[0].shape[0]
    for job in prange(len(rows) * nt):  # the tuples may be longer (TileKernels.bind_many pads them)
        j, t = job // nt, job % nt
        _tile_vnni(qss[j], ds[j], t, xw, xd, xsum, rows[j], y[j], t * tiles.TILE)


@njit(parallel=True, cache=True)
def _matmul_vnni_groups(at, nt, nb, spans, xw, xd, xsum, y):
    # Matrix j (its qs and d arrays at addresses at[j, 0], at[j, 1], laid out as _tile_vnni reads
    # them) times activation rows spans[j, 0]..spans[j, 1]-1 -> rows spans[j, 2].. of y
    # (R, nt * TILE), zeroed: a feed-forward's gate and up for a prompt's rows, a layer's routed
    # experts each with the rows routed to it; rows as _matmul_vnni takes them.
    N = y.shape[1]
    for job in prange(at.shape[0] * nt):  # tile-major: the threads' shares match, however the runs differ
        j, t = job % at.shape[0], job // at.shape[0]
        qs = carray(at_address(at[j, 0]), (nt, nb, 8, tiles.TILE), np.uint32)
        d = carray(at_address(at[j, 1]), (nt, nb, tiles.TILE), np.uint16)
        r0, r1, yo = spans[j, 0], spans[j, 1], spans[j, 2] * N + t * tiles.TILE
        _tile_run(qs, d, t, xw, xd, xsum, r0, r1, y, yo, N)


@njit(parallel=True, cache=True)
def _dequantize(blocks, d, out):
    # blocks (n, 34) uint8, d (n,) float32 -> out (n, 32)
    for i in prange(blocks.shape[0]):
        for j in range(QK):
            out[i, j] = d[i] * F32(np.int8(blocks[i, 2 + j]))


@njit(parallel=True, cache=True)
def _quantize(x, d, qs):
    # x (n, 32) float32 -> d (n,) float32 (stored as fp16 by the caller), qs (n, 32) int8.
    # gguf-py's Q8_0.quantize_blocks = ggml-quants.c quantize_row_q8_0_ref: round half away from
    # zero, computed as gguf-py's np_roundf does.
    for i in prange(x.shape[0]):
        amax = F32(0.0)
        for j in range(QK):
            amax = max(amax, abs(x[i, j]))
        di = amax / F32(127.0)
        idi = F32(1.0) / di if di != 0 else F32(0.0)
        d[i] = di
        for j in range(QK):
            v = x[i, j] * idi
            a = abs(v)
            fl = np.floor(a)
            r = fl + np.floor(F32(2.0) * (a - fl))
            qs[i, j] = np.int8(-r if v < 0 else r)


def _pack(b):
    # b (N, nb, 34) file blocks -> tiles.Packed
    n, nb = b.shape[:2]
    qs = tiles.tiled(n, nb, 32, dtype=np.uint8)
    tiles.tile_bytes(b, 2, np.uint8(0x80), qs)  # (n_tiles, nb, 32, TILE) uint8: q + 128
    return tiles.Packed(qs, tiles.NONE, tiles.tile_scales(n, b, 0, False), tiles.NONE, n)


def _pack_words(b):
    # b (N, nb, 34) file blocks -> tiles.Packed with qs (n_tiles, nb, 8, TILE) uint32 words of q + 128
    n, nb = b.shape[:2]
    qs = tiles.tiled(n, nb, 8)
    tiles.tile_words(b, 2, qs)
    qs ^= np.uint32(0x80808080)  # every byte q + 128 (padding rows too: their outputs are dropped)
    return tiles.Packed(qs, tiles.NONE, tiles.tile_scales(n, b, 0, True), tiles.NONE, n)  # scales: fp16 bits


@njit(cache=True)
def _row(p, x, norm_w, eps, y):
    # the portable kernel's row_kernel
    q, xd, xsum, xs = activations.q8_rows(x, norm_w, eps, np.int32)
    _matmul(p, q, xd, xsum, xs, y)


class Q8_0(QuantFormat):
    qtype = GGMLQuantizationType.Q8_0
    portable = TileKernels(_pack, (), activations.ints, _matmul, row_kernel=_row)
    vnni = TileKernels(_pack_words, ("qs", "d"), activations.words, _matmul_vnni, many_kernel=_matmul_vnni_many,
                       groups_kernel=_matmul_vnni_groups, row_kernel=_row_vnni)

    def quantize_blocks(self, x):
        """Bit-identical to gguf-py."""
        d = np.empty(x.shape[0], np.float32)
        out = np.empty((x.shape[0], self.type_size), np.uint8)
        _quantize(x, d, out[:, 2:].view(np.int8))
        out[:, :2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        return out

    def dequantize_blocks(self, blocks):
        out = np.empty((blocks.shape[0], QK), np.float32)
        _dequantize(blocks, tiles.fp16_field(blocks, 0), out)
        return out

"""Q5_0 and Q5_1: 32 values per block with the fifth bit of value j in bit j of qh (uint32):
Q5_0 (22 bytes): fp16 d, qh[4], qs[16]; x = d * (q - 16). Q5_1 (24 bytes): fp16 d, fp16 m, qh[4],
qs[16]; x = d * q + m. Nibbles as Q4_0 (ggml-common.h block_q5_0 / block_q5_1, ggml-quants.c).
llama-quantize falls back to Q5_0 (Q4_K_M) or Q5_1 for K-quant tensors whose rows are not a
multiple of 256: DeepSeek-V2-Lite's 1408-wide expert down projections.

Kernel layout: the nibbles as Q4_0's 4 uint32 words per row and block, qh as one uint32 per row
with its bits permuted (spread_fifth_bits) so that two shifts and masks put the fifth bits of a
word's 8 values beside their nibbles. The -16 offset of Q5_0 enters through the exact activation
sum, the min of Q5_1 through Q8_1's s.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit, prange, uint32

from . import tiles
from .q4_0 import x16
from .registry import QuantFormat
from .simd import (HAVE_VNNI, add_f, band, bor, dpbusd, load_f, load_i, mul_f, sll, splat_f, splat_i, srl, store_f,
                   to_f, zero_f)

F32 = np.float32
QK = 32


@njit(cache=True, inline="always")
def bit(h, j):
    return np.int32((h >> uint32(j)) & uint32(1))


def _spread_positions() -> np.ndarray:
    # bit j of qh goes to bit 8k + 2g (+1 for j >= 16) with g = (j mod 16) // 4, k = j mod 4
    j = np.arange(32)
    return 8 * (j % 4) + 2 * ((j % 16) // 4) + j // 16


# _SPREAD[i, v]: the spread bits of byte i of qh when that byte holds v; (4, 256) uint32
_SPREAD = np.array([[sum(1 << int(_spread_positions()[8 * i + n]) for n in range(8) if v >> n & 1)
                     for v in range(256)] for i in range(4)], np.uint32)


def spread_fifth_bits(qh: np.ndarray) -> np.ndarray:
    """qh (...,) uint32, bit j = fifth bit of value j -> the same 32 bits permuted so that the
    kernel finds them next to the nibbles: bit 8k + 2g <- value 4g + k, bit 8k + 2g + 1 <- value
    16 + 4g + k. Shifting by 2g - 4 (2g - 3) and masking 0x10101010 then lines up bit 4 of byte k
    with the low (high) nibbles of word g."""
    b = np.ascontiguousarray(qh, dtype=np.uint32).view(np.uint8).reshape(*qh.shape, 4)  # little-endian bytes
    return _SPREAD[0][b[..., 0]] | _SPREAD[1][b[..., 1]] | _SPREAD[2][b[..., 2]] | _SPREAD[3][b[..., 3]]


@njit(cache=True, nogil=True)
def _tile_fifth_bits(blocks, o, spread, out):
    # out[t, b, i] = spread_fifth_bits of the qh word at byte o of block b of row t * TILE + i
    n = blocks.shape[0]
    for t in range(out.shape[0]):
        for b in range(blocks.shape[1]):
            for i in range(min(tiles.TILE, n - t * tiles.TILE)):
                r = t * tiles.TILE + i
                out[t, b, i] = (spread[0, blocks[r, b, o]] | spread[1, blocks[r, b, o + 1]]
                                | spread[2, blocks[r, b, o + 2]] | spread[3, blocks[r, b, o + 3]])


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
    nibbles, p.qh (n_tiles, nb, TILE) uint32 fifth bits as spread_fifth_bits lays them out."""
    o = QK * b
    qs, h = p.qs, p.qh[t, b, r]
    return np.int32(np.int32(_word5(qs[t, b, 0, r], h, xq, k, o, 0) + _word5(qs[t, b, 1, r], h, xq, k, o, 1))
                    + np.int32(_word5(qs[t, b, 2, r], h, xq, k, o, 2) + _word5(qs[t, b, 3, r], h, xq, k, o, 3)))


@njit(parallel=True, cache=True)
def _matmul_q5_0(p, xq, xd, xsum, xs, y):
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


@njit(parallel=True, cache=True)
def _matmul_q5_1(p, xq, xd, xsum, xs, y):
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
def _chunk5(qs, qh, o, oh, xw, k, b, s):
    # s + sum_j q5_j * x_j for the 16 rows of a chunk of one block, four values at a time
    # (simd.dpbusd): o = flat index of word 0 of the chunk in qs, oh of its fifth bits in qh
    low, five = splat_i(0x0F0F0F0F), splat_i(0x10101010)
    h = load_i(qh, oh)
    xo = 8 * b
    v = load_i(qs, o)
    s = dpbusd(s, bor(band(v, low), band(sll(h, 4), five)), splat_i(xw[k, xo]))
    s = dpbusd(s, bor(band(srl(v, 4), low), band(sll(h, 3), five)), splat_i(xw[k, xo + 4]))
    v = load_i(qs, o + tiles.TILE)
    s = dpbusd(s, bor(band(v, low), band(sll(h, 2), five)), splat_i(xw[k, xo + 1]))
    s = dpbusd(s, bor(band(srl(v, 4), low), band(sll(h, 1), five)), splat_i(xw[k, xo + 5]))
    v = load_i(qs, o + 2 * tiles.TILE)
    s = dpbusd(s, bor(band(v, low), band(h, five)), splat_i(xw[k, xo + 2]))
    s = dpbusd(s, bor(band(srl(v, 4), low), band(srl(h, 1), five)), splat_i(xw[k, xo + 6]))
    v = load_i(qs, o + 3 * tiles.TILE)
    s = dpbusd(s, bor(band(v, low), band(srl(h, 2), five)), splat_i(xw[k, xo + 3]))
    s = dpbusd(s, bor(band(srl(v, 4), low), band(srl(h, 3), five)), splat_i(xw[k, xo + 7]))
    return s


@njit(cache=True, inline="always")
def _scaled(acc, s, d, o, dx):
    return add_f(acc, mul_f(to_f(s), mul_f(load_f(d, o), dx)))


@njit(cache=True, inline="always")
def _tile_q5_0_vnni(qs, qh, d, t, xw, xd, xsum, k, y, yo):
    # tile t times activation row k into y.flat[yo : yo + TILE]; the four 16-row chunks of the
    # tile advance together, so that the tile's bytes are read in order
    nb = qs.shape[1]
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
    for b in range(nb):
        o, oh = (t * nb + b) * 4 * tiles.TILE, (t * nb + b) * tiles.TILE
        s = splat_i(np.int32(-16) * xsum[k, b])  # the -16 of every quant
        dx = splat_f(xd[k, b])
        a0 = _scaled(a0, _chunk5(qs, qh, o, oh, xw, k, b, s), d, oh, dx)
        a1 = _scaled(a1, _chunk5(qs, qh, o + 16, oh + 16, xw, k, b, s), d, oh + 16, dx)
        a2 = _scaled(a2, _chunk5(qs, qh, o + 32, oh + 32, xw, k, b, s), d, oh + 32, dx)
        a3 = _scaled(a3, _chunk5(qs, qh, o + 48, oh + 48, xw, k, b, s), d, oh + 48, dx)
    store_f(y, yo, a0)
    store_f(y, yo + 16, a1)
    store_f(y, yo + 32, a2)
    store_f(y, yo + 48, a3)


@njit(parallel=True, cache=True)
def _matmul_q5_0_vnni(qs, qh, d, xw, xd, xsum, y):
    # _matmul_q5_0 on simd.dpbusd; xw (T, K / 4) int32 words of int8; y (n_tiles, T, TILE)
    nt, n_tok = qs.shape[0], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            _tile_q5_0_vnni(qs, qh, d, t, xw, xd, xsum, k, y, (t * n_tok + k) * tiles.TILE)


@njit(parallel=True, cache=True)
def _matmul_q5_0_vnni_many(qss, qhs, ds, rows, xw, xd, xsum, y):
    # matrix j times activation row rows[j] -> y[j] (n_tiles, TILE); the arguments are tuples of arrays
    nt = qss[0].shape[0]
    for job in prange(len(qss) * nt):
        j, t = job // nt, job % nt
        _tile_q5_0_vnni(qss[j], qhs[j], ds[j], t, xw, xd, xsum, rows[j], y[j], t * tiles.TILE)


@njit(cache=True, inline="always")
def _scaled_min(acc, s, d, m, o, dx, sx):
    return add_f(acc, add_f(mul_f(to_f(s), mul_f(load_f(d, o), dx)), mul_f(load_f(m, o), sx)))


@njit(parallel=True, cache=True)
def _matmul_q5_1_vnni(qs, qh, d, m, xw, xd, xs, y):
    # _matmul_q5_1 on simd.dpbusd
    nt, nb, n_tok = qs.shape[0], qs.shape[1], xw.shape[0]
    for t in prange(nt):
        for k in range(n_tok):
            a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()
            for b in range(nb):
                o, oh = (t * nb + b) * 4 * tiles.TILE, (t * nb + b) * tiles.TILE
                s = splat_i(0)
                dx, sx = splat_f(xd[k, b]), splat_f(xs[k, b])
                a0 = _scaled_min(a0, _chunk5(qs, qh, o, oh, xw, k, b, s), d, m, oh, dx, sx)
                a1 = _scaled_min(a1, _chunk5(qs, qh, o + 16, oh + 16, xw, k, b, s), d, m, oh + 16, dx, sx)
                a2 = _scaled_min(a2, _chunk5(qs, qh, o + 32, oh + 32, xw, k, b, s), d, m, oh + 32, dx, sx)
                a3 = _scaled_min(a3, _chunk5(qs, qh, o + 48, oh + 48, xw, k, b, s), d, m, oh + 48, dx, sx)
            o = (t * n_tok + k) * tiles.TILE
            store_f(y, o, a0)
            store_f(y, o + 16, a1)
            store_f(y, o + 32, a2)
            store_f(y, o + 48, a3)


def _run_vnni(kernel, p: tiles.Packed, x: np.ndarray, has_min: bool) -> np.ndarray:
    tiles._check(p, x)
    a = tiles.quantize_q8(x, np.int8)
    t = a.q.shape[0]
    y = np.empty((p.qs.shape[0], t, tiles.TILE), np.float32)
    if has_min:
        kernel(p.qs, p.qh, p.d, p.m, a.q.view(np.int32), a.d, a.s, y)
    else:
        kernel(p.qs, p.qh, p.d, a.q.view(np.int32), a.d, a.sums, y)
    return y.transpose(1, 0, 2).reshape(t, -1)[:, :p.n]


@njit(parallel=True, cache=True)
def _dequantize(blocks, d, m, has_min, out):
    # blocks (n, 22 or 24) uint8, d, m (n,) float32 -> out (n, 32)
    o = 4 if has_min else 2  # offset of qh
    for i in prange(blocks.shape[0]):
        qh = (np.uint32(blocks[i, o]) | (np.uint32(blocks[i, o + 1]) << 8)
              | (np.uint32(blocks[i, o + 2]) << 16) | (np.uint32(blocks[i, o + 3]) << 24))
        for j in range(16):
            q = blocks[i, o + 4 + j]
            lo = np.int32(q & 15) | (bit(qh, j) << 4)
            hi = np.int32(q >> 4) | (bit(qh, j + 16) << 4)
            if has_min:
                out[i, j] = d[i] * F32(lo) + m[i]
                out[i, j + 16] = d[i] * F32(hi) + m[i]
            else:
                out[i, j] = d[i] * F32(lo - 16)
                out[i, j + 16] = d[i] * F32(hi - 16)


@njit(parallel=True, cache=True)
def _quantize(x, has_min, d, m, qh, qs):
    # x (n, 32) float32 -> d, m (n,) float32 (stored as fp16 by the caller), qh (n,) uint32,
    # qs (n, 16) uint8. gguf-py's Q5_0 / Q5_1.quantize_blocks = ggml-quants.c
    # quantize_row_q5_0_ref (largest magnitude maps to -16) / quantize_row_q5_1_ref.
    for i in prange(x.shape[0]):
        if has_min:
            lo = x[i, 0]
            hi = x[i, 0]
            for j in range(1, QK):
                lo = min(lo, x[i, j])
                hi = max(hi, x[i, j])
            di = (hi - lo) / F32(31.0)
            base, bias = lo, F32(0.5)
        else:
            amax = F32(0.0)
            vmax = F32(0.0)
            for j in range(QK):
                if abs(x[i, j]) > amax:
                    amax = abs(x[i, j])
                    vmax = x[i, j]
            di = vmax / F32(-16.0)
            base, bias = F32(0.0), F32(16.5)
        idi = F32(1.0) / di if di != 0 else F32(0.0)
        d[i] = di
        m[i] = base
        h = np.uint32(0)
        for j in range(QK):
            q = min(np.int32((x[i, j] - base) * idi + bias), 31)
            h |= np.uint32(q >> 4) << np.uint32(j)
            if j < 16:
                qs[i, j] = np.uint8(q & 15)
            else:
                qs[i, j - 16] |= np.uint8((q & 15) << 4)
        qh[i] = h


class _Q5(QuantFormat):
    qtype = GGMLQuantizationType.Q5_0  # block and byte sizes; each subclass names its own type
    has_min = False

    @property
    def qh_offset(self) -> int:
        return 4 if self.has_min else 2

    def dequantize(self, blocks):
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, self.type_size)
        out = np.empty((blocks.shape[0], QK), np.float32)
        m = tiles.fp16_field(blocks, 2) if self.has_min else np.zeros(blocks.shape[0], np.float32)
        _dequantize(blocks, tiles.fp16_field(blocks, 0), m, self.has_min, out)
        return out.reshape(-1)

    def quantize(self, x):
        """(..., K) float32 rows -> (..., K / 32 * type_size) uint8, bit-identical to gguf-py."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[-1] % QK:
            raise ValueError(f"{self.qtype.name}: row length {x.shape[-1]} is not a multiple of {QK}")
        blocks = x.reshape(-1, QK)
        n = blocks.shape[0]
        d, m = np.empty(n, np.float32), np.empty(n, np.float32)
        qh, qs = np.empty(n, np.uint32), np.empty((n, 16), np.uint8)
        _quantize(blocks, self.has_min, d, m, qh, qs)
        o = self.qh_offset
        out = np.empty((n, self.type_size), np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        if self.has_min:
            out[:, 2:4] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)
        out[:, o:o + 4] = qh.view(np.uint8).reshape(-1, 4)
        out[:, o + 4:] = qs
        return out.reshape(*x.shape[:-1], -1)

    def pack(self, raw):
        b = tiles.blocks_of(raw, self.type_size)  # (N, nb, 22 or 24)
        n, nb = b.shape[:2]
        o = self.qh_offset
        qs, qh = tiles.tiled(n, nb, 4), tiles.tiled(n, nb)  # (n_tiles, nb, 4, TILE), (n_tiles, nb, TILE)
        tiles.tile_words(b, o + 4, qs)
        _tile_fifth_bits(b, o, _SPREAD, qh)
        d = tiles.tiled(n, nb, dtype=np.float32)
        tiles.tile_fp16(b, 0, d)
        m = tiles.NONE
        if self.has_min:
            m = tiles.tiled(n, nb, dtype=np.float32)
            tiles.tile_fp16(b, 2, m)
        return tiles.Packed(qs, qh, d, m, n)


class Q5_0(_Q5):
    qtype = GGMLQuantizationType.Q5_0

    def matvec(self, packed, x):
        return self.matmul(packed, x)[0]

    def matmul(self, packed, x):
        if HAVE_VNNI:
            return _run_vnni(_matmul_q5_0_vnni, packed, x, False)
        return tiles.matmul(_matmul_q5_0, packed, x)

    def matmul_many(self, packeds, x, rows):
        if not HAVE_VNNI:
            return None
        a = tiles.quantize_q8(np.ascontiguousarray(x, dtype=np.float32), np.int8)
        y = np.empty((len(packeds), packeds[0].qs.shape[0], tiles.TILE), np.float32)
        _matmul_q5_0_vnni_many(tuple(p.qs for p in packeds), tuple(p.qh for p in packeds), tuple(p.d for p in packeds),
                               np.asarray(rows, np.int64), a.q.view(np.int32), a.d, a.sums, y)
        return y.reshape(len(packeds), -1)[:, :packeds[0].n]


class Q5_1(_Q5):
    qtype = GGMLQuantizationType.Q5_1
    has_min = True

    def matvec(self, packed, x):
        return self.matmul(packed, x)[0]

    def matmul(self, packed, x):
        if HAVE_VNNI:
            return _run_vnni(_matmul_q5_1_vnni, packed, x, True)
        return tiles.matmul(_matmul_q5_1, packed, x)

"""The CPU backend: weights stay memory-mapped in the file's quantization and are repacked for
numba kernels on first use (edgeseek/quantize); activations, caches and small tensors are numpy
arrays; BLAS (one thread beside numba's) where a product is not on quantized blocks."""
from __future__ import annotations

import numba
import numpy as np
from numba import carray, njit, prange

from edgeseek.errors import UnsupportedError
from edgeseek.models.common import plus, rms_norm, softmax
from edgeseek.models.common import swiglu as common_swiglu
from edgeseek.models.moe import FEW_TOKENS, SIGMOID, RouterConfig, moe
from edgeseek.models.moe import route as route_numpy
from edgeseek.quantize import QMatrix, get_format, tiles
from edgeseek.quantize.activations import FEW_ROWS, rms_norm_row
from edgeseek.quantize.matrix import packed_nbytes
from edgeseek.quantize.simd import (WIDE_VECTORS, add_f, at_address, div_f, exp_f, hsum_f, load_f, load_h, max_f, mul_f, pick_ge, prefetch,
                                    splat_f, store_f, store_h, sub_f, zero_f)

from .normed import Normed, rows


def tensor_format(gguf, t):
    """The quant format of tensor `t`; an unsupported type is named with the file and tensor."""
    try:
        return get_format(t.qtype)
    except UnsupportedError as e:
        raise UnsupportedError(f"{gguf.path}: tensor {t.name!r}: {e}") from None


class Embedding:
    """token_embd rows looked up without dequantizing the whole table: (V, D)."""

    def __init__(self, gguf, name: str, shape: tuple[int, int]):
        t = gguf.tensor(name, shape)
        self.raw = t.raw  # (V, row_bytes)
        self.fmt = tensor_format(gguf, t)
        self.shape = t.shape

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (ids.min() < 0 or ids.max() >= self.shape[0]):
            raise ValueError(f"token id out of range [0, {self.shape[0]})")
        rows = np.ascontiguousarray(self.raw[ids]).reshape(-1, self.fmt.type_size)
        return self.fmt.dequantize(rows).reshape(len(ids), self.shape[1])


@njit(parallel=True, fastmath=True, cache=True)
def _heads_matvec(w, x, y):
    # w (H, R, K), x (H, K) -> y (H, R): y[h] = w[h] @ x[h]; one row per iteration, both cores
    H, R, K = w.shape
    for j in prange(H * R):
        h, r = j // R, j % R
        s = np.float32(0.0)
        for k in range(K):
            s += w[h, r, k] * x[h, k]
        y[h, r] = s


@njit(fastmath=True, cache=True, inline="always")
def _dot_h(acc, a16, ao, q, qo, width):
    # acc + the float16 row a16.flat[ao : ao + width] (uint16 view) times q.flat[qo : qo + width],
    # 16 lanes at a time; width a multiple of 16
    for j in range(0, width, 16):
        acc = add_f(acc, mul_f(load_h(a16, ao + j), load_f(q, qo + j)))
    return acc


@njit(parallel=True, fastmath=True, cache=True)
def _latent_scores8(q_lat, q_pe, c16, kpe16, n, scale, scores):
    # _latent_scores for two positions and eight heads at a time (H a multiple of 8): sixteen
    # independent sums in flight, each float16 cache row widened once for the eight heads and each
    # query piece loaded once for the two positions; a (pair of positions, group of eight heads) per
    # iteration, both cores
    H, C = q_lat.shape
    R = q_pe.shape[1]
    G = H // 8
    for job in prange(((n + 1) // 2) * G):
        s, h0 = (job // G) * 2, (job % G) * 8
        t = min(s + 1, n - 1)  # an odd last position computed twice
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero_f()
        b0 = b1 = b2 = b3 = b4 = b5 = b6 = b7 = zero_f()
        for j in range(0, C, 16):
            r = load_h(c16, s * C + j)
            u = load_h(c16, t * C + j)
            q = load_f(q_lat, (h0 + 0) * C + j)
            a0 = add_f(a0, mul_f(r, q))
            b0 = add_f(b0, mul_f(u, q))
            q = load_f(q_lat, (h0 + 1) * C + j)
            a1 = add_f(a1, mul_f(r, q))
            b1 = add_f(b1, mul_f(u, q))
            q = load_f(q_lat, (h0 + 2) * C + j)
            a2 = add_f(a2, mul_f(r, q))
            b2 = add_f(b2, mul_f(u, q))
            q = load_f(q_lat, (h0 + 3) * C + j)
            a3 = add_f(a3, mul_f(r, q))
            b3 = add_f(b3, mul_f(u, q))
            q = load_f(q_lat, (h0 + 4) * C + j)
            a4 = add_f(a4, mul_f(r, q))
            b4 = add_f(b4, mul_f(u, q))
            q = load_f(q_lat, (h0 + 5) * C + j)
            a5 = add_f(a5, mul_f(r, q))
            b5 = add_f(b5, mul_f(u, q))
            q = load_f(q_lat, (h0 + 6) * C + j)
            a6 = add_f(a6, mul_f(r, q))
            b6 = add_f(b6, mul_f(u, q))
            q = load_f(q_lat, (h0 + 7) * C + j)
            a7 = add_f(a7, mul_f(r, q))
            b7 = add_f(b7, mul_f(u, q))
        for j in range(0, R, 16):
            r = load_h(kpe16, s * R + j)
            u = load_h(kpe16, t * R + j)
            q = load_f(q_pe, (h0 + 0) * R + j)
            a0 = add_f(a0, mul_f(r, q))
            b0 = add_f(b0, mul_f(u, q))
            q = load_f(q_pe, (h0 + 1) * R + j)
            a1 = add_f(a1, mul_f(r, q))
            b1 = add_f(b1, mul_f(u, q))
            q = load_f(q_pe, (h0 + 2) * R + j)
            a2 = add_f(a2, mul_f(r, q))
            b2 = add_f(b2, mul_f(u, q))
            q = load_f(q_pe, (h0 + 3) * R + j)
            a3 = add_f(a3, mul_f(r, q))
            b3 = add_f(b3, mul_f(u, q))
            q = load_f(q_pe, (h0 + 4) * R + j)
            a4 = add_f(a4, mul_f(r, q))
            b4 = add_f(b4, mul_f(u, q))
            q = load_f(q_pe, (h0 + 5) * R + j)
            a5 = add_f(a5, mul_f(r, q))
            b5 = add_f(b5, mul_f(u, q))
            q = load_f(q_pe, (h0 + 6) * R + j)
            a6 = add_f(a6, mul_f(r, q))
            b6 = add_f(b6, mul_f(u, q))
            q = load_f(q_pe, (h0 + 7) * R + j)
            a7 = add_f(a7, mul_f(r, q))
            b7 = add_f(b7, mul_f(u, q))
        scores[h0 + 0, s] = hsum_f(a0) * scale
        scores[h0 + 1, s] = hsum_f(a1) * scale
        scores[h0 + 2, s] = hsum_f(a2) * scale
        scores[h0 + 3, s] = hsum_f(a3) * scale
        scores[h0 + 4, s] = hsum_f(a4) * scale
        scores[h0 + 5, s] = hsum_f(a5) * scale
        scores[h0 + 6, s] = hsum_f(a6) * scale
        scores[h0 + 7, s] = hsum_f(a7) * scale
        scores[h0 + 0, t] = hsum_f(b0) * scale
        scores[h0 + 1, t] = hsum_f(b1) * scale
        scores[h0 + 2, t] = hsum_f(b2) * scale
        scores[h0 + 3, t] = hsum_f(b3) * scale
        scores[h0 + 4, t] = hsum_f(b4) * scale
        scores[h0 + 5, t] = hsum_f(b5) * scale
        scores[h0 + 6, t] = hsum_f(b6) * scale
        scores[h0 + 7, t] = hsum_f(b7) * scale


@njit(parallel=True, fastmath=True, cache=True)
def _latent_mix8(p, c16, n, out):
    # out (H, C) = p (H, n) @ c[:n], eight heads at a time (H a multiple of 8): a (16 columns, eight
    # heads) per iteration keeps its eight sums in registers over every position, each float16 row
    # piece widened once for the eight; both cores, no partial sums to add up
    H, C = out.shape
    G = H // 8
    for job in prange((C // 16) * G):
        j, h0 = (job // G) * 16, (job % G) * 8
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = zero_f()
        for s in range(n):
            r = load_h(c16, s * C + j)
            a0 = add_f(a0, mul_f(r, splat_f(p[h0 + 0, s])))
            a1 = add_f(a1, mul_f(r, splat_f(p[h0 + 1, s])))
            a2 = add_f(a2, mul_f(r, splat_f(p[h0 + 2, s])))
            a3 = add_f(a3, mul_f(r, splat_f(p[h0 + 3, s])))
            a4 = add_f(a4, mul_f(r, splat_f(p[h0 + 4, s])))
            a5 = add_f(a5, mul_f(r, splat_f(p[h0 + 5, s])))
            a6 = add_f(a6, mul_f(r, splat_f(p[h0 + 6, s])))
            a7 = add_f(a7, mul_f(r, splat_f(p[h0 + 7, s])))
        store_f(out, (h0 + 0) * C + j, a0)
        store_f(out, (h0 + 1) * C + j, a1)
        store_f(out, (h0 + 2) * C + j, a2)
        store_f(out, (h0 + 3) * C + j, a3)
        store_f(out, (h0 + 4) * C + j, a4)
        store_f(out, (h0 + 5) * C + j, a5)
        store_f(out, (h0 + 6) * C + j, a6)
        store_f(out, (h0 + 7) * C + j, a7)


@njit(parallel=True, fastmath=True, cache=True)
def _latent_mix(p, c16, n, parts, out):
    # out (H, C) = p (H, n) @ c[:n]: each thread a run of positions, every row read once from start
    # to end into its own (H, C) sums (parts (threads, H * C)), which are added up at the end
    H = p.shape[0]
    C = out.shape[1]
    nt = parts.shape[0]
    for t in prange(nt):
        acc = parts[t]
        acc[:] = 0.0
        for s in range(t * n // nt, (t + 1) * n // nt):
            for v in range(0, C, 16):
                row = load_h(c16, s * C + v)
                for h in range(H):
                    store_f(acc, h * C + v, add_f(load_f(acc, h * C + v), mul_f(splat_f(p[h, s]), row)))
    for h in range(H):
        for j in range(C):
            total = np.float32(0.0)
            for t in range(nt):
                total += parts[t, h * C + j]
            out[h, j] = total


class Heads:
    """A (H, R, K) stack of per-head matrices kept in the file's quantization: a decode step
    multiplies every head in one kernel call (matmul_many, head h by row h of x), a prompt head by
    head with the same kernels (8-bit activations either way, as llama.cpp's products: a prompt and
    its tokens one at a time give the same result)."""

    def __init__(self, gguf, name: str, shape: tuple[int, int, int]):
        t = gguf.tensor(name, shape)
        self.fmt = tensor_format(gguf, t)
        self.name, self.shape, self.raw = name, t.shape, t.raw  # raw (H, R, row_bytes)
        self._packed, self._bound = None, {}

    def bound(self, T: int):
        """T tokens' products of every head (matrix h times row t * H + h) as one bound call
        (QuantFormat.bind_many): call(x (T * H, K) float32 contiguous) -> (T * H, R); None where
        the format has no matmul_many."""
        call = self._bound.get(T)
        if call is None:
            H, _, K = self.shape
            call = self._bound[T] = self.fmt.bind_many(self.packed * T, np.arange(T * H), (T * H, K)) or False
        return call or None

    @property
    def packed(self) -> list:
        if self._packed is None:
            self._packed = [self.fmt.pack(self.raw[h]) for h in range(self.shape[0])]
        return self._packed

    def matrix(self, h: int) -> QMatrix:
        m = QMatrix(self.fmt.qtype, self.raw[h], self.shape[1:], f"{self.name}[{h}]")
        m._packed = self.packed[h]
        return m


@njit(fastmath=True, cache=True, inline="always")
def _dots_2x2(a0, a1, b0, b1, c16, s, t, q, i, k, width):
    # the four sums of _scores_2x2 plus one piece of their products: rows s and t of c16 (float16 as
    # uint16, `width` a row) times the query rows i and k of q (flat, `width` a row)
    for j in range(0, width, 16):
        x, y = load_h(c16, s * width + j), load_h(c16, t * width + j)
        v = load_f(q, i * width + j)
        a0 = add_f(a0, mul_f(x, v))
        b0 = add_f(b0, mul_f(y, v))
        v = load_f(q, k * width + j)
        a1 = add_f(a1, mul_f(x, v))
        b1 = add_f(b1, mul_f(y, v))
    return a0, a1, b0, b1


@njit(fastmath=True, cache=True, inline="always")
def _scores_2x2(q_lat, q_pe, c16, kpe16, i, k, s, t, scale, scores, ri, rk):
    # scale * (query . cache entry) of the query rows i and k (flat rows of q_lat (.., C) and q_pe
    # (.., R)) at positions s and t of a latent cache (float16 as uint16) -> scores[ri, s], scores[ri, t],
    # scores[rk, s], scores[rk, t]: four sums in flight, each cache piece widened once for both
    # rows and each query piece loaded once for both positions (eight vector registers on AVX2)
    z = zero_f()
    a0, a1, b0, b1 = _dots_2x2(z, z, z, z, c16, s, t, q_lat, i, k, q_lat.shape[-1])
    a0, a1, b0, b1 = _dots_2x2(a0, a1, b0, b1, kpe16, s, t, q_pe, i, k, q_pe.shape[-1])
    scores[ri, s] = hsum_f(a0) * scale
    scores[rk, s] = hsum_f(a1) * scale
    scores[ri, t] = hsum_f(b0) * scale
    scores[rk, t] = hsum_f(b1) * scale


@njit(fastmath=True, cache=True, inline="always")
def _mix_4(p, k, c16, n, out, i, last, j):
    # columns j..j+15 of out's flat rows i..i+3 (none past `last`, a row repeated where fewer are
    # left) = rows k..k+3 of p (none past its last) @ rows 0..n-1 of c16 (float16 as uint16, out's
    # width): four sums held in registers over every position, each cache piece widened once for
    # the four
    C, P = out.shape[-1], p.shape[0]
    k1, k2, k3 = min(k + 1, P - 1), min(k + 2, P - 1), min(k + 3, P - 1)
    a0 = a1 = a2 = a3 = zero_f()
    for s in range(n):
        x = load_h(c16, s * C + j)
        a0 = add_f(a0, mul_f(x, splat_f(p[k, s])))
        a1 = add_f(a1, mul_f(x, splat_f(p[k1, s])))
        a2 = add_f(a2, mul_f(x, splat_f(p[k2, s])))
        a3 = add_f(a3, mul_f(x, splat_f(p[k3, s])))
    store_f(out, min(i + 3, last) * C + j, a3)
    store_f(out, min(i + 2, last) * C + j, a2)
    store_f(out, min(i + 1, last) * C + j, a1)
    store_f(out, i * C + j, a0)


@njit(fastmath=True, cache=True, inline="always")
def _probabilities(row, n):
    # row[:n] -> softmax(row[:n]) in place (row has room for 16 more), the exponentials 16 at a time
    # (simd.exp_f); weights below 1e-30 made zero (subnormal ones would run the products at
    # microcode speed)
    top = np.float32(-np.inf)
    for s in range(n):
        top = max(top, row[s])
    for s in range(n, n + (-n) % 16):
        row[s] = -np.inf
    t, acc = splat_f(top), zero_f()
    for s in range(0, n, 16):
        e = exp_f(sub_f(load_f(row, s), t))
        store_f(row, s, e)
        acc = add_f(acc, e)
    inv = np.float32(1.0) / hsum_f(acc)
    for s in range(n):
        w = row[s] * inv
        row[s] = w if w >= np.float32(1e-30) else np.float32(0.0)


@njit(fastmath=True, cache=True, inline="always")
def _latent_four(q_lat, q_pe, i, last, c16, kpe16, n, scale, scores, out):
    # Attention of the query rows i..i+3 (flat rows of q_lat (.., C) and q_pe (.., R), none past
    # `last`: a row repeated where fewer are left) over n positions of one latent cache (c16, kpe16:
    # float16 as uint16) -> the same rows of out; scores (4, n + 16) scratch. Four heads at a time,
    # on one core: scores two heads by two positions, then each head's softmax, then the mix four
    # heads by 16 columns
    i1, i2, i3 = min(i + 1, last), min(i + 2, last), min(i + 3, last)
    for s in range(0, n, 2):
        t = min(s + 1, n - 1)  # an odd last position computed twice
        _scores_2x2(q_lat, q_pe, c16, kpe16, i, i1, s, t, scale, scores, 0, 1)
        _scores_2x2(q_lat, q_pe, c16, kpe16, i2, i3, s, t, scale, scores, 2, 3)
    for r in range(4):
        _probabilities(scores[r], n)
    for j in range(0, q_lat.shape[-1], 16):
        _mix_4(scores, 0, c16, n, out, i, last, j)


@njit(fastmath=True, cache=True)
def _latent_short(q_lat, q_pe, c16, kpe16, n, scale, scores, out):
    # _latent_scores, the softmax and _latent_mix in one call on one core, for short contexts:
    # q_lat (H, C), q_pe (H, R), scores (4, n + 16) scratch, out (H, C)
    H = q_lat.shape[0]
    for h in range(0, H, 4):
        _latent_four(q_lat, q_pe, h, H - 1, c16, kpe16, n, scale, scores, out)


@njit(parallel=True, fastmath=True, cache=True)
def _latent_scores(q_lat, q_pe, c16, kpe16, n, scale, scores):
    # scores[h, s] = scale * (q_lat[h] . c[s] + q_pe[h] . k_pe[s]) for s < n, from the float16 cache
    # (no float32 copy): a (pair of heads, pair of positions) per iteration, a head pair's queries
    # staying in L1 while the positions stream past; both cores
    H = q_lat.shape[0]
    P = (n + 1) // 2
    for job in prange(((H + 1) // 2) * P):
        h, s = (job // P) * 2, (job % P) * 2
        k = min(h + 1, H - 1)
        _scores_2x2(q_lat, q_pe, c16, kpe16, h, k, s, min(s + 1, n - 1), scale, scores, h, k)


@njit(parallel=True, fastmath=True, cache=True)
def _latent_mix4(p, c16, n, out):
    # out (H, C) = p (H, n) @ c[:n], a (16 columns, four heads) per iteration: the four sums stay in
    # registers over every position; both cores, no partial sums to add up
    H, C = out.shape
    G = (H + 3) // 4
    for job in prange((C // 16) * G):
        h = (job % G) * 4
        _mix_4(p, h, c16, n, out, h, H - 1, (job // G) * 16)


@njit(parallel=True, fastmath=True, cache=True)
def _latent_long(q_lat, q_pe, c16, kpe16, n, scale, by8, scores, out):
    # One token's attention over a long context on both cores, in one call: the scores, each head's
    # softmax (_probabilities, as _latent_short's), the mix; scores (H, n + 16) scratch. by8: the
    # kernels of eight heads at a time (AVX-512's registers hold their sixteen sums)
    if by8:
        _latent_scores8(q_lat, q_pe, c16, kpe16, n, scale, scores)
    else:
        _latent_scores(q_lat, q_pe, c16, kpe16, n, scale, scores)
    for h in prange(q_lat.shape[0]):
        _probabilities(scores[h], n)
    if by8:
        _latent_mix8(scores, c16, n, out)
    else:
        _latent_mix4(scores, c16, n, out)


@njit(fastmath=True, cache=True, inline="always")
def _latent_job(q_lat, q_pe, at, n, scale, out, job):
    # (sequence, group of four heads) `job` of _latent_rows: _latent_four on that sequence's caches
    B, H, C = q_lat.shape
    G = (H + 3) // 4
    b = job // G
    m = n[b]
    c16 = carray(at_address(at[b, 0]), (m * C,), np.uint16)
    kpe16 = carray(at_address(at[b, 1]), (m * q_pe.shape[2],), np.uint16)
    _latent_four(q_lat, q_pe, b * H + (job % G) * 4, b * H + H - 1, c16, kpe16, m, scale,
                 np.empty((4, m + 16), np.float32), out)


@njit(parallel=True, fastmath=True, cache=True)
def _latent_rows(q_lat, q_pe, at, n, scale, out):
    # _latent_short of several sequences' new tokens in one call, a (sequence, four heads) per
    # iteration on both cores: q_lat (B, H, C), q_pe (B, H, R); row b's layer caches c (.., C) and
    # k_pe (.., R) float16 (as uint16) at addresses at[b, 0], at[b, 1], its first n[b] positions
    # attended; out (B, H, C). Per head the same steps as _latent_short, so the same results.
    for job in prange(q_lat.shape[0] * ((q_lat.shape[1] + 3) // 4)):
        _latent_job(q_lat, q_pe, at, n, scale, out, job)


@njit(fastmath=True, cache=True)
def _latent_rows_one_core(q_lat, q_pe, at, n, scale, out):
    # _latent_rows where the work is less than a parallel region costs (a speculative verification's
    # few tokens over a short context)
    for job in range(q_lat.shape[0] * ((q_lat.shape[1] + 3) // 4)):
        _latent_job(q_lat, q_pe, at, n, scale, out, job)


@njit(cache=True, inline="always")
def _rope_row(x, o, out, cos, sin, p, dim, neox):
    # x[o:o + len(out)] -> out: its first dim values rotated by the tables' row p (pairs (2i, 2i+1),
    # or (i, i + dim/2) for neox), the rest copied; the numpy math of models/common.py's Rope,
    # without its temporaries (compiled without fastmath: the same bits)
    for i in range(dim, out.shape[0]):
        out[i] = x[o + i]
    half = dim // 2
    for i in range(half):
        ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
        a, b, c, s = x[o + ia], x[o + ib], cos[p, i], sin[p, i]
        out[ia] = a * c - b * s
        out[ib] = a * s + b * c


@njit(cache=True)
def _rope(x, cos, sin, positions, dim, neox, out):
    # x (T, H, D) float32 -> out: each head's row roped at its token's position (_rope_row)
    for t in range(x.shape[0]):
        for h in range(x.shape[1]):
            _rope_row(x[t, h], 0, out[t, h], cos, sin, positions[t], dim, neox)


@njit(cache=True)
def _latent_entries(q, kv, norm_w, eps, cos, sin, p, dim, neox, q_pe, lat, k_pe):
    # a decode token's MLA inputs to the attention: q (H, N + R) -> q_pe (H, R) roped; kv (C + R,)
    # -> lat (C,) normalized, k_pe (R,) roped; _rope's and _rms_norm's steps, so the same bits
    H, R = q_pe.shape
    N, C = q.shape[1] - R, lat.shape[0]
    rms_norm_row(kv[:C], norm_w, eps, lat)
    for h in range(H):
        _rope_row(q[h], N, q_pe[h], cos, sin, p, dim, neox)
    _rope_row(kv, C, k_pe, cos, sin, p, dim, neox)


@njit(cache=True)
def _latent_entries_rows(q, kv, norm_w, eps, cos, sin, pos, dim, neox, c16, kpe16, q_pe):
    # a verification's few tokens of one sequence: row t's entries as _latent_entries makes them
    # (q_pe[t] roped; its latent normalized and k_pe roped), the two stored as float16 (store_h:
    # numpy's rounding) at position pos[t] of the layer caches c16 (S, C) and kpe16 (S, R) (uint16)
    T, C, R = q.shape[0], c16.shape[1], kpe16.shape[1]
    lat, k_pe = np.empty(C, np.float32), np.empty(R, np.float32)
    cf, kf = c16.reshape(-1), kpe16.reshape(-1)
    for t in range(T):
        _latent_entries(q[t], kv[t], norm_w, eps, cos, sin, pos[t], dim, neox, q_pe[t], lat, k_pe)
        for j in range(0, C, 16):
            store_h(cf, pos[t] * C + j, load_f(lat, j))
        for j in range(0, R, 16):
            store_h(kf, pos[t] * R + j, load_f(k_pe, j))


@njit(cache=True)
def _latent_few(q, kv, norm_w, eps, cos, sin, pos, dim, neox, q_lat, c16, kpe16, scale, out):
    # _latent_entries_rows, then each row's _latent_short up to its own position, all on one core in
    # one call: q (T, H, N + R), kv (T, C + R), q_lat and out (T, H, C)
    T, H = q_lat.shape[:2]
    q_pe = np.empty((T, H, kpe16.shape[1]), np.float32)
    _latent_entries_rows(q, kv, norm_w, eps, cos, sin, pos, dim, neox, c16, kpe16, q_pe)
    scores = np.empty((4, pos.max() + 17), np.float32)
    for t in range(T):
        _latent_short(q_lat[t], q_pe[t], c16, kpe16, pos[t] + 1, scale, scores, out[t])


@njit(cache=True)
def _rms_norm(x, w, eps, out):
    # x (T, D) float32 -> x / rms(x) * w, row by row (activations.rms_norm_row)
    for t in range(x.shape[0]):
        rms_norm_row(x[t], w, eps, out[t])


@njit(fastmath=True, cache=True, inline="always")
def _swiglu_row(g, u, out, t):
    # out[t] = silu(g[t]) * u[t] for row t of (T, F) float32 arrays, 16 values at a time (numpy's silu
    # makes four temporaries and an errstate: 9 us for SmolLM2's 1536 values). sigmoid(x) from
    # e = exp(-|x|) <= 1, so nothing overflows: 1 / (1 + e) for x >= 0, e / (1 + e) below. The
    # last F % 16 values one by one, the same way.
    F = g.shape[1]
    one = splat_f(np.float32(1.0))
    o = t * F
    gf, uf, of = g.reshape(-1), u.reshape(-1), out.reshape(-1)
    for j in range(0, F - F % 16, 16):
        x = load_f(gf, o + j)
        e = exp_f(sub_f(zero_f(), max_f(x, sub_f(zero_f(), x))))
        r = div_f(one, add_f(one, e))
        store_f(of, o + j, mul_f(mul_f(x, pick_ge(x, np.float32(0.0), r, mul_f(e, r))), load_f(uf, o + j)))
    for j in range(F - F % 16, F):
        x = g[t, j]
        e = np.float32(np.exp(-abs(x)))
        r = np.float32(1.0) / (np.float32(1.0) + e)
        out[t, j] = x * (r if x >= 0 else e * r) * u[t, j]


@njit(fastmath=True, cache=True)
def _swiglu_few(g, u, out):
    for t in range(g.shape[0]):
        _swiglu_row(g, u, out, t)


@njit(parallel=True, fastmath=True, cache=True)
def _swiglu_many(g, u, out):
    for t in prange(g.shape[0]):
        _swiglu_row(g, u, out, t)


@njit(cache=True)
def _expert_sums(ys, weights, ids, out):
    # ys (T * k, D) float32, row t * k + s token t's expert in router slot s; weights, ids (T, k) ->
    # out (T, D): each token's weight * row summed in expert order, one add after another from zero
    # (the float32 products and adds of numpy's multiply and a reduction over the slots)
    T, k = ids.shape
    order = np.empty(k, np.int64)
    for t in range(T):
        for s in range(k):  # the slots by expert id: an insertion sort of a few
            v, j = s, s - 1
            while j >= 0 and ids[t, order[j]] > ids[t, v]:
                order[j + 1] = order[j]
                j -= 1
            order[j + 1] = v
        out[t, :] = 0.0
        for s in range(k):
            r, w = t * k + order[s], weights[t, order[s]]
            for d in range(ys.shape[1]):
                out[t, d] += ys[r, d] * w


@njit(cache=True)
def _unique_small(ids, experts, inverse):
    # ids (n,) int64 -> experts (n,) its distinct values ascending in the first m slots, inverse (n,)
    # each id's index among them; returns m (np.unique's, for a few tokens' choices)
    n = ids.shape[0]
    experts[:] = np.sort(ids)
    m = 0
    for i in range(n):
        if m == 0 or experts[i] != experts[m - 1]:
            experts[m] = experts[i]
            m += 1
    for i in range(n):
        lo, hi = 0, m - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if experts[mid] < ids[i]:
                lo = mid + 1
            else:
                hi = mid
        inverse[i] = lo
    return m


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """silu(g) * u of (T, F) float32 rows (common.swiglu's math in one numba call; row by row, so
    that a row's values do not depend on the rows beside it)."""
    g = np.ascontiguousarray(g, dtype=np.float32)
    u = np.ascontiguousarray(u, dtype=np.float32)
    if g.ndim != 2 or g.shape != u.shape:
        return common_swiglu(g, u)
    out = np.empty_like(g)
    (_swiglu_few if g.size <= SWIGLU_ONE_CORE else _swiglu_many)(g, u, out)
    return out


@njit(cache=True)
def _route_rows(logits, bias, sigmoid, n_group, n_group_used, norm, scale, ids, weights):
    # models.moe.route for each row of logits (T, E) float32 -> ids (T, k) int64, weights (T, k)
    # float32; bias (E,) or empty. Ranks as its stable sorts do: of equal scores the lower index first.
    T, E = logits.shape
    k, G = ids.shape[1], n_group
    per = E // G
    probs, select = np.empty(E, np.float32), np.empty(E, np.float32)
    top2, kept, taken = np.empty(G, np.float32), np.empty(G, np.bool_), np.empty(E, np.bool_)
    one, inf = np.float32(1.0), np.float32(np.inf)
    for t in range(T):
        if sigmoid:
            for e in range(E):
                probs[e] = one / (one + np.exp(-logits[t, e]))
        else:
            m = logits[t, 0]
            for e in range(1, E):
                m = max(m, logits[t, e])
            s = np.float32(0.0)
            for e in range(E):
                probs[e] = np.exp(logits[t, e] - m)
                s += probs[e]
            for e in range(E):
                probs[e] = probs[e] / s
        for e in range(E):
            select[e] = probs[e] + bias[e] if len(bias) else probs[e]
        if G > 1:  # groups ranked by the sum of their two best scores; the others' experts out
            for g in range(G):
                a, b = -inf, -inf
                for e in range(g * per, (g + 1) * per):
                    if select[e] > a:
                        a, b = select[e], a
                    elif select[e] > b:
                        b = select[e]
                top2[g] = a + b
                kept[g] = False
            for _ in range(min(n_group_used, G)):
                best = -1
                for g in range(G):
                    if not kept[g] and (best < 0 or top2[g] > top2[best]):
                        best = g
                kept[best] = True
            for g in range(G):
                if not kept[g]:
                    select[g * per:(g + 1) * per] = -inf
        taken[:] = False
        total = np.float32(0.0)
        for j in range(k):
            best = -1
            for e in range(E):
                if not taken[e] and (best < 0 or select[e] > select[best]):
                    best = e
            taken[best] = True
            ids[t, j] = best
            weights[t, j] = probs[best]
            total += probs[best]
        if norm:
            total = max(total, np.float32(6.103515625e-5))
            for j in range(k):
                weights[t, j] = weights[t, j] / total
        for j in range(k):
            weights[t, j] = weights[t, j] * scale


NO_BIAS = np.zeros(0, np.float32)


ROUTER_AHEAD = 1024  # values: how far ahead the router's product asks for its weights


@njit(fastmath=True, cache=True, inline="always")
def _router_dot(x, w, out, job):
    # out[t, e] = x[t] . w[e] for job t * E + e, x (T, D) and w (E, D) float32, D a multiple of 64:
    # summed in one fixed order (four 16-lane chains, then the lanes), whatever T is
    D, E = x.shape[1], w.shape[0]
    t, e = job // E, job % E
    a0, a1, a2, a3 = zero_f(), zero_f(), zero_f(), zero_f()  # four chains: the adds' latency overlapped
    xo, wo = t * D, e * D
    for j in range(0, D, 64):
        for line in range(0, 64, 16):  # the lines 4 KiB ahead (past a row's end: the next row's)
            prefetch(w, wo + j + ROUTER_AHEAD + line)
        a0 = add_f(a0, mul_f(load_f(x, xo + j), load_f(w, wo + j)))
        a1 = add_f(a1, mul_f(load_f(x, xo + j + 16), load_f(w, wo + j + 16)))
        a2 = add_f(a2, mul_f(load_f(x, xo + j + 32), load_f(w, wo + j + 32)))
        a3 = add_f(a3, mul_f(load_f(x, xo + j + 48), load_f(w, wo + j + 48)))
    out[t, e] = hsum_f(add_f(add_f(a0, a1), add_f(a2, a3)))


@njit(fastmath=True, cache=True)
def _router_logits_one_core(x, w, out):
    for job in range(x.shape[0] * w.shape[0]):
        _router_dot(x, w, out, job)


@njit(parallel=True, fastmath=True, cache=True)
def _router_logits(x, w, out):
    for job in prange(x.shape[0] * w.shape[0]):
        _router_dot(x, w, out, job)


def router_logits(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, D) @ w.T for the router, each row's logits the same bits whatever rows come with it
    (BLAS's one-row and many-row products round differently: a token's experts and weights would
    then depend on the batch it runs in); numpy's product where D is no multiple of 64."""
    if x.shape[1] % 64 or w.dtype != np.float32 or not w.flags.c_contiguous:
        return x @ w.T
    out = np.empty((len(x), w.shape[0]), np.float32)
    (_router_logits_one_core if len(x) <= FEW_TOKENS else _router_logits)(np.ascontiguousarray(x, dtype=np.float32), w, out)
    return out


def route(logits: np.ndarray, cfg, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """models.moe.route in one numba call (its numpy steps cost ~20 us on a decode step's row, 26
    times a V2-Lite step): the same experts in the same order, the weights within float32 rounding
    of its (exp's own rounding differs from numpy's)."""
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[1] % cfg.n_group or not 0 < cfg.n_used <= logits.shape[1]:
        return route_numpy(logits, cfg, bias)
    ids = np.empty((len(logits), cfg.n_used), np.int64)
    weights = np.empty((len(logits), cfg.n_used), np.float32)
    _route_rows(logits, NO_BIAS if bias is None else np.ascontiguousarray(bias, dtype=np.float32),
                cfg.gating == SIGMOID, cfg.n_group, cfg.n_group_used, cfg.norm_weights,
                np.float32(1.0 if cfg.scale == 0.0 else cfg.scale), ids, weights)
    return ids, weights


SWIGLU_ONE_CORE = 1 << 14  # values: up to here one core (a decode step's six experts, 8448 values: 12 us as a
# parallel region, 4 on one core)
KV_KERNEL_MIN = 1024  # positions: from here both cores, below one (a parallel region costs more than the work)
MANY_PAIRS = 64  # (token, head) pairs of MLA's per-head products in one matmul_many call (one kernel
# compiled per count: a few tokens of V2-Lite's 16 heads, not of V3's 128)
FUSE_MAX = 2 << 20  # bytes of the matrices one linears call reads up to which they run as one matrix (SmolLM2's
# gate and up, 1.9 MB in Q8_0: a call's own cost is then as much as its bytes take; 7-8% of its decode step)
LATENT_SHORT = 1024  # MLA decode: positions x heads below which one core does it (both cores from 64 of V2-Lite's)


@njit(fastmath=True, cache=True, inline="always")
def _softmax_mix(scores, n, top, v16, base, width, out, oo):
    # out.flat[oo : oo + width] = softmax(scores[:n]) @ rows s of v16 (float16 as uint16, row s at
    # base + s * width), in the scores' own storage (room for 16 more than n); width
    # a multiple of 16. The exponentials 16 at a time (simd.exp_f; libm's one by one were half a
    # short context's attention)
    for s in range(n, n + (-n) % 16):
        scores[s] = -np.inf
    t, acc = splat_f(top), zero_f()
    for s in range(0, n, 16):
        x = sub_f(load_f(scores, s), t)
        e = exp_f(x)
        store_f(scores, s, e)
        acc = add_f(acc, e)
    inv = np.float32(1.0) / hsum_f(acc)
    for j in range(0, width, 16):
        store_f(out, oo + j, zero_f())
    for s in range(n):
        w = scores[s] * inv
        if w < np.float32(1e-30):  # subnormal weights would run the products at microcode speed
            continue
        vo = base + s * width
        for j in range(0, width, 16):
            store_f(out, oo + j, add_f(load_f(out, oo + j), mul_f(splat_f(w), load_h(v16, vo + j))))


@njit(fastmath=True, cache=True)
def _gqa_short(q, k16, v16, n, scale, scores, out):
    # One token's attention on one core, for short contexts: q (G, Hg, d) float32; k16, v16 (G, n_ctx,
    # d) float16 caches as uint16, widened 16 at a time; scores (n,) scratch; out (G, Hg, d)
    G, Hg, d = q.shape
    n_ctx = k16.shape[1]
    for g in range(G):
        for h in range(Hg):
            qo = (g * Hg + h) * d
            top = np.float32(-np.inf)
            for s in range(n):
                x = hsum_f(_dot_h(zero_f(), k16, (g * n_ctx + s) * d, q, qo, d)) * scale
                scores[s] = x
                top = max(top, x)
            _softmax_mix(scores, n, top, v16, g * n_ctx * d, d, out, qo)


@njit(fastmath=True, cache=True)
def _gqa_step(q, k, v, cos, sin, p, dim, neox, k16, v16, scale, scores, out):
    # A decode token's whole attention on one core: q (G, Hg, d), k and v (G, 1, d) float32 as the
    # projections give them; q and k roped at position p (_rope: compiled without fastmath, the same
    # bits as the model's rope), k and v stored there as float16 (store_h: numpy's rounding) in the
    # caches k16, v16 (G, n_ctx, d) as uint16, then _gqa_short over positions 0..p
    G, Hg, d = q.shape
    qr, kr, at = np.empty_like(q), np.empty_like(k), np.full(G, p, np.int64)  # (each group's heads as one token's)
    _rope(q, cos, sin, at, dim, neox, qr)
    _rope(k, cos, sin, at, dim, neox, kr)
    n_ctx = k16.shape[1]
    kf, vf, k16f, v16f = kr.reshape(-1), v.reshape(-1), k16.reshape(-1), v16.reshape(-1)
    for g in range(G):
        for j in range(0, d, 16):
            store_h(k16f, (g * n_ctx + p) * d + j, load_f(kf, g * d + j))
            store_h(v16f, (g * n_ctx + p) * d + j, load_f(vf, g * d + j))
    _gqa_short(qr, k16, v16, p + 1, scale, scores, out)


def _one_kind(ws) -> bool:
    """Whether ws are QMatrix of one format and one width (linears runs them through one activation)."""
    return all(type(w) is QMatrix for w in ws) and len({(w.fmt, w.shape[1]) for w in ws}) == 1


def _plus(y, d):
    return y if d is None else y + d


@njit(parallel=True, fastmath=True, cache=True)
def _lora_pairs_h(a16, bt16, e, x, s, t, out):
    # out[i] = s * B[e[i]] @ (A[e[i]] @ x[i]): a16 (E, r, K), bt16 (E, r, N) (B transposed) float16 as
    # uint16, x (n, K) float32, t (n, r) scratch; K and N multiples of 16. Reads only the chosen
    # experts' pairs, in place (no gathered copy), 16 halves widened at a time; B's rows as 16-output
    # vectors scaled by t, so no horizontal sum per output
    E, r, K = a16.shape
    N = bt16.shape[2]
    n = e.shape[0]
    for j in prange(n * r):
        i, q = j // r, j % r
        t[i, q] = hsum_f(_dot_h(zero_f(), a16, (e[i] * r + q) * K, x, i * K, K)) * s
    M = N // 16
    for j in prange(n * M):
        i, m = j // M, (j % M) * 16
        acc = zero_f()
        for q in range(r):
            acc = add_f(acc, mul_f(splat_f(t[i, q]), load_h(bt16, (e[i] * r + q) * N + m)))
        store_f(out, i * N + m, acc)


class CPUBackend:
    xp = np
    device = "cpu"

    def __init__(self):
        self._groups: dict = {}  # linears' matrices (their ids) -> (fused layout or None, output cuts, the matrices)
        self._bound: dict = {}  # linears' matrices (their ids) -> their bound one-token products, or False

    @property
    def threads(self) -> int:
        """Host threads the kernels run on (numba's), for work the model shares out itself."""
        return numba.get_num_threads()

    def matrix(self, gguf, name: str, shape: tuple[int, int]) -> QMatrix:
        t = gguf.tensor(name, shape)
        tensor_format(gguf, t)
        return QMatrix(t.qtype, t.raw, t.shape, name)

    def dense(self, gguf, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        t = gguf.tensor(name, shape)
        fmt = tensor_format(gguf, t)
        return fmt.dequantize(np.ascontiguousarray(t.raw).reshape(-1, fmt.type_size)).reshape(t.shape)

    def heads(self, gguf, name: str, shape: tuple[int, int, int]) -> Heads:
        return Heads(gguf, name, shape)

    def embedding(self, gguf, name: str, shape: tuple[int, int]) -> Embedding:
        return Embedding(gguf, name, shape)

    def per_head(self, w, x: np.ndarray) -> np.ndarray:
        # Quantized heads, a few tokens (a verification's, up to MANY_PAIRS (token, head) pairs): every
        # pair in one bound matmul_many call; more: every head with its rows in one call where the
        # format has it (matmul_groups), else a token's heads in one call. A float32 stack, a few
        # tokens: a numba kernel on both cores (numpy's einsum runs these on one core, at a third of
        # the bandwidth); more tokens: batched BLAS.
        if isinstance(w, Heads):
            H, T = w.shape[0], len(x)
            if T <= FEW_TOKENS and T * H <= MANY_PAIRS and (T == 1 or w.fmt.many_compiled(T * H)):
                # bound once per token count where load made its kernel (the grouped call's addresses,
                # transposes and spans cost more: 55 against 17 us for three tokens of edgeseek-mini's
                # k_b, 277 against 134 of V2-Lite's); a mis-shaped x: matmul_many names it
                x = np.ascontiguousarray(x, dtype=np.float32)
                call = w.bound(T) if x.shape[1:] == (H, w.shape[2]) else None
                y = call(x.reshape(T * H, -1)) if call is not None else \
                    w.fmt.matmul_many(w.packed * T, x.reshape(T * H, -1), np.arange(T * H))
                if y is not None:
                    return y.reshape(T, H, -1)  # (T, H, R)
            if T > 2:
                starts = np.arange(H) * T
                y = w.fmt.matmul_groups(w.packed, np.ascontiguousarray(x.transpose(1, 0, 2), dtype=np.float32)
                                        .reshape(H * T, -1), np.stack([starts, starts + T, starts], axis=1))
                if y is not None:  # (H * T, R) head-major: every head in one call, as head by head
                    return y.reshape(H, T, -1).transpose(1, 0, 2)
            if T <= FEW_TOKENS:  # many heads (V3's 128), or a count load did not compile: a token's heads
                x = np.ascontiguousarray(x, dtype=np.float32)
                ys = [w.fmt.matmul_many(w.packed, x[t], np.arange(H)) for t in range(T)]
                if all(y is not None for y in ys):
                    return np.stack(ys)  # (T, H, R)
            return np.stack([w.matrix(h)(np.ascontiguousarray(x[:, h])) for h in range(H)], axis=1)
        if len(x) <= 2:
            out = np.empty((len(x), w.shape[0], w.shape[1]), np.float32)  # (T, H, R)
            for t in range(len(x)):
                _heads_matvec(w, np.ascontiguousarray(x[t], dtype=np.float32), out[t])
            return out
        return np.matmul(x.transpose(1, 0, 2), w.transpose(0, 2, 1)).transpose(1, 0, 2)

    @staticmethod
    def head_rows(w, rows: int) -> QMatrix | None:
        """A matrix of w's first `rows` rows over a view of w's kernel layout (no bytes of its own);
        None where w has no tiled layout, the rows are all of it or no whole number of tiles."""
        if not isinstance(w, QMatrix):
            return None
        p = w.packed
        if not (hasattr(p, "_fields") and p._fields[-1] == "n" and "d" in p._fields):
            return None
        n_tiles, tile = p.d.shape[0], p.d.shape[-1]
        keep = rows // tile
        if rows % tile or keep >= n_tiles:
            return None
        cut = [a[:keep] if isinstance(a, np.ndarray) and a.ndim and a.shape[0] == n_tiles else a for a in p[:-1]]
        return QMatrix.from_packed(w.fmt.qtype, type(p)(*cut, keep * tile), (keep * tile, w.shape[1]), f"{w.name}[:{keep * tile}]")

    @staticmethod
    def expert_sums(ys: np.ndarray, weights: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """Each token's routed rows weighted and summed in expert order: ys (T * k, D) float32 (row
        t * k + s: token t's choice s), weights and ids (T, k) -> (T, D), the bits of numpy's product
        and reduction over the choices sorted by expert (models.moe), in one numba call."""
        out = np.empty((ids.shape[0], ys.shape[1]), np.float32)
        _expert_sums(np.ascontiguousarray(ys, dtype=np.float32), np.ascontiguousarray(weights, dtype=np.float32),
                     np.ascontiguousarray(ids, dtype=np.int64), out)
        return out

    @staticmethod
    def unique_experts(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """np.unique(ids, return_inverse=True) for a few tokens' choices (T, k), in one numba call."""
        flat = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        experts, inverse = np.empty_like(flat), np.empty_like(flat)
        return experts[:_unique_small(flat, experts, inverse)], inverse.reshape(ids.shape)

    def experts_rows(self, x: np.ndarray, triples, rows, delta=None) -> np.ndarray | None:
        # a decode step's experts (or a verification's (token, expert) pairs): two kernel calls per
        # layer (gate and up of every pair, x quantized once; down) instead of three per expert;
        # rows equal what the products give one by one
        gates, ups, downs = zip(*triples)
        fmt = gates[0].fmt
        if any(m.fmt is not fmt for m in gates + ups):
            return None
        if len(x) > 1 and delta is None and not fmt.many_compiled(2 * len(gates)):
            return None  # several tokens' pairs in a tuple length load did not compile (a batch step of a
            # few sequences without MTP): numba would compile it now, seconds to minutes; the runs path
        rows = np.asarray(rows, np.int64)
        gu = fmt.matmul_many([m.packed for m in gates + ups], x, np.concatenate([rows, rows]))  # one region
        if gu is None:
            return None
        g, u = gu[:len(gates)], gu[len(gates):]  # (n, F) each
        if delta is not None:  # LoRA: each pair's low-rank deltas (models/lora.py)
            g, u = _plus(g, delta("gate", x[rows])), _plus(u, delta("up", x[rows]))
        h = swiglu(g, u)  # (n, F)
        d = None
        if all(m.fmt is downs[0].fmt for m in downs):
            d = downs[0].fmt.matmul_many([m.packed for m in downs], h, np.arange(len(downs)))
        d = d if d is not None else np.concatenate([m(h[i:i + 1]) for i, m in enumerate(downs)])
        return _plus(d, delta("down", h)) if delta is not None else d

    def experts_runs(self, x: np.ndarray, triples, counts: np.ndarray) -> np.ndarray | None:
        # several sequences' step (or prompts): each expert once for the run of rows routed to it,
        # gate and up of every expert in one kernel call (the rows quantized once), down in another;
        # rows equal what the products give expert by expert
        gates, ups, downs = zip(*triples)
        fmt, n = gates[0].fmt, len(x)
        if any(m.fmt is not fmt for m in gates + ups):
            return None
        ends = np.cumsum(counts)
        spans = np.stack([ends - counts, ends, ends - counts], axis=1)  # (E, 3): rows a..b-1 -> rows a..
        gu = fmt.matmul_groups([m.packed for m in gates + ups], x, np.concatenate([spans, spans + [0, 0, n]]))
        if gu is None:
            return None
        h = swiglu(gu[:n], gu[n:])  # (n, F)
        d = None
        if all(m.fmt is downs[0].fmt for m in downs):
            d = downs[0].fmt.matmul_groups([m.packed for m in downs], h, spans)
        return d if d is not None else np.concatenate([m(h[a:b]) for m, (a, b, _) in zip(downs, spans)])

    def lora_pairs(self, a, b, e, x, s: float):
        """s * B[e_i] (A[e_i] x_i) for a few (token, expert) pairs of float16 LoRA pairs (models/lora.py),
        a (E, r, K) and b (E, N, r) a view of a contiguous (E, r, N): one numba call reading the chosen
        pairs' halves in place; None where it does not apply (float32 pairs, widths no multiple of 16,
        a prompt's many pairs)."""
        bt = b.swapaxes(-1, -2)
        if a.dtype != np.float16 or b.dtype != np.float16 or a.shape[2] % 16 or b.shape[1] % 16 or len(e) > 64 \
                or not (a.flags.c_contiguous and bt.flags.c_contiguous):
            return None
        n, r = len(e), a.shape[1]
        out = np.empty((n, b.shape[1]), np.float32)
        _lora_pairs_h(a.view(np.uint16), bt.view(np.uint16), np.ascontiguousarray(e, dtype=np.int64),
                      np.ascontiguousarray(x, dtype=np.float32), np.float32(s), np.empty((n, r), np.float32), out)
        return out

    def moe(self, x, router_weight, router, bias, store, layer: int, lora=None, shared=None,
            residual=None) -> np.ndarray:
        x = rows(x)
        logits = router_logits(x, router_weight)  # (T, E)
        if lora is not None and lora.groups:  # an adapter's router pair (llama.cpp's build_moe_ffn has it)
            logits = lora.add(f"blk.{layer}.ffn_gate_inp.weight", x, logits)
        ids, weights = route(logits, router, bias)  # (T, k)
        out = moe(x, ids, weights, store, layer, self, lora)
        if shared is not None:
            return self.ffn(x, *shared, add=out, residual=residual)
        return plus(out, residual=residual)

    def latent_step(self, q, kv, norm_w, eps: float, rope, q_lat, cache_c, cache_k_pe, pos, scale: float):
        """A decode token's rope of q_pe and k_pe and norm of its latent in one numba call (the
        model's three calls through its rope and norm, the same bits), then latent_decode; None
        where that does not run (the model's path)."""
        H, C = q_lat.shape
        R = cache_k_pe.shape[1]
        if not isinstance(pos, np.ndarray) or len(pos) != 1 or C % 16 or R % 16 or norm_w.dtype != np.float32 \
                or kv.shape != (C + R,) or q.ndim != 2 or q.shape[1] <= R or rope.dim > R:
            return None
        p = int(pos[0])
        rope.ensure(p + 1)
        q_pe, lat, k_pe = np.empty((H, R), np.float32), np.empty((1, C), np.float32), np.empty((1, R), np.float32)
        _latent_entries(np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(kv, dtype=np.float32), norm_w,
                        np.float32(eps), rope.cos, rope.sin, p, rope.dim, rope.kind == "neox", q_pe, lat[0], k_pe[0])
        return self.latent_decode(q_lat, q_pe, lat, k_pe, cache_c, cache_k_pe, pos, scale)

    def latent_steps(self, q, kv, norm_w, eps: float, rope, q_lat, cache_c, cache_k_pe, pos, scale: float):
        """latent_step for a few new tokens of one sequence (a speculative verification): q (T, H,
        N + R), kv (T, C + R), q_lat (T, H, C) at host positions pos (T,) -> o_lat (T, H, C), each row
        what latent_step gives it (the same entries, stored before any row attends; each row attends
        up to its own position); one numba call over a short context, two (the entries, then
        _latent_rows on both cores) over a long one. None where latent_step would not run."""
        T, H, C = q_lat.shape
        R = cache_k_pe.shape[1]
        if not isinstance(pos, np.ndarray) or C % 16 or R % 16 or norm_w.dtype != np.float32 \
                or kv.shape != (T, C + R) or q.ndim != 3 or q.shape[2] <= R or rope.dim > R \
                or not (cache_c.flags.c_contiguous and cache_k_pe.flags.c_contiguous):
            return None
        pos = pos.astype(np.int64, copy=False)
        rope.ensure(int(pos.max()) + 1)
        args = (np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(kv, dtype=np.float32), norm_w,
                np.float32(eps), rope.cos, rope.sin, pos, rope.dim, rope.kind == "neox")
        c16, k16 = cache_c.view(np.uint16), cache_k_pe.view(np.uint16)
        q_lat = np.ascontiguousarray(q_lat, dtype=np.float32)
        out = np.empty((T, H, C), np.float32)
        if int(pos.sum() + T) * H < LATENT_SHORT:
            _latent_few(*args, q_lat, c16, k16, np.float32(scale), out)
            return out
        q_pe = np.empty((T, H, R), np.float32)
        _latent_entries_rows(*args, c16, k16, q_pe)
        at = np.tile(np.array([[c16.ctypes.data, k16.ctypes.data]], np.int64), (T, 1))
        _latent_rows(q_lat, q_pe, at, pos + 1, np.float32(scale), out)
        return out

    def latent_decode(self, q_lat, q_pe, lat_new, k_pe_new, cache_c, cache_k_pe, pos, scale: float):
        """One new token's MLA attention straight from the float16 latent cache (two numba kernels,
        both cores), where C and R are multiples of 16; else None (the model's numpy math)."""
        H, C = q_lat.shape
        R = q_pe.shape[1]
        if C % 16 or R % 16:
            return None
        p = int(pos[0])
        cache_c[p] = lat_new[0]
        cache_k_pe[p] = k_pe_new[0]
        n = p + 1
        c16 = cache_c.view(np.uint16)
        if n * H < LATENT_SHORT:  # little work: one core, one call
            out = np.empty((H, C), np.float32)
            _latent_short(np.ascontiguousarray(q_lat, dtype=np.float32), np.ascontiguousarray(q_pe, dtype=np.float32),
                          c16, cache_k_pe.view(np.uint16), n, np.float32(scale), np.empty((4, n + 16), np.float32), out)
            return out[None]
        out = np.empty((H, C), np.float32)
        _latent_long(np.ascontiguousarray(q_lat, dtype=np.float32), np.ascontiguousarray(q_pe, dtype=np.float32), c16,
                     cache_k_pe.view(np.uint16), n, np.float32(scale), WIDE_VECTORS and H % 8 == 0,
                     np.empty((H, n + 16), np.float32), out)
        return out[None]

    def latent_decode_rows(self, q_lat, q_pe, lat_new, k_pe_new, caches_c: list, caches_k_pe: list, pos,
                           scale: float):
        """latent_decode of one new token for each of several sequences (a batch's decode step), in
        one call: row b stores lat_new[b], k_pe_new[b] at pos[b] of its layer caches caches_c[b]
        (S_b, C), caches_k_pe[b] (S_b, R) and attends positions 0..pos[b] -> o_lat (B, H, C), each row
        bit for bit what latent_decode gives (the same per-head arithmetic, whichever of its paths runs);
        None (nothing stored) where C or R is no multiple of 16 or a cache is not contiguous."""
        B, H, C = q_lat.shape
        R = q_pe.shape[2]
        if C % 16 or R % 16:
            return None
        at = np.empty((B, 2), np.int64)
        addresses: dict = {}  # a verification's rows share one cache: its addresses looked up once
        for b, (c, k, p) in enumerate(zip(caches_c, caches_k_pe, pos.tolist())):
            where = addresses.get((id(c), id(k)))
            if where is None:
                if not (c.flags.c_contiguous and k.flags.c_contiguous):
                    return None
                where = addresses[id(c), id(k)] = c.ctypes.data, k.ctypes.data
            c[p] = lat_new[b]
            k[p] = k_pe_new[b]
            at[b] = where
        out = np.empty((B, H, C), np.float32)
        kernel = _latent_rows_one_core if int(pos.sum() + B) * H < LATENT_SHORT else _latent_rows
        kernel(np.ascontiguousarray(q_lat, dtype=np.float32), np.ascontiguousarray(q_pe, dtype=np.float32), at,
               (pos + 1).astype(np.int64), np.float32(scale), out)
        return out

    def kv_decode(self, q, k_new, v_new, k_cache, v_cache, pos, scale: float):
        """One new token's attention (GQA) straight from the float16 caches, with the latent
        decode's kernels, a group of heads per kv head (on one core below KV_KERNEL_MIN positions);
        None where head_dim is no multiple of 16. SmolLM2 Q4_1 at 2000 positions: 18.7 ms a step,
        55.4 through numpy's float32 copy of the cache."""
        G, Hg, d = q.shape
        if d % 16:
            return None
        n = int(pos[0]) + 1
        k_cache[:, n - 1] = k_new
        v_cache[:, n - 1] = v_new
        out = np.empty((G, Hg, d), np.float32)
        if n < KV_KERNEL_MIN:
            _gqa_short(np.ascontiguousarray(q, dtype=np.float32), k_cache.view(np.uint16), v_cache.view(np.uint16), n,
                       np.float32(scale), np.empty(n + 16, np.float32), out)
            return out
        no_pe, no_cache = np.zeros((Hg, 0), np.float32), np.zeros((1, 16), np.uint16)
        parts = np.empty((max(1, min(numba.get_num_threads(), n // 16)), Hg * d), np.float32)
        scores = np.empty((Hg, n), np.float32)
        for g in range(G):
            _latent_scores(np.ascontiguousarray(q[g], dtype=np.float32), no_pe, k_cache[g].view(np.uint16), no_cache,
                           n, np.float32(scale), scores)
            probs = np.ascontiguousarray(softmax(scores), dtype=np.float32)
            probs[probs < 1e-30] = 0.0  # subnormal weights would run the products at microcode speed
            _latent_mix(probs, v_cache[g].view(np.uint16), n, parts, out[g])
        return out

    def kv_step(self, q, k, v, rope, k_cache, v_cache, pos, scale: float):
        """A decode token's rope, cache store and attention in one numba call (what rope twice and
        kv_decode do, the same bits), over a short context on one core; None from KV_KERNEL_MIN
        positions (kv_decode's two-core path then runs), or where head_dim is no multiple of 16."""
        G, n_ctx, d = k_cache.shape
        if d % 16 or not isinstance(pos, np.ndarray) or rope.dim % 2 or k_cache.dtype != np.float16 \
                or v_cache.dtype != np.float16:
            return None
        n = int(pos[0]) + 1
        if n >= KV_KERNEL_MIN:
            return None
        rope.ensure(n)
        out = np.empty((G, q.size // (G * d), d), np.float32)
        _gqa_step(np.ascontiguousarray(q, dtype=np.float32).reshape(G, -1, d),
                  np.ascontiguousarray(k, dtype=np.float32).reshape(G, 1, d),
                  np.ascontiguousarray(v, dtype=np.float32).reshape(G, 1, d), rope.cos, rope.sin,
                  n - 1, rope.dim, rope.kind == "neox", k_cache.view(np.uint16),
                  v_cache.view(np.uint16), np.float32(scale), np.empty(n + 16, np.float32), out)
        return out

    def normed(self, x, weight, eps: float):
        """rms_norm(x, weight, eps) for the products that follow: a decode token's (or a
        verification's few) as a Normed, which linears normalizes in the call that quantizes it
        (the row kernels' norm, activations.q8_rows)."""
        if np.ndim(x) == 2 and len(x) <= FEW_TOKENS and getattr(weight, "dtype", None) == np.float32:
            return Normed(x, weight, eps, self.rms_norm)
        return self.rms_norm(x, weight, eps)

    rows = staticmethod(rows)

    def rms_norm(self, x, weight, eps: float):
        # one numba call per norm (a small model's step has two a layer)
        x = rows(x)
        if np.ndim(x) != 2 or weight.dtype != np.float32:
            return rms_norm(x, weight, eps)
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        _rms_norm(x, np.ascontiguousarray(weight), np.float32(eps), out)
        return out
    swiglu = staticmethod(swiglu)

    def linear(self, w, x, residual=None):
        return plus(w(rows(x)), residual=residual)

    def linears(self, ws, x):
        """One token, or a verification's few, through several matrices of one format and width: its
        8-bit activations made once (three per layer otherwise for q, k and v, two for gate and up),
        in the call that normalizes it where x is a Normed and the format takes a prologue; small
        matrices as one (fused), one kernel call for all of them."""
        if 0 < len(x) <= FEW_ROWS:  # a decode step, a verification's few: the products bound once for these matrices
            call = self._bound.get(tuple(map(id, ws)))
            if call is None:
                call = self._bind(ws)
            if call:
                norm = x if isinstance(x, Normed) and call.norm else None
                h = np.ascontiguousarray(rows(x) if norm is None else norm.x, dtype=np.float32)
                if h.shape[1] == ws[0].shape[1]:
                    return call(h) if norm is None else call(h, norm.weight, norm.eps)
        if len(x) <= FEW_TOKENS and _one_kind(ws):
            fmt, group = ws[0].fmt, self._fused(ws)
            packed = [w.packed for w in ws] if group is None else [group[0]]
            pro = {"norm": (x.weight, x.eps)} if isinstance(x, Normed) and fmt.prologues else None
            x = x.x if pro else rows(x)
            if len(x) == 1:  # (gate and up through one matmul_many call measured slower: 23 us against 19 on SmolLM2's)
                ys = [y[None] for y in fmt.matvecs(packed, x[0], pro)]
            else:
                ys = fmt.matmuls(packed, x, pro)  # a verification's few tokens
            if group is None:
                return ys
            y, cuts = ys[0], group[1]
            return [y[:, a:b] for a, b in zip(cuts, cuts[1:])]
        x = rows(x)
        return [w(x) for w in ws]

    def _bind(self, ws):
        """linears' products of a token (or a verification's few) through ws, bound once
        (QuantFormat.bind): call(x (T, K) [, norm weight, eps]) -> [(T, N_i), ...], call.norm telling
        whether it takes x's norm; False where the general path runs (matrices of several formats or
        widths, a format without a binding)."""
        call = False
        if _one_kind(ws):
            fmt, group = ws[0].fmt, self._fused(ws)
            bound = fmt.bind([w.packed for w in ws] if group is None else [group[0]])
            if bound is not None:
                cuts = None if group is None else group[1]

                def call(x, norm=None, eps=0.0, _ws=ws):  # (_ws: the matrices held, their ids stay theirs)
                    ys = bound(x, norm, eps)
                    return ys if cuts is None else [ys[0][:, a:b] for a, b in zip(cuts, cuts[1:])]
                call.norm = fmt.prologues
        self._bound[tuple(map(id, ws))] = call
        return call

    def _fused(self, ws):
        """The fused layout of matrices that one `linears` call reads (tiles.fused), made on their
        first product where their layouts together are at most FUSE_MAX bytes (each member's layout
        then a view of it, so the weights are held once); None where they are not fused."""
        if len(ws) < 2:
            return None
        key = tuple(map(id, ws))
        group = self._groups.get(key)
        if group is None:
            made = tiles.fused([w.packed for w in ws]) \
                if sum(packed_nbytes(w.packed) for w in ws) <= FUSE_MAX else None
            if made is not None:
                for w, view in zip(ws, made[1]):
                    w._packed = view
                cuts = [0, *np.cumsum([w.shape[0] for w in ws]).tolist()]  # each matrix's columns of the output
                group = (made[0], cuts, ws)
            group = self._groups[key] = group or (None, None, ws)  # ws held: their ids stay theirs
        return group if group[0] is not None else None

    def ffn(self, x, gate, up, down, add=None, residual=None):
        y = None
        if len(x) > FEW_TOKENS:  # many rows: gate and up in one call, the rows quantized once
            y = self.experts_runs(x, [(gate, up, down)], np.array([len(x)]))
        if y is None:  # one row or a verification's few: gate and up share its 8-bit activations (the grouped
            # call's bookkeeping costs more than its products on a small model: 97 against 52 us, edgeseek-mini)
            y = down(swiglu(*self.linears([gate, up], x)))
        return plus(y, add, residual)

    def rope(self, rope, x, positions):
        # one numba call instead of numpy's slices and temporaries (a small model's step makes two a layer)
        if not isinstance(positions, np.ndarray) or np.ndim(x) != 3:
            return None
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        _rope(x, rope.cos, rope.sin, positions.astype(np.int64, copy=False), rope.dim, rope.kind == "neox", out)
        return out

    def tokens(self, ids) -> np.ndarray:
        return np.asarray(ids)

    def positions(self, pos: np.ndarray) -> np.ndarray:
        return pos

    def replay(self, model, tokens, cache) -> None:
        return None

    def host(self, x: np.ndarray) -> np.ndarray:
        return x

    def latent_attention(self, q_lat, q_pe, cache_c, cache_k_pe, start: int, scale: float):
        return None  # the model's own math

    def causal_attention(self, q, k, v, start: int, scale: float) -> np.ndarray:
        T, S = q.shape[2], k.shape[1]
        scores = np.matmul(q, k[:, None].transpose(0, 1, 3, 2)) * scale  # (G, H, T, S)
        if T > 1:
            mask = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # (T, S)
            scores[..., mask] = -np.inf
        return np.matmul(softmax(scores), v[:, None])  # (G, H, T, dv)

    def pack(self, matrices, gguf=None) -> int:
        total = 0
        for m in matrices:
            m.packed  # noqa: B018  (builds and keeps the layout)
            total += m.nbytes
            if gguf is not None:  # one copy of the weights in the resident set, not two
                gguf.release_pages(gguf.tensor(m.name))
        return total

    def warmup(self) -> None:
        from edgeseek.models.common import Rope, rope_freqs
        self.rms_norm(np.ones((1, 16), np.float32), np.ones(16, np.float32), 1e-6)  # the norm kernel
        g = np.ones((2, 17), np.float32)
        for kernel in (_swiglu_few, _swiglu_many):  # silu(g) * u on one core and on both
            kernel(g, g, np.empty_like(g))
        r = Rope(16, rope_freqs(16, 10000.0))
        r.ensure(1)
        self.rope(r, np.zeros((1, 1, 16), np.float32), np.zeros(1, np.int64))  # the rope kernel
        kc = np.zeros((1, 4, 16), np.float16)  # a grouped-query layer cache of 4 positions: one decode token
        self.kv_step(np.zeros(32, np.float32), np.zeros(16, np.float32), np.zeros(16, np.float32), r, kc, kc.copy(),
                     np.array([1]), 0.25)
        w = np.zeros((1, 1, 16), np.float32)  # (H, R, K) as attn_k_b / attn_v_b
        self.per_head(w, np.zeros((1, 1, 16), np.float32))  # one token: the numba kernel
        c, k = np.zeros((4, 16), np.float16), np.zeros((4, 16), np.float16)  # a latent cache of 4 positions
        q = np.zeros((2, 16), np.float32)
        self.latent_decode(q, q, q[:1], q[:1], c, k, np.array([1]), 0.5)
        fixed = np.ones(16, np.float32)
        fixed.setflags(write=False)  # a norm weight as the file's pages give it
        for norm in (np.ones(16, np.float32), fixed):  # a decode token's rope and norm, then the above
            self.latent_step(np.zeros((2, 32), np.float32), np.zeros(32, np.float32), norm, 1e-6, r, q, c, k,
                             np.array([1]), 0.5)
        for bias in (None, np.zeros(4, np.float32), fixed[:4]):  # the router, V3's bias written or mapped
            route(np.zeros((1, 4), np.float32), RouterConfig(4, 2), bias)
        for n in (1, FEW_TOKENS + 1):  # and its logits, on one core and on both
            router_logits(np.zeros((n, 64), np.float32), np.ones((4, 64), np.float32))
        ids = np.array([[3, 1], [0, 3]])  # a few tokens' choices: their experts, and their rows summed by expert
        self.unique_experts(ids)
        self.expert_sums(np.ones((4, 16), np.float32), np.ones((2, 2), np.float32), ids)
        for norm in (np.ones(16, np.float32), fixed):  # a verification's tokens' whole attention,
            for n in (1, LATENT_SHORT):  # on one core and on both
                cc, kk = np.zeros((n + 2, 16), np.float16), np.zeros((n + 2, 16), np.float16)
                self.latent_steps(np.zeros((2, 2, 32), np.float32), np.zeros((2, 32), np.float32), norm, 1e-6, r,
                                  np.zeros((2, 2, 16), np.float32), cc, kk, np.array([n, n + 1]), 0.5)
        rows = np.zeros((2, 2, 16), np.float32)  # two rows (a batch's sequences, a verification's tokens)
        self.latent_decode_rows(rows, rows, q, q, [c, c], [k, k], np.array([1, 2]), 0.5)  # on one core
        n = LATENT_SHORT // 2  # and enough positions for both cores
        c, k = np.zeros((n + 1, 16), np.float16), np.zeros((n + 1, 16), np.float16)
        self.latent_decode_rows(rows, rows, q, q, [c, c], [k, k], np.array([n, n]), 0.5)
        self.latent_decode(q, q, q[:1], q[:1], c, k, np.array([n]), 0.5)  # one token over a long context

"""The CUDA backend's kernels written with numpy, from gguf-py's dequantization: the backend's own
logic (placement, the expert tiers, the decode and prompt paths, the engine's plumbing) runs and is
tested on a machine without a GPU; the kernels themselves are tested against gguf-py on a GPU
(test_cuda_kernels.py, marked cuda)."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from edgeseek.backends.cuda import INT8_TYPES, MIXED_DOWN, CUDABackend, _expert_tiles
from edgeseek.models.common import rms_norm, softmax
from edgeseek.models.moe import route


def _rows(qtype, w: np.ndarray, k: int) -> np.ndarray:
    """(N, row_bytes) blocks, or (E, N, row_bytes) -> float32 values (..., k)."""
    return quants.dequantize(np.ascontiguousarray(w), qtype).astype(np.float32).reshape(*w.shape[:-1], k)


class NumpyKernels:
    def mmv(self, qtype, w, row_bytes, x, y, n, k, t, add=None, res=None):
        assert x.dtype == np.float32 and x.flags.c_contiguous and t <= 8
        y[:t] = x[:t] @ _rows(qtype, w, k).T
        if add is not None:
            y[:t] = add + y[:t]
        if res is not None:
            y[:t] = res + y[:t]

    def mmv_ids(self, qtype, w, row_bytes, expert_bytes, ids, x, x_div, y, n, k, p, x_stride=None):
        assert ids.dtype == np.int32 and expert_bytes == w.shape[1] * w.shape[2]
        x = x.reshape(-1, k)  # rows at x_stride: a (T, H, K) view's rows
        for j in range(p):
            y[j] = _rows(qtype, w[ids[j]], k) @ x[j // x_div]

    def glu_ids(self, qtype, wg, wu, row_bytes, expert_bytes, ids, x, x_div, h, n, k, p, shared=None):
        assert x.flags.c_contiguous
        wg, wu = wg.reshape(-1, n, row_bytes), wu.reshape(-1, n, row_bytes)  # a matrix: a stack of one
        for j in range(p):
            g, u = _rows(qtype, wg[ids[j]], k) @ x[j // x_div], _rows(qtype, wu[ids[j]], k) @ x[j // x_div]
            h[j] = self.silu_mul(g, u)
        if shared is not None:
            wg2, wu2, _, n2, h2 = shared
            for t in range(len(x)):
                h2[t] = self.silu_mul(_rows(qtype, wg2, k) @ x[t], _rows(qtype, wu2, k) @ x[t])

    def down_ids(self, qtype, w, row_bytes, expert_bytes, ids, h, weights, add, y, n, k, t, used, shared=None,
                 res=None):
        for r in range(t):
            acc = np.zeros(n, np.float32)
            for j in range(used):
                p = r * used + j
                acc += weights.reshape(-1)[p] * (_rows(qtype, w[ids[p]], k) @ h[p])
            y[r] = acc if add is None else add[r] + acc
            if shared is not None:
                w2, _, k2, h2 = shared
                y[r] = y[r] + _rows(qtype, w2, k2) @ h2[r]
            if res is not None:
                y[r] = res[r] + y[r]

    def dequant(self, qtype, w, row_bytes, rows, n_rows, k, out):
        src = w if rows is None else w[rows]
        out.reshape(n_rows, k)[:] = _rows(qtype, src[:n_rows], k).astype(out.dtype)

    def gemm_f16(self, x16, w16, y):
        y[:] = x16.astype(np.float32) @ np.swapaxes(w16.astype(np.float32), -1, -2)

    def moe_glu_mma(self, qtype, wg, wu, row_bytes, expert_bytes, tiles, n_tiles, x16, a_rows, h16, n, k):
        wg, wu = wg.reshape(-1, n, row_bytes), wu.reshape(-1, n, row_bytes)  # a matrix: a stack of one
        for e, p0, count in tiles.reshape(n_tiles, 3).tolist():
            x = x16[a_rows[p0:p0 + count]].astype(np.float32)
            g = x @ _rows(qtype, wg[e], k).astype(np.float16).astype(np.float32).T
            u = x @ _rows(qtype, wu[e], k).astype(np.float16).astype(np.float32).T
            h16[p0:p0 + count] = (g / (1.0 + np.exp(-g)) * u).astype(np.float16)

    def moe_down_mma(self, qtype, w, row_bytes, expert_bytes, tiles, n_tiles, h16, wp, y, n, k):
        w = w.reshape(-1, n, row_bytes)
        for e, p0, count in tiles.reshape(n_tiles, 3).tolist():
            y[p0:p0 + count] = wp[p0:p0 + count, None] * (
                h16[p0:p0 + count].astype(np.float32) @ _rows(qtype, w[e], k).astype(np.float16).astype(np.float32).T)

    def moe_plan(self, ids, w, p, k, e, max_tiles, tiles, a_rows, wp, pos, hist):
        flat = ids.reshape(-1)[:p]
        order = np.argsort(flat, kind="stable")  # pairs by expert, token order within one
        hist[:] = np.bincount(flat, minlength=e)[:e]
        experts = np.nonzero(hist)[0]
        rows = _expert_tiles(experts, (np.cumsum(hist) - hist)[experts], hist[experts])
        t = np.zeros((max_tiles, 3), np.int32)
        t[:len(rows)] = rows
        tiles[:] = t.reshape(-1)
        a_rows[:] = order // k
        wp[:] = w.reshape(-1)[order]
        pos[order] = np.arange(p)

    def causal_softmax(self, a, b, heads, start, scale, p16=None):
        rows, s = a.shape
        v = np.float32(scale) * (a + b)
        v[np.arange(s)[None, :] > start + np.arange(rows)[:, None] // heads] = -np.inf
        (a if p16 is None else p16)[:] = softmax(v)

    def gemm_f16_kn(self, x16, w16, y):
        y[:] = x16.astype(np.float32) @ w16.astype(np.float32)

    def moe_combine(self, y, pos, k, out):
        pos = pos.reshape(len(out), k)
        for j in range(k):
            on = pos[:, j] >= 0
            out[on] += y[pos[on, j]]

    def scatter_add(self, out, rows, values):
        np.add.at(out, rows, values)

    def silu_mul(self, g, u):
        return g / (1.0 + np.exp(-g)) * u

    def rms_norm(self, x, w, eps, q8=False):
        y = rms_norm(x, w, eps)
        return (y, self.quantize_q8(y)) if q8 else y

    # the INT8_TYPES on int8 activations: the kernels' q8_1, then the float products on its values
    def quantize_q8(self, x):
        b = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, 32)
        d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d[:, None] == 0, 0, np.rint(b / d[:, None])).astype(np.int8)
        return q.reshape(-1), np.stack([d, d * q.sum(axis=1, dtype=np.float32)], axis=1)

    @staticmethod
    def _values(q8, k):
        xq, xs = q8
        return (xq.reshape(-1, 32).astype(np.float32) * xs[:, :1]).reshape(-1, k)

    def mmv1_q8(self, qtype, w, row_bytes, q8, y, n, k, add=None, res=None):
        assert qtype in INT8_TYPES
        self.mmv(qtype, w, row_bytes, self._values(q8, k)[:1], y, n, k, 1, add, res)

    def glu_q8(self, qtype, wg, wu, row_bytes, expert_bytes, ids, q8, x_div, h, n, k, p, t, shared=None):
        assert qtype in INT8_TYPES
        self.glu_ids(qtype, wg, wu, row_bytes, expert_bytes, ids, self._values(q8, k)[:t], x_div, h, n, k, p, shared)

    def down_q8(self, qtype, w, row_bytes, expert_bytes, ids, hq8, weights, add, y, n, k, t, used, shared=None,
                res=None):
        """The routed sums (+ add), then the shared experts' down (its own format), then res: the
        kernel's order."""
        assert qtype in INT8_TYPES
        self.down_ids(qtype, w, row_bytes, expert_bytes, ids, self._values(hq8, k), weights, add, y, n, k, t, used)
        if shared is not None:
            qtype2, w2, _, k2, hq2 = shared
            assert qtype2 == qtype or (qtype, qtype2) in MIXED_DOWN
            y[:t] = y[:t] + self._values(hq2, k2)[:t] @ _rows(qtype2, w2, k2).T
        if res is not None:
            y[:t] = res + y[:t]

    def rope(self, x, y, positions, cos, sin, dim, neox):
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        y[:] = x
        if not neox:
            a, b = x[..., 0:dim:2], x[..., 1:dim:2]
            y[..., 0:dim:2], y[..., 1:dim:2] = a * c - b * s, a * s + b * c
        else:
            a, b = x[..., : dim // 2], x[..., dim // 2: dim]
            y[..., : dim // 2], y[..., dim // 2: dim] = a * c - b * s, a * s + b * c

    def route(self, logits, bias, router, ids, w):
        i, ww = route(logits, router, bias)
        ids[:], w[:] = i, ww

    def mmv3_q8(self, qtype, mats, q8, ys, k):
        for (w, row_bytes, n), y in zip(mats, ys):
            self.mmv1_q8(qtype, w, row_bytes, q8, y, n, k)

    def _staged(self, x, norm):
        """What a launch's blocks stage: x (1, K), normalized by norm = (weight, eps) where given, as q8."""
        return self.quantize_q8(x if norm is None else rms_norm(x.reshape(1, -1), *norm))

    def mmv1_sq8(self, qtype, w, row_bytes, x, norm, y, n, k, add=None, res=None):
        self.mmv1_q8(qtype, w, row_bytes, self._staged(x, norm), y, n, k, add, res)

    def mmv3_sq8(self, qtype, mats, x, norm, ys, k):
        self.mmv3_q8(qtype, mats, self._staged(x, norm), ys, k)

    def norm_router_route(self, x, norm, y, q8, w, logits, bias, router, ids, wts):
        y[:] = rms_norm(x, *norm)
        q8[0][:], q8[1][:] = self.quantize_q8(y)
        self.router_route(w, y, logits, bias, router, ids, wts)

    def router_route(self, w, x, logits, bias, router, ids, wts):
        e, d = w.shape
        self.mmv(Q.F32, w.view(np.uint8), 4 * d, x, logits, e, d, 1)
        self.route(logits, bias, router, ids, wts)

    def store_row(self, src, dst, pos):
        dst[pos[0]] = src.reshape(-1).astype(np.float16)

    def store_kv(self, k, v, k_cache, v_cache, pos):
        k_cache[:, pos[0]], v_cache[:, pos[0]] = k, v

    def gqa_decode(self, q, k_cache, v_cache, pos, group, scale):
        s = int(pos[0]) + 1
        kv = np.arange(len(q)) // group  # each query head's kv head
        k, v = k_cache[kv, :s].astype(np.float32), v_cache[kv, :s].astype(np.float32)  # (H, S, d)
        p = softmax(np.einsum("hd,hsd->hs", q, k) * scale)
        return np.einsum("hs,hsd->hd", p, v).astype(np.float32)

    def mla_entry(self, q, kv, norm_w, eps, rope, pos, n_head, nope, cache_c, cache_kpe):
        r, c = cache_kpe.shape[-1], cache_c.shape[-1]
        q_pe = np.empty((n_head, r), np.float32)
        self.rope(q[None, :, nope:], q_pe[None], pos[:1], rope.cos, rope.sin, rope.dim, rope.kind == "neox")
        cache_c[pos[0]] = rms_norm(kv[None, :c], norm_w, eps)[0].astype(np.float16)
        k_pe = np.empty((1, 1, r), np.float32)
        self.rope(kv[None, None, c:], k_pe, pos[:1], rope.cos, rope.sin, rope.dim, rope.kind == "neox")
        cache_kpe[pos[0]] = k_pe.reshape(r).astype(np.float16)
        return q_pe

    def mla_decode(self, q_lat, q_pe, cache_c, cache_kpe, pos, scale):
        s = int(pos[0]) + 1
        c, kpe = cache_c[:s].astype(np.float32), cache_kpe[:s].astype(np.float32)
        scores = (q_lat @ c.T + q_pe @ kpe.T) * scale  # (H, S)
        return (softmax(scores) @ c)[None]


class EmulatedCUDABackend(CUDABackend):
    """CUDABackend on numpy arrays and NumpyKernels, with a pretend GPU of `total` bytes."""

    def __init__(self, total: int = 80 << 30):
        super().__init__(kernels=NumpyKernels(), xp=np)
        self.total = total

    def memory(self):
        return self.total - self.uploaded, self.total

    def name(self):
        return "emulated GPU"

    def used(self):
        return self.uploaded

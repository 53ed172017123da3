"""Pieces every architecture uses: RMSNorm, rope (llama.cpp's NORM and NEOX kinds, YaRN), SiLU,
softmax, embedding lookup, and weight loading from a GGUF file."""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from edgeseek.errors import GGUFError, UnsupportedError
from edgeseek.quantize import QMatrix, get_format


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, D) float32 -> x / rms(x) * weight, in float32 as llama.cpp does."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + eps)).astype(np.float32) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def ffn(x: np.ndarray, gate, up, down) -> np.ndarray:
    """SwiGLU feed-forward: down(silu(gate x) * up x); x (T, D) -> (T, D)."""
    return down(silu(gate(x)) * up(x))


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def require(gguf, ok: bool, message: str) -> None:
    """A rule between metadata values (each key's own type and range are checked on opening)."""
    if not ok:
        raise GGUFError(f"{gguf.path}: {message}")


# --- weights -----------------------------------------------------------------------------------
def vector(gguf, name: str, length: int | None = None) -> np.ndarray:
    """A 1-D tensor (norm weight, bias) as float32."""
    t = gguf.tensor(name)
    if len(t.shape) != 1 or (length is not None and t.shape[0] != length):
        raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {t.shape}, expected ({length},)")
    return dense(gguf, name).reshape(-1)


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


def per_head(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y[t, h] = w[h] @ x[t, h]: w (H, R, K) float32, x (T, H, K) -> (T, H, R). A few tokens go
    through a numba kernel on both cores (numpy's einsum runs these on one core, at a third of
    the bandwidth); more tokens through batched BLAS."""
    if len(x) <= 2:
        out = np.empty((len(x), w.shape[0], w.shape[1]), np.float32)
        for t in range(len(x)):
            _heads_matvec(w, np.ascontiguousarray(x[t], dtype=np.float32), out[t])
        return out
    return np.matmul(x.transpose(1, 0, 2), w.transpose(0, 2, 1)).transpose(1, 0, 2)


def tensor_format(gguf, t):
    """The quant format of tensor `t`; an unsupported type is named with the file and tensor."""
    try:
        return get_format(t.qtype)
    except UnsupportedError as e:
        raise UnsupportedError(f"{gguf.path}: tensor {t.name!r}: {e}") from None


def dense(gguf, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Any tensor as a float32 array in numpy order: for small tensors only."""
    t = gguf.tensor(name, shape)
    fmt = tensor_format(gguf, t)
    return fmt.dequantize(np.ascontiguousarray(t.raw).reshape(-1, fmt.type_size)).reshape(t.shape)


def matrix(gguf, name: str, shape: tuple[int, int]) -> QMatrix:
    """A 2-D weight (out, in) kept in its file quantization: y = W @ x."""
    t = gguf.tensor(name, shape)
    tensor_format(gguf, t)
    return QMatrix(t.qtype, t.raw, t.shape, name)


def pack_all(model, gguf=None) -> int:
    """Build the kernel layout of every weight of the layers and the output now instead of on
    first use; returns the bytes of quantized weights packed. With `gguf`, each tensor's file pages
    are released once packed, so the resident set holds one copy of the weights, not two. (Routed
    experts are their store's to pack.)"""
    total = 0
    for L in model.layers + [None]:
        for m in [model.output] if L is None else [m for m in vars(L).values() if isinstance(m, QMatrix)]:
            m.packed  # noqa: B018  (builds and keeps the layout)
            total += m.nbytes
            if gguf is not None:
                gguf.release_pages(gguf.tensor(m.name))
    return total


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


# --- rope ------------------------------------------------------------------------------------
def rope_freqs(dim: int, base: float, factors: np.ndarray | None = None) -> np.ndarray:
    """theta_i = base^(-2i/dim), i < dim/2, divided by per-frequency factors (llama3's rope_freqs)."""
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factors is not None:
        inv = inv / factors.astype(np.float64)
    return inv


def yarn_freqs(dim: int, base: float, factor: float, orig_ctx: int, beta_fast: float = 32.0,
               beta_slow: float = 1.0) -> np.ndarray:
    """YaRN's blend of interpolated and extrapolated frequencies (llama.cpp ggml rope_yarn)."""
    inv = rope_freqs(dim, base)

    def corr_dim(n_rot):
        return dim * math.log(orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(dim - 1.0, math.ceil(corr_dim(beta_slow)))
    i = np.arange(dim // 2, dtype=np.float64)
    ramp = np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)
    extrapolate = 1.0 - ramp  # 1: keep the original frequency, 0: interpolate by the factor
    return inv / factor * (1.0 - extrapolate) + inv * extrapolate


class Rope:
    """Rotary embedding on the first `dim` values of each head.

    kind "norm" rotates adjacent pairs (x[2i], x[2i+1]) (llama, deepseek2 in GGUF);
    "neox" rotates (x[i], x[i + dim/2]) (qwen2). `mscale` multiplies cos and sin (YaRN).
    """

    def __init__(self, dim: int, inv_freq: np.ndarray, kind: str = "norm", mscale: float = 1.0):
        self.dim, self.inv_freq, self.kind, self.mscale = dim, inv_freq, kind, mscale

    def __call__(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """x (T, H, head_dim) float32, positions (T,) -> rotated copy."""
        ang = positions[:, None].astype(np.float64) * self.inv_freq[None, :]  # (T, dim/2)
        cos = (np.cos(ang) * self.mscale).astype(np.float32)[:, None, :]
        sin = (np.sin(ang) * self.mscale).astype(np.float32)[:, None, :]
        out = x.copy()
        d = self.dim
        if self.kind == "norm":
            a, b = x[..., 0:d:2], x[..., 1:d:2]
            out[..., 0:d:2] = a * cos - b * sin
            out[..., 1:d:2] = a * sin + b * cos
        else:
            a, b = x[..., : d // 2], x[..., d // 2: d]
            out[..., : d // 2] = a * cos - b * sin
            out[..., d // 2: d] = a * sin + b * cos
        return out


def causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int, scale: float) -> np.ndarray:
    """q (G, H, T, d) against k (G, S, d), v (G, S, dv) where the T queries sit at positions
    start..start+T-1 of the S keys; -> (G, H, T, dv)."""
    T, S = q.shape[2], k.shape[1]
    scores = np.matmul(q, k[:, None].transpose(0, 1, 3, 2)) * scale  # (G, H, T, S)
    if T > 1:
        mask = np.arange(S)[None, :] > (start + np.arange(T))[:, None]  # (T, S)
        scores[..., mask] = -np.inf
    return np.matmul(softmax(scores), v[:, None])  # (G, H, T, dv)


class DecoderModel:
    """The pre-norm decoder every architecture here shares; a subclass supplies `attention` and
    `feed_forward` for one layer, and the weights: token_embd, layers, output_norm, output."""

    def attention(self, L, h: np.ndarray, cache, i: int, pos: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def feed_forward(self, L, h: np.ndarray, i: int) -> np.ndarray:
        raise NotImplementedError

    def attention_rows(self, L, h: np.ndarray, caches: list, i: int, pos: np.ndarray) -> np.ndarray:
        """One new token of each of several sequences: row t of h goes with caches[t] at pos[t]."""
        raise NotImplementedError

    def begin_step(self) -> None:
        """A forward pass begins: the token boundary for whatever keeps per-token state."""

    def warmup(self) -> None:
        """Run the architecture's own numba kernels (beyond the quant formats') once on tiny
        inputs, so that they compile, or load from numba's cache, at load time."""

    def pack(self, gguf=None) -> int:
        """Repack every weight for the kernels now (else each is packed on first use); with the
        GGUFFile, release the file pages of what was packed."""
        return pack_all(self, gguf)

    def forward(self, tokens: np.ndarray, cache, all_logits: bool = False) -> np.ndarray:
        """tokens (T,) at positions cache.pos.. -> logits (T, V) or, by default, (1, V) of the last."""
        eps = self.config.rms_eps
        T = len(tokens)
        start = cache.pos
        if start + T > cache.n_ctx:
            raise ValueError(f"context full: {start} + {T} tokens > {cache.n_ctx}")
        pos = np.arange(start, start + T)
        self.begin_step()
        x = self.token_embd(np.asarray(tokens))  # (T, D)
        for i, L in enumerate(self.layers):
            x = x + self.attention(L, rms_norm(x, L.attn_norm, eps), cache, i, pos)
            x = x + self.feed_forward(L, rms_norm(x, L.ffn_norm, eps), i)
        cache.pos = start + T
        if not all_logits:
            x = x[-1:]
        return self.output(rms_norm(x, self.output_norm, eps))

    def forward_rows(self, tokens: np.ndarray, caches: list) -> np.ndarray:
        """One decode step of several sequences at once: token t continues the sequence of
        caches[t] -> logits (len(tokens), V). Every weight is read once for all of them, and each
        routed expert once for all the sequences routed to it; attention runs per sequence."""
        eps = self.config.rms_eps
        pos = np.array([c.pos for c in caches])
        for c in caches:
            if c.pos + 1 > c.n_ctx:
                raise ValueError(f"context full: {c.pos} + 1 tokens > {c.n_ctx}")
        self.begin_step()
        x = self.token_embd(np.asarray(tokens))  # (B, D)
        for i, L in enumerate(self.layers):
            x = x + self.attention_rows(L, rms_norm(x, L.attn_norm, eps), caches, i, pos)
            x = x + self.feed_forward(L, rms_norm(x, L.ffn_norm, eps), i)
        for c in caches:
            c.pos += 1
        return self.output(rms_norm(x, self.output_norm, eps))

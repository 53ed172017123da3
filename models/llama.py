"""Dense llama-family models: `llama` (SmolLM2, the R1 Llama distills) and `qwen2` (the R1 Qwen
distills: q/k/v biases, NEOX rope). Graph as llama.cpp's src/models/llama.cpp and qwen2.cpp."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import DecoderModel, Rope, require, rope_freqs, vector


@dataclass(frozen=True)
class LlamaConfig:
    arch: str  # "llama" or "qwen2"
    vocab_size: int
    n_layer: int
    n_embd: int  # hidden size D
    n_head: int
    n_head_kv: int  # grouped-query attention: n_head / n_head_kv query heads share a key head
    head_dim: int
    n_ff: int  # feed-forward width F
    rms_eps: float
    rope_base: float
    rope_dim: int  # rotated values per head
    rope_scale: float  # linear rope scaling factor (positions divided by it)
    context_length: int

    @classmethod
    def from_gguf(cls, g) -> "LlamaConfig":
        n_embd = g.arch_meta("embedding_length")
        n_head = g.arch_meta("attention.head_count")
        head_dim = g.arch_meta("attention.key_length", n_embd // n_head)
        scaling = g.arch_meta("rope.scaling.type", "none")
        c = cls(
            arch=g.arch,
            vocab_size=g.arch_meta("vocab_size", None) or len(g.meta("tokenizer.ggml.tokens")),
            n_layer=g.arch_meta("block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=g.arch_meta("attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_ff=g.arch_meta("feed_forward_length"),
            rms_eps=g.arch_meta("attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=g.arch_meta("rope.freq_base", 10000.0),
            rope_dim=g.arch_meta("rope.dimension_count", head_dim),
            rope_scale=g.arch_meta("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
            context_length=g.arch_meta("context_length", 4096),
        )
        a = g.arch
        require(g, head_dim >= 1, f"'{a}.attention.head_count' {n_head} exceeds '{a}.embedding_length' {n_embd}")
        require(g, n_head % c.n_head_kv == 0, f"'{a}.attention.head_count' {n_head} is not a multiple of "
                f"'{a}.attention.head_count_kv' {c.n_head_kv}")
        require(g, c.rope_dim % 2 == 0 and c.rope_dim <= head_dim, f"'{a}.rope.dimension_count' {c.rope_dim} "
                f"should be even and at most the head size {head_dim}")
        return c


class KVCache:
    """Keys and values of every layer, preallocated: k, v (n_layer, n_head_kv, n_ctx, head_dim).

    Stored as float16, as llama.cpp's default cache type: half the memory, and the same rounding.
    """

    def __init__(self, cfg: LlamaConfig, n_ctx: int, xp=np):
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.k = xp.zeros(shape, np.float16)  # in the backend's memory (xp)
        self.v = xp.zeros(shape, np.float16)
        self.n_ctx = n_ctx
        self.pos = 0
        self.lora: tuple = ()  # the adapters this sequence runs with (models/lora.py Adapter)

    def truncate(self, n: int) -> None:
        self.pos = min(self.pos, n)


class Layer:
    def __init__(self, b, g, i: int, c: LlamaConfig):
        D, H, Hkv, d = c.n_embd, c.n_head, c.n_head_kv, c.head_dim
        p = f"blk.{i}."
        self.attn_norm = vector(b, g, p + "attn_norm.weight", D)
        self.attn_q = b.matrix(g, p + "attn_q.weight", (H * d, D))
        self.attn_k = b.matrix(g, p + "attn_k.weight", (Hkv * d, D))
        self.attn_v = b.matrix(g, p + "attn_v.weight", (Hkv * d, D))
        self.attn_output = b.matrix(g, p + "attn_output.weight", (D, H * d))
        bias = (lambda n, k: vector(b, g, p + n, k) if g.has(p + n) else None)
        self.attn_q_b, self.attn_k_b, self.attn_v_b = (
            bias("attn_q.bias", H * d), bias("attn_k.bias", Hkv * d), bias("attn_v.bias", Hkv * d))
        self.ffn_norm = vector(b, g, p + "ffn_norm.weight", D)
        self.ffn_gate = b.matrix(g, p + "ffn_gate.weight", (c.n_ff, D))
        self.ffn_up = b.matrix(g, p + "ffn_up.weight", (c.n_ff, D))
        self.ffn_down = b.matrix(g, p + "ffn_down.weight", (D, c.n_ff))


class LlamaModel(DecoderModel):
    graph_safe = True  # a decode step reads its position from the backend's arrays only (capturable)
    def __init__(self, g, backend, n_ctx: int = 4096):
        b = self.backend = backend
        self.config = c = LlamaConfig.from_gguf(g)
        self.n_ctx = n_ctx
        self.token_embd = backend.embedding(g, "token_embd.weight", (c.vocab_size, c.n_embd))
        self.layers = [Layer(backend, g, i, c) for i in range(c.n_layer)]
        self.output_norm = vector(b, g, "output_norm.weight", c.n_embd)
        tied = not g.has("output.weight")  # tied embeddings: the output head is token_embd
        self.output = b.matrix(g, "token_embd.weight" if tied else "output.weight", (c.vocab_size, c.n_embd))
        # llama3's rope scaling: one factor per rotated pair of values
        factors = vector(b, g, "rope_freqs.weight", c.rope_dim // 2) if g.has("rope_freqs.weight") else None
        inv = rope_freqs(c.rope_dim, c.rope_base, factors) / c.rope_scale
        self.rope = Rope(c.rope_dim, inv, "neox" if c.arch == "qwen2" else "norm", backend=b)

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        return KVCache(self.config, n_ctx or self.n_ctx, self.backend.xp)

    def feed_forward(self, L: Layer, h: np.ndarray, i: int, residual=None) -> np.ndarray:
        return self.backend.ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, residual=residual)

    def _projections(self, L: Layer, h: np.ndarray):
        """Rows of h -> q (T, H*d), k and v (T, Hkv*d), biases added, not roped."""
        q, k, v = self.linears([L.attn_q, L.attn_k, L.attn_v], h)
        if L.attn_q_b is not None:
            q, k, v = q + L.attn_q_b, k + L.attn_k_b, v + L.attn_v_b
        return q, k, v

    def _roped(self, q, k, v, pos):
        """Projections at positions pos -> roped q (T, H, d), roped k and v (T, Hkv, d)."""
        c = self.config
        T, H, Hkv, d = len(q), c.n_head, c.n_head_kv, c.head_dim
        return self.rope(q.reshape(T, H, d), pos), self.rope(k.reshape(T, Hkv, d), pos), v.reshape(T, Hkv, d)

    def _project(self, L: Layer, h: np.ndarray, pos):
        """Rows of h at positions pos -> roped q (T, H, d), roped k and v (T, Hkv, d)."""
        return self._roped(*self._projections(L, h), pos)

    def _attend(self, q, k, v, cache: KVCache, i: int, pos: np.ndarray, pos_x=None) -> np.ndarray:
        """One sequence's new tokens: store their keys and values, attend over the cache -> (T, H*d).
        pos_x: the backend's copy of the positions (a captured decode step reads them there)."""
        c = self.config
        T, H, Hkv, d = len(pos), c.n_head, c.n_head_kv, c.head_dim
        qg = q.reshape(T, Hkv, H // Hkv, d).transpose(1, 2, 0, 3)  # (Hkv, H/Hkv, T, d)
        if T == 1:  # decode: the backend stores the entry and attends straight from the float16 cache
            o = self.backend.kv_decode(qg[:, :, 0], k[0], v[0], cache.k[i], cache.v[i],
                                       pos if pos_x is None else pos_x, 1.0 / np.sqrt(d))
            if o is not None:
                return o.reshape(1, H * d)
        s0, s1 = pos[0], pos[-1] + 1
        cache.k[i, :, s0:s1] = k.transpose(1, 0, 2)  # (Hkv, T, d)
        cache.v[i, :, s0:s1] = v.transpose(1, 0, 2)
        k_all = cache.k[i, :, :s1].astype(np.float32)  # (Hkv, S, d)
        v_all = cache.v[i, :, :s1].astype(np.float32)
        o = self.backend.causal_attention(qg, k_all, v_all, s0, 1.0 / np.sqrt(d))
        return o.transpose(2, 0, 1, 3).reshape(T, H * d)

    def attention(self, L: Layer, h: np.ndarray, cache: KVCache, i: int, pos: np.ndarray, pos_x,
                  residual=None) -> np.ndarray:
        q, k, v = self._projections(L, h)
        step = getattr(self.backend, "kv_step", None) if len(pos) == 1 else None
        if step is not None:  # a decode step: the backend's rope, cache store and attention in one call
            o = step(q[0], k[0], v[0], self.rope, cache.k[i], cache.v[i], pos_x, 1.0 / np.sqrt(self.config.head_dim))
            if o is not None:
                return self.backend.linear(L.attn_output, o.reshape(1, -1), residual)
        return self.backend.linear(L.attn_output, self._attend(*self._roped(q, k, v, pos_x), cache, i, pos, pos_x),
                                   residual)

    def attention_rows(self, L: Layer, h: np.ndarray, caches: list, i: int, pos: np.ndarray, spans: list,
                       residual=None) -> np.ndarray:
        """New tokens of several sequences: rows a..b-1 of h (spans[r] = (a, b)) continue caches[r]."""
        q, k, v = self._project(L, h, self.backend.positions(pos))
        o = self.backend.xp.concatenate([self._attend(q[a:b], k[a:b], v[a:b], cache, i, pos[a:b])
                                         for cache, (a, b) in zip(caches, spans)])
        return self.backend.linear(L.attn_output, o, residual)

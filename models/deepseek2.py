"""DeepSeek V2 / V2-Lite / V3 / R1 (GGUF arch `deepseek2`): MLA attention over a latent KV cache,
routed + shared experts. Graph as llama.cpp's src/models/deepseek2.cpp, math as
shared/reference/deepseek2-gguf.md.

Letters in shapes: T tokens, S cached positions, D hidden, H heads, C kv_lora rank (512),
R rope dims per head (64), N nope dims per head (128), V value dims per head (128), E experts.

Attention runs in the absorbed form whatever the file's layout: attn_k_b (H, C, N) folds into the
query (q_lat = k_b @ q_nope) and attn_v_b (H, V, C) into the output, so the cache holds only the
normalized latent c~ (C) and the roped k_pe (R) per token per layer. The legacy attn_kv_b layout
(H*(N+V), C) is split into the same two matrices at load.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgeseek.errors import GGUFError, UnsupportedError

from .common import DecoderModel, Rope, each_in_threads, require, rope_freqs, softmax, vector, yarn_freqs
from .moe import FEW_TOKENS, SIGMOID, SOFTMAX, RouterConfig, route

# A prompt chunk of at least this many tokens attends with keys and values decompressed from the
# latent cache (llama.cpp's prompt form): a score of N + R values a head and position, and a weighted
# sum of V, where the absorbed form takes C + R and C (576 and 512 against 192 and 128 on V2-Lite);
# decompressing costs the cache's positions times k_b and v_b once a chunk. On the host only.
DECOMPRESS_TOKENS = 64
DRAFT_TILE = 128  # rows: a multiple of every kernel layout's tile (16, 64, the K-quants' portable 128): mtp_step's
# drafts over the head's first rows


@dataclass(frozen=True)
class DeepSeek2Config:
    arch: str
    vocab_size: int
    n_layer: int
    n_embd: int  # D
    n_head: int  # H
    q_lora_rank: int  # 0: no q-LoRA (V2-Lite), the query comes from attn_q
    kv_lora_rank: int  # C
    qk_nope: int  # N
    qk_rope: int  # R
    v_head: int  # V
    n_ff: int  # dense layers' width
    n_ff_exp: int  # each expert's width
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_dense_lead: int  # leading dense layers (first_k_dense_replace)
    router: RouterConfig
    rms_eps: float
    rope_base: float
    yarn_factor: float  # 1: no YaRN
    yarn_orig_ctx: int
    yarn_beta_fast: float
    yarn_beta_slow: float
    yarn_log_mul: float  # 0.1 * mscale_all_dim, as the GGUF stores it
    rope_attn_factor: float
    context_length: int
    mla_layout: bool  # file holds attn_k_b / attn_v_b (else the legacy attn_kv_b)
    n_mtp: int = 0  # multi-token-prediction blocks after the n_layer main layers (nextn_predict_layers)

    @classmethod
    def from_gguf(cls, g) -> "DeepSeek2Config":
        m = g.arch_meta
        rope = m("rope.dimension_count")
        k_mla, v_mla = m("attention.key_length_mla", 0), m("attention.value_length_mla", 0)
        mla = bool(k_mla and v_mla)
        k_len = k_mla if mla else m("attention.key_length")
        v_len = v_mla if mla else m("attention.value_length")
        if mla != g.has("blk.0.attn_k_b.weight"):
            raise GGUFError(f"{g.path}: key_length_mla/value_length_mla say MLA layout={mla}, "
                            f"but tensor blk.0.attn_k_b.weight is {'missing' if mla else 'present'}")
        yarn = m("rope.scaling.type", "none") == "yarn"
        n_expert = m("expert_count", 0)
        gating = m("expert_gating_func", SOFTMAX) or SOFTMAX  # absent or 0: softmax, as llama.cpp reads V2 files
        if gating not in (SOFTMAX, SIGMOID):
            raise UnsupportedError(f"{g.path}: '{g.arch}.expert_gating_func' {gating} is not supported "
                                   f"(1 softmax, 2 sigmoid)")
        n_mtp = m("nextn_predict_layers", 0)
        require(g, n_mtp < m("block_count"), f"'{g.arch}.nextn_predict_layers' {n_mtp} should be below "
                f"'{g.arch}.block_count' {m('block_count')}")
        c = cls(
            arch=g.arch,
            vocab_size=m("vocab_size", None) or len(g.meta("tokenizer.ggml.tokens")),
            n_layer=m("block_count") - n_mtp,
            n_embd=m("embedding_length"),
            n_head=m("attention.head_count"),
            q_lora_rank=m("attention.q_lora_rank", 0),
            kv_lora_rank=m("attention.kv_lora_rank"),
            qk_nope=k_len - rope,
            qk_rope=rope,
            v_head=v_len,
            n_ff=m("feed_forward_length"),
            n_ff_exp=m("expert_feed_forward_length", 0),
            n_expert=n_expert,
            n_expert_used=m("expert_used_count", 0),
            n_expert_shared=m("expert_shared_count", 0),
            n_dense_lead=m("leading_dense_block_count", 0),
            router=RouterConfig(
                n_expert=n_expert,
                n_used=m("expert_used_count", 0),
                gating=gating,
                n_group=m("expert_group_count", 1) or 1,
                n_group_used=m("expert_group_used_count", 1) or 1,
                norm_weights=bool(m("expert_weights_norm", False)),
                scale=m("expert_weights_scale", 1.0),
            ),
            rms_eps=m("attention.layer_norm_rms_epsilon", 1e-6),
            rope_base=m("rope.freq_base", 10000.0),
            yarn_factor=m("rope.scaling.factor", 1.0) if yarn else 1.0,
            yarn_orig_ctx=m("rope.scaling.original_context_length", m("context_length", 4096)),
            yarn_beta_fast=m("rope.scaling.yarn_beta_fast", 32.0),
            yarn_beta_slow=m("rope.scaling.yarn_beta_slow", 1.0),
            yarn_log_mul=m("rope.scaling.yarn_log_multiplier", 0.0),
            rope_attn_factor=m("rope.scaling.attn_factor", 1.0),
            context_length=m("context_length", 4096),
            mla_layout=mla,
            n_mtp=n_mtp,
        )
        key = f"'{g.arch}.attention.key_length{'_mla' if mla else ''}'"
        require(g, k_len > rope and rope % 2 == 0, f"{key} {k_len} should exceed the even "
                f"'{g.arch}.rope.dimension_count' {rope}")
        r = c.router
        if n_expert:
            require(g, 1 <= r.n_used <= n_expert, f"'{g.arch}.expert_used_count' {r.n_used} should be between 1 "
                    f"and '{g.arch}.expert_count' {n_expert}")
            require(g, n_expert % r.n_group == 0 and r.n_group_used <= r.n_group,
                    f"'{g.arch}.expert_group_count' {r.n_group} should divide '{g.arch}.expert_count' {n_expert} "
                    f"and be at least '{g.arch}.expert_group_used_count' {r.n_group_used}")
        return c

    @property
    def kq_scale(self) -> float:
        """1/sqrt(N+R), times mscale^2 with mscale = 1 + 0.1 * mscale_all_dim * ln(factor) (YaRN)."""
        mscale = self.rope_attn_factor
        if self.yarn_factor > 1.0:
            mscale *= 1.0 + self.yarn_log_mul * math.log(self.yarn_factor)
        return mscale * mscale / math.sqrt(self.qk_nope + self.qk_rope)


class LatentCache:
    """Per layer and token: the normalized latent c~ (C) and the roped shared key k_pe (R).

    float16, as llama.cpp's default cache type: (512 + 64) * 2 bytes per token per layer.
    """

    def __init__(self, cfg: DeepSeek2Config, n_ctx: int, xp=np, n_layer: int | None = None):
        n_layer = n_layer or cfg.n_layer  # the MTP block's own layer follows the main ones when it runs
        self.c = xp.zeros((n_layer, n_ctx, cfg.kv_lora_rank), np.float16)  # (L, S, C), in the backend's memory
        self.k_pe = xp.zeros((n_layer, n_ctx, cfg.qk_rope), np.float16)  # (L, S, R)
        self.n_ctx = n_ctx
        self.pos = 0
        self.lora: tuple = ()  # the adapters this sequence runs with (models/lora.py Adapter)

    def truncate(self, n: int) -> None:
        self.pos = min(self.pos, n)


class Layer:
    def __init__(self, b, g, i: int, c: DeepSeek2Config):
        D, H, C, N, R, V = c.n_embd, c.n_head, c.kv_lora_rank, c.qk_nope, c.qk_rope, c.v_head
        p = f"blk.{i}."
        self.attn_norm = vector(b, g, p + "attn_norm.weight", D)
        if c.q_lora_rank:
            self.attn_q_a = b.matrix(g, p + "attn_q_a.weight", (c.q_lora_rank, D))
            self.attn_q_a_norm = vector(b, g, p + "attn_q_a_norm.weight", c.q_lora_rank)
            self.attn_q_b = b.matrix(g, p + "attn_q_b.weight", (H * (N + R), c.q_lora_rank))
        else:
            self.attn_q = b.matrix(g, p + "attn_q.weight", (H * (N + R), D))
        self.attn_kv_a_mqa = b.matrix(g, p + "attn_kv_a_mqa.weight", (C + R, D))
        self.attn_kv_a_norm = vector(b, g, p + "attn_kv_a_norm.weight", C)
        if c.mla_layout:
            self.attn_k_b = b.heads(g, p + "attn_k_b.weight", (H, C, N))  # (H, C, N), the file's quantization
            self.attn_v_b = b.heads(g, p + "attn_v_b.weight", (H, V, C))  # (H, V, C)
        else:
            kv_b = b.dense(g, p + "attn_kv_b.weight", (H * (N + V), C)).reshape(H, N + V, C)
            self.attn_k_b = b.xp.ascontiguousarray(kv_b[:, :N, :].transpose(0, 2, 1))  # (H, C, N)
            self.attn_v_b = b.xp.ascontiguousarray(kv_b[:, N:, :])  # (H, V, C)
        self.attn_output = b.matrix(g, p + "attn_output.weight", (D, H * V))
        self.ffn_norm = vector(b, g, p + "ffn_norm.weight", D)
        self.dense = i < c.n_dense_lead
        if self.dense:
            self.ffn_gate = b.matrix(g, p + "ffn_gate.weight", (c.n_ff, D))
            self.ffn_up = b.matrix(g, p + "ffn_up.weight", (c.n_ff, D))
            self.ffn_down = b.matrix(g, p + "ffn_down.weight", (D, c.n_ff))
        else:
            self.ffn_gate_inp = b.dense(g, p + "ffn_gate_inp.weight", (c.n_expert, D))  # (E, D) router
            bias = p + "exp_probs_b.bias"  # V3's selection bias
            self.exp_probs_b = vector(b, g, bias, c.n_expert) if g.has(bias) else None
            if c.n_expert_shared:
                F = c.n_ff_exp * c.n_expert_shared
                self.ffn_gate_shexp = b.matrix(g, p + "ffn_gate_shexp.weight", (F, D))
                self.ffn_up_shexp = b.matrix(g, p + "ffn_up_shexp.weight", (F, D))
                self.ffn_down_shexp = b.matrix(g, p + "ffn_down_shexp.weight", (D, F))


class MTPLayer(Layer):
    """DeepSeek-V3's multi-token-prediction module (block n_layer of the file, llama.cpp's nextn
    tensors): from the main model's hidden state h_i (after output_norm, as the head sees it) and
    the embedding of token i+1, a decoder block predicts token i+2:
    eh_proj([enorm(embed(t_{i+1})); hnorm(h_i)]) -> block -> shared_head_norm -> shared head.
    The embedding, head norm and head are the main model's where the file has no copy of its own."""

    def __init__(self, b, g, i: int, c: DeepSeek2Config, model):
        super().__init__(b, g, i, c)
        D, V = c.n_embd, c.vocab_size
        p = f"blk.{i}.nextn."
        self.eh_proj = b.matrix(g, p + "eh_proj.weight", (D, 2 * D))
        self.enorm = vector(b, g, p + "enorm.weight", D)
        self.hnorm = vector(b, g, p + "hnorm.weight", D)
        has = g.has
        self.embed = b.embedding(g, p + "embed_tokens.weight", (V, D)) if has(p + "embed_tokens.weight") \
            else model.token_embd
        self.head_norm = vector(b, g, p + "shared_head_norm.weight", D) if has(p + "shared_head_norm.weight") \
            else model.output_norm
        self.head = b.matrix(g, p + "shared_head_head.weight", (V, D)) if has(p + "shared_head_head.weight") \
            else model.output


class DeepSeek2Model(DecoderModel):
    graph_safe = True  # a decode step reads its position from the backend's arrays only (capturable)

    def __init__(self, g, backend, expert_store, n_ctx: int = 4096):
        """`expert_store` serves the routed experts (the engine builds it: edgeseek/expert_store.py;
        None where the file has none)."""
        b = self.backend = backend
        self.config = c = DeepSeek2Config.from_gguf(g)
        self.n_ctx = n_ctx
        self.token_embd = backend.embedding(g, "token_embd.weight", (c.vocab_size, c.n_embd))
        self.layers = [Layer(backend, g, i, c) for i in range(c.n_layer)]
        self.output_norm = vector(b, g, "output_norm.weight", c.n_embd)
        head = "output.weight" if g.has("output.weight") else "token_embd.weight"
        self.output = b.matrix(g, head, (c.vocab_size, c.n_embd))
        self.experts = expert_store
        self.mtp: MTPLayer | None = None  # load_mtp() reads it when multi-token prediction is on
        self._draft = None  # (the head's layout, rows, the matrix of its first rows): _head_rows
        if c.yarn_factor > 1.0:
            inv = yarn_freqs(c.qk_rope, c.rope_base, c.yarn_factor, c.yarn_orig_ctx,
                             c.yarn_beta_fast, c.yarn_beta_slow)
        else:
            inv = rope_freqs(c.qk_rope, c.rope_base)
        # llama.cpp cancels YaRN's own cos/sin magnitude scaling for deepseek2 and moves it into
        # kq_scale, leaving rope.scaling.attn_factor (1 unless the file sets it) on cos/sin.
        self.rope = Rope(c.qk_rope, inv, "norm", mscale=c.rope_attn_factor, backend=b)

    def begin_step(self) -> None:
        if self.experts is not None:
            self.experts.begin_step()

    def pack(self, gguf=None) -> int:
        return super().pack(gguf) + (self.experts.pack(gguf) if self.experts is not None else 0)

    def new_cache(self, n_ctx: int | None = None) -> LatentCache:
        n_layer = self.config.n_layer + (1 if self.mtp is not None else 0)
        return LatentCache(self.config, n_ctx or self.n_ctx, self.backend.xp, n_layer)

    def load_mtp(self, g) -> MTPLayer:
        """Read the file's first MTP block (a GGUFError names a missing or mis-shaped tensor)."""
        if not self.config.n_mtp:
            raise GGUFError(f"{g.path}: no multi-token-prediction layer ('{g.arch}.nextn_predict_layers' is 0 "
                            f"or absent)")
        self.mtp = MTPLayer(self.backend, g, self.config.n_layer, self.config, self)
        return self.mtp

    def draft_rows(self, rows: int) -> int | None:
        """The head rows mtp_step(rows=...) drafts from for a wish of `rows`: whole tiles of the
        kernel layouts (DRAFT_TILE); None where the backend has no view of a head's first rows or
        they would be all of it."""
        rows = -(-rows // DRAFT_TILE) * DRAFT_TILE
        return rows if hasattr(self.backend, "head_rows") and rows < self.config.vocab_size else None

    def _head_rows(self, rows: int):
        """The MTP head's first `rows` rows as a matrix over its current kernel layout (made at the
        first draft, after load has put the layout in place; again if the layout changes), or None."""
        head, d = self.mtp.head, self._draft
        if d is None or d[0] is not getattr(head, "_packed", None) or d[1] != rows:
            view = self.backend.head_rows(head, rows)  # (packs the head where it was not yet)
            d = self._draft = (getattr(head, "_packed", None), rows, view)
        return d[2]

    def mtp_step(self, hidden, next_ids, pos: np.ndarray, cache, rows: int | None = None):
        """The MTP block over rows i of `hidden` (main hidden states, (T, D), backend arrays) with the
        tokens that follow them (`next_ids`, backend ids), at consecutive positions pos -> (logits
        (1, V) of the last row on the host: the next draft; the block's output for that row (1, D),
        to draft further with the same module). Every row writes the block's cache entry at its
        position. `rows` (draft_rows'): logits of the first `rows` tokens only, the others -inf.

        The block is one layer, so a row's cache entry comes from its input alone (the latent and
        k_pe of its normed input) and no later row reads a row's output: the rows before the last
        (a verification's accepted drafts, a prompt's catch-up) write their entries and stop there;
        only the last runs attention, the feed-forward and the head."""
        M, c, b = self.mtp, self.config, self.backend
        eps = c.rms_eps
        self.assign_lora([cache], [len(pos)])
        e = b.rms_norm(M.embed(next_ids), M.enorm, eps)
        h = b.rms_norm(hidden, M.hnorm, eps)
        x = M.eh_proj(b.xp.concatenate([e, h], axis=1))
        i = c.n_layer
        if len(pos) > 1:  # (a sequence's adapters apply to every row alike: the rows reassigned)
            self.assign_lora([cache], [len(pos) - 1])
            self._entries_only(M, b.rms_norm(x[:-1], M.attn_norm, eps), cache, i, pos[:-1])
            x, pos = x[-1:], pos[-1:]
            self.assign_lora([cache], [1])
        pos_x = b.positions(pos)
        x = self.attention(M, self.normed(x, M.attn_norm, eps), cache, i, pos, pos_x, residual=x)
        x = self.feed_forward(M, self.normed(x, M.ffn_norm, eps), i, residual=x)
        h = b.rms_norm(x[-1:], M.head_norm, eps)
        if rows is None:
            return b.host(M.head(h)), x
        head = self._head_rows(rows)
        logits = np.full((1, c.vocab_size), -np.inf, np.float32)
        logits[:, :rows] = b.host(head(h)) if head is not None else b.host(M.head(h))[:, :rows]
        return logits, x

    def _entries_only(self, L: Layer, h: np.ndarray, cache: LatentCache, i: int, pos: np.ndarray) -> None:
        """Rows h (normed layer input) at consecutive positions pos: their cache entries of layer i
        stored, nothing attended."""
        kv = self.backend.linear(L.attn_kv_a_mqa, h)  # (T, C + R)
        _store(cache, i, int(pos[0]), int(pos[-1]) + 1, *self._latent_entries(L, kv, self.backend.positions(pos)))

    def _queries(self, L: Layer, h: np.ndarray, absorb: bool = True):
        """Rows of h -> q (T, H, N + R) (each head: [nope N | rope R]), its absorbed part q_lat
        (T, H, C) = k_b @ q_nope (None unless absorb), and kv (T, C + R) = [latent | k_pe], neither
        roped nor normalized."""
        c = self.config
        T, H, N, R = len(h), c.n_head, c.qk_nope, c.qk_rope
        q, kv = self.linears([L.attn_q_a if c.q_lora_rank else L.attn_q, L.attn_kv_a_mqa], h)
        if c.q_lora_rank:
            q = L.attn_q_b(self.backend.rms_norm(q, L.attn_q_a_norm, c.rms_eps))
        q = q.reshape(T, H, N + R)
        return q, self.backend.per_head(L.attn_k_b, q[:, :, :N]) if absorb else None, kv

    def _entries(self, L: Layer, q, kv, pos):
        """q_pe (T, H, R) roped, and the new cache entries: normalized latents (T, C), roped k_pe (T, R)."""
        return (self.rope(q[:, :, self.config.qk_nope:], pos), *self._latent_entries(L, kv, pos))

    def _latent_entries(self, L: Layer, kv, pos):
        """kv (T, C + R) -> the cache entries: normalized latents (T, C), roped k_pe (T, R)."""
        c = self.config
        C = c.kv_lora_rank
        return self.backend.rms_norm(kv[:, :C], L.attn_kv_a_norm, c.rms_eps), self.rope(kv[:, None, C:], pos)[:, 0]

    def _attend(self, q_lat, q_pe, lat_new, k_pe_new, cache: LatentCache, i: int, pos: np.ndarray) -> np.ndarray:
        """One sequence's new tokens: store their cache entries, attend over the cache -> o_lat (T, H, C)."""
        s0, s1 = int(pos[0]), int(pos[-1]) + 1
        _store(cache, i, s0, s1, lat_new, k_pe_new)
        consecutive = pos[-1] - pos[0] + 1 == len(pos)
        if consecutive:
            o = self.backend.latent_attention(q_lat, q_pe, cache.c[i, :s1], cache.k_pe[i, :s1], s0,
                                              self.config.kq_scale)
            if o is not None:
                return o
        lat, k_pe = _as_f32(cache, i, s1)
        scores = (q_lat @ lat.T + q_pe @ k_pe.T) * self.config.kq_scale  # (T, H, S)
        if len(pos) > 1:
            xp = self.backend.xp
            if consecutive:  # consecutive positions: the mask made beside the scores
                future = xp.arange(s1)[None, :] > xp.arange(s0, s1)[:, None]  # (T, S)
            else:
                future = xp.asarray(np.arange(s1)[None, :] > pos[:, None])
            scores = xp.where(future[:, None, :], -np.inf, scores)
        return softmax(scores) @ lat  # (T, H, C)

    def _attend_decompressed(self, L: Layer, q_nope, q_pe, lat_new, k_pe_new, cache: LatentCache, i: int,
                             pos: np.ndarray) -> np.ndarray:
        """One sequence's prompt chunk: store its cache entries, then head by head decompress every
        cached position's keys lat @ k_b (S, N) and values lat @ v_b^T (S, V) and attend -> o
        (T, H, V), the input of attn_output (no v_b after). The heads are shared out over the
        backend's threads (numpy's products and ufuncs run without the GIL, on one BLAS thread
        each); a head's scores (T, S) stay in the cache where the whole (H, T, S) would not."""
        c = self.config
        s0, s1 = int(pos[0]), int(pos[-1]) + 1
        T, H, N = q_nope.shape
        _store(cache, i, s0, s1, lat_new, k_pe_new)
        lat, k_pe = _as_f32(cache, i, s1)
        kb, vb = _dense_heads(L.attn_k_b), _dense_heads(L.attn_v_b)  # (H, C, N), (H, V, C)
        q = np.concatenate([q_nope, q_pe], axis=-1).astype(np.float32) * np.float32(c.kq_scale)  # (T, H, N + R)
        # the chunk's own positions: row t sees s0 + t and before (an earlier chunk's all of them)
        own = np.where(np.arange(s1 - s0)[None, :] > (pos - s0)[:, None], -np.inf, 0.0).astype(np.float32)
        o = np.empty((T, H, vb.shape[1]), np.float32)

        def head(h: int) -> None:
            keys = np.empty((s1, q.shape[2]), np.float32)
            np.matmul(lat, kb[h], out=keys[:, :N])
            keys[:, N:] = k_pe
            w = q[:, h] @ keys.T  # (T, S)
            w[:, s0:] += own
            np.subtract(w, w.max(axis=1, keepdims=True), out=w)
            np.exp(w, out=w)
            w /= w.sum(axis=1, keepdims=True)
            np.matmul(w, lat @ vb[h].T, out=o[:, h])

        each_in_threads(head, H, getattr(self.backend, "threads", 1))
        return o

    def _output(self, L: Layer, o_lat: np.ndarray, residual=None) -> np.ndarray:
        o = self.backend.per_head(L.attn_v_b, o_lat)  # (T, H, V)
        return self.backend.linear(L.attn_output, o.reshape(len(o), -1), residual)

    def attention(self, L: Layer, h: np.ndarray, cache: LatentCache, i: int, pos: np.ndarray, pos_x,
                  residual=None) -> np.ndarray:
        c = self.config
        if len(pos) >= DECOMPRESS_TOKENS and self.backend.xp is np and _on_host(L.attn_k_b) and _on_host(L.attn_v_b):
            q, _, kv = self._queries(L, h, absorb=False)
            q_pe, lat, k_pe = self._entries(L, q, kv, pos_x)
            o = self._attend_decompressed(L, q[:, :, :c.qk_nope], q_pe, lat, k_pe, cache, i, pos)
            return self.backend.linear(L.attn_output, o.reshape(len(o), -1), residual)
        q, q_lat, kv = self._queries(L, h)
        o_lat = None
        if len(pos) == 1:  # a decode step: the backend's whole attention where it has one
            o_lat = self.backend.latent_step(q[0], kv[0], L.attn_kv_a_norm, c.rms_eps, self.rope, q_lat[0],
                                             cache.c[i], cache.k_pe[i], pos_x, c.kq_scale)
        elif len(pos) <= FEW_TOKENS and pos[-1] - pos[0] + 1 == len(pos) and hasattr(self.backend, "latent_steps"):
            o_lat = self.backend.latent_steps(q, kv, L.attn_kv_a_norm, c.rms_eps, self.rope, q_lat, cache.c[i],
                                              cache.k_pe[i], pos_x, c.kq_scale)  # a verification's few tokens
        if o_lat is None:
            q_pe, lat, k_pe = self._entries(L, q, kv, pos_x)
            o_lat = self._attend_few(q_lat, q_pe, lat, k_pe, cache, i, pos, pos_x)
            if o_lat is None:
                o_lat = self._attend(q_lat, q_pe, lat, k_pe, cache, i, pos)
        return self._output(L, o_lat, residual)

    def _attend_few(self, q_lat, q_pe, lat, k_pe, cache: LatentCache, i: int, pos: np.ndarray, pos_x):
        """A decode step (one token), or on the host a few (a speculative verification, a batch row):
        the backend's one-token kernels, every token in one call as a batch's rows over one cache
        (each writes its cache entry and attends up to it), else token after token; None where they
        do not apply."""
        T = len(pos)
        if T == 1:
            return self.backend.latent_decode(q_lat[0], q_pe[0], lat, k_pe, cache.c[i], cache.k_pe[i], pos_x,
                                              self.config.kq_scale)
        if T > FEW_TOKENS or self.backend.xp is not np:
            return None
        o = self.backend.latent_decode_rows(q_lat, q_pe, lat, k_pe, [cache.c[i]] * T, [cache.k_pe[i]] * T, pos,
                                            self.config.kq_scale)  # every token in one call, as a batch's rows
        if o is not None:
            return o
        outs = []
        for t in range(T):
            o = self.backend.latent_decode(q_lat[t], q_pe[t], lat[t:t + 1], k_pe[t:t + 1], cache.c[i], cache.k_pe[i],
                                           pos[t:t + 1], self.config.kq_scale)
            if o is None:
                return None
            outs.append(o)
        return np.concatenate(outs)

    def attention_rows(self, L: Layer, h: np.ndarray, caches: list, i: int, pos: np.ndarray, spans: list,
                       residual=None) -> np.ndarray:
        """New tokens of several sequences: rows a..b-1 of h (spans[r] = (a, b)) continue caches[r]."""
        pos_x = self.backend.positions(pos)
        q, q_lat, kv = self._queries(L, h)
        q_pe, lat, k_pe = self._entries(L, q, kv, pos_x)
        if len(spans) == len(pos) > 1:  # a decode step: one token a sequence, every row in one call
            o_lat = self.backend.latent_decode_rows(q_lat, q_pe, lat, k_pe, [c.c[i] for c in caches],
                                                    [c.k_pe[i] for c in caches], pos, self.config.kq_scale)
            if o_lat is not None:
                return self._output(L, o_lat, residual)
        parts = []
        for cache, (a, b) in zip(caches, spans):
            o = self._attend_few(q_lat[a:b], q_pe[a:b], lat[a:b], k_pe[a:b], cache, i, pos[a:b], pos_x[a:b]) \
                if self.backend.xp is np else None  # (the GPU's decode kernel is checked on single steps only)
            parts.append(o if o is not None else self._attend(q_lat[a:b], q_pe[a:b], lat[a:b], k_pe[a:b], cache, i, pos[a:b]))
        o_lat = self.backend.xp.concatenate(parts)
        return self._output(L, o_lat, residual)

    # Speculative prefetch: when decoding one token, the next MoE layer's router applied to this
    # layer's FFN input names the experts the store starts reading ahead (mixtral-offloading's
    # guess; the hidden state changes little from one layer to the next). Off unless asked for.
    prefetch_experts = False

    def feed_forward(self, L: Layer, h: np.ndarray, i: int, residual=None) -> np.ndarray:
        b = self.backend
        if L.dense:
            return b.ffn(h, L.ffn_gate, L.ffn_up, L.ffn_down, residual=residual)
        nxt = self.layers[i + 1] if i + 1 < len(self.layers) else None
        if self.prefetch_experts and len(h) == 1 and nxt is not None:  # read while this layer's experts run
            guess, _ = route(h @ nxt.ffn_gate_inp.T, self.config.router, nxt.exp_probs_b)
            self.experts.prefetch(i + 1, guess[0])
        shared = (L.ffn_gate_shexp, L.ffn_up_shexp, L.ffn_down_shexp) if self.config.n_expert_shared else None
        # residual + (routed + shared), as llama.cpp adds them
        return b.moe(h, L.ffn_gate_inp, self.config.router, L.exp_probs_b, self.experts, i, self.lora, shared, residual)


def _store(cache: LatentCache, i: int, s0: int, s1: int, lat_new, k_pe_new) -> None:
    """Layer i's new entries stored at positions s0..s1-1."""
    cache.c[i, s0:s1] = lat_new
    cache.k_pe[i, s0:s1] = k_pe_new


def _as_f32(cache: LatentCache, i: int, s1: int):
    """Layer i's cache up to position s1 as float32: latents (S, C), k_pe (S, R)."""
    return cache.c[i, :s1].astype(np.float32), cache.k_pe[i, :s1].astype(np.float32)


def _on_host(w) -> bool:
    """A per-head stack the host can dequantize: a float array, or the CPU backend's quantized heads."""
    return isinstance(w, np.ndarray) or hasattr(w, "matrix")


def _dense_heads(w) -> np.ndarray:
    """A per-head stack (H, R, K) as float32: an array as is, the file's quantized heads dequantized."""
    if isinstance(w, np.ndarray):
        return w.astype(np.float32, copy=False)
    return np.stack([w.matrix(h).dequantize() for h in range(w.shape[0])]).reshape(w.shape)

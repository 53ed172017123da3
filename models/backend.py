"""The seam between a forward pass and the hardware it runs on.

Everything an architecture asks of the machine is named here and nowhere else: the array module
its activations live in; its weights kept in the file's quantization and the products with them
(one token or many, several routed experts at once); small tensors as arrays; the embedding lookup;
the per-head products of MLA's absorbed attention; attention over a cache; building the kernel
layouts ahead of use. The routed experts come from an expert store, which the engine hands to the
model beside the backend. models/ calls only this interface and imports nothing from the runtime;
edgeseek/backends/ implements it: the CPU with numba kernels on the file's blocks (cpu.py), and a
CUDA backend next, as ggml's backends are to llama.cpp's one graph per architecture.

Shapes: T tokens, K inputs, N outputs, H heads, S cached positions.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Protocol, Sequence


class Linear(Protocol):
    """A weight (N, K) in the file's quantization."""

    name: str  # the GGUF tensor's name
    shape: tuple[int, int]  # (N, K)

    def __call__(self, x):
        """W @ x: x (K,) -> (N,), or x (T, K) -> (T, N)."""


class Backend(Protocol):
    xp: ModuleType  # the array module of activations, caches and small weights (numpy on the CPU)

    def matrix(self, gguf, name: str, shape: tuple[int, int]) -> Linear:
        """A 2-D weight (out, in), shape and type checked, kept in its file quantization."""

    def dense(self, gguf, name: str, shape: tuple[int, ...] | None = None):
        """Any (small) tensor as float32, numpy order."""

    def heads(self, gguf, name: str, shape: tuple[int, int, int]):
        """A stack of per-head matrices (H, R, K) in the file's quantization, for per_head."""

    def embedding(self, gguf, name: str, shape: tuple[int, int]) -> Callable:
        """Row lookup in a (V, D) table: ids (T,) -> (T, D) float32, without dequantizing it all."""

    def per_head(self, w, x):
        """y[t, h] = w[h] @ x[t, h]: w (H, R, K) (from heads(), or a float32 array), x (T, H, K)
        -> (T, H, R)."""

    def experts_rows(self, x, triples: Sequence, rows, delta=None) -> object | None:
        """SwiGLU of row rows[i] of x (T, D) through triple i (gate, up, down) -> (n, D), each
        projection of all the triples in one call; None where the weights' format has no such
        kernel (the caller then goes expert by expert). `delta` (models/lora.py's
        LoraRows.experts), when given: delta(kind, inputs (n, K)) -> (n, N) or None, added to the
        gate, up and down products of the pairs before the SwiGLU and the sum."""

    def experts_runs(self, x, triples: Sequence, counts) -> object | None:
        """SwiGLU of runs of consecutive rows of x (n, D): the next counts[i] rows through triple i
        (gate, up, down) -> (n, D), each projection of every triple in one call with each triple's
        weights read once for its run (several sequences' tokens routed to one expert); None where
        the weights' format has no such kernel (the caller then goes expert by expert)."""

    def lora_pairs(self, a, b, e, x, s: float):
        """Optional (models/lora.py uses numpy without it): s * B[e_i] (A[e_i] x_i) for pairs of
        stacked LoRA tensors a (E, r, K), b (E, N, r), e (n,) expert ids, x (n, K) -> (n, N), or
        None where the backend has no kernel for these."""

    def moe(self, x, router_weight, router, bias, store, layer: int, lora=None, shared=None, residual=None):
        """A MoE layer's routed experts for tokens x (T, D): router logits x @ router_weight.T
        (E, D), routing (models/moe.py's rule with its RouterConfig and selection bias), the
        choices counted in the store, each token's weighted experts summed -> (T, D). `lora`: the
        model's LoraRows, whose adapters add their experts' low-rank deltas (models/lora.py).
        `shared`: the layer's shared experts (gate, up, down) or None, `residual` (T, D) or None:
        the result is then residual + (routed + ffn(x, *shared)), as llama.cpp adds them (a GPU
        runs both experts' products in the same launches)."""

    def latent_decode(self, q_lat, q_pe, lat_new, k_pe_new, cache_c, cache_k_pe, pos, scale: float):
        """MLA's absorbed attention of one new token, or None (the model's own math then runs):
        store lat_new (1, C) and k_pe_new (1, R) at position pos in one layer's cache (S, C) and
        (S, R); q_lat (H, C) and q_pe (H, R) attend over positions 0..pos -> o_lat (1, H, C)."""

    def latent_step(self, q, kv, norm_w, eps: float, rope, q_lat, cache_c, cache_k_pe, pos, scale: float):
        """A decode step's whole MLA attention from the raw projections, or None (the model then
        ropes, normalizes and calls latent_decode): q (H, N + R) and kv (C + R) of the new token,
        q_lat (H, C) its absorbed query; the latent kv[:C] normalized by norm_w (eps) and kv[C:]
        roped are stored at pos, q's last R values of each head roped, and the token attends over
        positions 0..pos -> o_lat (1, H, C)."""

    def latent_steps(self, q, kv, norm_w, eps: float, rope, q_lat, cache_c, cache_k_pe, pos, scale: float):
        """Optional: latent_step for a few new tokens of one sequence at consecutive positions pos
        (a speculative verification): q (T, H, N + R), kv (T, C + R), q_lat (T, H, C) -> o_lat (T,
        H, C), each row what latent_step gives it; None where it does not apply."""
        return None

    def latent_decode_rows(self, q_lat, q_pe, lat_new, k_pe_new, caches_c: list, caches_k_pe: list, pos,
                           scale: float):
        """latent_decode for one new token of each of several sequences (row b: q_lat (B, H, C),
        q_pe (B, H, R), lat_new (B, C), k_pe_new (B, R), its own layer caches caches_c[b] (S, C) and
        caches_k_pe[b] (S, R), host positions pos (B,)) in one call -> o_lat (B, H, C); None, having
        stored nothing, where it does not apply."""

    def rms_norm(self, x, weight, eps: float):
        """models/common.rms_norm: x (T, D) -> x / rms(x) * weight."""

    def normed(self, x, weight, eps: float):
        """Optional: rms_norm(x, weight, eps) as the input of a layer's attention or feed-forward,
        which reach it only through this interface: a backend may return a value of its own that
        its products normalize in their own launches (DecoderModel.normed calls rms_norm where a
        backend has none)."""

    def linears(self, ws: Sequence[Linear], x) -> list:
        """[w(x) for w in ws]: several products of one input (a backend may prepare x once); optional,
        DecoderModel.linears calls each product where a backend has none."""

    def linear(self, w, x, residual=None):
        """w(x), plus residual (T, N) where given: residual + w(x) (a backend may add it in the
        product's own kernel)."""

    def ffn(self, x, gate, up, down, add=None, residual=None):
        """The SwiGLU feed-forward down(silu(gate x) * up x) of Linears: x (T, D) -> (T, D)
        (common.ffn, or the backend's fused kernels); with add and residual (T, D),
        residual + (add + ffn(x)), the order of the graph's own additions (a MoE layer: the
        residual stream + (routed + shared))."""

    def swiglu(self, g, u):
        """silu(g) * u, elementwise."""

    def rope(self, rope, x, positions):
        """rope(x, positions) (models/common.Rope: its tables, kind and dim) as one kernel, or
        None: Rope's own math then runs."""

    def tokens(self, ids: np.ndarray):
        """Token ids (T,) from the host as the embedding takes them."""

    def positions(self, pos: np.ndarray):
        """Positions (T,) from the host as the rope tables and attention take them."""

    def replay(self, model, tokens: np.ndarray, cache):
        """One decode step run as a replay of the step captured once for this cache, returning
        host logits (1, V); None where the backend runs every step as it comes."""

    def host(self, x):
        """An activation (logits) as a numpy array in host memory."""

    def kv_decode(self, q, k_new, v_new, k_cache, v_cache, pos, scale: float):
        """One new token of grouped-query attention: store k_new, v_new (G, d) at position pos (host
        ints (1,), or the backend's positions) in one layer's float16 caches k_cache, v_cache
        (G, n_ctx, d), then q (G, H, d) (H query heads per kv head) attends positions 0..pos ->
        (G, H, d); None, having stored nothing, where the backend has no such kernel (the caller
        stores, converts the cache and uses causal_attention)."""

    def kv_step(self, q, k, v, rope, k_cache, v_cache, pos, scale: float):
        """Optional: a decode token's whole grouped-query attention from its projections, q (H*d,),
        k and v (G*d,), not roped: q and k rotated by `rope` (models/common.Rope) at position pos
        (the backend's positions, (1,)), k and v stored there in one layer's float16 caches (G,
        n_ctx, d), q attends positions 0..pos -> (G, H/G, d), what rope and kv_decode give; None,
        having stored nothing, where it does not apply (the model then ropes and calls kv_decode)."""

    def latent_attention(self, q_lat, q_pe, cache_c, cache_k_pe, start: int, scale: float):
        """MLA's absorbed attention of T consecutive queries at positions start..start+T-1: q_lat
        (T, H, C), q_pe (T, H, R) against one layer's cache as stored (float16) up to the last of
        them, cache_c (S, C), cache_k_pe (S, R) -> o_lat (T, H, C); None where the backend leaves
        it to the model's math."""

    def causal_attention(self, q, k, v, start: int, scale: float):
        """q (G, H, T, d) against k (G, S, d), v (G, S, dv), the T queries at positions
        start..start+T-1 of the S keys -> (G, H, T, dv)."""

    def pack(self, matrices: Sequence[Linear], gguf=None) -> int:
        """Build the kernel layout of these weights now instead of at first use; with the file,
        release its pages of what was copied. Bytes of quantized weights packed."""

    def warmup(self) -> None:
        """Compile (or load) the backend's own kernels beyond the quant formats'."""

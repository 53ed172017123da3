"""Pieces every architecture uses: RMSNorm, rope (llama.cpp's NORM and NEOX kinds, YaRN), SiLU,
softmax, the SwiGLU feed-forward, and the pre-norm decoder's forward pass. What they ask of the
hardware goes through the backend (backend.py)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from edgeseek.errors import GGUFError


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def each_in_threads(fn: Callable[[int], None], n: int, threads: int) -> None:
    """fn(0) .. fn(n - 1) shared out over `threads` host threads (work that numpy runs without the
    GIL: large products and ufuncs); in this thread alone when threads is 1."""
    global _POOL, _POOL_SIZE
    threads = max(1, min(threads, n))
    if threads == 1:
        for j in range(n):
            fn(j)
        return
    if _POOL_SIZE < threads:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(threads, thread_name_prefix="edgeseek-heads"), threads

    def part(k: int) -> None:
        for j in range(k, n, threads):
            fn(j)
    for f in [_POOL.submit(part, k) for k in range(threads)]:
        f.result()


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (T, D) float32 -> x / rms(x) * weight, in float32 as llama.cpp does."""
    ms = np.mean(np.square(x), axis=-1, keepdims=True)
    return x * (1.0 / np.sqrt(ms + eps)).astype(np.float32) * weight


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows for x < -88: x / inf is the right -0
        return x / (1.0 + np.exp(-x))


def swiglu(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    return silu(g) * u


def ffn(x: np.ndarray, gate, up, down, glu=swiglu) -> np.ndarray:
    """SwiGLU feed-forward: down(silu(gate x) * up x); x (T, D) -> (T, D). `glu` is the
    backend's silu(g) * u (one kernel on a GPU)."""
    return down(glu(gate(x), up(x)))


def plus(y, add=None, residual=None):
    """residual + (add + y), each where given: the order a layer's graph adds in (a MoE layer's
    residual stream + (routed + shared)), for backends that add outside their kernels."""
    if add is not None:
        y = add + y
    return y if residual is None else residual + y


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def require(gguf, ok: bool, message: str) -> None:
    """A rule between metadata values (each key's own type and range are checked on opening)."""
    if not ok:
        raise GGUFError(f"{gguf.path}: {message}")


# --- weights -----------------------------------------------------------------------------------
def vector(backend, gguf, name: str, length: int | None = None) -> np.ndarray:
    """A 1-D tensor (norm weight, bias) as float32."""
    t = gguf.tensor(name)
    if len(t.shape) != 1 or (length is not None and t.shape[0] != length):
        raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {t.shape}, expected ({length},)")
    return backend.dense(gguf, name).reshape(-1)


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
    cos and sin are tables over positions (computed in float64, kept as float32 in the backend's
    memory), indexed by the positions: host ints, or the backend's device copy of them, which a
    decode step captured as a CUDA graph reads at every replay.
    """

    def __init__(self, dim: int, inv_freq: np.ndarray, kind: str = "norm", mscale: float = 1.0, backend=None):
        self.dim, self.inv_freq, self.kind, self.mscale = dim, inv_freq, kind, mscale
        self.backend = backend
        self.xp = backend.xp if backend is not None else np  # the array module of the activations rotated
        self.cos = self.sin = None
        self.n = 0  # positions the tables cover
        self._retired: list = []  # earlier tables: a captured step may still read them

    def ensure(self, n: int) -> None:
        """Tables covering positions 0..n-1."""
        if n <= self.n:
            return
        n = max(n, 2 * self.n, 256)
        ang = np.arange(n, dtype=np.float64)[:, None] * self.inv_freq[None, :]  # (n, dim/2)
        if self.cos is not None:
            self._retired.append((self.cos, self.sin))
        self.cos = self.xp.asarray((np.cos(ang) * self.mscale).astype(np.float32))
        self.sin = self.xp.asarray((np.sin(ang) * self.mscale).astype(np.float32))
        self.n = n

    def __call__(self, x, positions):
        """x (T, H, head_dim) float32, positions (T,) -> rotated copy."""
        if isinstance(positions, np.ndarray) and len(positions):  # a decode step's one position read as it is
            self.ensure(int(positions[0] if len(positions) == 1 else positions.max()) + 1)
        if self.backend is not None:
            out = self.backend.rope(self, x, positions)  # one kernel on a GPU; None: the math below
            if out is not None:
                return out
        cos = self.cos[positions][:, None, :]  # (T, 1, dim/2)
        sin = self.sin[positions][:, None, :]
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


PROMPT_CHUNK = 512  # tokens of a prompt in one forward pass (llama.cpp's default micro-batch)


def _is_linear(m) -> bool:
    return callable(m) and hasattr(m, "shape") and hasattr(m, "name")


class DecoderModel:
    """The pre-norm decoder every architecture here shares; a subclass supplies `attention` and
    `feed_forward` for one layer, and the weights: token_embd, layers, output_norm, output, made
    by its `backend`."""

    backend: object  # models.backend.Backend
    lora = None  # models.lora.LoraRows once adapters are attached: each pass's rows -> adapters

    def assign_lora(self, caches: list, counts: list[int]) -> None:
        """The adapters of this pass's rows: counts[r] rows run with caches[r].lora (a sequence's
        adapters travel with its cache)."""
        if self.lora is not None:
            self.lora.assign([c.lora for c in caches], counts)

    def attention(self, L, h: np.ndarray, cache, i: int, pos: np.ndarray, pos_x, residual=None) -> np.ndarray:
        """Layer L's attention for rows h at positions pos (host ints; pos_x: the backend's copy),
        added to residual where given (the backend may add it in the output product's kernel)."""
        raise NotImplementedError

    def feed_forward(self, L, h: np.ndarray, i: int, residual=None) -> np.ndarray:
        """Layer L's feed-forward for rows h, added to residual where given."""
        raise NotImplementedError

    def attention_rows(self, L, h: np.ndarray, caches: list, i: int, pos: np.ndarray, spans: list,
                       residual=None) -> np.ndarray:
        """New tokens of several sequences: rows a..b-1 of h (spans[r] = (a, b)) continue caches[r]
        at positions pos[a:b]; added to residual where given."""
        raise NotImplementedError

    def normed(self, x, weight, eps: float):
        """rms_norm(x) for a layer's products: a backend with `normed` may leave it to the launches
        that read it (backend.normed); their inputs are then its values, nothing else reads them."""
        f = getattr(self.backend, "normed", None)
        return f(x, weight, eps) if f is not None else self.backend.rms_norm(x, weight, eps)

    def linears(self, ws: list, h):
        """[w(h) for w in ws]: several products of one input (a layer's q, k and v), through the
        backend's linears where it has one (the CPU's makes h's 8-bit activations once)."""
        both = getattr(self.backend, "linears", None)
        return both(ws, h) if both is not None else [w(h) for w in ws]

    def begin_step(self) -> None:
        """A forward pass begins: the token boundary for whatever keeps per-token state."""

    def pack(self, gguf=None) -> int:
        """Build the kernel layout of every weight of the layers and the output now (else each is
        built on first use); with the GGUFFile, release the file pages of what was copied.
        Routed experts are their store's to pack."""
        mats = [m for L in self.layers for m in vars(L).values() if _is_linear(m)] + [self.output]
        return self.backend.pack(mats, gguf)

    def forward(self, tokens: np.ndarray, cache, all_logits: bool = False, hidden: bool = False, head: bool = True):
        """tokens (T,) at positions cache.pos.. -> logits (T, V) or, by default, (1, V) of the last,
        as a numpy array whatever device the activations live on; with `hidden`, also the final
        hidden states (T, D) after output_norm, as the backend's array (multi-token prediction
        drafts from them). `head` False (with `hidden`): no logits (None), the caller runs the output
        head on the rows it needs (a verification's, up to its first rejected draft). A backend may
        run a one-token step as a replay of the same step captured
        once (backend.replay, a CUDA graph). A prompt longer than PROMPT_CHUNK runs chunk after
        chunk, each attending to the cache the earlier ones filled: its attention scores (chunk, H,
        S) and activations stay bounded however long the prompt."""
        T = len(tokens)
        start = cache.pos
        if start + T > cache.n_ctx:
            raise ValueError(f"context full: {start} + {T} tokens > {cache.n_ctx}")
        chunk = PROMPT_CHUNK
        if T > chunk:
            outs = [self.forward(tokens[a:a + chunk], cache, all_logits, hidden, head) for a in range(0, T, chunk)]
            logits = [o[0] if hidden else o for o in outs]
            logits = None if not head else np.concatenate(logits) if all_logits else logits[-1]
            return (logits, self.backend.xp.concatenate([o[1] for o in outs])) if hidden else logits
        self.begin_step()
        self.rope.ensure(cache.n_ctx)
        self.assign_lora([cache], [T])
        plain = self.lora is None or not self.lora.groups  # a captured step knows no adapters
        logits = self.backend.replay(self, tokens, cache) if T == 1 and not all_logits and not hidden and plain \
            else None
        h = None
        if logits is None:
            out = self.step(self.backend.tokens(tokens), np.arange(start, start + T), cache, all_logits, hidden,
                            head or not hidden)
            logits, h = out if hidden else (out, None)
            logits = self.backend.host(logits) if logits is not None else None
        cache.pos = start + T
        return (logits, h) if hidden else logits

    def step(self, ids, pos: np.ndarray, cache, all_logits: bool = False, hidden: bool = False, head: bool = True):
        """The forward pass on the backend's arrays: token ids (T,) (backend.tokens), their
        positions (host ints) -> logits (T, V), or (1, V) of the last token, or None without `head`
        (and, with `hidden`, the normed final hidden states); the cache's position is the caller's
        to advance."""
        eps = self.config.rms_eps
        pos_x = self.backend.positions(pos)
        x = self.token_embd(ids)  # (T, D)
        for i, L in enumerate(self.layers):
            x = self.attention(L, self.normed(x, L.attn_norm, eps), cache, i, pos, pos_x, residual=x)
            x = self.feed_forward(L, self.normed(x, L.ffn_norm, eps), i, residual=x)
        if not all_logits and not hidden:
            x = x[-1:]
        h = self.backend.rms_norm(x, self.output_norm, eps)
        logits = self.output(h if all_logits or not hidden else h[-1:]) if head else None
        return (logits, h) if hidden else logits

    def forward_rows(self, tokens: np.ndarray, caches: list, counts: list[int] | None = None, hidden: bool = False,
                     last: bool = False):
        """One decode step of several sequences at once: the tokens continue the sequences of
        caches, counts[r] tokens for caches[r] (default one each; speculative decoding verifies
        several; several prompts prefilled together) -> logits (len(tokens), V), or with `last`
        only each sequence's last token's (len(caches), V) (and, with `hidden`, the normed final
        hidden states of those rows).
        Every weight is read once for all of them, and each routed expert once for all the tokens
        routed to it; attention runs per sequence."""
        eps = self.config.rms_eps
        counts = [1] * len(caches) if counts is None else list(counts)
        for c, n in zip(caches, counts):
            if c.pos + n > c.n_ctx:
                raise ValueError(f"context full: {c.pos} + {n} tokens > {c.n_ctx}")
        pos = np.concatenate([np.arange(c.pos, c.pos + n) for c, n in zip(caches, counts)])
        ends = np.cumsum(counts)
        spans = list(zip(ends - counts, ends))
        self.begin_step()
        self.rope.ensure(max(c.n_ctx for c in caches))
        self.assign_lora(caches, counts)
        x = self.token_embd(self.backend.tokens(tokens))  # (B, D)
        for i, L in enumerate(self.layers):
            x = self.attention_rows(L, self.backend.rms_norm(x, L.attn_norm, eps), caches, i, pos, spans, residual=x)
            x = self.feed_forward(L, self.backend.rms_norm(x, L.ffn_norm, eps), i, residual=x)
        for c, n in zip(caches, counts):
            c.pos += n
        if last:
            x = x[ends - 1]  # (len(caches), D)
            self.assign_lora(caches, [1] * len(caches))  # the head's rows: one a sequence
        h = self.backend.rms_norm(x, self.output_norm, eps)
        logits = self.backend.host(self.output(h))
        return (logits, h) if hidden else logits
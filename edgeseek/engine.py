"""`load(path)`: a GGUF file opened into a model, its tokenizer and its chat template."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from . import kernels
from .chat_template import ChatTemplate
from .errors import EdgeseekError, GGUFError
from .experts import WORKSPACE, CachedExpertStore, load_profile, parse_size, plan_budget, profile_path
from .gguf_file import GGUFFile
from .models import load_model
from .tokenizer import Tokenizer


@dataclass
class Engine:
    path: Path
    gguf: GGUFFile
    model: object  # an edgeseek.models Model: config, new_cache(), forward()
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None  # None when the file carries no tokenizer.chat_template
    n_ctx: int  # default context length of new caches
    load_seconds: float
    budget_plan: object = None  # experts.BudgetPlan when loaded with a RAM budget

    def expert_stats(self) -> dict:
        """The expert store's counters (hit rate, bytes read, ...); empty for dense models and mmap."""
        store = getattr(self.model, "experts", None)
        return store.stats() if store is not None else {}

    def close(self) -> None:
        """Save the expert-usage profile and stop the store's reader threads."""
        store = getattr(self.model, "experts", None)
        if store is not None and hasattr(store, "close"):
            store.close()

    @property
    def arch(self) -> str:
        return self.gguf.arch

    def new_context(self, n_ctx: int | None = None) -> "Context":
        return Context(self, n_ctx or self.n_ctx)


class Context:
    """A KV cache and the token ids it holds, so that a conversation only processes new tokens."""

    def __init__(self, engine: Engine, n_ctx: int):
        self.n_ctx = n_ctx
        self.cache = engine.model.new_cache(n_ctx)
        self.tokens: list[int] = []  # ids whose keys/values are in the cache, in order

    def reuse_prefix(self, ids: list[int]) -> list[int]:
        """Drop cached tokens after the longest common prefix with `ids`; return the ids still to run.

        At least one id is always left to run, since its logits pick the next token.
        """
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        n = min(n, len(ids) - 1)
        self.truncate(n)
        return ids[n:]

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.cache.truncate(n)

    def reset(self) -> None:
        self.truncate(0)


def kv_cache_bytes(gguf, n_ctx: int) -> int:
    """Bytes of a float16 KV cache of n_ctx positions for this file's architecture."""
    m = gguf.arch_meta
    n_layer = m("block_count")
    if gguf.arch == "deepseek2":
        return n_layer * n_ctx * (m("attention.kv_lora_rank") + m("rope.dimension_count")) * 2
    n_head = m("attention.head_count")
    head_dim = m("attention.key_length", 0) or m("embedding_length") // n_head
    return 2 * n_layer * n_ctx * m("attention.head_count_kv", n_head) * head_dim * 2


def load(path: str | os.PathLike, n_ctx: int = 4096, expert_store=None, ram_budget: int | str | None = None,
         io_threads: int = 8, use_profile: bool = True, on_compile=None) -> Engine:
    """Open a GGUF model file. Weights stay memory-mapped; nothing is read until it is used.

    With `ram_budget` (bytes, or a size such as "4G"), routed experts are read from the file on
    demand into a cache that, with everything else the model keeps resident, stays inside the
    budget; the non-expert weights are packed now. A budget too small for the resident part is
    refused here, before any weight is read. The expert-usage profile saved by earlier runs (in the
    user's cache directory) warms and pins the cache unless `use_profile` is False.

    The numba kernels of the file's formats are compiled here, or loaded from numba's cache;
    `on_compile(message)` is called when they must be compiled (the first run after an install).
    """
    t0 = time.perf_counter()
    gguf = GGUFFile(path)
    plan = None
    if ram_budget is not None and expert_store is None:
        ctx = min(n_ctx, gguf.arch_meta("context_length", n_ctx) or n_ctx)
        m = gguf.arch_meta
        plan = plan_budget(gguf, parse_size(ram_budget), kv_cache_bytes(gguf, ctx), m("expert_used_count", 0),
                           io_threads)
        if m("expert_count", 0):
            n_layer, n_expert = m("block_count"), m("expert_count")
            prof_file = profile_path(gguf)
            prof = load_profile(prof_file, n_layer, n_expert) if use_profile else None
            expert_store = CachedExpertStore(gguf, n_layer, n_expert, m("embedding_length"),
                                             m("expert_feed_forward_length"), plan.expert_cache,
                                             io_threads=io_threads, profile=prof, profile_file=prof_file,
                                             budget_bytes=plan.budget, reserve_bytes=plan.io_buffers + WORKSPACE)
    model = load_model(gguf, expert_store=expert_store, n_ctx=n_ctx)
    tokenizer = Tokenizer.from_gguf(gguf)
    if tokenizer.vocab_size != model.config.vocab_size:  # ids of one would index past the other
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} tokens, but the model's "
                        f"vocabulary (token_embd.weight) has {model.config.vocab_size}")
    template = ChatTemplate.from_gguf(gguf) if gguf.meta("tokenizer.chat_template", None) else None
    n_ctx = min(n_ctx, model.config.context_length or n_ctx)
    if n_ctx < 1:
        raise EdgeseekError(f"{path}: context length must be positive, got {n_ctx}")
    kernels.prepare({t.qtype for t in gguf.tensors.values()}, gguf.arch_meta("expert_used_count", 0),
                    notify=on_compile, extra=model.warmup)
    if plan is not None:
        model.pack(gguf)  # the resident weights in the kernel layout now; their file pages released
    return Engine(Path(path), gguf, model, tokenizer, template, n_ctx, time.perf_counter() - t0, plan)

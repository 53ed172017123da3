"""`load(path)`: a GGUF file opened into a model, its tokenizer and its chat template."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from .chat_template import ChatTemplate
from .errors import EdgeseekError
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


def load(path: str | os.PathLike, n_ctx: int = 4096, expert_store=None) -> Engine:
    """Open a GGUF model file. Weights stay memory-mapped; nothing is read until it is used."""
    t0 = time.perf_counter()
    gguf = GGUFFile(path)
    model = load_model(gguf, expert_store=expert_store, n_ctx=n_ctx)
    tokenizer = Tokenizer.from_gguf(gguf)
    template = ChatTemplate.from_gguf(gguf) if gguf.meta("tokenizer.chat_template", None) else None
    n_ctx = min(n_ctx, model.config.context_length or n_ctx)
    if n_ctx < 1:
        raise EdgeseekError(f"{path}: context length must be positive, got {n_ctx}")
    return Engine(Path(path), gguf, model, tokenizer, template, n_ctx, time.perf_counter() - t0)

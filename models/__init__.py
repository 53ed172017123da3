"""One module per architecture; `load_model` picks it from `general.architecture`."""
from __future__ import annotations

from edgeseek.errors import UnsupportedError


def _llama(gguf, backend, expert_store, n_ctx):
    from .llama import LlamaModel
    return LlamaModel(gguf, backend, n_ctx)


def _deepseek2(gguf, backend, expert_store, n_ctx):
    from .deepseek2 import DeepSeek2Model
    return DeepSeek2Model(gguf, backend, expert_store, n_ctx)


ARCHITECTURES = {"llama": _llama, "qwen2": _llama, "deepseek2": _deepseek2}


def load_model(gguf, backend, expert_store=None, n_ctx: int = 4096):
    """The model of the file's architecture, its weights made by `backend` (models/backend.py) and
    its routed experts served by `expert_store`."""
    build = ARCHITECTURES.get(gguf.arch)
    if build is None:
        raise UnsupportedError(
            f"{gguf.path}: architecture {gguf.arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return build(gguf, backend, expert_store, n_ctx)

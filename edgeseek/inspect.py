"""What a GGUF model file holds: architecture, sizes, parameters total and active, tensor types."""
from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from .gguf_file import GGUFFile


def describe(path: str | os.PathLike) -> dict:
    f = GGUFFile(path)
    arch = f.arch
    types: dict[str, dict] = defaultdict(lambda: {"count": 0, "bytes": 0})
    total = routed = 0
    for t in f.tensors.values():
        n = int(np.prod(t.shape))
        total += n
        if "_exps." in t.name:
            routed += n
        types[t.qtype.name]["count"] += 1
        types[t.qtype.name]["bytes"] += t.n_bytes
    n_expert = f.arch_meta("expert_count", 0) or 0
    n_used = f.arch_meta("expert_used_count", 0) or 0
    active = total - routed + (routed * n_used // n_expert if n_expert else 0)
    info = {
        "path": str(f.path),
        "name": f.meta("general.name", ""),
        "architecture": arch,
        "file_bytes": f.path.stat().st_size,
        "file_type": f.meta("general.file_type", None),
        "parameters": total,
        "parameters_active_per_token": active,
        "layers": f.arch_meta("block_count", None),
        "embedding_length": f.arch_meta("embedding_length", None),
        "context_length": f.arch_meta("context_length", None),
        "experts": n_expert or None,
        "experts_used": n_used or None,
        "experts_shared": f.arch_meta("expert_shared_count", None),
        "routed_expert_bytes": sum(t.n_bytes for t in f.tensors.values() if "_exps." in t.name),
        "tokenizer": f"{f.meta('tokenizer.ggml.model', '?')} (pre {f.meta('tokenizer.ggml.pre', '-')})",
        "tensor_types": dict(sorted(types.items())),
        "chat_template": f.meta("tokenizer.chat_template", None),
    }
    return info

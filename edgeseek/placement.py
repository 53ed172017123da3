"""Where each weight lives when a GPU runs the model: VRAM first for everything but the routed
experts (embeddings, output, attention with its latent KV cache, norms, routers, shared experts,
dense layers), then as many routed experts as the budget leaves, hottest first by the saved usage
profile; the rest stay with the CPU's expert store (RAM, or the file under --ram-budget). The plan
is made from the file's tensor table before any weight is read, so `edgeseek inspect --gpu-budget`
shows it and a budget too small is refused before loading.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .budget import KINDS, format_size, kv_cache_bytes
from .errors import EdgeseekError

# Tensors the backend keeps as float32 arrays rather than in their file quantization (models/
# calls backend.dense for them): their VRAM is 4 bytes per value whatever the file stores.
DENSE = ("attn_kv_b", "ffn_gate_inp", "norm", "bias", "exp_probs_b", "rope_freqs")
# Activations, logits, the prefill's dequantized tiles (at most PREFILL_TILE values of float16 at
# a time for a matrix; twice that for each of gate and up of a group of routed experts), a long
# prompt's copies of experts left on the CPU (cuda.STREAM_BYTES) and the kernels' module: what a
# step needs beside the weights and the cache.
PREFILL_TILE = 32 << 20
WORKSPACE = 512 << 20


class GPUBudgetError(EdgeseekError):
    pass


def _vram_bytes(t) -> int:
    name = t.name.split(".")[-2] if t.name.count(".") >= 2 else t.name
    if any(d in name for d in DENSE):
        return int(np.prod(t.shape)) * 4
    return t.n_bytes


def _is_routed(name: str) -> bool:
    return any(f".{k}." in name for k in KINDS)


@dataclass
class GPUPlan:
    budget: int
    resident: int  # weights other than the routed experts, in VRAM
    kv_cache: int
    workspace: int
    expert_bytes: int  # routed experts placed in VRAM
    on_gpu: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> sorted expert ids in VRAM
    n_expert: int = 0  # per layer

    @property
    def experts_on_gpu(self) -> int:
        return sum(len(v) for v in self.on_gpu.values())

    @property
    def experts_total(self) -> int:
        return self.n_expert * len(self.on_gpu)

    @property
    def used(self) -> int:
        return self.resident + self.kv_cache + self.workspace + self.expert_bytes

    def describe(self) -> str:
        s = (f"weights {format_size(self.resident)}, KV cache {format_size(self.kv_cache)}, "
             f"workspace {format_size(self.workspace)}")
        if self.on_gpu:
            left = self.experts_total - self.experts_on_gpu
            s += (f", routed experts {self.experts_on_gpu}/{self.experts_total} ({format_size(self.expert_bytes)})"
                  + (f"; the other {left} on the CPU" if left else ", all on the GPU"))
        return s


def plan_gpu(gguf, budget: int, n_ctx: int, profile: np.ndarray | None = None) -> GPUPlan:
    """Fill `budget` bytes of VRAM: the non-expert weights and the KV cache must fit (else a
    GPUBudgetError with the figure needed), then routed experts by descending profile count (ties:
    the same number in every layer, lower ids first)."""
    ctx = min(n_ctx, gguf.arch_meta("context_length", n_ctx) or n_ctx)
    resident = sum(_vram_bytes(t) for t in gguf.tensors.values() if not _is_routed(t.name))
    kv = kv_cache_bytes(gguf, ctx)
    need = resident + kv + WORKSPACE
    if budget < need:
        raise GPUBudgetError(
            f"{gguf.path.name}: a GPU budget of {format_size(budget)} cannot hold the weights that stay on the "
            f"GPU; it needs at least {format_size(need)} (weights {format_size(resident)}, KV cache of {ctx} "
            f"tokens {format_size(kv)}, workspace {format_size(WORKSPACE)})")
    plan = GPUPlan(budget, resident, kv, WORKSPACE, 0)
    n_layer, n_expert = gguf.arch_meta("block_count"), gguf.arch_meta("expert_count", 0)
    layers = [i for i in range(n_layer) if gguf.has(f"blk.{i}.{KINDS[0]}.weight")]
    if not n_expert or not layers:
        return plan
    plan.n_expert = n_expert
    per_expert = {i: sum(gguf.tensor(f"blk.{i}.{k}.weight").n_bytes for k in KINDS) // n_expert for i in layers}
    counts = np.zeros((n_layer, n_expert)) if profile is None else np.asarray(profile, np.float64)
    # hottest first; among equals expert id then layer, so that an even spread fills every layer alike
    order = sorted(((i, e) for i in layers for e in range(n_expert)), key=lambda ie: (-counts[ie], ie[1], ie[0]))
    left = budget - need
    chosen: dict[int, list[int]] = {i: [] for i in layers}
    for i, e in order:
        if per_expert[i] <= left:
            chosen[i].append(e)
            left -= per_expert[i]
            plan.expert_bytes += per_expert[i]
    plan.on_gpu = {i: np.array(sorted(v), np.int64) for i, v in chosen.items()}
    return plan

"""Where each weight lives when a GPU runs the model: VRAM first for everything but the routed
experts (embeddings, output, attention with its latent KV cache, norms, routers, shared experts,
dense layers), then as many routed experts as the budget leaves, chosen by the saved usage profile
so that a decode step leaves the least to the CPU: each pair left there costs its expert's CPU
products, and each layer with any expert left there a wait for the host (the step's graph cut in
two). A layer's hottest experts go first; whole layers win where the profile is flat, as llama.cpp's
--n-cpu-moe places them. The rest stay with the CPU's expert store (RAM, or the file under
--ram-budget). The plan is made from the file's tensor table before any weight is read, so
`edgeseek inspect --gpu-budget` shows it and a budget too small is refused before loading.
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
# A decode step's wait for the host in a layer with experts on the CPU (the graph cut, the copies
# both ways, the host's part around its products), in units of one expert's products on the CPU.
HOST_WAIT_EXPERTS = 1.0
# Where layers' experts differ in size (a mix of quant types), the plan counts the budget in steps
# of this fraction of the smallest one, each size rounded down to whole steps (then set right,
# expert by expert).
GRAIN = 4


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
    GPUBudgetError with the figure needed), then the routed experts that leave a decode step the
    least CPU work by the profile's counts (none: every expert alike), see _choose."""
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
    per_expert = np.array([sum(gguf.tensor(f"blk.{i}.{k}.weight").n_bytes for k in KINDS) // n_expert
                           for i in layers], np.int64)
    counts = np.zeros((n_layer, n_expert)) if profile is None else np.asarray(profile, np.float64)
    taken = _choose(counts[layers], per_expert, budget - need)
    for i, ids, size in zip(layers, taken, per_expert):
        plan.on_gpu[i] = np.sort(ids)
        plan.expert_bytes += len(ids) * int(size)
    return plan


def _choose(counts: np.ndarray, per_expert: np.ndarray, room: int) -> list[np.ndarray]:
    """The experts of each MoE layer (counts (L, E), each layer's expert size in bytes) to hold in
    `room` bytes: a layer's m hottest (ties: lower ids) leave its share of pairs 1 - top_m / total
    (a layer never counted: 1 - m / E) to the CPU, each pair as costly as its expert's bytes, plus
    HOST_WAIT_EXPERTS for the layer's wait while m < E. The number per layer that costs least in
    all is a knapsack over the layers, solved exactly on the budget counted in experts; where the
    sizes differ, in steps of 1/GRAIN of the smallest with each size rounded down, then set right
    expert by expert: out while over the budget (the one that spares least per byte), in while
    one fits (the one that spares most)."""
    L, E = counts.shape
    order = np.argsort(-counts, axis=1, kind="stable")  # each layer's experts, hottest first
    top = np.concatenate([np.zeros((L, 1)), np.cumsum(np.take_along_axis(counts, order, 1), axis=1)], axis=1)
    total = top[:, -1:]
    share = np.where(total > 0, top / np.where(total > 0, total, 1), np.arange(E + 1) / E)  # (L, E + 1)
    weight = per_expert / per_expert.mean()
    cost = (1 - share) * weight[:, None] + HOST_WAIT_EXPERTS * (np.arange(E + 1) < E)
    step = int(per_expert[0]) if (per_expert == per_expert[0]).all() else max(1, int(per_expert.min()) // GRAIN)
    units = np.maximum(1, per_expert // step)  # each layer's expert in steps, rounded down
    B = int(min(room // step, (units * E).sum()))
    best = np.zeros(B + 1)  # the least cost of the layers so far within b steps
    picks = np.zeros((L, B + 1), np.int32)
    for i in range(L):
        new = best + cost[i, 0]
        for m in range(1, min(E, B // int(units[i])) + 1):
            u = m * int(units[i])
            c, into = best[:B + 1 - u] + cost[i, m], new[u:]
            better = c < into
            into[better] = c[better]
            picks[i, u:][better] = m
        best = new
    m, b = np.zeros(L, np.int64), B
    for i in reversed(range(L)):
        m[i] = picks[i, b]
        b -= m[i] * int(units[i])
    left = room - int((m * per_expert).sum())
    while left < 0:  # sizes rounded down: over by less than a step a layer; the expert that spares least per byte out
        rows = np.flatnonzero(m > 0)
        loss = (cost[rows, m[rows] - 1] - cost[rows, m[rows]]) / per_expert[rows]
        i = rows[np.argmin(loss)]
        m[i] -= 1
        left += int(per_expert[i])
    while True:  # what the rounding left: one more expert where it spares the most per byte
        fits = (m < E) & (per_expert <= left)
        if not fits.any():
            break
        rows = np.flatnonzero(fits)
        gain = (cost[rows, m[rows]] - cost[rows, m[rows] + 1]) / per_expert[rows]
        i = rows[np.argmax(gain)]
        m[i] += 1
        left -= int(per_expert[i])
    return [order[i, :m[i]].astype(np.int64) for i in range(L)]

"""The RAM budget: sizes as users write them, this process's resident memory, and the plan that
splits a budget between what must stay resident and the cache of routed experts. One planner for
`load(..., ram_budget=)` and `edgeseek inspect --ram-budget`."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import BudgetError, EdgeseekError

KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # the stacked routed-expert tensors of a layer

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40, "TIB": 1 << 40}


def parse_size(text: str | int) -> int:
    """'4G', '3.5GB', '512M', '1024' (bytes) -> bytes. Binary units: 1G = 2^30 bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise EdgeseekError(f"cannot read {text!r} as a size: use a number with K, M or G (e.g. 4G, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_size(n: float) -> str:
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}iB"
    return f"{int(n)} B"


def resident_set_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from /proc/self/status: VmRSS (all of it) or RssAnon (its
    anonymous pages: what the kernel cannot reclaim, unlike pages of mapped files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0



# --- the plan ----------------------------------------------------------------------------------

IO_THREADS = 8  # expert reads in flight under a budget: each holds one expert's bytes
# Packed layouts pad tiles, and the portable ones (no VNNI) hold scales as float32: at most this much
# more than the file's bytes.
PACK_OVERHEAD = 1.25
# Activations, logits, numba's compiled kernels and numpy's working buffers beside the weights.
WORKSPACE = 128 << 20


@dataclass(frozen=True)
class BudgetPlan:
    budget: int
    runtime: int  # the process before any weight is read (interpreter, numpy, numba, kernels)
    resident_weights: int  # everything but the routed experts, in the kernel layout
    kv_cache: int
    io_buffers: int
    expert_bytes: int  # one routed expert in the kernel layout
    expert_cache: int  # what is left for the cache of routed experts

    @property
    def expert_slots(self) -> int:
        return self.expert_cache // self.expert_bytes if self.expert_bytes else 0

    def describe(self) -> str:
        return (f"runtime {format_size(self.runtime)}, resident weights {format_size(self.resident_weights)}, "
                f"KV cache {format_size(self.kv_cache)}, read buffers {format_size(self.io_buffers)}, "
                f"workspace {format_size(WORKSPACE)}, expert cache {format_size(self.expert_cache)} "
                f"({self.expert_slots} experts of {format_size(self.expert_bytes)})")


def plan_budget(gguf, budget: int, kv_cache_bytes: int, n_used: int, io_threads: int) -> BudgetPlan:
    """Split `budget` bytes between what must stay resident and the expert cache; refuse (before any
    weight is read) when the budget cannot hold the resident part and one token's experts of a layer."""
    routed = [t for t in gguf.tensors.values() if any(f".{k}." in t.name for k in KINDS)]
    n_expert = routed[0].shape[0] if routed else 0
    routed_names = {t.name for t in routed}
    resident = sum(t.n_bytes for t in gguf.tensors.values()
                   if t.name not in routed_names and t.name != "token_embd.weight")
    resident = int(resident * PACK_OVERHEAD)  # token_embd is read row by row from the mapped file
    per_expert_file = sum(t.n_bytes for t in routed if t.name.startswith("blk.")) // max(1, n_expert * len(routed) // 3)
    expert_bytes = int(per_expert_file * PACK_OVERHEAD)
    runtime = resident_set_bytes("RssAnon")
    io = io_threads * per_expert_file if routed else 0
    left = budget - runtime - resident - kv_cache_bytes - io - WORKSPACE
    plan = BudgetPlan(budget, runtime, resident, kv_cache_bytes, io, expert_bytes, max(0, left))
    need = budget - left + n_used * expert_bytes
    if left < n_used * expert_bytes:
        raise BudgetError(
            f"{gguf.path.name}: a RAM budget of {format_size(budget)} cannot hold what must stay resident; "
            f"it needs at least {format_size(need)}: {plan.describe()}, "
            f"and {n_used} experts of {format_size(expert_bytes)} for one token of one layer")
    return plan


def kv_cache_bytes(gguf, n_ctx: int) -> int:
    """Bytes of a float16 KV cache of n_ctx positions for this file's architecture."""
    m = gguf.arch_meta
    n_layer = m("block_count")
    if gguf.arch == "deepseek2":
        return n_layer * n_ctx * (m("attention.kv_lora_rank") + m("rope.dimension_count")) * 2
    n_head = m("attention.head_count")
    head_dim = m("attention.key_length", 0) or m("embedding_length") // n_head
    return 2 * n_layer * n_ctx * m("attention.head_count_kv", n_head) * head_dim * 2


def plan_for(gguf, budget: int | str, n_ctx: int, io_threads: int = IO_THREADS) -> BudgetPlan:
    """The plan for running this file within `budget` (bytes or a size such as "4G") at a context
    of n_ctx tokens with io_threads expert reads in flight: what load and inspect both use."""
    ctx = min(n_ctx, gguf.arch_meta("context_length", n_ctx) or n_ctx)
    return plan_budget(gguf, parse_size(budget), kv_cache_bytes(gguf, ctx), gguf.arch_meta("expert_used_count", 0),
                       io_threads)

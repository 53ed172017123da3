"""`load(path)`: a GGUF file opened into a model, its tokenizer and its chat template."""
from __future__ import annotations

import functools
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import kernels
from .backends import CPUBackend
from .backends.cpu import MANY_PAIRS
from .budget import IO_THREADS, WORKSPACE, BudgetPlan, format_size, parse_size, plan_for
from .chat_template import ChatTemplate
from .errors import EdgeseekError, GGUFError
from .expert_store import CachedExpertStore, ExpertStore, MmapExpertStore
from .gguf_file import GGUFFile
from .models import load_model
from .models.moe import FEW_TOKENS
from .placement import GPUPlan, plan_gpu
from .profile import load_profile, profile_path, save_profile

if TYPE_CHECKING:
    from .lora import Adapters
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
    budget_plan: BudgetPlan | None = None  # when loaded with a RAM budget
    experts: ExpertStore | None = None  # the routed experts' store of a MoE model
    device: str = "cpu"  # "cpu" or "cuda"
    device_name: str = "CPU"  # the GPU's name on cuda
    gpu_plan: GPUPlan | None = None  # what went to VRAM, on cuda
    backend: object = None
    mtp: "MTP | None" = None  # multi-token prediction, where the file has an MTP block and it is on
    notes: list = field(default_factory=list)  # warnings for the user (an MTP block left off, ...)
    adapters: tuple = ()  # LoRA adapters (models/lora.py Adapter) that new contexts run with (--lora)
    _lora: "Adapters | None" = None

    @property
    def lora(self) -> "Adapters":
        """The LoRA adapters read for this model, each file once (edgeseek/lora.py)."""
        if self._lora is None:
            from .lora import Adapters
            self._lora = Adapters(self)
        return self._lora

    def use_lora(self, specs) -> tuple:
        """--lora FILE[:SCALE] values: the adapters every new context runs with from now on."""
        self.adapters = self.lora.parse(specs)
        return self.adapters

    def vram_used(self) -> int:
        """Bytes of GPU memory this process holds (0 on the CPU)."""
        return self.backend.used() if self.device == "cuda" else 0

    def expert_stats(self) -> dict:
        """The expert store's counters (hit rate, bytes read, ...); empty for dense models and mmap."""
        return self.experts.stats() if self.experts is not None else {}

    def save_profile(self) -> None:
        """Add the router's choices since the last save to the model's usage profile."""
        if self.experts is not None and self.experts.counts.any():
            save_profile(profile_path(self.gguf), self.experts.take_counts(), str(self.path))

    def close(self) -> None:
        """Save the expert-usage profile and stop the store's reader threads."""
        if self.experts is not None:
            self.save_profile()
            self.experts.close()

    @property
    def arch(self) -> str:
        return self.gguf.arch

    def new_context(self, n_ctx: int | None = None, adapters: tuple | None = None) -> "Context":
        """A new KV cache; `adapters` (default: the engine's) are the LoRA adapters it runs with."""
        return Context(self, n_ctx or self.n_ctx, adapters)


class Context:
    """A KV cache and the token ids it holds, so that a conversation only processes new tokens."""

    def __init__(self, engine: Engine, n_ctx: int, adapters: tuple | None = None):
        self.n_ctx = n_ctx
        self.cache = engine.model.new_cache(n_ctx)
        self.cache.lora = engine.adapters if adapters is None else tuple(adapters)  # read by each forward pass
        self.tokens: list[int] = []  # ids whose keys/values are in the cache, in order
        self.mtp_valid = 0  # positions whose MTP cache entries are written (multi-token prediction)

    @property
    def adapters(self) -> tuple:
        return self.cache.lora

    def use_adapters(self, adapters: tuple) -> None:
        """Run with other LoRA adapters from now on: what the cache holds was computed with the
        old ones, so it is dropped."""
        adapters = tuple(adapters)
        if adapters != self.cache.lora:
            self.reset()
            self.cache.lora = adapters

    def truncate(self, n: int) -> None:
        del self.tokens[n:]
        self.cache.truncate(n)
        self.mtp_valid = min(self.mtp_valid, n)

    def reset(self) -> None:
        self.truncate(0)


DEVICES = ("auto", "cpu", "cuda")
MTP_MAX = 3  # drafts per step: beyond one, the single MTP module drafts from its own output
AUTO_PLAIN = 8  # --mtp auto: plain decode steps timed first (the MTP entries kept written meanwhile)
AUTO_STEPS = 16  # then MTP steps measured before it decides
# The MTP block drafts from the vocabulary's first third (its most frequent tokens in a BPE
# vocabulary, whose ids follow the merges' order): its output head, the largest part of a small
# model's draft, over a third of the rows. A draft cannot be a later token, so where the main model's
# tokens at the drafted positions fall there more often than DRAFT_MISS_MAX of the steps (counted
# from DRAFT_MISS_STEPS on), drafts take the whole head again. Verification is unchanged: the same
# tokens (greedy) and the same distribution (sampling: the rule holds for any draft distribution).
DRAFT_SHARE = 3
DRAFT_MISS_MAX = 0.05
DRAFT_MISS_STEPS = 32


@dataclass
class MTP:
    """Multi-token prediction of a loaded model: drafts per step (0: off) and what it measured.
    With `auto`, the process's first AUTO_PLAIN decode steps run plain and are timed, the next
    AUTO_STEPS with MTP; MTP stays on if its tokens per second beat the plain steps' (verifying
    several positions costs more than one step, the more so when experts come from disk: the routed
    experts of every position are read)."""
    k: int
    auto: bool = False
    draft_rows: int | None = None  # the head's rows the drafts come from (None: all)
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    seconds: float = 0.0
    plain_steps: int = 0
    plain_seconds: float = 0.0
    draft_misses: int = 0  # steps whose first drafted position held a token past draft_rows

    def step(self, drafted: int, accepted: int, seconds: float, first: int | None = None) -> None:
        """A step's drafts, how many were kept, its seconds, and the main model's token at the
        first drafted position (`first`)."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.seconds += seconds
        if self.draft_rows is not None and first is not None and first >= self.draft_rows:
            self.draft_misses += 1
            if self.steps >= DRAFT_MISS_STEPS and self.draft_misses > DRAFT_MISS_MAX * self.steps:
                self.draft_rows = None  # this text's tokens lie past the draft vocabulary too often
        if self.auto and self.steps == AUTO_STEPS:
            self.auto = False
            # MTP steps begin only once AUTO_PLAIN plain steps were timed (measuring_plain)
            keep = self.plain_seconds <= 0 or \
                (self.steps + self.accepted) / self.seconds > self.plain_steps / self.plain_seconds
            self.k = self.k if keep else 0

    def measuring_plain(self) -> bool:
        return self.auto and self.steps == 0 and self.plain_steps < AUTO_PLAIN

    def plain_step(self, seconds: float) -> None:
        self.plain_steps += 1
        self.plain_seconds += seconds

    def stats(self) -> dict:
        return {"mtp_drafts": self.k, "mtp_steps": self.steps,
                "mtp_acceptance": round(self.accepted / self.drafted, 3) if self.drafted else None,
                "mtp_tokens_per_step": round((self.steps + self.accepted) / self.steps, 3) if self.steps else None}


def mtp_mode(value: str | int | None) -> tuple[int, bool]:
    """--mtp auto|off|N -> (drafts per step, auto)."""
    v = "off" if value is None else str(value).strip().lower()
    if v == "off":
        return 0, False
    if v == "auto":
        return 1, True
    if v.isdigit() and 1 <= int(v) <= MTP_MAX:
        return int(v), False
    raise EdgeseekError(f"--mtp {value!r}: expected auto, off or a number of drafts from 1 to {MTP_MAX}")


GPU_RESERVE = 1 << 30  # VRAM left free by default: other programs, the CUDA context's growth, fragmentation


def resolve_device(device: str | None) -> str:
    """"cpu" or "cuda" for a --device value: auto is the GPU when a usable NVIDIA GPU and the cuda
    extra are there. Asking for cuda where it cannot run is one line saying why."""
    device = (device or "auto").lower()
    if device not in DEVICES:
        raise EdgeseekError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cpu":
        return "cpu"
    from .backends.cuda import probe
    reason = probe()
    if reason is None:
        return "cuda"
    if device == "cuda":
        raise EdgeseekError(f"--device cuda: {reason}")
    return "cpu"


def _collector_paused(f):
    """Python's cyclic garbage collector off while `f` runs: a load makes tens of thousands of
    objects (the packed cache's index and views, the layers), and each full collection they set off
    walks every object numba's compiler has made as well, 0.15-0.2 s of a 1.2 s load; what a load
    leaves behind is freed by reference counts, or by the next collection after it."""
    @functools.wraps(f)
    def paused(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return f(*args, **kwargs)
        finally:
            if was:
                gc.enable()
    return paused


def verification_counts(used: int, heads: int) -> tuple[int, ...]:
    """The matmul_many counts of a speculative verification of 2-4 tokens, which load compiles where
    MTP is on: the (token, expert) pairs (down; gate and up together) and the (token, head) pairs of
    MLA's per-head products."""
    return (tuple(n * used * t for n in (1, 2) for t in range(2, FEW_TOKENS + 1))
            + tuple(heads * t for t in range(2, FEW_TOKENS + 1) if 0 < heads * t <= MANY_PAIRS))


@_collector_paused
def load(path: str | os.PathLike, n_ctx: int = 4096, expert_store=None, ram_budget: int | str | None = None,
         io_threads: int = IO_THREADS, use_profile: bool = True, on_compile=None, device: str | None = "auto",
         gpu_budget: int | str | None = None, backend=None, mtp: str | int | None = "auto") -> Engine:
    """Open a GGUF model file. Weights stay memory-mapped; nothing is read until it is used.

    With `ram_budget` (bytes, or a size such as "4G"), routed experts are read from the file on
    demand into a cache that, with everything else the model keeps resident, stays inside the
    budget; the non-expert weights are packed now. A budget too small for the resident part is
    refused here, before any weight is read. The expert-usage profile saved by earlier runs (in the
    user's cache directory) warms and pins the cache unless `use_profile` is False.

    The numba kernels of the file's formats are compiled here, or loaded from numba's cache;
    `on_compile(message)` is called when they must be compiled (the first run after an install).

    `device` "cuda" puts the model on the GPU (edgeseek/backends/cuda.py): everything but the routed
    experts, then as many experts as `gpu_budget` leaves (default: the free VRAM less a reserve),
    hottest first; the rest run on the CPU from the store above. "auto" picks the GPU when one can be
    used. `backend` replaces the device's backend (tests run the CUDA backend's logic on numpy).

    `mtp` ("auto", "off" or 1-3 drafts per step) turns on self-speculative decoding with the file's
    multi-token-prediction block (DeepSeek-V3's nextn layer): with a number, a file without a
    usable block is an error naming the tensor; with auto, a note, and MTP stays off.
    """
    t0 = time.perf_counter()
    mtp_k, mtp_auto = mtp_mode(mtp)
    gguf = GGUFFile(path)
    if gguf.meta("general.type", None) == "adapter":
        raise EdgeseekError(f"{path}: a LoRA adapter, not a model: give the base model's file and this one "
                            f"with --lora")
    notes: list[str] = []
    if mtp_k and not (gguf.arch == "deepseek2" and gguf.arch_meta("nextn_predict_layers", 0)):
        if not mtp_auto:
            raise EdgeseekError(f"--mtp {mtp}: {path} has no multi-token-prediction layer "
                                f"('{gguf.arch}.nextn_predict_layers' is absent or 0)")
        mtp_k = 0
    device = backend.device if backend is not None else resolve_device(device)
    plan = gpu_plan = None
    if ram_budget is not None and expert_store is None:
        plan = plan_for(gguf, ram_budget, n_ctx, io_threads)
    if device == "cuda":
        if backend is None:
            from .backends.cuda import CUDABackend
            backend = CUDABackend()
        gpu_plan = _gpu_plan(gguf, backend, gpu_budget, n_ctx, use_profile)
    backend = backend or CPUBackend()
    cpu_types = {t.qtype for t in gguf.tensors.values()}
    if gpu_plan is not None:  # the CPU computes only the routed experts left out of VRAM
        cpu_types = {t.qtype for t in gguf.tensors.values() if "_exps." in t.name} \
            if gpu_plan.experts_on_gpu < gpu_plan.experts_total else set()
    # before the expert store, whose warm-up from the usage profile packs experts already
    used = gguf.arch_meta("expert_used_count", 0)
    if not 0 < used <= gguf.arch_meta("expert_count", 0):
        used = 0  # not compiled for: the model's reading of the metadata says what is wrong with it
    heads = gguf.arch_meta("attention.head_count") \
        if gguf.arch == "deepseek2" and gguf.has("blk.0.attn_k_b.weight") and device == "cpu" else 0
    # matmul_many: a decode step's experts (gate and up in one call, then down), MLA's heads
    many = (used, 2 * used, heads) if heads else (used, 2 * used)
    if gguf.arch_meta("nextn_predict_layers", 0) and mtp != "off" and used:
        many += verification_counts(used, heads)
    kernels.prepare(cpu_types, many, notify=on_compile, extra=backend.warmup)
    if expert_store is None and gguf.arch_meta("expert_count", 0):
        expert_store = _expert_store(gguf, plan, io_threads, use_profile)
        if gpu_plan is not None:
            from .backends.cuda import TieredExperts
            expert_store = TieredExperts(backend, gguf, expert_store, gpu_plan)
    model = load_model(gguf, backend, expert_store, n_ctx)
    mtp_state = None
    if mtp_k:
        try:
            model.load_mtp(gguf)
            mtp_state = MTP(mtp_k, mtp_auto, model.draft_rows(model.config.vocab_size // DRAFT_SHARE))
        except GGUFError as e:
            if not mtp_auto:
                raise
            notes.append(f"multi-token prediction off: {e}")
    tokenizer = Tokenizer.from_gguf(gguf)
    if tokenizer.vocab_size != model.config.vocab_size:  # ids of one would index past the other
        raise GGUFError(f"{path}: tokenizer.ggml.tokens has {tokenizer.vocab_size} tokens, but the model's "
                        f"vocabulary (token_embd.weight) has {model.config.vocab_size}")
    template = ChatTemplate.from_gguf(gguf) if gguf.meta("tokenizer.chat_template", None) else None
    n_ctx = min(n_ctx, model.config.context_length or n_ctx)
    if n_ctx < 1:
        raise EdgeseekError(f"{path}: context length must be positive, got {n_ctx}")
    if plan is not None:
        model.pack(gguf)  # the resident weights in the kernel layout now; their file pages released
    elif device == "cpu" and backend.device == "cpu":
        from . import packed_cache
        note = packed_cache.attach(model, gguf, on_compile)
        if note:
            notes.append(note)
    elif gpu_plan is not None and gpu_plan.experts_on_gpu < gpu_plan.experts_total:
        from . import packed_cache  # the CPU's experts from the cache a CPU load of the file built
        packed_cache.attach(model, gguf, build=False)
        expert_store.pack_cpu()  # those the cache did not give, packed now
    kernels.one_blas_thread()  # last: loading may have brought in another BLAS (numba loads scipy's)
    return Engine(Path(path), gguf, model, tokenizer, template, n_ctx, time.perf_counter() - t0, plan, expert_store,
                  device, backend.name() if device == "cuda" else "CPU", gpu_plan, backend, mtp_state, notes)


def _gpu_plan(gguf, backend, gpu_budget, n_ctx: int, use_profile: bool) -> GPUPlan:
    """The VRAM plan: checked against the budget (and the GPU's free memory) before any weight is read."""
    free, total = backend.memory()
    budget = parse_size(gpu_budget) if gpu_budget is not None else max(0, free - GPU_RESERVE)
    if budget > free:
        raise EdgeseekError(f"--gpu-budget {format_size(budget)} is more than the {format_size(free)} free on "
                            f"{backend.name()} ({format_size(total)} in all)")
    m = gguf.arch_meta
    profile = None
    if use_profile and m("expert_count", 0):
        profile = load_profile(profile_path(gguf), m("block_count"), m("expert_count"))
    return plan_gpu(gguf, budget, n_ctx, profile)


def _expert_store(gguf, plan: BudgetPlan | None, io_threads: int, use_profile: bool) -> ExpertStore:
    """The whole file mapped; or, with a budget plan, a cache of experts read on demand, warmed and
    pinned by the saved usage profile."""
    m = gguf.arch_meta
    shape = (gguf, m("block_count"), m("expert_count"), m("embedding_length"), m("expert_feed_forward_length"))
    if plan is None:
        return MmapExpertStore(*shape)
    profile = load_profile(profile_path(gguf), m("block_count"), m("expert_count")) if use_profile else None
    return CachedExpertStore(*shape, plan.expert_cache, io_threads=io_threads, profile=profile,
                             budget_bytes=plan.budget, reserve_bytes=plan.io_buffers + WORKSPACE)

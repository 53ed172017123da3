"""Expert stores: where a routed expert's weights come from. The MoE math only asks a store for
the experts of one layer, and takes them in the order the store can serve them.

`MmapExpertStore` serves every expert straight from the memory-mapped GGUF file (llama.cpp's way:
the page cache decides what stays in RAM). `CachedExpertStore` runs models larger than RAM: it holds
a bounded cache of experts in the kernel layout and reads every other expert from the file when a
router chooses it, several reads in flight at once (a pool of threads doing `os.pread`), while the
experts already in RAM are computed. Its policy is frequency with exponential aging, with the
experts a saved usage profile ranks highest pinned; an expert-usage profile is counted as it runs.
"""
from __future__ import annotations

import heapq
import json
import mmap
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseek.quantize import QMatrix, get_format
from edgeseek.quantize.matrix import packed_nbytes

from .errors import BudgetError, EdgeseekError, GGUFError, UnsupportedError

KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
DIRECT_ALIGN = 4096  # O_DIRECT offsets and sizes: multiples of the logical block size


class ExpertStore:
    """The interface: (gate, up, down) QMatrix triples for the given experts of one layer.

    Every store counts how often each expert is chosen (`counts`, layers x experts) and adds the
    counts to the model's usage profile in the user's cache directory on `save_profile()` / `close()`.
    """

    resident = True  # every expert lives in the mapped file: pack_all may pack them all
    counts: np.ndarray | None = None
    profile_file: Path | None = None

    def save_profile(self) -> None:
        if self.profile_file is None or self.counts is None or not self.counts.any():
            return
        old = load_profile(self.profile_file, *self.counts.shape)
        counts = self.counts + (old if old is not None else 0)
        self.profile_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.profile_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"model": str(getattr(self, "path", "")), "tokens": int(counts.sum()),
                                   "counts": counts.tolist()}))
        os.replace(tmp, self.profile_file)
        self.counts[:] = 0  # saved: the next save adds only what came since

    def close(self) -> None:
        self.save_profile()

    def experts(self, layer: int, ids: np.ndarray) -> list[tuple[QMatrix, QMatrix, QMatrix]]:
        raise NotImplementedError

    def fetch(self, layer: int, ids: np.ndarray):
        """(j, triple) for expert ids[j], in the order they are ready: a store that reads from disk
        yields the experts it holds first and the others as their reads complete."""
        yield from enumerate(self.experts(layer, ids))

    def fetch_groups(self, layer: int, ids: np.ndarray):
        """Lists of (j, triple) that are ready together: everything at once here; a store that
        reads from disk gives the experts it holds as one list, then each other as it lands."""
        yield list(self.fetch(layer, ids))

    def prefetch(self, layer: int, ids: np.ndarray) -> None:
        """A hint: these experts of `layer` are likely next. Stores that read from disk may start."""

    def stats(self) -> dict:
        return {}


def _expert_tensors(gguf, layer: int, n_expert: int, n_embd: int, n_ff_exp: int):
    shapes = {"ffn_gate_exps": (n_expert, n_ff_exp, n_embd), "ffn_up_exps": (n_expert, n_ff_exp, n_embd),
              "ffn_down_exps": (n_expert, n_embd, n_ff_exp)}  # numpy order (E, out, in)
    tensors = [gguf.tensor(f"blk.{layer}.{kind}.weight", shape) for kind, shape in shapes.items()]
    for t in tensors:
        try:
            get_format(t.qtype)
        except UnsupportedError as e:
            raise UnsupportedError(f"{gguf.path}: tensor {t.name!r}: {e}") from None
    return tensors


class MmapExpertStore(ExpertStore):
    """Each routed expert is one contiguous slice along axis 0 of the stacked ffn_{gate,up,down}_exps
    tensors; its QMatrix (and its repacked layout) is built on first use and kept."""

    def __init__(self, gguf, n_expert: int, n_embd: int, n_ff_exp: int, n_layer: int = 0,
                 profile_file: Path | None = None):
        self.gguf, self.path = gguf, gguf.path
        self.n_expert = n_expert
        self.n_embd, self.n_ff_exp = n_embd, n_ff_exp
        self._cache: dict[tuple[int, int], tuple[QMatrix, QMatrix, QMatrix]] = {}
        for i in range(n_layer):  # shapes and types checked now, not at a layer's first token
            if gguf.has(f"blk.{i}.ffn_gate_exps.weight"):
                _expert_tensors(gguf, i, n_expert, n_embd, n_ff_exp)
        self.counts = np.zeros((n_layer, n_expert), np.int64) if n_layer else None
        self.profile_file = profile_file

    def stats(self) -> dict:
        return {"resident_bytes": resident_set_bytes()}

    def experts(self, layer: int, ids: np.ndarray):
        result = []
        tensors = None
        if self.counts is not None:
            np.add.at(self.counts[layer], ids, 1)
        for e in ids.tolist():
            key = (layer, e)
            triple = self._cache.get(key)
            if triple is None:
                if not 0 <= e < self.n_expert:
                    raise GGUFError(f"layer {layer}: expert {e} out of range [0, {self.n_expert})")
                tensors = tensors or _expert_tensors(self.gguf, layer, self.n_expert, self.n_embd, self.n_ff_exp)
                triple = tuple(QMatrix(t.qtype, t.raw[e], t.shape[1:], f"{t.name}[{e}]") for t in tensors)
                self._cache[key] = triple
            result.append(triple)
        return result


# --- sizes -------------------------------------------------------------------------------------

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


# --- the RAM budget ----------------------------------------------------------------------------

# Packed layouts hold scales as float32 and pad tiles: at most this much more than the file's bytes.
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


# --- the cached store ----------------------------------------------------------------------------


def profile_path(gguf) -> Path:
    """Where the expert-usage profile of this model file is kept (the user's cache directory)."""
    root = Path(os.environ.get("EDGESEEK_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                               / "edgeseek"))
    size = gguf.path.stat().st_size
    return root / "profiles" / f"{gguf.path.stem}-{size}.json"


def load_profile(path: Path, n_layer: int, n_expert: int) -> np.ndarray | None:
    """The saved usage counts (n_layer, n_expert), or None when there is none for this shape."""
    try:
        data = json.loads(path.read_text())
        counts = np.array(data["counts"], np.int64)
    except (OSError, ValueError, KeyError):
        return None
    return counts if counts.shape == (n_layer, n_expert) else None


class AgingFrequency:
    """Eviction by frequency with exponential aging: an expert's score is the sum over its uses of
    decay^(tokens since that use), so a burst of use fades and steady use stays. Kept in the
    order-preserving form sum g^-t (g = decay, t the token of each use), which never needs
    rescoring as tokens pass; a heap of (score, key) with stale entries skipped finds the lowest."""

    def __init__(self, decay: float = 0.98):
        self.growth = 1.0 / decay
        self.boost = 1.0  # g^-now
        self.score: dict = {}
        self.heap: list = []

    def use(self, key, cached: bool) -> None:
        s = self.score.get(key, 0.0) + self.boost
        self.score[key] = s
        if cached:
            heapq.heappush(self.heap, (s, key))

    def head_start(self, key, value: float) -> None:
        self.score[key] = value

    def admit(self, key) -> None:
        heapq.heappush(self.heap, (self.score.get(key, 0.0), key))

    def victim(self, cached, keep: set):
        """The cached key of lowest score outside `keep`, or None."""
        skipped, found = [], None
        while self.heap:
            s, key = heapq.heappop(self.heap)
            if key not in cached or s != self.score.get(key, 0.0):
                continue  # stale entry
            if key in keep:
                skipped.append((s, key))
                continue
            found = key
            break
        for item in skipped:
            heapq.heappush(self.heap, item)
        return found

    def tick(self, cached) -> None:
        self.boost *= self.growth
        if self.boost > 1e100:  # renormalize; the order of scores is unchanged
            scale = 1.0 / self.boost
            self.score = {k: v * scale for k, v in self.score.items()}
            self.heap = [(self.score[k], k) for k in cached]
            heapq.heapify(self.heap)
            self.boost = 1.0


class LeastRecentlyUsed:
    """Plain LRU, the baseline the aging policy is measured against (bench/bench_policy.py)."""

    def __init__(self):
        from collections import OrderedDict
        self.order = OrderedDict()

    def use(self, key, cached: bool) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def head_start(self, key, value: float) -> None:
        pass

    def admit(self, key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def victim(self, cached, keep: set):
        for key in self.order:
            if key in cached and key not in keep:
                del self.order[key]
                return key
        return None

    def tick(self, cached) -> None:
        pass


class _ExpertRead:
    """The pending reads of one expert's gate, up and down matrices."""

    def __init__(self, futures: list[Future]):
        self.futures = futures

    def result(self) -> list[np.ndarray]:
        return [f.result() for f in self.futures]

    def cancel(self) -> None:
        for f in self.futures:
            f.cancel()


class CachedExpertStore(ExpertStore):
    """Routed experts read from the GGUF file on demand into a cache of at most `capacity_bytes`.

    Reads go through a pool of `io_threads` threads (os.pread releases the GIL, so reads overlap each
    other and the computation); the caller packs each expert into the kernel layout as it consumes
    it. Eviction: the lowest score, score = sum over uses of decay^(age in tokens), never a pinned
    expert nor one the current layer is using. `prefetch` starts reads of likely experts of a coming
    layer, at most `prefetch_cap` in flight.
    """

    resident = False

    def __init__(self, gguf, n_layer: int, n_expert: int, n_embd: int, n_ff_exp: int, capacity_bytes: int, *,
                 io_threads: int = 8, decay: float = 0.98, pin_fraction: float = 0.5,
                 profile: np.ndarray | None = None, profile_file: Path | None = None,
                 prefetch_cap: int = 12, drop_page_cache: bool = True, budget_bytes: int | None = None,
                 reserve_bytes: int = 0, direct_io: bool = True, policy=None):
        self.gguf, self.path = gguf, gguf.path
        self.n_layer, self.n_expert = n_layer, n_expert
        self.tensors = {}
        for i in range(n_layer):
            if gguf.has(f"blk.{i}.ffn_gate_exps.weight"):
                self.tensors[i] = _expert_tensors(gguf, i, n_expert, n_embd, n_ff_exp)
        self.fd = os.open(self.path, os.O_RDONLY)
        self.file_size = os.fstat(self.fd).st_size
        self.fd_direct = None
        if direct_io and hasattr(os, "O_DIRECT"):
            try:
                self.fd_direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                pass  # tmpfs and some file systems have no O_DIRECT
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="edgeseek-io")
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self.cache: dict[tuple[int, int], tuple[QMatrix, QMatrix, QMatrix]] = {}
        self.pending: dict[tuple[int, int], _ExpertRead] = {}
        self.prefetched: set[tuple[int, int]] = set()
        self.prefetch_cap = prefetch_cap
        self.capacity_bytes = capacity_bytes
        # With a whole-process budget, the capacity follows the measured resident set each token:
        # budget - (RSS - the cache's own bytes) - reserve (read buffers, working memory).
        self.budget_bytes, self.reserve_bytes = budget_bytes, reserve_bytes
        self.expert_bytes = 0  # one expert packed; measured on the first one
        self.bytes_cached = 0
        self.policy = policy or AgingFrequency(decay)
        self.pinned: set[tuple[int, int]] = set()
        self.counts = np.zeros((n_layer, n_expert), np.int64)
        self.profile_file = profile_file
        self.n_hit = self.n_miss = self.n_prefetch = self.n_prefetch_used = 0
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.tokens = 0
        self._first_moe = min(self.tensors) if self.tensors else 0
        if profile is not None:
            self.warm(profile, pin_fraction)

    # -- reading ----------------------------------------------------------------------------------

    def _read_one(self, t, e: int) -> np.ndarray:
        """Expert e's rows of the stacked tensor t: (rows, row_bytes) uint8. Runs on a pool thread."""
        t0 = time.perf_counter()
        n = t.n_bytes // self.n_expert
        raw = self._pread(t.offset + e * n, n, f"{t.name} expert {e}").reshape(t.raw.shape[1:])
        self.read_seconds += time.perf_counter() - t0
        return raw

    def _read(self, layer: int, e: int) -> list[np.ndarray]:
        """The file bytes of expert e of `layer`: three (rows, row_bytes) uint8 arrays."""
        return [self._read_one(t, e) for t in self.tensors[layer]]

    def _pread(self, off: int, n: int, what: str) -> np.ndarray:
        """n bytes at off. With O_DIRECT the read goes from the disk straight into a page-aligned
        anonymous buffer: no page-cache copy to reclaim (under a memory limit, reclaiming it is what
        stalls a reader) and no second copy of the bytes; else a plain pread, then the page cache
        is told to drop what was read."""
        if self.fd_direct is not None:
            start = off // DIRECT_ALIGN * DIRECT_ALIGN
            size = -(-(off + n - start) // DIRECT_ALIGN) * DIRECT_ALIGN
            buf = mmap.mmap(-1, size)
            try:
                self._fill(self.fd_direct, memoryview(buf), start, what, min(size, self.file_size - start))
                return np.frombuffer(buf, np.uint8, count=n, offset=off - start)
            except OSError:
                self.fd_direct = None  # the file system refuses O_DIRECT after all: plain reads from now on
        buf = bytearray(n)
        self._fill(self.fd, memoryview(buf), off, what, n)
        if self.drop_page_cache:
            os.posix_fadvise(self.fd, off, n, os.POSIX_FADV_DONTNEED)
        return np.frombuffer(buf, np.uint8)

    def _fill(self, fd: int, view: memoryview, off: int, what: str, need: int) -> None:
        done = 0
        while done < need:
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                raise GGUFError(f"{self.path}: short read of {what} at byte {off + done} (file truncated?)")
            done += got

    def _start(self, key: tuple[int, int]) -> "_ExpertRead":
        """The reads of an expert's three matrices, each on its own pool thread."""
        f = self.pending.get(key)
        if f is None:
            layer, e = key
            f = self.pending[key] = _ExpertRead([self.pool.submit(self._read_one, t, e) for t in self.tensors[layer]])
        return f

    def _pack(self, key: tuple[int, int], raws: list[np.ndarray]) -> tuple[QMatrix, QMatrix, QMatrix]:
        layer, e = key
        triple = tuple(QMatrix.from_packed(t.qtype, QMatrix(t.qtype, r, t.shape[1:]).packed, t.shape[1:],
                                           f"{t.name}[{e}]") for t, r in zip(self.tensors[layer], raws))
        self.bytes_read += sum(r.nbytes for r in raws)
        if not self.expert_bytes:
            self.expert_bytes = sum(m.resident_bytes for m in triple)
        return triple

    # -- the policy ---------------------------------------------------------------------------------

    def _use(self, key: tuple[int, int]) -> None:
        self.policy.use(key, key in self.cache)

    def _insert(self, key, triple, in_use: set) -> None:
        size = sum(m.resident_bytes for m in triple)
        while self.bytes_cached + size > self.capacity_bytes and self._evict(in_use):
            pass
        if self.bytes_cached + size > self.capacity_bytes:
            return  # everything left is pinned or in use: serve this one without keeping it
        self.cache[key] = triple
        self.bytes_cached += size
        self.policy.admit(key)

    def _evict(self, in_use: set) -> bool:
        key = self.policy.victim(self.cache, in_use | self.pinned)
        if key is None:
            return False
        triple = self.cache.pop(key)
        self.bytes_cached -= sum(m.resident_bytes for m in triple)
        return True

    def _fit_budget(self) -> None:
        rss = resident_set_bytes("RssAnon")  # mapped-file pages are reclaimable: not counted
        floor = self.expert_bytes * 8  # never below a layer's worth of experts (refused at load otherwise)
        self.capacity_bytes = max(floor, self.budget_bytes - (rss - self.bytes_cached) - self.reserve_bytes)
        while self.bytes_cached > self.capacity_bytes and self._evict(set()):
            pass

    def _advance(self) -> None:
        """One token passed: later uses weigh 1/decay times more than earlier ones."""
        if self.budget_bytes is not None:
            self._fit_budget()
        self.tokens += 1
        self.policy.tick(self.cache)
        if self.profile_file is not None and self.tokens % 256 == 0:
            self.save_profile()

    # -- the interface ----------------------------------------------------------------------------

    def experts(self, layer: int, ids: np.ndarray):
        out = [None] * len(ids)
        for j, triple in self.fetch(layer, ids):
            out[j] = triple
        return out

    def fetch(self, layer: int, ids: np.ndarray):
        for group in self.fetch_groups(layer, ids):
            yield from group

    def fetch_groups(self, layer: int, ids: np.ndarray):
        if layer not in self.tensors:
            raise GGUFError(f"{self.path}: layer {layer} has no routed experts")
        keys = [(layer, int(e)) for e in ids.tolist()]
        for _, e in keys:
            if not 0 <= e < self.n_expert:
                raise GGUFError(f"layer {layer}: expert {e} out of range [0, {self.n_expert})")
        if layer == self._first_moe:
            self._advance()
        in_use = set(keys)
        ready, waiting = [], []
        for j, key in enumerate(keys):
            self.counts[key] += 1
            self._use(key)
            if key in self.cache:
                self.n_hit += 1
                ready.append(j)
            else:
                self.n_miss += 1
                if key in self.prefetched:
                    self.n_prefetch_used += 1
                waiting.append((j, self._start(key)))
        if ready:  # computed while the reads run
            yield [(j, self.cache[keys[j]]) for j in ready]
        for j, f in waiting:
            raws = f.result()
            key = keys[j]
            self.pending.pop(key, None)
            self.prefetched.discard(key)
            triple = self._pack(key, raws)
            self._insert(key, triple, in_use)
            yield [(j, triple)]
        self._drop_stale_prefetches(layer)

    def prefetch(self, layer: int, ids: np.ndarray) -> None:
        if layer not in self.tensors:
            return
        for e in ids.tolist():
            key = (layer, int(e))
            if key in self.cache or key in self.pending:
                continue
            if len(self.prefetched) >= self.prefetch_cap:
                return
            self.n_prefetch += 1
            self.prefetched.add(key)
            self._start(key)

    def _drop_stale_prefetches(self, layer: int) -> None:
        # prefetches for this layer that the router did not choose: their reads are wasted
        for key in [k for k in self.prefetched if k[0] == layer]:
            self.prefetched.discard(key)
            f = self.pending.pop(key, None)
            if f is not None:
                f.cancel()

    def warm(self, profile: np.ndarray, pin_fraction: float = 0.5) -> int:
        """Read the most used experts of a saved profile into the cache (all reads in flight
        together) and pin the top `pin_fraction` of the cache; returns how many were loaded."""
        order = np.argsort(-profile, axis=None, kind="stable")
        keys = [(int(i // self.n_expert), int(i % self.n_expert)) for i in order
                if profile.flat[i] > 0 and int(i // self.n_expert) in self.tensors]
        if not keys:
            return 0
        first = self._pack(keys[0], self._read(*keys[0]))
        per = sum(m.resident_bytes for m in first)
        n = min(len(keys), self.capacity_bytes // per)
        n_pin = int(n * pin_fraction)
        futures = [(key, self._start(key)) for key in keys[1:n]]
        total = float(profile.sum())
        for idx, (key, f) in enumerate([(keys[0], None)] + futures):
            self.policy.head_start(key, float(profile[key]) / total)  # below one real use
            raws = None if f is None else f.result()
            self.pending.pop(key, None)
            self._insert(key, first if f is None else self._pack(key, raws), set())
            if idx < n_pin:
                self.pinned.add(key)
        self.bytes_read = 0  # reads of the warm-up are not per-token traffic
        return n

    def stats(self) -> dict:
        n = self.n_hit + self.n_miss
        return {
            "expert_hit_rate": self.n_hit / n if n else 0.0,
            "expert_hits": self.n_hit,
            "expert_misses": self.n_miss,
            "bytes_read": self.bytes_read,
            "bytes_read_per_token": self.bytes_read / self.tokens if self.tokens else 0.0,
            "read_seconds": self.read_seconds,
            "prefetch_issued": self.n_prefetch,
            "prefetch_accuracy": self.n_prefetch_used / self.n_prefetch if self.n_prefetch else 0.0,
            "experts_cached": len(self.cache),
            "expert_cache_bytes": self.bytes_cached,
            "expert_cache_capacity": self.capacity_bytes,
            "pinned": len(self.pinned),
            "resident_bytes": resident_set_bytes(),
            "anonymous_bytes": resident_set_bytes("RssAnon"),
        }

    def close(self) -> None:
        self.save_profile()
        self.pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)
        if self.fd_direct is not None:
            os.close(self.fd_direct)


# --- the profile's colours in the terminal heatmap (the PNG figure: plot.py) -------------------


def heat_rgb(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> (..., 3) uint8 colours from dark blue through red to yellow."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    stops = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float64)
    x = v * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = x - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)

"""Expert stores: where a routed expert's weights come from. The MoE math only asks a store for
the experts of one layer, and takes them in the order the store can serve them. The engine builds
the store; the model only calls it.

`MmapExpertStore` serves every expert straight from the memory-mapped GGUF file (llama.cpp's way:
the page cache decides what stays in RAM). `CachedExpertStore` runs models larger than RAM: it holds
a bounded cache of experts in the kernel layout and reads every other expert from the file when a
router chooses it, several reads in flight at once (a pool of threads doing `os.pread`), while the
experts already in RAM are computed. Its eviction policy is policy.py's; the experts a saved usage
profile ranks highest are pinned. Every store counts the router's choices for the usage profile
(profile.py), which the engine saves.
"""
from __future__ import annotations

import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from edgeseek.quantize import QMatrix, get_format

from .budget import KINDS, resident_set_bytes
from .errors import GGUFError, UnsupportedError
from .policy import AgingFrequency

DIRECT_ALIGN = 4096  # O_DIRECT offsets and sizes: multiples of the logical block size


class ExpertStore:
    """The interface: (gate, up, down) QMatrix triples for the given experts of one layer.

    The model calls `begin_step()` once per forward pass (the token boundary: aging, the budget's
    refit) and `count(layer, ids)` with every choice of the router; `counts` (layers x experts)
    is what the engine adds to the usage profile.
    """

    counts: np.ndarray

    def begin_step(self) -> None:
        """A forward pass begins (one token of decode, or a prompt's tokens together)."""

    def count(self, layer: int, ids: np.ndarray) -> None:
        """The router's choices of one layer, (T, k) expert ids, for the usage profile."""
        self.counts[layer] += np.bincount(np.asarray(ids).reshape(-1), minlength=len(self.counts[layer])) \
            .astype(self.counts.dtype, copy=False)  # (np.add.at: several times the cost on a decode step's few)

    def take_counts(self) -> np.ndarray:
        """The counts since the last call, and reset them."""
        counts = self.counts.copy()
        self.counts[:] = 0
        return counts

    def close(self) -> None:
        pass

    def pack(self, gguf=None) -> int:
        """Put every expert this store keeps resident into the kernel layout now (else each is
        packed on first use); with the GGUFFile, release their file pages. Bytes packed."""
        return 0

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


def expert_tensors(gguf, layer: int, n_expert: int, n_embd: int, n_ff_exp: int):
    """The stacked gate, up and down tensors of a layer's routed experts, shapes and types checked."""
    shapes = {"ffn_gate_exps": (n_expert, n_ff_exp, n_embd), "ffn_up_exps": (n_expert, n_ff_exp, n_embd),
              "ffn_down_exps": (n_expert, n_embd, n_ff_exp)}  # numpy order (E, out, in)
    tensors = [gguf.tensor(f"blk.{layer}.{kind}.weight", shape) for kind, shape in shapes.items()]
    for t in tensors:
        try:
            get_format(t.qtype)
        except UnsupportedError as e:
            raise UnsupportedError(f"{gguf.path}: tensor {t.name!r}: {e}") from None
    return tensors


def moe_layers(gguf, n_layer: int, n_expert: int, n_embd: int, n_ff_exp: int) -> dict:
    """layer -> its expert tensors, for every layer that has routed experts."""
    return {i: expert_tensors(gguf, i, n_expert, n_embd, n_ff_exp) for i in range(n_layer)
            if gguf.has(f"blk.{i}.{KINDS[0]}.weight")}


class MmapExpertStore(ExpertStore):
    """Each routed expert is one contiguous slice along axis 0 of the stacked ffn_{gate,up,down}_exps
    tensors; its QMatrix (and its repacked layout) is built on first use and kept."""

    def __init__(self, gguf, n_layer: int, n_expert: int, n_embd: int, n_ff_exp: int):
        self.path = gguf.path
        self.n_expert = n_expert
        self.tensors = moe_layers(gguf, n_layer, n_expert, n_embd, n_ff_exp)  # checked now, not at first use
        self._cache: dict[tuple[int, int], tuple[QMatrix, QMatrix, QMatrix]] = {}
        self.counts = np.zeros((n_layer, n_expert), np.int64)

    def stats(self) -> dict:
        return {"resident_bytes": resident_set_bytes()}

    def pack(self, gguf=None) -> int:
        total = 0
        for layer, tensors in self.tensors.items():
            for triple in self.experts(layer, np.arange(self.n_expert)):
                for m in triple:
                    m.packed  # noqa: B018  (builds and keeps the layout)
                    total += m.nbytes
            if gguf is not None:
                for t in tensors:
                    gguf.release_pages(t)
        return total

    def experts(self, layer: int, ids: np.ndarray):
        result = []
        for e in ids.tolist():
            key = (layer, e)
            triple = self._cache.get(key)
            if triple is None:
                if not 0 <= e < self.n_expert:
                    raise GGUFError(f"layer {layer}: expert {e} out of range [0, {self.n_expert})")
                triple = tuple(QMatrix(t.qtype, t.raw[e], t.shape[1:], f"{t.name}[{e}]") for t in self.tensors[layer])
                self._cache[key] = triple
            result.append(triple)
        return result


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
                 profile: np.ndarray | None = None,
                 prefetch_cap: int = 12, drop_page_cache: bool = True, budget_bytes: int | None = None,
                 reserve_bytes: int = 0, direct_io: bool = True, policy=None):
        self.path = gguf.path
        self.n_layer, self.n_expert = n_layer, n_expert
        self.tensors = moe_layers(gguf, n_layer, n_expert, n_embd, n_ff_exp)
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
        self.n_hit = self.n_miss = self.n_prefetch = self.n_prefetch_used = 0
        self.bytes_read = 0
        self.read_seconds = 0.0
        self.tokens = 0
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

    def begin_step(self) -> None:
        """One forward pass: later uses weigh 1/decay times more than earlier ones; with a budget,
        the cache's capacity follows the measured resident set."""
        if self.budget_bytes is not None:
            self._fit_budget()
        self.tokens += 1
        self.policy.tick(self.cache)

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
        in_use = set(keys)
        ready, waiting = [], []
        for j, key in enumerate(keys):
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
        self.pool.shutdown(wait=True, cancel_futures=True)
        os.close(self.fd)
        if self.fd_direct is not None:
            os.close(self.fd_direct)

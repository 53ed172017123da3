"""The packed-weights cache: every weight of a model file in the CPU kernels' layout, written once to
one file in the user's cache directory and memory-mapped on later starts, so that loading and the
first tokens pack nothing (llama.cpp repacks at every load instead).

The file is keyed by the GGUF's identity (size, modification time and a hash of its first MiB, where
the header and tensor index live), by the kernel set of this CPU (the VNNI and portable layouts
differ) and by LAYOUT, the version of the layouts; a stale or damaged cache is ignored and rebuilt. It is written to a temporary file and
renamed at the end. Layout: the arrays one after another, 64-byte aligned, then a JSON index, its
length (8 bytes) and MAGIC.

    EDGESEEK_PACKED_CACHE=0           off
    EDGESEEK_PACKED_CACHE_MAX=20G     the most disk one model's cache may take (default: twice the file)
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from .hub import cache_dir

MAGIC = b"EDGESEEK-PACKED1"
LAYOUT = 7  # bumped when a kernel layout changes (2: Q6_K's VNNI layout holds its levels one a byte;
#              3: Q4_0 and Q8_0, 4: every VNNI layout keep the file's fp16 scales; 5: Q6_K's VNNI
#              layout in the file's 210 bytes a block again, its words in reading order; 6: Q5_K
#              gets VNNI kernels and their layout; 7: Q4_K's VNNI layout holds the mins in pairs)
ALIGN = 64


def enabled() -> bool:
    return os.environ.get("EDGESEEK_PACKED_CACHE", "1").strip().lower() not in ("0", "off", "no", "false")


def max_bytes(gguf_size: int) -> int:
    from .budget import parse_size
    value = os.environ.get("EDGESEEK_PACKED_CACHE_MAX")
    return parse_size(value) if value else 2 * gguf_size


def path_for(gguf) -> Path:
    from .quantize.simd import VNNI_KERNELS
    st = os.stat(gguf.path)
    h = hashlib.sha256()
    with open(gguf.path, "rb") as f:
        h.update(f.read(1 << 20))
    key = f"{st.st_size}-{st.st_mtime_ns}-{h.hexdigest()[:16]}-{'vnni' if VNNI_KERNELS else 'portable'}_l{LAYOUT}"
    return cache_dir() / "packed" / f"{gguf.path.stem}-{key}.pack"


class PackedFile:
    """A cache file, memory-mapped copy-on-write (the kernels take writable arrays; no page is ever
    written, so every page stays the page cache's)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        huge_pages(mapped)
        # a plain array over the mapping (it keeps the mmap as its base): views of it are made
        # without numpy.memmap's per-view bookkeeping, thousands of them at every start
        self.map = np.frombuffer(mapped, np.uint8)
        tail = bytes(self.map[-len(MAGIC) - 8:])
        if tail[8:] != MAGIC:
            raise ValueError(f"{path}: not a packed-weights cache (no end marker)")
        (n,) = struct.unpack("<Q", tail[:8])
        end = len(self.map) - len(MAGIC) - 8
        if n > end:
            raise ValueError(f"{path}: index length {n} past the file")
        self.index = json.loads(bytes(self.map[end - n:end]))

    @classmethod
    def open(cls, path: Path) -> "PackedFile | None":
        """The cache at `path`, or None where there is none or it cannot be read (then it is rebuilt)."""
        try:
            return cls(path)
        except (OSError, ValueError, struct.error):
            return None

    def get(self, name: str):
        entry = self.index.get(name)
        if entry is None:
            return None
        fields = [self._array(f) if isinstance(f, dict) else f for f in entry["fields"]]
        if entry["type"] is None:
            return fields[0]
        return _layout_type(entry["type"])(*fields)

    def _array(self, f: dict) -> np.ndarray:
        # one ndarray over the mapping: a start makes thousands of these (attach)
        dtype, shape, off = _dtype(f["dtype"]), f["shape"], f["offset"]
        if off + math.prod(shape) * dtype.itemsize > len(self.map):
            raise ValueError(f"{self.path}: an array at byte {off} runs past the file")
        return np.ndarray(shape, dtype, self.map, off)


_dtype = functools.cache(np.dtype)


@functools.cache
def _layout_type(path: str):
    """The class of a packed layout, by its dotted path in the index."""
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def huge_pages(m: mmap.mmap) -> None:
    """Ask for the mapping in 2 MiB pages (MADV_HUGEPAGE) where the kernel has transparent huge
    pages: the page cache then reads the file in 2 MiB folios and maps each with one page-table
    entry. A decode step reads ~1.5 GB scattered over a V2-Lite file's 8.8 GB; in 4 KiB pages
    the TLB misses cost a third of its speed (the Q4_0 file: 21.2-22.1 tok/s against 12.5-15.0, the
    cache's pages in memory either way). Folios the page cache already holds in 4 KiB stay so until
    they are evicted; a cache written here is in large folios from the start (buffered writes)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is not None:
        try:
            m.madvise(advice)
        except OSError:  # a kernel without transparent huge pages
            pass


def write(path: Path, items, limit: int) -> int | None:
    """(name, packed layout, kernel set) triples -> the cache file at `path`, written beside it and renamed at the
    end; the bytes written, or None (nothing left behind) where it would pass `limit`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    index: dict = {}
    try:
        with open(tmp, "wb") as raw, _ChunkWriter(raw) as f:
            for name, packed, kernels in items:
                arrays = [packed] if isinstance(packed, np.ndarray) else list(packed)
                fields = []
                for a in arrays:
                    if not isinstance(a, np.ndarray):
                        fields.append(a)  # an int (rows) or another plain value
                        continue
                    f.write(b"\0" * (-f.tell() % ALIGN))
                    fields.append({"dtype": a.dtype.str, "shape": list(a.shape), "offset": f.tell()})
                    f.write(np.ascontiguousarray(a))
                    if f.tell() > limit:
                        raise _TooLarge
                kind = None if isinstance(packed, np.ndarray) else f"{type(packed).__module__}.{type(packed).__qualname__}"
                index[name] = {"type": kind, "fields": fields, "kernels": kernels}
            blob = json.dumps(index).encode()
            f.write(blob + struct.pack("<Q", len(blob)) + MAGIC)
            size = f.tell()
        os.replace(tmp, path)
        return size
    except _TooLarge:
        tmp.unlink(missing_ok=True)
        return None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _TooLarge(Exception):
    pass


class _ChunkWriter:
    """Writes to a file in whole CHUNKs at chunk-aligned offsets (the last one shorter): the page
    cache keeps what it is given in folios of the writes' size, and 2 MiB folios, with huge_pages,
    map the cache in 2 MiB pages from its first use; the layouts' own writes (a few KiB to a few
    MiB each, at any offset) left nine tenths of a V2-Lite cache in smaller folios."""

    CHUNK = 8 << 20

    def __init__(self, f):
        self.f, self.buf, self.fill, self.pos = f, bytearray(self.CHUNK), 0, 0

    def write(self, data) -> None:
        view = memoryview(data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else data)
        while len(view):
            n = min(len(view), self.CHUNK - self.fill)
            self.buf[self.fill:self.fill + n] = view[:n]
            self.fill, self.pos, view = self.fill + n, self.pos + n, view[n:]
            if self.fill == self.CHUNK:
                self.f.write(self.buf)
                self.fill = 0

    def tell(self) -> int:
        return self.pos

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None and self.fill:
            self.f.write(memoryview(self.buf)[:self.fill])


def remove_stale(path: Path) -> None:
    """Other caches of the same model file name (an older version of the file) are removed."""
    stem = path.name.rsplit("-", 4)[0]
    for old in path.parent.glob(f"{stem}-*.pack"):
        if old != path and old.name.rsplit("-", 4)[0] == stem:
            old.unlink(missing_ok=True)


MIN_FILE = 256 << 20  # smaller files pack in well under a second at load: no cache for them


def kernel_set(fmt) -> str:
    return "vnni" if fmt.kernels is fmt.vnni else "portable"


def matrices(model):
    """(name, holder, head) for every weight the CPU kernels read in their layout: the layers' (and
    an MTP block's) matrices and per-head stacks, the output, the routed experts of a store that maps
    the whole file. head is None for a matrix, h for head h of a Heads stack."""
    from .backends.cpu import Heads
    from .expert_store import MmapExpertStore
    from .quantize import QMatrix
    layers = list(model.layers) + ([model.mtp] if getattr(model, "mtp", None) is not None else [])
    for L in layers:
        for v in vars(L).values():
            if isinstance(v, QMatrix) and v.raw is not None:
                yield v.name, v, None
            elif isinstance(v, Heads):
                for h in range(v.shape[0]):
                    yield f"{v.name}[{h}]", v, h
    if isinstance(model.output, QMatrix):
        yield model.output.name, model.output, None
    store = getattr(model, "experts", None)
    store = getattr(store, "cpu_store", store)  # a GPU model's CPU tier
    if isinstance(store, MmapExpertStore):
        for layer in store.tensors:
            for triple in store.experts(layer, np.arange(store.n_expert)):
                for m in triple:
                    yield m.name, m, None


def attach(model, gguf, notify=None, build: bool = True) -> str | None:
    """Point every weight of `model` at its layout in the cache, building the cache first where there
    is none or it is stale (with `build`; else, as for a GPU model's CPU tier, only a cache an
    earlier load built is used); -> a note for the user where it could not be written, else None."""
    size = gguf.path.stat().st_size
    if not enabled() or size < MIN_FILE:
        return None
    path = path_for(gguf)
    pf = PackedFile.open(path)
    if pf is None and not build:
        return None
    if pf is None:
        if notify is not None:
            notify(f"packing weights for this CPU into {path.parent} (first run only)")
        if write(path, _built(model), max_bytes(size)) is None:
            return "packed-weights cache not written: over EDGESEEK_PACKED_CACHE_MAX"
        remove_stale(path)
        gguf.release_pages()  # what was packed from them now comes from the cache's pages
        pf = PackedFile.open(path)
        if pf is None:
            return None
    views: dict = {}
    for name, holder, head in matrices(model):
        entry = pf.index.get(name)
        if entry is None or entry.get("kernels") != kernel_set(holder.fmt):
            continue  # packed on first use, as without a cache
        if head is None:
            holder._packed = pf.get(name)
        else:
            views.setdefault(id(holder), (holder, [None] * holder.shape[0]))[1][head] = pf.get(name)
    for holder, layouts in views.values():
        if all(v is not None for v in layouts):
            holder._packed = layouts
    return None


def _built(model):
    """Each weight's layout, packed as it is written and dropped from RAM afterwards: the cache's
    mapping takes its place."""
    for name, holder, head in matrices(model):
        yield name, (holder.packed if head is None else holder.packed[head]), kernel_set(holder.fmt)
        if head is None or head == holder.shape[0] - 1:
            holder._packed = None
            if head is None:
                holder._bound = None  # (its bound product holds the layout too)

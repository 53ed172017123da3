"""The packed-weights cache (edgeseek/packed_cache.py): built on the first load, memory-mapped on the
next, the same logits either way; rebuilt when the model file changes or the cache is damaged; not
written past its size cap; off with EDGESEEK_PACKED_CACHE=0."""
import mmap
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgeseek
from edgeseek import packed_cache
from edgeseek.gguf_file import GGUFFile

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_k_m.gguf"
TOKENS = np.array([1, 17, 300, 42, 7, 99, 5])


@pytest.fixture()
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESEEK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packed_cache, "MIN_FILE", 0)  # the fixtures are small
    path = tmp_path / "model.gguf"
    shutil.copy(FIXTURE, path)
    return path


def logits(path):
    e = edgeseek.load(path, n_ctx=32)
    return e.model.forward(TOKENS, e.model.new_cache(), all_logits=True)


def caches(tmp_path):
    return sorted((tmp_path / "cache" / "packed").glob("*.pack"))


def test_built_then_mapped_same_logits(model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESEEK_PACKED_CACHE", "0")
    plain = logits(model)
    assert caches(tmp_path) == []
    monkeypatch.delenv("EDGESEEK_PACKED_CACHE")
    first = logits(model)
    (built,) = caches(tmp_path)
    second = logits(model)
    assert caches(tmp_path) == [built]
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(second, plain)
    e = edgeseek.load(model, n_ctx=32)  # every weight, routed experts included, comes from the mapping
    mats = list(packed_cache.matrices(e.model))
    assert mats and all(h._packed is not None for _, h, _ in mats)
    assert any(isinstance(h._packed, tuple) and _mapped(h._packed[0]) for _, h, head in mats if head is None)


def _mapped(a) -> bool:
    """Whether array a is a view of a memory-mapped file."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = a.obj if isinstance(a, memoryview) else getattr(a, "base", None)  # np.frombuffer's base
    return False


def test_a_changed_model_file_gets_a_new_cache(model, tmp_path):
    logits(model)
    (old,) = caches(tmp_path)
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    logits(model)
    (new,) = caches(tmp_path)
    assert new != old  # the stale one removed


def test_a_cache_of_an_earlier_layout_version_is_replaced(model, tmp_path):
    """A cache written before the layouts' version entered the key (or by an older version) is
    never read, and goes once the current one is written."""
    logits(model)
    (current,) = caches(tmp_path)
    older = current.with_name(current.name.replace(f"_l{packed_cache.LAYOUT}.pack", ".pack"))
    current.rename(older)
    want = logits(model)
    assert caches(tmp_path) == [current]
    np.testing.assert_array_equal(logits(model), want)


def test_a_damaged_cache_is_rebuilt(model, tmp_path):
    want = logits(model)
    (path,) = caches(tmp_path)
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"XXXX")  # the end marker
    assert packed_cache.PackedFile.open(path) is None
    np.testing.assert_array_equal(logits(model), want)
    assert packed_cache.PackedFile.open(path) is not None


def test_size_cap(model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESEEK_PACKED_CACHE_MAX", "1K")
    e = edgeseek.load(model, n_ctx=32)
    assert caches(tmp_path) == [] and not list((tmp_path / "cache" / "packed").glob("*.tmp"))
    assert any("packed-weights cache not written" in n for n in e.notes)


def test_the_key_follows_the_file_and_the_kernels(model):
    a = packed_cache.path_for(GGUFFile(model))
    assert a == packed_cache.path_for(GGUFFile(model))
    layout = f"_l{packed_cache.LAYOUT}.pack"  # a new layout version: a new key, the old file stale
    assert a.name.startswith("model-") and a.name.endswith((f"-vnni{layout}", f"-portable{layout}"))


def test_a_gpu_models_cpu_experts_come_from_a_cache_a_cpu_load_built(model, tmp_path):
    """Routed experts left to the CPU by a VRAM budget read their layouts from the cache an earlier CPU
    load built; without one they are packed at load, in RAM (no packing at their first tokens); a GPU
    load never builds a cache itself."""
    from cuda_emulation import EmulatedCUDABackend
    from edgeseek.placement import plan_gpu
    plan = plan_gpu(GGUFFile(model), 1 << 40, 32)
    budget = plan.used - plan.expert_bytes  # every routed expert on the CPU
    gpu = edgeseek.load(model, n_ctx=32, backend=EmulatedCUDABackend(), gpu_budget=budget)
    assert caches(tmp_path) == []
    assert all(m._packed is not None and not _mapped(m._packed[0]) for tr in _cpu_experts(gpu) for m in tr)
    logits(model)  # a CPU load builds the cache
    gpu = edgeseek.load(model, n_ctx=32, backend=EmulatedCUDABackend(), gpu_budget=budget)
    experts = list(_cpu_experts(gpu))
    assert experts and all(_mapped(m._packed[0]) for tr in experts for m in tr)


def _cpu_experts(engine):
    store = engine.model.experts.cpu_store
    for layer in store.tensors:
        yield from store.experts(layer, np.arange(store.n_expert))


def test_written_in_chunks_and_mapped_in_huge_pages(model, tmp_path, monkeypatch):
    """The cache is written through 8 MiB chunks (here 4 KiB ones, so that the small fixture crosses
    many) byte for byte as the layouts are, and its mapping asks for 2 MiB pages."""
    monkeypatch.setattr(packed_cache._ChunkWriter, "CHUNK", 4096)
    chunked = logits(model)
    (built,) = caches(tmp_path)
    monkeypatch.setenv("EDGESEEK_PACKED_CACHE", "0")
    np.testing.assert_array_equal(chunked, logits(model))
    pf = packed_cache.PackedFile(built)
    assert len(pf.index) > 10 and pf.map.nbytes == built.stat().st_size
    if not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists():
        pytest.skip("no transparent huge pages on this platform")
    smaps = Path("/proc/self/smaps").read_text().split("\n")
    at = [i for i, line in enumerate(smaps) if line.endswith(str(built))]
    assert at, "the cache is not mapped"
    flags = next(line for line in smaps[at[-1]:] if line.startswith("VmFlags:"))
    assert " hg" in flags  # VM_HUGEPAGE: madvise(MADV_HUGEPAGE) took

"""One side of the bigger-than-RAM benchmark, in its own process (bench_offload.py puts it in a
memory cgroup). Loads the model, evaluates an 8-token prompt, then decodes N tokens one at a time
from a fixed random sequence (the same for both engines: a random-weight model's own greedy output
repeats one token, which would make every step route to the same experts), and prints one JSON
object: load_s, decode_tps, disk bytes read per decoded token (/proc/self/io), peak RSS, and
edgeseek's expert-cache stats.

    python bench/offload_side.py edgeseek MODEL.gguf --budget 3.8G [--decode 32]
    python bench/offload_side.py llama.cpp MODEL.gguf [--decode 32]     (mmap, repacking off)
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgeseek_side import peak_rss
from llama_cpp_side import disable_repack


def io_read_bytes() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def sequence(vocab: int, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(300, vocab, n).astype(np.int32)


def run_edgeseek(path: str, budget: str | None, n_decode: int, prefetch: bool) -> dict:
    import edgeseek

    t0 = time.perf_counter()
    e = edgeseek.load(path, n_ctx=64 + n_decode, ram_budget=budget, use_profile=False)
    if budget is None:
        e.model.pack(e.gguf)
    load_s = time.perf_counter() - t0
    m = e.model
    if prefetch:
        m.prefetch_experts = True
    seq = sequence(m.config.vocab_size, 10 + n_decode)
    cache = m.new_cache()
    m.forward(seq[:8], cache)
    for tok in seq[8:10]:  # untimed: numba loads the one-token kernels from its cache
        m.forward(np.array([tok]), cache)
    r0, t = io_read_bytes(), time.perf_counter()
    for tok in seq[10:]:
        m.forward(np.array([tok]), cache)
    dt = time.perf_counter() - t
    out = {"load_s": load_s, "decode_tps": n_decode / dt, "disk_read_per_token": (io_read_bytes() - r0) / n_decode,
           "peak_rss_bytes": peak_rss(), "experts": e.expert_stats(),
           "budget_plan": e.budget_plan.describe() if e.budget_plan else None}
    e.close()
    return out


def run_llama_cpp(path: str, n_decode: int, threads: int = 2) -> dict:
    import llama_cpp

    disable_repack()  # repacking copies the weights into anonymous memory: no mmap left to page
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=64 + n_decode, n_threads=threads, n_threads_batch=threads, use_mmap=True,
                          verbose=False)
    load_s = time.perf_counter() - t0
    seq = sequence(llm.n_vocab(), 10 + n_decode).tolist()
    llm.eval(seq[:8])
    for tok in seq[8:10]:  # untimed, as edgeseek's
        llm.eval([tok])
    r0, t = io_read_bytes(), time.perf_counter()
    for tok in seq[10:]:
        llm.eval([tok])
    dt = time.perf_counter() - t
    return {"load_s": load_s, "decode_tps": n_decode / dt, "disk_read_per_token": (io_read_bytes() - r0) / n_decode,
            "peak_rss_bytes": peak_rss()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("engine", choices=["edgeseek", "llama.cpp"])
    p.add_argument("model")
    p.add_argument("--budget", default=None)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--prefetch", action="store_true")
    a = p.parse_args()
    if a.engine == "edgeseek":
        print(json.dumps(run_edgeseek(a.model, a.budget, a.decode, a.prefetch)))
    else:
        print(json.dumps(run_llama_cpp(a.model, a.decode)))

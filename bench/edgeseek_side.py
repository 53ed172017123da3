"""edgeseek's side of the runtime benchmark: run in its own process so its peak RSS is its own.

    python bench/edgeseek_side.py MODEL.gguf [--prefill 512] [--prompt 32] [--decode 128] [--page-in]

Prints one JSON object: load_s (open the file, read metadata, tokenizer), pack_s (repack every
weight into the kernel layout, as llama.cpp repacks at load), first_token_s (32-token prompt; includes
compiling the kernels the first time numba's cache sees them; with --page-in, after page_in_s spent
touching every packed weight, so that decode is measured warm), then two untimed decode steps,
prefill_tps, decode_tps, peak_rss_bytes. Token ids are random (seeded) so the figures
do not depend on the tokenizer; decode is greedy.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def touch_packed(engine) -> None:
    """Touch a byte of every page of every packed weight, routed experts included."""
    m = engine.model
    mats = [w for L in m.layers for w in vars(L).values() if hasattr(w, "packed")] + [m.output]
    if getattr(m, "experts", None) is not None:
        mats += [w for i in m.experts.tensors for t in m.experts.experts(i, np.arange(m.config.n_expert)) for w in t]
    for w in mats:
        for a in (w.packed if isinstance(w.packed, tuple) else (w.packed,)):
            if isinstance(a, np.ndarray) and a.size:
                int(a.reshape(-1).view(np.uint8)[::4096].sum())


def run(path: str, n_prefill: int = 512, n_prompt: int = 32, n_decode: int = 128, seed: int = 0,
        page_in: bool = False) -> dict:
    import edgeseek

    t0 = time.perf_counter()
    engine = edgeseek.load(path, n_ctx=max(n_prefill, n_prompt + n_decode) + 16)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.model.pack(engine.gguf)  # the packed copies are what the kernels read from now on
    pack_s = time.perf_counter() - t0
    page_in_s = 0.0
    if page_in:  # steady decode: every packed weight in the page cache, as llama.cpp's are once loaded
        t0 = time.perf_counter()
        touch_packed(engine)
        page_in_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    vocab = engine.model.config.vocab_size
    model = engine.model
    # Decode: a short prompt, then greedy tokens one at a time.
    cache = model.new_cache()
    prompt = rng.integers(100, vocab, n_prompt).astype(np.int32)
    t = time.perf_counter()
    logits = model.forward(prompt, cache)[-1]
    first_token_s = time.perf_counter() - t
    token = int(np.argmax(logits))
    for _ in range(2):  # compiles (or loads from numba's cache) the one-token kernels
        logits = model.forward(np.array([token], np.int32), cache)[-1]
        token = int(np.argmax(logits))
    t = time.perf_counter()
    for _ in range(n_decode):
        logits = model.forward(np.array([token], np.int32), cache)[-1]
        token = int(np.argmax(logits))
    decode_tps = n_decode / (time.perf_counter() - t)
    # Prefill: a long prompt in one batched forward, on warm weights.
    cache = model.new_cache()
    prompt = rng.integers(100, vocab, n_prefill).astype(np.int32)
    t = time.perf_counter()
    model.forward(prompt, cache)
    prefill_tps = n_prefill / (time.perf_counter() - t)
    return {"load_s": load_s, "pack_s": pack_s, "page_in_s": page_in_s, "first_token_s": first_token_s, "prefill_tps": prefill_tps,
            "decode_tps": decode_tps, "peak_rss_bytes": peak_rss(), "n_prefill": n_prefill,
            "n_prompt": n_prompt, "n_decode": n_decode}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--page-in", action="store_true", help="touch every packed weight before the prompt")
    a = p.parse_args()
    print(json.dumps(run(a.model, a.prefill, a.prompt, a.decode, page_in=a.page_in)))

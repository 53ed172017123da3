"""llama.cpp's side of the runtime benchmark (llama-cpp-python), in its own process so its peak RSS
is its own. Same measurements as edgeseek_side.py, same random token ids.

    python bench/llama_cpp_side.py MODEL.gguf [--prefill 512] [--prompt 32] [--decode 128]
                                   [--no-repack] [--no-mmap] [--threads 2]

--no-repack turns off llama.cpp's weight repacking into anonymous memory ("extra buffer types"),
its best configuration when the model does not fit in RAM.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from edgeseek_side import peak_rss


def disable_repack() -> None:
    """Turn off llama.cpp's weight repacking into anonymous memory ("extra buffer types") for the
    models this process loads next: llama-cpp-python has no option for it, so the default model
    parameters it builds from are patched."""
    import llama_cpp

    default_params = llama_cpp.llama_model_default_params

    def no_repack():
        p = default_params()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_model_default_params = no_repack
    llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack


def greedy(llm) -> int:
    """The argmax of the last evaluated token's logits. llama-cpp-python leaves them in its context
    (Llama.scores is filled only with logits_all, and has n_batch rows: a prompt past the first
    batch would index past it)."""
    import llama_cpp
    return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))))


def run(path: str, n_prefill: int = 512, n_prompt: int = 32, n_decode: int = 128, threads: int = 2,
        repack: bool = True, mmap: bool = True, seed: int = 0) -> dict:
    import llama_cpp

    if not repack:
        disable_repack()
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(path, n_ctx=max(n_prefill, n_prompt + n_decode) + 8, n_batch=512, n_ubatch=512,
                          n_threads=threads, n_threads_batch=threads, use_mmap=mmap, verbose=False)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    vocab = llm.n_vocab()

    prompt = rng.integers(100, vocab, n_prompt).tolist()
    t = time.perf_counter()
    llm.eval(prompt)
    first_token_s = time.perf_counter() - t
    token = greedy(llm)
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([token])
        token = greedy(llm)
    decode_tps = n_decode / (time.perf_counter() - t)
    llm.reset()
    prompt = rng.integers(100, vocab, n_prefill).tolist()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill_tps = n_prefill / (time.perf_counter() - t)
    return {"load_s": load_s, "first_token_s": first_token_s, "prefill_tps": prefill_tps,
            "decode_tps": decode_tps, "peak_rss_bytes": peak_rss(), "n_prefill": n_prefill,
            "n_prompt": n_prompt, "n_decode": n_decode, "repack": repack, "mmap": mmap}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-repack", action="store_true")
    p.add_argument("--no-mmap", action="store_true")
    a = p.parse_args()
    print(json.dumps(run(a.model, a.prefill, a.prompt, a.decode, a.threads, not a.no_repack, not a.no_mmap)))

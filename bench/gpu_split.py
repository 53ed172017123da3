"""Where a GPU decode step's time goes when routed experts run on the CPU: decode tokens/s with the
experts split as a VRAM budget leaves them (`cpu`: none in VRAM, as bench_gpu.py's experts-cpu; or
a size such as 4G), a 512-token prompt (the CPU's experts copied to the GPU for it), the host's
memory bandwidth and numba's threading layer, the CPU's experts alone (six random experts of every layer through the CPU
kernels, as a step calls them, with the bandwidth they reach), then a profile of the host's side of
the steps (the chain of graphs waits, the CPU's experts, the copies).

    python bench/gpu_split.py MODEL.gguf [--budget cpu|SIZE] [--threads 16] [--steps 32]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--budget", default="cpu", help="cpu (no routed expert in VRAM) or a VRAM budget (4G)")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args()
    os.environ.setdefault("NUMBA_NUM_THREADS", str(a.threads))
    import edgeseek
    from edgeseek.gguf_file import GGUFFile
    from edgeseek.placement import plan_gpu

    n_ctx = 512 + 2 * a.steps + 64
    budget = a.budget
    if budget == "cpu":
        plan = plan_gpu(GGUFFile(a.model), 1 << 50, n_ctx)
        budget = str(plan.used - plan.expert_bytes)
    engine = edgeseek.load(a.model, n_ctx=n_ctx, device="cuda", gpu_budget=budget)
    model, rng = engine.model, np.random.default_rng(0)
    model.forward(rng.integers(100, model.config.vocab_size, 512).astype(np.int32), model.new_cache())  # warm-up
    for _ in range(2):
        prompt = rng.integers(100, model.config.vocab_size, 512).astype(np.int32)
        t = time.perf_counter()
        model.forward(prompt, model.new_cache())
        print(f"prefill: 512 tokens in {(time.perf_counter() - t) * 1e3:.0f} ms "
              f"({512 / (time.perf_counter() - t):.0f} tok/s)")
    cache = model.new_cache()
    token = int(np.argmax(model.forward(rng.integers(100, model.config.vocab_size, 8).astype(np.int32), cache)[-1]))

    def steps(n: int) -> None:
        nonlocal token
        for _ in range(n):
            token = int(np.argmax(model.forward(np.array([token], np.int32), cache)[-1]))

    steps(8)  # the chain captured
    engine.expert_stats()
    for _ in range(2):
        t = time.perf_counter()
        steps(a.steps)
        dt = time.perf_counter() - t
        print(f"decode: {dt / a.steps * 1e3:.2f} ms a token ({a.steps / dt:.1f} tok/s)")
    print("expert pairs:", {k: v for k, v in engine.expert_stats().items() if k.startswith("expert_pairs")})

    import numba
    a1 = np.ones(1 << 28, np.float32)  # 1 GiB
    a2 = np.empty_like(a1)
    t = time.perf_counter()
    np.copyto(a2, a1)
    print(f"host: a 1 GiB copy {2 * a1.nbytes / (time.perf_counter() - t) / 1e9:.1f} GB/s (read + write, one thread); "
          f"numba threading layer {numba.threading_layer()}, {numba.get_num_threads()} threads")
    del a1, a2
    from bench_runtime import bandwidth_gbs  # beside this script
    print(f"host: read bandwidth {bandwidth_gbs():.1f} GB/s with numba's {numba.get_num_threads()} threads")
    store = model.experts
    x = rng.standard_normal((1, model.config.n_embd)).astype(np.float32)
    layers = list(store.layers())
    k = model.config.n_expert_used
    for _ in range(3):
        t, read = time.perf_counter(), 0
        for layer in layers:
            triples = store.cpu_store.experts(layer, rng.choice(store.n_expert, k, replace=False))
            store.cpu.experts_rows(x, triples, np.zeros(k, np.int64))
            read += sum(m.nbytes for tr in triples for m in tr)
        dt = time.perf_counter() - t
        print(f"the CPU's experts alone: {k} a layer x {len(layers)} layers {dt * 1e3:.2f} ms "
              f"({read / dt / 1e9:.1f} GB/s)")

    prof = cProfile.Profile()
    prof.enable()
    steps(a.steps)
    prof.disable()
    pstats.Stats(prof).sort_stats("cumtime").print_stats(20)


if __name__ == "__main__":
    main()

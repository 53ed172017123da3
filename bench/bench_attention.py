"""One decode token's MLA attention on the CPU, straight from the float16 latent cache, at several
context lengths: `CPUBackend.latent_decode` with DeepSeek-V2-Lite's shapes (16 heads, kv_lora 512,
rope 64), the path it takes at each length (one core below LATENT_SHORT positions x heads, both
cores from there), microseconds a call and GFLOP/s (scores and mix: 2 H n (2 C + R)). Times are the
minimum over repeats, alternated lengths; the cache is warm (a decode step's weights evict it: inside
a model a call takes longer, `bench_runtime.py --prompt 2048/8192` has the whole step).

    python bench/bench_attention.py [--positions 64,256,1024,4096] [--heads 16] [--out FILE]

The end-to-end figure beside llama.cpp is bench_runtime.py's decode after a long prompt.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--positions", default="32,64,128,256,1024,2048,4096")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--rope", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from edgeseek.backends import cpu
    from edgeseek.quantize.simd import WIDE_VECTORS

    H, C, R = a.heads, a.latent, a.rope
    lengths = [int(n) for n in a.positions.split(",")]
    rng = np.random.default_rng(0)
    cache_c = rng.standard_normal((max(lengths), C)).astype(np.float16)
    cache_k = rng.standard_normal((max(lengths), R)).astype(np.float16)
    q_lat, q_pe = rng.standard_normal((H, C)).astype(np.float32), rng.standard_normal((H, R)).astype(np.float32)
    new_c, new_k = rng.standard_normal((1, C)).astype(np.float32), rng.standard_normal((1, R)).astype(np.float32)
    backend = cpu.CPUBackend()
    best = {n: float("inf") for n in lengths}
    for n in lengths:  # compiled or loaded before timing
        backend.latent_decode(q_lat, q_pe, new_c, new_k, cache_c, cache_k, np.array([n - 1]), 0.1)
    for _ in range(a.repeats):
        for n in lengths:
            calls = max(5, 20000 // n)
            t = time.perf_counter()
            for _ in range(calls):
                backend.latent_decode(q_lat, q_pe, new_c, new_k, cache_c, cache_k, np.array([n - 1]), 0.1)
            best[n] = min(best[n], (time.perf_counter() - t) / calls)
    rows = []
    print(f"MLA decode attention, {H} heads, latent {C}, rope {R}; {'AVX-512' if WIDE_VECTORS else 'AVX2 or less'}\n")
    print("| positions | path | us a call | GFLOP/s |\n|---|---|---|---|")
    for n in lengths:
        path = "one core" if n * H < cpu.LATENT_SHORT else "both cores"
        gflops = 2 * H * n * (2 * C + R) / best[n] / 1e9
        rows.append({"positions": n, "path": path, "us": round(best[n] * 1e6, 1), "gflops": round(gflops, 1)})
        print(f"| {n} | {path} | {best[n] * 1e6:.1f} | {gflops:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"heads": H, "latent": C, "rope": R, "wide_vectors": WIDE_VECTORS,
                                           "latent_short": cpu.LATENT_SHORT, "runs": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()

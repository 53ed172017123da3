"""A decode step's routed-expert products on the CPU, per format: what a split placement (the routed
experts on the CPU beside a GPU) and a CPU decode step wait on.

For each format and each of the two expert shapes of DeepSeek-V2-Lite (gate and up 1408 x 2048, down
2048 x 1408; a K-quant only where its 256-value blocks divide K), `--layers` layers of `--used`
experts, each a distinct random matrix (the step's weights come from memory, not from the caches:
27 layers of V2-Lite's are 0.3-0.6 GB), run as the model runs them: a layer's matrices in one
`matmul_many` call (gate and up: 2 x used matrices; down: used), bound once as the model binds them.
Reports ms a step and GB/s of weight bytes as the file stores them, against the host's read bandwidth
with the same threads (bench_runtime.bandwidth_gbs). The minimum over `--repeats` steps, and the median.

    python bench/bench_experts.py                                  # Q4_0, Q4_K, Q5_0, Q5_K, Q6_K, Q8_0
    python bench/bench_experts.py --formats Q4_K,Q4_0 --threads 16 --out bench/results/experts-host.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHAPES = {"gate_up": (1408, 2048), "down": (2048, 1408)}


def random_packed(fmt, n: int, k: int, count: int, rng) -> list:
    """`count` packed matrices of the format, each its own memory: one random block of rows is
    quantized and its bytes shuffled per matrix (the kernels' speed does not depend on the values)."""
    rows = 64
    raw0 = np.asarray(fmt.quantize(rng.standard_normal((rows, k)).astype(np.float32)), np.uint8).reshape(rows, -1)
    out = []
    for _ in range(count):
        raw = raw0[rng.integers(0, rows, n)]
        out.append(fmt.pack(np.ascontiguousarray(raw)))
    return out


def step_products(fmt, shape: tuple[int, int], layers: int, per_layer: int, repeats: int, rng) -> dict:
    """`layers` matmul_many calls of `per_layer` distinct matrices each, one activation row, as one
    decode step's routed-expert products; ms a step (min and median) and GB/s."""
    n, k = shape
    mats = random_packed(fmt, n, k, layers * per_layer, rng)
    calls = [fmt.bind_many(mats[i * per_layer:(i + 1) * per_layer], np.zeros(per_layer, np.int64), (1, k))
             for i in range(layers)]
    if calls[0] is None:
        return {"skipped": "no matmul_many kernel"}
    x = rng.standard_normal((1, k)).astype(np.float32)
    for call in calls:  # compiled or loaded, and paged in
        call(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for call in calls:
            call(x)
        times.append(time.perf_counter() - t0)
    nbytes = layers * per_layer * n * (k // fmt.block_size) * fmt.type_size
    best = min(times)
    return {"shape": list(shape), "matrices": layers * per_layer, "MB": round(nbytes / 1e6, 1),
            "ms": round(best * 1e3, 3), "median_ms": round(float(np.median(times)) * 1e3, 3),
            "GB_per_s": round(nbytes / best / 1e9, 2)}


def run(formats: dict, layers: int, used: int, repeats: int, bandwidth: float | None) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for name, fmt in formats.items():
        rows = {}
        for part, shape in SHAPES.items():
            if shape[1] % fmt.block_size:
                rows[part] = {"skipped": f"K={shape[1]} is not a multiple of {fmt.block_size}"}
                continue
            rows[part] = step_products(fmt, shape, layers, used * (2 if part == "gate_up" else 1), repeats, rng)
            if bandwidth and "GB_per_s" in rows[part]:
                rows[part]["bandwidth_fraction"] = round(rows[part]["GB_per_s"] / bandwidth, 3)
        out[name] = rows
        said = (f"{p} {r['ms']} ms {r['GB_per_s']} GB/s" if "ms" in r else f"{p} skipped" for p, r in rows.items())
        print(f"{name}: " + "; ".join(said), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="Q4_0,Q4_K,Q5_0,Q5_K,Q6_K,Q8_0")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: numba's own)")
    ap.add_argument("--layers", type=int, default=26, help="layers with routed experts (V2-Lite: 26)")
    ap.add_argument("--used", type=int, default=6, help="experts a token uses (V2-Lite: 6)")
    ap.add_argument("--repeats", type=int, default=20, help="decode steps timed")
    ap.add_argument("--out", default=str(HERE / "results" / "experts.json"))
    args = ap.parse_args(argv)

    import numba

    from bench_runtime import bandwidth_gbs
    from edgeseek.quantize import FORMATS

    if args.threads:
        numba.set_num_threads(args.threads)
    wanted = [s.strip().upper() for s in args.formats.split(",") if s.strip()]
    by_name = {q.name: f for q, f in FORMATS.items()}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        ap.error(f"unknown or unregistered formats: {', '.join(unknown)}")
    bw = bandwidth_gbs()
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
              "bandwidth_gbs": round(bw, 1), "layers": args.layers, "used": args.used,
              "formats": run({w: by_name[w] for w in wanted}, args.layers, args.used, args.repeats, bw)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"read bandwidth {bw:.1f} GB/s at {report['numba_threads']} threads; written to {out}")


if __name__ == "__main__":
    main()

"""Kernel benchmark: every registered format's matvec (decode) and matmul (prefill) on the matrix
shapes of DeepSeek-V2-Lite, plus the cost of repacking.

For each format of edgeseek.quantize.FORMATS and each shape N x K (y = W @ x, W has N rows of K
values), a random matrix is quantized with the format's own quantizer (a block of rows is
quantized and repeated, so that the 102400-row output matrix does not need 800 MB of float32), then:
- pack: the file rows -> the kernel layout, in ms per MB of weights;
- matvec: GB/s of weight bytes (as stored in the GGUF file) and GFLOP/s (2 N K per product). A
  model reads each matrix once per token, from memory, not from the CPU caches: the matvec cycles
  through copies of the packed matrix that together exceed --cold-mb (256 MB by default, 0 for
  cache-resident timings);
- matmul with T tokens: GFLOP/s (2 N K T), and the weight bytes per second for comparison.
Times are the minimum over repeats (and the median is kept): on a shared machine the minimum is
the figure least disturbed by other processes.

    python bench/bench_kernels.py                       # all formats, default shapes
    python bench/bench_kernels.py --formats Q4_0,Q8_0 --shapes 8192x2048 --tokens 32
    python bench/bench_kernels.py --threads 1 --out bench/results/kernels-1t.json
    python bench/bench_kernels.py --formats Q4_0 --shapes 2048x2048 --asm   # what LLVM made of it

Writes bench/results/kernels.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import importlib
import json
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import numpy as np

# (N, K): DeepSeek-V2-Lite decode. Experts gate/up 1408 x 2048 and down 2048 x 1408, attention and
# shared experts 2048 x 2048, kv_a 576 x 2048, output 102400 x 2048.
DEFAULT_SHAPES = "2048x1408,1408x2048,2048x2048,576x2048,102400x2048"
DEFAULT_MATMUL_SHAPES = "2048x1408,1408x2048,2048x2048"
QUANT_ROWS = 2048  # rows quantized from random data; larger matrices repeat them


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def random_raw(fmt, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """(n, row_bytes) uint8 rows of a random Gaussian matrix in the format."""
    rows = min(n, QUANT_ROWS)
    w = rng.standard_normal((rows, k)).astype(np.float32)
    raw = np.asarray(fmt.quantize(w), dtype=np.uint8).reshape(rows, -1)
    return np.ascontiguousarray(np.resize(raw, (n, raw.shape[1])))


def timed(fn, min_time: float, min_reps: int = 5) -> tuple[float, float, int]:
    """(min, median, repeats) seconds per call of fn(); the first call (compilation) is not timed."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), len(times)


def bench_format(fmt, shapes, matmul_shapes, tokens, min_time, rng, cold_mb):
    results = []
    for n, k in shapes:
        if k % fmt.block_size:
            results.append({"shape": [n, k], "skipped": f"K={k} is not a multiple of {fmt.block_size}"})
            continue
        raw = random_raw(fmt, n, k, rng)
        mb = raw.nbytes / 1e6
        t0 = time.perf_counter()
        packed = fmt.pack(raw)
        pack_s = time.perf_counter() - t0
        x = rng.standard_normal(k).astype(np.float32)
        copies = [packed] + [copy.deepcopy(packed) for _ in range(int(cold_mb / mb))]  # own memory each
        n_copies = len(copies)
        turn = iter(range(1 << 62))
        best, med, reps = timed(lambda: fmt.matvec(copies[next(turn) % n_copies], x), min_time)
        del copies[1:]
        r = {"shape": [n, k], "weight_MB": round(mb, 3), "pack_ms_per_MB": round(pack_s * 1e3 / mb, 3),
             "matvec": {"ms": round(best * 1e3, 4), "median_ms": round(med * 1e3, 4), "repeats": reps,
                        "copies": n_copies,
                        "GB_per_s": round(raw.nbytes / best / 1e9, 2),
                        "GFLOP_per_s": round(2 * n * k / best / 1e9, 1)}}
        if (n, k) in matmul_shapes:
            r["matmul"] = {}
            for t in tokens:
                xt = rng.standard_normal((t, k)).astype(np.float32)
                best, med, reps = timed(lambda: fmt.matmul(packed, xt), min_time, min_reps=3)
                r["matmul"][str(t)] = {"ms": round(best * 1e3, 3), "median_ms": round(med * 1e3, 3),
                                       "repeats": reps, "GFLOP_per_s": round(2 * n * k * t / best / 1e9, 1),
                                       "GB_per_s": round(raw.nbytes / best / 1e9, 2)}
        results.append(r)
    return results


ASM_OPS = ("vpdpbusd", "vpdpwssd", "vpmaddubsw", "vpmaddwd", "vpmulld", "vfmadd231ps", "vcvtph2ps")


def asm_summary(fmt) -> dict:
    """For each numba function of the format's module that ran: how many instructions use zmm and
    ymm registers, and the counts of the multiply instructions that show vectorized products."""
    import numba

    mod = importlib.import_module(type(fmt).__module__)
    out = {}
    for name, obj in vars(mod).items():
        if isinstance(obj, numba.core.registry.CPUDispatcher) and obj.signatures:
            asm = obj.inspect_asm(obj.signatures[0])
            ops = collections.Counter(re.findall(r"^\s+(v\w+)\s", asm, re.M))
            out[name] = {"zmm": len(re.findall(r"%zmm", asm)), "ymm": len(re.findall(r"%ymm", asm)),
                         **{op: ops[op] for op in ASM_OPS if ops[op]}}
    return out


def markdown(report) -> str:
    tokens = report["tokens"]
    head = ("| format | N x K | MB | pack ms/MB | matvec ms | matvec GB/s | matvec GFLOP/s | "
            + " | ".join(f"T={t} GFLOP/s" for t in tokens) + " |")
    lines = [head, "|" + "---|" * (7 + len(tokens))]
    for name, rows in report["formats"].items():
        for r in rows:
            shape = "x".join(map(str, r["shape"]))
            if "skipped" in r:
                lines.append(f"| {name} | {shape} | " + " | ".join(["-"] * (5 + len(tokens))) + " |")
                continue
            mv = r["matvec"]
            mm = [str(r["matmul"][str(t)]["GFLOP_per_s"]) if "matmul" in r else "" for t in tokens]
            lines.append(f"| {name} | {shape} | {r['weight_MB']} | {r['pack_ms_per_MB']} | {mv['ms']} | "
                         f"{mv['GB_per_s']} | {mv['GFLOP_per_s']} | " + " | ".join(mm) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="", help="comma-separated names (F32, Q4_0, Q4_K, ...); default all")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxK (N rows, K inputs)")
    ap.add_argument("--matmul-shapes", default=DEFAULT_MATMUL_SHAPES,
                    help="shapes that also get the matmul (prefill) timing: 'all', 'none' or NxK list")
    ap.add_argument("--tokens", default="32,512", help="comma-separated T for the matmul")
    ap.add_argument("--threads", type=int, default=0, help="numba threads (default: numba's own)")
    ap.add_argument("--min-time", type=float, default=0.5, help="seconds of repeats per timing")
    ap.add_argument("--cold-mb", type=float, default=256,
                    help="matvec cycles through copies of the matrix adding up to this many MB")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.json"))
    ap.add_argument("--asm", action="store_true",
                    help="compile afresh (no numba cache) and report the kernels' vector instructions")
    args = ap.parse_args(argv)
    if args.asm:  # cached code cannot be inspected
        os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="edgeseek-asm-")

    import numba

    from edgeseek.quantize import FORMATS

    if args.threads:
        numba.set_num_threads(args.threads)
    shapes = parse_shapes(args.shapes)
    if args.matmul_shapes in ("all", "none"):
        matmul_shapes = set(shapes) if args.matmul_shapes == "all" else set()
    else:
        matmul_shapes = set(parse_shapes(args.matmul_shapes))
    tokens = [int(t) for t in args.tokens.split(",") if t]
    wanted = {s.strip().upper() for s in args.formats.split(",") if s.strip()}
    formats = {q.name: f for q, f in FORMATS.items() if not wanted or q.name in wanted}
    unknown = wanted - set(formats)
    if unknown:
        ap.error(f"unknown or unregistered formats: {', '.join(sorted(unknown))}")

    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "numba_threads": numba.get_num_threads(),
        "threading_layer": None, "load_average_start": os.getloadavg(),
        "note": "minimum over repeats; on a shared machine other processes slow the medians",
        "cold_MB": args.cold_mb,
        "tokens": tokens, "formats": {},
    }
    rng = np.random.default_rng(0)
    for name, fmt in formats.items():
        report["formats"][name] = bench_format(fmt, shapes, matmul_shapes, tokens, args.min_time, rng, args.cold_mb)
        if args.asm:
            report.setdefault("asm", {})[name] = asm_summary(fmt)
        print(f"{name}: done", flush=True)
    try:
        report["threading_layer"] = numba.threading_layer()
    except ValueError:
        pass
    report["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(f"{report['cpu']}, {report['numba_threads']} threads, load average {report['load_average_start'][0]:.2f}"
          f" -> {report['load_average_end'][0]:.2f}; minimum of repeats; weights as stored in the file\n")
    print(markdown(report))
    for name, funcs in report.get("asm", {}).items():
        for fn, counts in funcs.items():
            print(f"asm {name} {fn}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()

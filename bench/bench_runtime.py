"""edgeseek beside llama.cpp on the DeepSeek-V2-Lite-shaped files, same threads, same run.

    python bench/bench_runtime.py [--kinds q4_0 q4_k_m] [--files X.gguf ...] [--decode 128] [--prefill 512] [--cold]

For each file (made by make_v2lite.py if missing): llama.cpp (llama-cpp-python, its default
configuration: weights repacked for this CPU) and edgeseek, each in its own process, measure load
time, time to the first token of a 32-token prompt, decode tokens/s (128 greedy tokens after it),
prefill tokens/s (a 512-token prompt) and peak RSS. --cold drops the page cache before each run
(root); otherwise both sides are timed warm: the GGUF read once before llama.cpp maps it, edgeseek's
packed weights touched after load (edgeseek_side --page-in). --files measures other GGUF files the same way (a small dense model: SmolLM2-135M's Q4_1
file, its Q8_0 twin from requantize.py); --kinds none skips the V2-Lite files. Each edgeseek figure is given as a ratio to llama.cpp's and, for decode, as a fraction of
the memory-bandwidth limit: measured read bandwidth / bytes of weights read per token (every
tensor but the routed experts, plus 6 of 64 routed experts per MoE layer).

Writes bench/results/runtime.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def bandwidth_gbs(size_mb: int = 2048, repeats: int = 5) -> float:
    """Memory read bandwidth with numba's threads: the best of a few passes over `size_mb`, summed
    as uint32 rows (integer adds vectorize with several accumulators; a float32 sum is bound by
    its add latency at a third of this)."""
    from numba import njit, prange

    @njit(parallel=True)
    def total(a):
        out = np.zeros(a.shape[0], np.uint32)
        for i in prange(a.shape[0]):
            s = np.uint32(0)
            for j in range(a.shape[1]):
                s += a[i, j]
            out[i] = s
        return out.sum()

    a = np.ones((256, size_mb * (1 << 20) // 4 // 256), np.uint32)
    total(a)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        total(a)
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def bytes_per_token(path: Path) -> int:
    from edgeseek.gguf_file import GGUFFile

    g = GGUFFile(path)
    n_expert = g.arch_meta("expert_count", 1)  # a dense model: every tensor read
    n_used = g.arch_meta("expert_used_count", 1)
    total = 0
    for t in g.tensors.values():
        if t.name == "token_embd.weight":
            continue  # one row per token
        total += t.n_bytes * n_used // n_expert if "_exps." in t.name else t.n_bytes
    return total


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_through(path: Path) -> None:
    """Read a file once, so that its pages sit in the page cache (llama.cpp without repacking maps
    the GGUF and reads it on demand, as edgeseek maps its packed cache)."""
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


def user_python_env() -> dict:
    """This environment as a user's Python runs it: bytecode caches written and read (a CI shell's
    PYTHONDONTWRITEBYTECODE=1 recompiled edgeseek's 42 modules of a checkout at every start, 0.12 s,
    where llama-cpp-python's installed modules keep theirs)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def side(script: str, model: Path, args: list[str], cold: bool, python: str = sys.executable) -> dict:
    if cold:
        drop_caches()
    elif script == "llama_cpp_side.py":
        read_through(model)
    else:
        args = [*args, "--page-in"]
    cmd = [python, str(HERE / script), str(model), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=user_python_env())
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_of(runs: list[dict]) -> dict:
    """The run with the best decode rate, with the best prefill rate of all the runs."""
    best = dict(max(runs, key=lambda r: r["decode_tps"]))
    best["prefill_tps"] = max(r["prefill_tps"] for r in runs)
    best["rounds"] = len(runs)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["q4_0", "q4_k_m"])
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--files", nargs="*", type=Path, default=[])
    p.add_argument("--cold", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="the sides alternated N times, each one's best kept")
    p.add_argument("--edgeseek-python", default=sys.executable, metavar="PYTHON",
                   help="the interpreter of edgeseek's side: a virtual environment holding edgeseek's own "
                        "install (bench_first_reply.py --user-env makes one) rather than this one, whose "
                        "test extras bring SciPy into numba's start")
    p.add_argument("--out", type=Path, default=HERE / "results" / "runtime.json")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    from make_v2lite import write

    bw = bandwidth_gbs()
    args = ["--decode", str(a.decode), "--prompt", str(a.prompt), "--prefill", str(a.prefill)]
    results = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": 2, "bandwidth_gbs": round(bw, 1)},
               "date": time.strftime("%Y-%m-%d"), "cold": a.cold,
               "edgeseek_python": "this environment" if a.edgeseek_python == sys.executable else a.edgeseek_python,
               "files": {}}
    if a.out.exists():  # files not measured this time keep their entries (each with its date)
        old = json.loads(a.out.read_text())
        results["files"] = {k: {"date": old.get("date"), "bandwidth_gbs": old.get("machine", {}).get("bandwidth_gbs"),
                                **v} for k, v in old.get("files", {}).items()}
    rows = []
    models = [(kind, write(kind, HERE / "data" / f"v2lite-{kind}.gguf")) for kind in a.kinds if kind != "none"]
    for kind, model in models + [(f.stem, f) for f in a.files]:
        bpt = bytes_per_token(model)
        ref_args = args
        try:
            ref = [side("llama_cpp_side.py", model, ref_args, a.cold)]
        except RuntimeError as e:
            # llama.cpp's default repacks weights into its extra buffer types; on CPUs with AMX its
            # AMX buffer aborts on deepseek2 graphs (GGML_ASSERT(*cur_backend_id != -1),
            # llama-cpp-python 0.3.36), and crashes on SmolLM2 here: its best configuration that
            # runs is then without them
            print(f"llama.cpp with repacking failed, measured without it: {str(e).splitlines()[0]}", file=sys.stderr)
            ref_args = [*args, "--no-repack"]
            ref = [side("llama_cpp_side.py", model, ref_args, a.cold)]
        ours = [side("edgeseek_side.py", model, args, a.cold, a.edgeseek_python)]
        for _ in range(a.rounds - 1):
            ref.append(side("llama_cpp_side.py", model, ref_args, a.cold))
            ours.append(side("edgeseek_side.py", model, args, a.cold, a.edgeseek_python))
        ref, ours = best_of(ref), best_of(ours)
        limit = bw * 1e9 / bpt
        entry = {"file": model.name, "date": results["date"], "bandwidth_gbs": round(bw, 1),
                 "bytes_per_token": bpt, "bandwidth_limit_tps": limit,
                 "llama_cpp": ref, "edgeseek": ours,
                 "ratio": {k: ours[k] / ref[k] for k in ("decode_tps", "prefill_tps")},
                 "decode_fraction_of_limit": {"edgeseek": ours["decode_tps"] / limit,
                                              "llama_cpp": ref["decode_tps"] / limit}}
        results["files"][kind] = entry
        rows.append((kind, entry))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"memory bandwidth {bw:.1f} GB/s, 2 threads{', cold page cache' if a.cold else ''}\n")
    print("| file | | decode tok/s | prefill tok/s | load s | first token s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for kind, e in rows:
        for who in ("llama_cpp", "edgeseek"):
            r = e[who]
            extra = ""
            if who == "edgeseek":
                extra = (f" ({e['ratio']['decode_tps']:.2f}x, {e['decode_fraction_of_limit']['edgeseek']:.0%}"
                         f" of the {e['bandwidth_limit_tps']:.0f} tok/s limit)")
            pre = f" ({e['ratio']['prefill_tps']:.2f}x)" if who == "edgeseek" else ""
            load = r["load_s"] + r.get("pack_s", 0.0)
            print(f"| {kind} | {who.replace('_', '.')} | {r['decode_tps']:.2f}{extra} | {r['prefill_tps']:.1f}{pre} | "
                  f"{load:.1f} | {r['first_token_s']:.2f} | {r['peak_rss_bytes'] / 1e9:.1f} |")


if __name__ == "__main__":
    main()

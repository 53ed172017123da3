"""edgeseek on an NVIDIA GPU beside llama.cpp's llama-bench, same GGUF files, same machine.

    python bench/bench_gpu.py [FILES...] [--llama-bench PATH] [--threads 16] [--out bench/results/gpu.json]

Scenarios, each file (default: bench/make_v2lite.py's Q4_0 and Q4_K_M files):
  all-gpu      everything in VRAM; llama-bench -ngl 99
  experts-cpu  routed experts on the CPU (--threads); llama-bench -ngl 99 -ot exps=CPU
  budget-4g    a 4 GiB VRAM budget (a consumer card): llama-bench --n-cpu-moe N with the smallest N
               whose weights fit 4 GiB, and edgeseek with --gpu-budget equal to llama.cpp's VRAM use
Figures: pp512 (prefill tokens/s) and tg128 (decode tokens/s) as llama-bench defines them: the 128
tokens from an empty context; and tg128 after the 512-token prompt (llama-bench -d 512), where each
step attends to 512-640 positions. Each engine in its own process; decode also as a fraction of the
bandwidth limit (bytes a token reads: the non-expert weights but one embedding row, plus
n_used/n_expert of the routed experts, over the datasheet bandwidth).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
KINDS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
DATASHEET_BW = {"H200": 4.8e12, "H100": 3.35e12}
REPEATS = 3  # runs of each figure on our side, as llama-bench's -r 3


def side(path: str, gpu_budget: str | None, n_prefill: int, n_decode: int, threads: int, device: str) -> dict:
    """One engine process: load, pp (one forward of n_prefill tokens), tg (n_decode greedy steps from an
    empty context) and tg_d (n_decode greedy steps after the pp prompt), each the mean of REPEATS runs
    (expert pairs counted over all of them)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(threads))
    import edgeseek

    t0 = time.perf_counter()
    engine = edgeseek.load(path, n_ctx=n_prefill + n_decode + 16, device=device, gpu_budget=gpu_budget)
    load_s = time.perf_counter() - t0
    model, rng = engine.model, np.random.default_rng(0)
    vocab = model.config.vocab_size
    for _ in range(2):  # warm-up: kernels compiled, pools grown, cuBLAS handles made
        cache = model.new_cache()
        model.forward(rng.integers(100, vocab, n_prefill).astype(np.int32), cache)
        for _ in range(4):
            model.forward(np.array([7], np.int32), cache)

    def decode(token: int, cache) -> float:
        t = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(model.forward(np.array([token], np.int32), cache)[-1]))
        return time.perf_counter() - t

    tg, pp, deep = [], [], []
    engine.expert_stats()  # reset the per-tier counters
    for _ in range(REPEATS):  # each figure the mean of REPEATS runs, as llama-bench -r 3 reports
        cache = model.new_cache()  # tg: from an empty context, as llama-bench's tg128
        token = int(np.argmax(model.forward(np.array([7], np.int32), cache)[-1]))  # the cache's step captured
        tg.append(n_decode / decode(token, cache))
        cache = model.new_cache()
        prompt = rng.integers(100, vocab, n_prefill).astype(np.int32)
        t = time.perf_counter()
        logits = model.forward(prompt, cache)
        pp.append(n_prefill / (time.perf_counter() - t))
        token = int(np.argmax(model.forward(np.array([int(np.argmax(logits[-1]))], np.int32), cache)[-1]))
        deep.append(n_decode / decode(token, cache))  # tg at depth n_prefill, as llama-bench -d
    s = engine.expert_stats()
    plan = engine.gpu_plan
    mean = lambda v: round(float(np.mean(v)), 1)  # noqa: E731
    return {"load_s": round(load_s, 2), "pp_tps": mean(pp), "tg_tps": mean(tg), "tg_d_tps": mean(deep),
            "runs": {"pp_tps": [round(v, 1) for v in pp], "tg_tps": [round(v, 1) for v in tg],
                     "tg_d_tps": [round(v, 1) for v in deep]},
            "device": engine.device_name,
            "vram_bytes": engine.vram_used(),
            "experts_on_gpu": plan.experts_on_gpu if plan else None,
            "experts_total": plan.experts_total if plan else None,
            "expert_pairs_gpu": s.get("expert_pairs_gpu"), "expert_pairs_cpu": s.get("expert_pairs_cpu")}


def token_bytes(path: Path) -> tuple[int, int, int]:
    """(bytes one decode token reads, non-expert bytes, routed-expert bytes) of the file."""
    from edgeseek.gguf_file import GGUFFile
    g = GGUFFile(path)
    m = g.arch_meta
    routed = sum(t.n_bytes for t in g.tensors.values() if any(f".{k}." in t.name for k in KINDS))
    rest = sum(t.n_bytes for t in g.tensors.values() if not any(f".{k}." in t.name for k in KINDS))
    emb = g.tensor("token_embd.weight")
    read = rest - emb.n_bytes + emb.n_bytes // emb.shape[0]
    if not g.has("output.weight"):  # tied: the head reads the whole table
        read += emb.n_bytes
    read += routed * m("expert_used_count", 0) // max(1, m("expert_count", 1))
    return read, rest, routed


def n_cpu_moe_for(path: Path, vram: int, n_ctx: int) -> tuple[int, int]:
    """The smallest --n-cpu-moe N (experts of the first N layers on the CPU) whose weights and KV cache
    fit `vram`, and the VRAM that leaves in use."""
    from edgeseek.budget import kv_cache_bytes
    from edgeseek.gguf_file import GGUFFile
    g = GGUFFile(path)
    L = g.arch_meta("block_count")
    per_layer = [sum(g.tensor(f"blk.{i}.{k}.weight").n_bytes for k in KINDS) if g.has(f"blk.{i}.{KINDS[0]}.weight")
                 else 0 for i in range(L)]
    _, rest, _ = token_bytes(path)
    base = rest + kv_cache_bytes(g, n_ctx)
    for n in range(L + 1):
        used = base + sum(per_layer[n:])
        if used <= vram:
            return n, used
    return L, base


def llama_bench(binary: str, path: Path, extra: list[str], threads: int, n_prefill: int, n_decode: int) -> dict:
    cmd = [binary, "-m", str(path), "-ngl", "99", "-p", str(n_prefill), "-n", str(n_decode), "-d", f"0,{n_prefill}",
           "-t", str(threads), "-r", "3", "-o", "json", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}",
                "cmd": " ".join(cmd)}
    rows = json.loads(r.stdout)
    out = {"cmd": " ".join(cmd)}
    for row in rows:  # pp and tg at depth 0, then both at depth n_prefill (tg_d: decode after the prompt)
        key = ("pp" if row["n_prompt"] else "tg") + ("_d" if row.get("n_depth") else "") + "_tps"
        out[key] = round(row["avg_ts"], 1)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path,
                   default=[HERE / "data" / "v2lite-q4_0.gguf", HERE / "data" / "v2lite-q4_k_m.gguf"])
    p.add_argument("--llama-bench", default="/tmp/lc/llama.cpp/build/bin/llama-bench")
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--scenarios", nargs="+", default=["all-gpu", "experts-cpu", "budget-4g"])
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu.json")
    p.add_argument("--timeout", type=float, default=600, help="seconds per engine process")
    p.add_argument("--side", help=argparse.SUPPRESS)  # internal: one engine process
    p.add_argument("--gpu-budget", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        print(json.dumps(side(a.side, a.gpu_budget, a.prefill, a.decode, a.threads, a.device)))
        return
    from edgeseek.backends.cuda import probe
    reason = probe()
    if reason:
        sys.exit(f"bench_gpu: {reason}")
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    gpu = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    bw = next((v for k, v in DATASHEET_BW.items() if k in gpu), None)
    have_llama = Path(a.llama_bench).exists()
    results = {"gpu": gpu, "datasheet_bandwidth": bw, "threads": a.threads, "prefill": a.prefill,
               "decode": a.decode, "llama_bench": a.llama_bench if have_llama else None, "runs": []}
    for f in a.files:
        read, rest, routed = token_bytes(f)
        for sc in a.scenarios:
            budget, extra = None, []
            if sc == "experts-cpu":
                from edgeseek.placement import plan_gpu
                from edgeseek.gguf_file import GGUFFile
                plan = plan_gpu(GGUFFile(f), 1 << 50, a.prefill + a.decode + 16)
                budget = str(plan.used - plan.expert_bytes)  # nothing left for routed experts
                extra = ["-ot", "exps=CPU"]
            elif sc == "budget-4g":
                n, used = n_cpu_moe_for(f, 4 << 30, a.prefill + a.decode + 16)
                from edgeseek.placement import WORKSPACE
                budget = str(used + WORKSPACE)
                extra = ["--n-cpu-moe", str(n)]
            cmd = [sys.executable, __file__, "--side", str(f), "--prefill", str(a.prefill), "--decode", str(a.decode),
                   "--threads", str(a.threads)] + (["--gpu-budget", budget] if budget else [])
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                ours = json.loads(r.stdout) if r.returncode == 0 else {"error": r.stderr.strip()[-2000:]}
            except subprocess.TimeoutExpired:
                ours = {"error": f"timed out after {a.timeout} s"}
            theirs = llama_bench(a.llama_bench, f, extra, a.threads, a.prefill, a.decode) if have_llama else {}
            row = {"file": f.name, "scenario": sc, "bytes_per_token": read, "edgeseek": ours, "llama_cpp": theirs}
            if "tg_tps" in ours and bw and sc == "all-gpu":
                row["edgeseek"]["bandwidth_fraction"] = round(ours["tg_tps"] * read / bw, 3)
            if "tg_tps" in theirs and bw and sc == "all-gpu":
                row["llama_cpp"]["bandwidth_fraction"] = round(theirs["tg_tps"] * read / bw, 3)
            for k in ("pp_tps", "tg_tps", "tg_d_tps"):
                if k in ours and k in theirs:
                    row[k.replace("_tps", "_ratio")] = round(ours[k] / theirs[k], 2)
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{gpu}: {'file':24} {'scenario':12} {'edgeseek pp/tg/tg@d':>24} {'llama.cpp pp/tg/tg@d':>24}")
    for row in results["runs"]:
        o, t = row["edgeseek"], row["llama_cpp"]
        fig = lambda r: "/".join(str(r.get(k, "-")) for k in ("pp_tps", "tg_tps", "tg_d_tps"))  # noqa: E731
        print(f"{row['file']:24} {row['scenario']:12} {fig(o):>24} {fig(t):>24} {o.get('error', '')[:200]}")


if __name__ == "__main__":
    main()

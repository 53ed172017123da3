"""Batch throughput on the DeepSeek-V2-Lite-shaped file: 32 prompts, edgeseek with 8, 16 and 32
sequences in flight (one forward pass per step for all of them: each routed expert read once for
every sequence routed to it; the prompts admitted together prefilled in one pass) against the same
prompts one at a time, and against llama.cpp one at a time; same threads, same run. Greedy, a fixed
number of new tokens per prompt (end-of-sequence ignored), so every side produces the same number
of tokens. Both sides are timed warm: llama.cpp's load reads (repacks) all of its weights; edgeseek
maps its packed cache lazily, so its weights are paged in before the timing.

    python bench/bench_batch.py [--kind q4_0] [--prompts 32] [--tokens 24] [--parallel 8,16,32] [--rounds 1]

With --rounds N the sides run N times, alternating, and each keeps its best run (the machine is
shared). Writes bench/results/batch.json and prints a markdown table. Each run is its own process.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def prompts(n: int) -> list[str]:
    topics = ["the sea", "a mountain", "bread", "a library", "rain", "a train", "the moon", "a garden"]
    return [f"Request {i}: write two sentences about {topics[i % len(topics)]}." for i in range(n)]


def page_in(engine) -> None:
    """Touch a byte of every page of every packed weight, routed experts included."""
    m = engine.model
    mats = [w for L in m.layers for w in vars(L).values() if hasattr(w, "packed")] + [m.output]
    if m.experts is not None:
        mats += [w for i in m.experts.tensors for t in m.experts.experts(i, np.arange(m.config.n_expert)) for w in t]
    for w in mats:
        for a in (w.packed if isinstance(w.packed, tuple) else (w.packed,)):
            if isinstance(a, np.ndarray) and a.size:
                int(a.reshape(-1).view(np.uint8)[::4096].sum())


def side_edgeseek(model: str, n: int, tokens: int, parallel: int) -> dict:
    import edgeseek
    from edgeseek import batch as B
    from edgeseek.sampler import SamplerConfig

    engine = edgeseek.load(model, n_ctx=256)
    engine.model.pack(engine.gguf)
    page_in(engine)
    engine.tokenizer.stop_ids = frozenset()  # a fixed number of tokens per request
    reqs = [B.Request(f"r{i}", i, "completion", p, tokens, SamplerConfig.greedy(), []) for i, p in
            enumerate(prompts(n))]
    warm = [B.Request(f"w{i}", i, "completion", "warm up", 2, SamplerConfig.greedy(), []) for i in range(parallel)]
    B.run(engine, warm, lambda line: None, parallel=parallel)  # numba loads its kernels
    out = []
    t = time.perf_counter()
    B.run(engine, reqs, out.append, parallel=parallel)
    dt = time.perf_counter() - t
    n_tok = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in out)
    return {"seconds": dt, "completion_tokens": n_tok, "tokens_per_s": n_tok / dt}


def side_llama_cpp(model: str, n: int, tokens: int, repack: bool = True) -> dict:
    import llama_cpp

    if not repack:
        sys.path.insert(0, str(HERE))
        from llama_cpp_side import disable_repack
        disable_repack()
    llm = llama_cpp.Llama(model, n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False)
    llm.create_completion("warm up", max_tokens=2, temperature=0)
    n_tok = 0
    t = time.perf_counter()
    for p in prompts(n):
        r = llm.create_completion(p, max_tokens=tokens, temperature=0, logit_bias={llm.token_eos(): -1e9})
        n_tok += r["usage"]["completion_tokens"]
    dt = time.perf_counter() - t
    return {"seconds": dt, "completion_tokens": n_tok, "tokens_per_s": n_tok / dt, "repack": repack}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", default="q4_0")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--parallel", default="8,16,32", help="sequences in flight: one number, or a comma list to sweep")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--side", choices=["edgeseek", "llama.cpp"])
    p.add_argument("--no-repack", action="store_true", help="llama.cpp without its repacked weight buffers")
    p.add_argument("--out", type=Path, default=HERE / "results" / "batch.json")
    a = p.parse_args()
    model = str(HERE / "data" / f"v2lite-{a.kind}.gguf")
    if a.side == "edgeseek":
        print(json.dumps(side_edgeseek(model, a.prompts, a.tokens, int(a.parallel))))
        return
    if a.side == "llama.cpp":
        print(json.dumps(side_llama_cpp(model, a.prompts, a.tokens, not a.no_repack)))
        return

    def run(args):
        done = subprocess.run([sys.executable, __file__, *args, "--kind", a.kind, "--prompts", str(a.prompts),
                               "--tokens", str(a.tokens)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    sides = {f"edgeseek, {n} in flight": ["--side", "edgeseek", "--parallel", str(n)]
             for n in map(int, a.parallel.split(",")) if n > 1}
    sides["edgeseek, one at a time"] = ["--side", "edgeseek", "--parallel", "1"]
    sides["llama.cpp, one at a time"] = ["--side", "llama.cpp"]
    rows: dict[str, dict] = {}
    for _ in range(a.rounds):
        for name, args in sides.items():
            try:
                r = run(args)
            except RuntimeError as e:
                if name != "llama.cpp, one at a time" or "--no-repack" in args:
                    raise
                # on CPUs with AMX llama.cpp's repacked (AMX) buffer aborts on deepseek2 graphs
                # (GGML_ASSERT(*cur_backend_id != -1), llama-cpp-python 0.3.36), as bench_runtime.py
                # notes: its best configuration that runs is then without repacking
                print(f"llama.cpp with repacking failed, measured without it: {str(e).splitlines()[0]}",
                      file=sys.stderr)
                args.append("--no-repack")
                r = run(args)
            print(f"{name}: {r['tokens_per_s']:.2f} tok/s", file=sys.stderr)
            if name not in rows or r["tokens_per_s"] > rows[name]["tokens_per_s"]:
                rows[name] = r
    base = rows["llama.cpp, one at a time"]["tokens_per_s"]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": Path(model).name, "prompts": a.prompts, "tokens_per_prompt": a.tokens,
                                 "threads": 2, "rounds": a.rounds, "runs": rows}, indent=1))
    print("| run | tokens | seconds | tokens/s | vs llama.cpp |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['completion_tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.2f} | "
              f"{r['tokens_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()

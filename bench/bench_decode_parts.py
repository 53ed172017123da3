"""Where a CPU decode token's time goes: each part of the step against the weight bytes it reads and
the read bandwidth measured in the same minutes.

    python bench/bench_decode_parts.py [FILE] [--steps 20] [--rounds 5] [--prompt 32] [--out ...]

FILE (default: bench/make_v2lite.py's Q4_0 file) decodes greedily after a `--prompt`-token prompt,
each step's time split by timers around the model's parts: attention (the projections, the per-head
products and the latent attention), the routed experts' products, the shared experts' and the dense
layers' feed-forward, the MoE's own work around them (router, routing, the weighted sums), the output
head, and the rest (embedding, norms, the Python between them). Each part's bytes are the weights it
reads as the file stores them (the routed experts: the experts used per layer), so its GB/s can be set
against the bandwidth probe (bench_runtime.bandwidth_gbs, the same threads) run between rounds: this
machine's bandwidth moves by a quarter within minutes, and a part is only slow against the probe of
its own minutes. The median step over `--rounds` rounds of `--steps` steps.
"""
from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

import numpy as np

from bench_runtime import bandwidth_gbs

HERE = Path(__file__).resolve().parent
ATTENTION = ("attn_q.weight", "attn_q_a.weight", "attn_q_b.weight", "attn_kv_a_mqa.weight", "attn_kv_b.weight",
             "attn_k_b.weight", "attn_v_b.weight", "attn_output.weight")
DENSE_FFN = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight",
             "ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight")
ROUTED = ("ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight")


def part_bytes(engine) -> dict:
    """The weight bytes (as stored in the file) each part reads for one decode token."""
    g, c = engine.gguf, engine.model.config
    n_layer = len(engine.model.layers)

    def size(name):
        return g.tensors[name].n_bytes if name in g.tensors else 0

    out = collections.Counter()
    for i in range(n_layer):
        p = f"blk.{i}."
        out["attention"] += sum(size(p + t) for t in ATTENTION)
        out["ffn"] += sum(size(p + t) for t in DENSE_FFN)
        out["experts"] += sum(size(p + t) for t in ROUTED) * c.n_expert_used // max(c.n_expert, 1)
        out["moe_glue"] += size(p + "ffn_gate_inp.weight")
    out["head"] = size("output.weight") or size("token_embd.weight")
    return dict(out)


def timed_steps(engine, steps: int, rounds: int, prompt: int) -> tuple[dict, list]:
    m, b = engine.model, engine.model.backend
    spent = collections.defaultdict(float)

    def timer(obj, name, part):
        f = getattr(obj, name)

        def timed(*args, **kw):
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[part] += time.perf_counter() - t
        setattr(obj, name, timed)

    timer(m, "attention", "attention")
    timer(m, "feed_forward", "feed_forward")
    timer(m, "output", "head")
    timer(b, "experts_rows", "experts")
    timer(b, "ffn", "ffn")
    rng = np.random.default_rng(0)
    cache = m.new_cache()
    logits = m.forward(rng.integers(100, 1000, prompt).astype(np.int32), cache)
    token = int(np.argmax(logits[-1]))
    per_step, probes = collections.defaultdict(list), []
    for r in range(rounds):
        probes.append(bandwidth_gbs())
        for s in range(steps + 2):
            spent.clear()
            t = time.perf_counter()
            logits = m.forward(np.array([token], np.int32), cache)
            total = time.perf_counter() - t
            token = int(np.argmax(logits[-1]))
            if s < 2:  # the round's first steps after the probe
                continue
            parts = dict(spent)
            parts["moe_glue"] = parts.pop("feed_forward", 0.0) - parts.get("experts", 0.0) - parts.get("ffn", 0.0)
            parts["rest"] = total - sum(parts.values())
            parts["total"] = total
            for k, v in parts.items():
                per_step[k].append(v)
    probes.append(bandwidth_gbs())
    return {k: float(np.median(v)) for k, v in per_step.items()}, probes


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", nargs="?", type=Path, default=HERE / "data" / "v2lite-q4_0.gguf")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--out", type=Path, default=HERE / "results" / "decode_parts.json")
    a = p.parse_args()
    if not a.file.exists():
        raise SystemExit(f"{a.file}: no such file (bench/make_v2lite.py writes the V2-Lite-shaped ones)")
    import edgeseek

    engine = edgeseek.load(a.file, n_ctx=a.prompt + (a.steps + 2) * a.rounds + 8)
    sizes = part_bytes(engine)
    sizes["total"] = sum(sizes.values())
    seconds, probes = timed_steps(engine, a.steps, a.rounds, a.prompt)
    bw = float(np.median(probes))
    rows = {}
    for part in ("attention", "experts", "ffn", "moe_glue", "head", "rest", "total"):
        s, n = seconds.get(part, 0.0), sizes.get(part, 0)
        rows[part] = {"ms": round(s * 1e3, 2), "MB": round(n / 1e6, 1),
                      "GB_per_s": round(n / s / 1e9, 1) if s > 0 and n else None,
                      "of_bandwidth": round(n / s / 1e9 / bw, 3) if s > 0 and n else None,
                      "ms_at_bandwidth": round(n / bw / 1e6, 2)}
    print(f"{a.file.name}: {1 / seconds['total']:.2f} tok/s; read bandwidth {bw:.1f} GB/s "
          f"(probes {', '.join(f'{x:.1f}' for x in probes)}), {engine.model.backend.threads} threads\n")
    print("| part | ms / token | MB / token | GB/s | of the bandwidth | ms at the bandwidth |")
    print("|---|---|---|---|---|---|")
    for part, r in rows.items():
        share = "-" if r["of_bandwidth"] is None else f"{r['of_bandwidth']:.0%}"
        print(f"| {part} | {r['ms']} | {r['MB']} | {r['GB_per_s'] or '-'} | {share} | {r['ms_at_bandwidth']} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"file": a.file.name, "bandwidth_gbs": round(bw, 2), "probes": [round(x, 2) for x in probes],
                                 "steps": a.steps, "rounds": a.rounds, "prompt": a.prompt, "parts": rows}, indent=1) + "\n")
    print(f"\nwritten to {a.out}")


if __name__ == "__main__":
    main()

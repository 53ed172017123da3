"""Expert-cache policies on a recorded routing trace: frequency with aging (edgeseek's) against
plain LRU, at several cache sizes, by hit rate.

    python bench/bench_policy.py [MODEL.gguf] [--tokens 200] [--decays 0.9 0.98 0.995] [--chat]

Runs the model (whole file mapped) over a fixed random token sequence, one token at a time,
recording which experts each MoE layer chose; then replays the trace through each policy (the
classes the expert store uses) with the cache holding a given fraction of all routed experts.
Writes bench/results/policy.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CHAT_PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how volcanoes form.",
                "Give me five tips for a good night's sleep.", "Describe a busy market in the morning."]


def record(path: str, n_tokens: int, chat: bool = False) -> tuple[list, int]:
    """One entry per decode step: the (layer, experts) each MoE layer chose. `chat`: the model's own
    greedy replies to a few chat prompts (a trained model's real routing, decode steps only);
    otherwise a fixed random token sequence."""
    import edgeseek

    e = edgeseek.load(path, n_ctx=max(n_tokens, 512) + 8, mtp="off")
    m = e.model
    store = m.experts
    trace: list[list] = []
    fetch = store.fetch

    def recording_fetch(layer, ids):
        trace[-1].append((layer, [int(i) for i in ids]))
        yield from fetch(layer, ids)

    store.fetch = recording_fetch
    if chat:
        for prompt in CHAT_PROMPTS:
            text = e.chat_template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
            start = len(trace)
            trace.append([])  # the prompt's prefill: dropped below
            for _ in edgeseek.stream_generate(e, e.tokenizer.encode(text), max_tokens=n_tokens // len(CHAT_PROMPTS),
                                              sampler=edgeseek.SamplerConfig.greedy()):
                trace.append([])  # the next decode step's choices land here
            del trace[start]
            while trace and not trace[-1]:
                trace.pop()
        return trace, m.config.n_expert * sum(1 for L in m.layers if not L.dense)
    seq = np.random.default_rng(0).integers(300, m.config.vocab_size, n_tokens).astype(np.int32)
    cache = m.new_cache()
    for t in seq:
        trace.append([])
        m.forward(np.array([t]), cache)
    return trace, m.config.n_expert * sum(1 for L in m.layers if not L.dense)


def simulate(trace: list, policy, capacity: int) -> float:
    cached: set = set()
    hits = misses = 0
    for token in trace:
        policy.tick(cached)
        for layer, ids in token:
            keys = [(layer, e) for e in ids]
            for k in keys:
                policy.use(k, k in cached)
            in_use = set(keys)
            for k in keys:
                if k in cached:
                    hits += 1
                    continue
                misses += 1
                while len(cached) >= capacity:
                    v = policy.victim(cached, in_use)
                    if v is None:
                        break
                    cached.discard(v)
                if len(cached) < capacity:
                    cached.add(k)
                    policy.admit(k)
    return hits / max(1, hits + misses)


def main():
    from edgeseek.policy import AgingFrequency, LeastRecentlyUsed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(HERE / "data" / "v2lite-q4_0.gguf"))
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--decays", type=float, nargs="+", default=[0.9, 0.98, 0.995])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.6])
    p.add_argument("--chat", action="store_true", help="record the model's own greedy chat replies "
                   "(a trained model, e.g. edgeseek-mini) instead of a random token sequence")
    p.add_argument("--out", type=Path, default=HERE / "results" / "policy.json")
    a = p.parse_args()
    trace, n_routed = record(a.model, a.tokens, a.chat)
    # a fixed-seed uniform trace of the same shape: what routing with no preference at all gives
    rng = np.random.default_rng(1)
    k = len(trace[0][0][1])
    uniform = [[(layer, list(rng.choice(n_routed // len(t), k, replace=False))) for layer, _ in t] for t in trace]
    rows = []
    for name, tr in (("model", trace), ("uniform", uniform)):
        for frac in a.fractions:
            cap = int(frac * n_routed)
            row = {"trace": name, "cache_fraction": frac, "capacity": cap,
                   "lru": simulate(tr, LeastRecentlyUsed(), cap)}
            for d in a.decays:
                row[f"aging_{d}"] = simulate(tr, AgingFrequency(d), cap)
            rows.append(row)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": Path(a.model).name, "tokens": len(trace), "chat": a.chat, "rows": rows}, indent=1))
    cols = ["lru"] + [f"aging_{d}" for d in a.decays]
    print("| trace | cache | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['trace']} | {100 * r['cache_fraction']:.0f}% | " +
              " | ".join(f"{100 * r[c]:.1f}%" for c in cols) + " |")


if __name__ == "__main__":
    main()

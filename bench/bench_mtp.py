"""Multi-token prediction: what verifying k+1 positions costs against one decode step, and what MTP
gives on a model with a trained MTP layer.

    python bench/bench_mtp.py [--cost FILE] [--model FILE_WITH_MTP] [--device cpu] [--out bench/results/mtp.json]

--cost (default: bench/make_v2lite.py's Q4_0 file; random weights, so acceptance means nothing
there): the time of a main-model forward over 1, 2, 3, 4 positions after a 64-token prompt, and of
the MTP block over one row and two (measured where the file has an MTP layer, else estimated as one
MoE layer and the output head); from those, the speedup that acceptance a (DeepSeek reports
0.85-0.9 for its second token) gives with k drafts: tokens per step sum(a^j, j=0..k) over the
step's cost (the verification, the catch-up over the step's tokens, k-1 further drafts) in units of
a plain step. --model: greedy decode with MTP off and with k = 1, 2, 3 on five prompts; tokens/s,
acceptance, tokens per step, and, where --cost is the same file, the speedup the cost model
predicts from the measured tokens per step next to the measured one. With --cost it also gives the
acceptance at which the cost model reaches --target (1.3x by default) for each k, and the speedup
with every draft accepted (the ceiling the step's costs leave).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def interleaved(runs: dict, repeats: int) -> dict:
    """The median seconds of each of `runs`, timed one after another in rounds: this machine's
    speed drifts by a quarter within minutes, and a cost measured while it was slow would be set
    against another measured while it was fast."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def costs(path: Path, device: str, repeats: int, ram_budget: str | None = None) -> dict:
    """Seconds of a forward over T = 1..4 new positions at the same context length, and of the
    MTP block over one row and two (a step's catch-up after a rejected draft or an accepted one):
    measured where the file has an MTP layer, else estimated as one MoE layer (a step's per-layer
    mean) and the output head."""
    import edgeseek
    from edgeseek.gguf_file import GGUFFile
    gguf = GGUFFile(path)
    has_mtp = bool(gguf.arch_meta("nextn_predict_layers", 0))
    engine = edgeseek.load(path, n_ctx=256, device=device, mtp=1 if has_mtp else "off", ram_budget=ram_budget)
    model = engine.model
    if not has_mtp and device == "cpu":  # the kernels a verification runs where the file has MTP (load
        # compiles their (token, expert) and (token, head) counts only then; without, they take other paths)
        from edgeseek.engine import verification_counts
        from edgeseek.quantize import FORMATS
        heads = gguf.arch_meta("attention.head_count") if gguf.has("blk.0.attn_k_b.weight") else 0
        counts = verification_counts(gguf.arch_meta("expert_used_count", 0), heads)
        names = ("blk.1.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight", "blk.0.attn_k_b.weight",
                 "blk.0.attn_v_b.weight")  # the experts' and heads' formats (every format: minutes of numba)
        for q in {gguf.tensors[n].qtype for n in names if gguf.has(n)} & set(FORMATS):
            FORMATS[q].warmup(counts)
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, model.config.vocab_size, 64).astype(np.int32)
    cache = model.new_cache()
    model.forward(prompt, cache)
    runs = {}
    for T in (1, 2, 3, 4):
        ids = rng.integers(100, model.config.vocab_size, T).astype(np.int32)

        def run(ids=ids):
            model.forward(ids, cache, all_logits=True)
            cache.truncate(64)
        run()  # warm: the experts these tokens route to are packed
        runs[T] = run
    xp = model.backend.xp
    h = xp.asarray(np.ones((1, model.config.n_embd), np.float32))
    runs["head"] = lambda: model.backend.host(model.output(h))
    if has_mtp:
        hidden = xp.asarray(rng.standard_normal((2, model.config.n_embd)).astype(np.float32))
        ids2 = model.backend.tokens(rng.integers(100, model.config.vocab_size, 2))
        rows = engine.mtp.draft_rows  # the head's rows the drafts come from, as generation runs the block
        for T in (1, 2):
            runs["mtp", T] = lambda T=T: model.mtp_step(hidden[:T], ids2[:T], np.arange(64, 64 + T), cache, rows)
    t = interleaved(runs, repeats)
    out, head = {T: t[T] for T in (1, 2, 3, 4)}, t["head"]
    layer = (out[1] - head) / model.config.n_layer
    mtp = {T: t["mtp", T] for T in (1, 2)} if has_mtp else {1: layer + head, 2: layer + head}
    return {"forward_s": out, "head_s": head, "layer_s": layer, "mtp_block_s": mtp, "mtp_measured": has_mtp,
            "n_layer": model.config.n_layer, "draft_rows": engine.mtp.draft_rows if engine.mtp else None}


def predicted_speedup(c: dict, tokens: float, k: int) -> float:
    """Tokens per step over the step's cost in plain steps. A step: the verification over k+1
    positions; the catch-up, the block over the step's tokens (accepted drafts + 1; the rows before
    the last write their cache entries only: one row's cost and a share of the second's), whose
    last row is the next first draft; k-1 more drafts, one row each."""
    f, m = c["forward_s"], c["mtp_block_s"]
    catch_up = m[1] + (m[2] - m[1]) * (tokens - 1)
    step = f[min(k + 1, 4)] + catch_up + (k - 1) * m[1]
    return tokens * f[1] / step


def at_acceptance(a: float, k: int) -> float:
    """Tokens per step when each draft is accepted with probability a (given the ones before)."""
    return sum(a ** j for j in range(k + 1))


def acceptance_for(c: dict, target: float, k: int) -> float | None:
    """The per-draft acceptance at which the cost model reaches `target` times plain decoding with
    k drafts (the speedup grows with acceptance: bisection), None where even every draft accepted
    falls short."""
    if predicted_speedup(c, at_acceptance(1.0, k), k) < target:
        return None
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_speedup(c, at_acceptance(mid, k), k) < target else (lo, mid)
    return hi


PROMPTS = ["Tell me about the history of the printing press.", "Explain photosynthesis to a child.",
           "Write a short poem about the sea.", "Give three tips for learning a new language.",
           "Tell me a story about a robot who learns to paint."]


def with_model(path: Path, device: str, n: int, runs: int = 7) -> dict:
    """Greedy replies of up to n tokens to five prompts (their lengths and the MTP head's acceptance
    differ from prompt to prompt: one reply of 30 tokens measured mostly its first steps), `runs`
    rounds; within a round each prompt is answered by every mode in turn (one engine each; the order
    rotated from round to round), so that a mode's reply and plain decoding's reply to the same prompt
    are timed within a second of each other: this machine's speed drifts by a quarter within
    minutes, more than the modes differ. A mode's speedup is the median, over every (round, prompt),
    of its reply's tokens/s over plain decoding's; its decode tok/s all its replies' tokens over their
    decode time."""
    import edgeseek
    from edgeseek.sampler import SamplerConfig
    modes = ("off", 1, 2, 3)
    engines = {mode: edgeseek.load(path, device=device, mtp=mode) for mode in modes}
    e = engines["off"]
    prompts = [e.tokenizer.encode(e.chat_template.render([{"role": "user", "content": p}], add_generation_prompt=True)
                                  if e.chat_template is not None else p) for p in PROMPTS]
    for e in engines.values():
        list(edgeseek.stream_generate(e, prompts[0], max_tokens=8, sampler=SamplerConfig.greedy()))  # warm
        if e.mtp is not None:
            e.mtp.steps = e.mtp.drafted = e.mtp.accepted = e.mtp.draft_misses = 0
    tokens, seconds = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0.0)
    ratios: dict = {mode: [] for mode in modes}
    for r in range(runs):
        for ids in prompts:
            rate = {}
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                last = None
                for last in edgeseek.stream_generate(engines[mode], ids, max_tokens=n, sampler=SamplerConfig.greedy()):
                    pass
                tokens[mode] += last.generation_tokens
                seconds[mode] += last.generation_tokens / last.generation_tps
                rate[mode] = last.generation_tps
            for mode in modes:
                ratios[mode].append(rate[mode] / rate["off"])
    return {str(mode): {"decode_tps": round(tokens[mode] / seconds[mode], 2), "runs": runs, "prompts": len(PROMPTS),
                        "speedup": round(float(np.median(ratios[mode])), 3),
                        "speedup_quartiles": [round(float(q), 3) for q in np.percentile(ratios[mode], [25, 75])],
                        **(engines[mode].mtp.stats() if engines[mode].mtp else {})} for mode in modes}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cost", type=Path, default=HERE / "data" / "v2lite-q4_0.gguf")
    p.add_argument("--model", type=Path, help="a GGUF file with an MTP layer (the distilled model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ram-budget", help="experts from the file through a cache of this size (e.g. 4G)")
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--runs", type=int, default=7, help="--model: replies per mode (their median)")
    p.add_argument("--target", type=float, default=1.3, help="the speedup whose acceptance the cost model reports")
    p.add_argument("--out", type=Path, default=HERE / "results" / "mtp.json")
    a = p.parse_args()
    result = {"device": a.device, "ram_budget": a.ram_budget}
    if a.cost and a.cost.exists():
        c = costs(a.cost, a.device, a.repeats, a.ram_budget)
        c["predicted_speedup"] = {f"a={acc}": {f"k={k}": round(predicted_speedup(c, at_acceptance(acc, k), k), 3)
                                               for k in (1, 2, 3)} for acc in (0.5, 0.7, 0.85, 0.9)}
        c["ceiling"] = {f"k={k}": round(predicted_speedup(c, at_acceptance(1.0, k), k), 3) for k in (1, 2, 3)}
        need = {f"k={k}": acceptance_for(c, a.target, k) for k in (1, 2, 3)}
        c["acceptance_for"] = {f"{a.target}x": {k: None if v is None else round(v, 3) for k, v in need.items()}}
        result["cost"] = {"file": a.cost.name, **c}
        f = c["forward_s"]
        print(f"{a.cost.name}: forward over 1/2/3/4 positions {f[1] * 1e3:.1f} / {f[2] * 1e3:.1f} / "
              f"{f[3] * 1e3:.1f} / {f[4] * 1e3:.1f} ms (x{f[2] / f[1]:.2f} / x{f[3] / f[1]:.2f} / x{f[4] / f[1]:.2f});"
              f" MTP block over 1 / 2 rows {c['mtp_block_s'][1] * 1e3:.2f} / {c['mtp_block_s'][2] * 1e3:.2f} ms"
              f" ({'measured' if c['mtp_measured'] else 'estimated'}; head {c['head_s'] * 1e3:.2f} ms)")
        for acc, row in c["predicted_speedup"].items():
            print(f"  predicted speedup at {acc}: " + ", ".join(f"{k} {v:.2f}x" for k, v in row.items()))
        print(f"  {a.target}x needs acceptance " + ", ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in need.items())
              + " (every draft accepted: " + ", ".join(f"{k} {v:.2f}x" for k, v in c["ceiling"].items()) + ")")
    if a.model:
        rows = with_model(a.model, a.device, a.decode, a.runs)
        result["model"] = {"file": a.model.name, "runs": rows}
        same = "cost" in result and result["cost"]["file"] == a.model.name
        for mode, r in rows.items():
            if same and mode != "off":  # what the cost model predicts from the measured tokens per step
                r["predicted_speedup"] = round(predicted_speedup(result["cost"], r["mtp_tokens_per_step"], int(mode)), 3)
            print(f"  mtp {mode}: {r['decode_tps']} tok/s ({r['speedup']:.2f}x"
                  + (f", predicted {r['predicted_speedup']:.2f}x" if "predicted_speedup" in r else "")
                  + f"), acceptance {r.get('mtp_acceptance')}, tokens/step {r.get('mtp_tokens_per_step')}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

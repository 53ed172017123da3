"""What the distilled model (train/distill.py) learned, measured with edgeseek on the GGUF files.

    python train/evaluate.py STUDENT.gguf --teacher SMOLLM2.gguf --data RUN/data.npy \
        [--rows 120] [--out bench/results/distill.json]

- held-out perplexity of student and teacher on the teacher's replies (the rows of data.npy that
  training never saw: distill.HELD_OUT), scored on the reply tokens only;
- the MTP head's top-1 agreement with the main model's next-next token (what a greedy draft needs to
  be accepted), on the same text;
- expert routing over that text, per MoE layer: the entropy of expert use over the corpus (balanced:
  near log2(n_expert)) and given the token id (specific per token: far below it), plus the counts
  written as the model's usage profile, so `edgeseek experts STUDENT --png` draws them;
- greedy chat replies of both models to five prompts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea.",
           "Explain photosynthesis to a child.", "Give three tips for learning a new language.",
           "Tell me a story about a robot who learns to paint."]


def held_out_rows(data: np.ndarray, n: int) -> list[np.ndarray]:
    rows = data[len(data) - distill.held_out(len(data)):][:n]
    return [r[r >= 0] for r in rows]


def reply_start(ids: np.ndarray, im_start: int) -> int:
    """Index of the first reply token: after the last '<|im_start|>', 'assistant', '\\n'."""
    return int(np.nonzero(ids == im_start)[0][-1]) + 3


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(engine, rows, im_start: int) -> tuple[float, int]:
    nll, n = 0.0, 0
    for ids in rows:
        logits = engine.model.forward(ids, engine.model.new_cache(len(ids) + 1), all_logits=True)
        s = reply_start(ids, im_start)
        lp = log_softmax(logits[s - 1:-1])
        nll -= lp[np.arange(len(lp)), ids[s:]].sum()
        n += len(ids) - s
    return float(np.exp(nll / n)), n


def mtp_agreement(engine, rows, im_start: int) -> dict:
    """For each reply position i: the MTP head given h_i and token i+1 against the main model's own
    argmax at i+1 (what a greedy draft must match) and against the text's token i+2."""
    m = engine.model
    b, M = m.backend, m.mtp
    same = text = n = 0
    for ids in rows:
        cache = m.new_cache(len(ids) + 1)
        logits, h = m.forward(ids, cache, all_logits=True, hidden=True)
        pos = np.arange(len(ids) - 1)
        _, x = m.mtp_step(h[:-1], b.tokens(ids[1:]), pos, cache)
        draft = b.host(M.head(b.rms_norm(x, M.head_norm, m.config.rms_eps))).argmax(-1)  # predicts i+2
        s = reply_start(ids, im_start)
        i = np.arange(max(s - 1, 0), len(ids) - 2)
        same += int((draft[i] == logits[i + 1].argmax(-1)).sum())
        text += int((draft[i] == ids[i + 2]).sum())
        n += len(i)
    return {"positions": n, "agree_with_main_model": same / n, "agree_with_text": text / n}


def routing(engine, rows) -> dict:
    """Each MoE layer's expert choices over the text, one token at a time (as decoding routes)."""
    m = engine.model
    store = m.experts
    fetch = store.fetch
    seen: list = []

    def recording(layer, ids):
        seen.append((layer, [int(i) for i in ids]))
        yield from fetch(layer, ids)

    store.fetch = recording
    per_layer: dict = defaultdict(lambda: defaultdict(lambda: np.zeros(m.config.n_expert)))
    counts = np.zeros((m.config.n_layer + m.config.n_mtp, m.config.n_expert))  # the file's blocks, MTP's too
    try:
        for ids in rows:
            cache = m.new_cache(len(ids) + 1)
            for t in ids:
                seen.clear()
                m.forward(np.array([t]), cache)
                for layer, chosen in seen:
                    if layer < m.config.n_layer:
                        per_layer[layer][int(t)][chosen] += 1
                        counts[layer, chosen] += 1
    finally:
        store.fetch = fetch

    def entropy(c):
        p = c[c > 0] / c.sum()
        return float(-(p * np.log2(p)).sum())

    layers = {}
    for layer, by_token in sorted(per_layer.items()):
        total = sum(by_token.values())
        n = total.sum()
        given = sum(c.sum() / n * entropy(c) for c in by_token.values())
        layers[layer] = {"corpus_entropy_bits": entropy(total), "given_token_entropy_bits": given,
                         "busiest_share": float(total.max() / n), "idlest_share": float(total.min() / n)}
    return {"max_entropy_bits": float(np.log2(m.config.n_expert)), "layers": layers, "counts": counts}


def replies(engine, prompts) -> list[str]:
    import edgeseek
    out = []
    for p in prompts:
        text = engine.chat_template.render([{"role": "user", "content": p}], add_generation_prompt=True)
        out.append(edgeseek.generate(engine, text, max_tokens=96, sampler=edgeseek.SamplerConfig.greedy()).strip())
    return out


def main():
    import edgeseek
    from edgeseek.gguf_file import GGUFFile
    from edgeseek.profile import profile_path, save_profile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("student", type=Path)
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rows", type=int, default=120, help="held-out rows to score")
    p.add_argument("--routing-rows", type=int, default=40, help="held-out rows decoded token by token")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "bench" / "results"
                   / "distill.json")
    a = p.parse_args()
    rows = held_out_rows(np.load(a.data), a.rows)
    student = edgeseek.load(a.student, mtp=1, n_ctx=1024)
    teacher = edgeseek.load(a.teacher, n_ctx=1024)
    im_start = student.tokenizer.encode("<|im_start|>")[0]
    res = {"student": str(a.student.name), "teacher": str(a.teacher.name), "held_out_rows": len(rows)}
    t0 = time.perf_counter()
    res["perplexity"] = {}
    for name, e in (("student", student), ("teacher", teacher)):
        ppl, n = perplexity(e, rows, im_start)
        res["perplexity"][name] = ppl
        res["perplexity"]["tokens"] = n
        print(f"held-out perplexity {name}: {ppl:.2f} over {n} reply tokens", flush=True)
    res["mtp"] = mtp_agreement(student, rows, im_start)
    print(f"MTP top-1 agreement: {res['mtp']}", flush=True)
    r = routing(edgeseek.load(a.student, mtp="off", n_ctx=1024), rows[:a.routing_rows])
    g = GGUFFile(a.student)
    save_profile(profile_path(g), r.pop("counts"), str(a.student))
    res["routing"] = r
    for layer, v in r["layers"].items():
        print(f"layer {layer}: expert-use entropy {v['corpus_entropy_bits']:.2f} bits over the text, "
              f"{v['given_token_entropy_bits']:.2f} given the token (max {r['max_entropy_bits']:.2f})")
    res["replies"] = {"prompts": PROMPTS, "student": replies(edgeseek.load(a.student, mtp="off"), PROMPTS),
                      "teacher": replies(teacher, PROMPTS)}
    res["seconds"] = time.perf_counter() - t0
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(res, indent=1))
    print(f"-> {a.out}")


if __name__ == "__main__":
    main()

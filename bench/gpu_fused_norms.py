"""Decode on the GPU with a step's norms and its attention output's quantization inside the
products that read them (the default) against launches of their own, alternated in one process:
tg128 from an empty context and tg64 after a 512-token prompt, `--rounds` rounds; then the logits of
both on the same 48 tokens (teacher-forced), as fractions of their spread. On the GPU machine:

    python bench/gpu_fused_norms.py bench/data/v2lite-q4_0.gguf [more.gguf] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    import edgeseek
    for path in a.files:
        engine = edgeseek.load(path, n_ctx=1024, device="cuda")
        m, b = engine.model, engine.model.backend
        rng = np.random.default_rng(0)
        prompt = rng.integers(100, m.config.vocab_size, 512).astype(np.int32)
        out = {"file": path.split("/")[-1], "device": engine.device_name}

        def fused(on: bool) -> None:
            if on:
                b.__dict__.pop("stages", None)
            else:  # no product stages its activations: the norms and quantizations launch on their own
                b.stages = lambda x, q: False

        def tg(n: int, pre=None) -> float:
            cache = m.new_cache()  # its own decode graph, captured with the variant in force
            if pre is not None:
                m.forward(pre, cache)
            token = int(np.argmax(m.forward(np.array([7], np.int32), cache)[-1]))
            t = time.perf_counter()
            for _ in range(n):
                token = int(np.argmax(m.forward(np.array([token], np.int32), cache)[-1]))
            return n / (time.perf_counter() - t)

        for _ in range(a.rounds):
            for on in (False, True):
                fused(on)
                key = "fused" if on else "own launches"
                out.setdefault(key + " tg128", []).append(round(tg(128), 1))
                out.setdefault(key + " tg64@512", []).append(round(tg(64, prompt), 1))
        tokens, logits = rng.integers(100, m.config.vocab_size, 48).astype(np.int32), {}
        for on in (False, True):
            fused(on)
            cache = m.new_cache()
            logits[on] = np.array([m.forward(np.array([t], np.int32), cache)[-1] for t in tokens])
        spread = float(logits[False].max() - logits[False].min())
        out["logits_max_diff_over_spread"] = float(np.abs(logits[True] - logits[False]).max()) / spread
        out["argmax_equal"] = float(np.mean(logits[True].argmax(-1) == logits[False].argmax(-1)))
        print(json.dumps(out), flush=True)
        del engine, m, b


if __name__ == "__main__":
    main()

"""Token sampling: repetition penalty, top-k, top-p, min-p, temperature, seeded draws.

The order and the defaults follow llama.cpp's common sampler chain (common/sampling.cpp):
penalties -> top-k -> top-p -> min-p -> temperature -> draw. top-p and min-p see the
probabilities at temperature 1, as there. temperature <= 0 means greedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class SamplerConfig:
    temperature: float = 0.8  # <= 0: greedy (argmax after penalties)
    top_k: int = 40  # keep the k most likely tokens; <= 0: all
    top_p: float = 0.95  # keep the smallest set whose probability reaches p; 1: all
    min_p: float = 0.05  # drop tokens below min_p * p(best); 0: none
    repeat_penalty: float = 1.0  # > 1 discourages the last `repeat_last_n` tokens; 1: off
    repeat_last_n: int = 64
    seed: int | None = None  # None: a fresh random seed

    def __post_init__(self):
        # ValueError naming the option: from the command line, /set and the Python API alike
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
        for name in ("top_p", "min_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)}")
        if self.repeat_penalty <= 0:
            raise ValueError(f"repeat_penalty must be positive, got {self.repeat_penalty}")

    @classmethod
    def greedy(cls) -> "SamplerConfig":
        return cls(temperature=0.0)

    def updated(self, **changes) -> "SamplerConfig":
        """A copy with some options changed; unknown names raise ValueError naming them."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown sampling option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **changes)


class Sampler:
    def __init__(self, config: SamplerConfig = SamplerConfig()):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray, history: list[int] | None = None) -> int:
        """One token id from logits (V,) float32; `history` holds the ids so far (for penalties)."""
        ids, p = self.distribution(logits, history)
        if self.config.temperature <= 0:
            return int(ids[0])
        return int(ids[self.rng.choice(len(ids), p=p)])

    def distribution(self, logits: np.ndarray, history: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """What a draw picks from: candidate ids and their probabilities after the whole chain
        (greedy: the best id with probability 1). Speculative decoding accepts drafts by it."""
        c = self.config
        logits = np.asarray(logits, dtype=np.float32)
        if c.repeat_penalty != 1.0 and history and c.repeat_last_n != 0:
            recent = history[-c.repeat_last_n:] if c.repeat_last_n > 0 else history
            ids = np.unique(np.asarray(recent, dtype=np.int64))
            logits = logits.copy()
            vals = logits[ids]
            # llama.cpp's penalty: divide positive logits, multiply negative ones.
            logits[ids] = np.where(vals > 0, vals / c.repeat_penalty, vals * c.repeat_penalty)
        if c.temperature <= 0:
            return np.array([int(np.argmax(logits))]), np.ones(1)

        # Candidates sorted by logit, best first: (n,)
        if 0 < c.top_k < logits.shape[0]:
            ids = np.argpartition(-logits, c.top_k - 1)[: c.top_k]
        else:
            ids = np.arange(logits.shape[0])
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        cand = logits[ids].astype(np.float64)

        if c.top_p < 1.0:
            p = _softmax(cand)
            keep = int(np.searchsorted(np.cumsum(p), c.top_p) + 1)
            ids, cand = ids[:keep], cand[:keep]
        if c.min_p > 0.0:
            p = _softmax(cand)
            keep = p >= c.min_p * p[0]
            ids, cand = ids[keep], cand[keep]
        return ids, _softmax(cand / c.temperature)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()

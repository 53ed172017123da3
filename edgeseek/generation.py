"""Generation in layers: `generate_step` yields token ids, `stream_generate` yields text with stats.

Frontends (the chat, the batch runner) only consume `stream_generate`'s `GenerationResponse`s.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from .errors import EdgeseekError
from .sampler import Sampler, SamplerConfig

if TYPE_CHECKING:
    from .engine import Context, Engine


@dataclass
class GenerationResponse:
    text: str  # the new text since the previous response ("" is possible)
    token: int | None  # the token that produced it (None on the final, flushing response)
    prompt_tokens: int  # tokens of the prompt actually processed (cached prefix excluded)
    prompt_tps: float  # prompt processing, tokens/s
    generation_tokens: int  # tokens generated so far
    generation_tps: float  # tokens/s since the first token
    ttft: float  # seconds from the call to the first token
    finish_reason: str | None = None  # "stop" (EOS or stop string), "length", or None while running


def generate_step(
    engine: Engine, prompt_ids: Sequence[int], context: Context, sampler: Sampler
) -> Iterator[int]:
    """Yields token ids without end: prefill runs once (batched), then one decode step per token.

    The context's cache always holds exactly `context.tokens`; an interrupted step (Ctrl+C) rolls
    back what it had written.
    """
    model = engine.model
    try:
        new = context.reuse_prefix(list(prompt_ids))
        logits = model.forward(np.asarray(new, dtype=np.int32), context.cache)[-1]
        context.tokens.extend(new)
        while True:
            token = sampler(logits, context.tokens)
            yield token
            if len(context.tokens) >= context.n_ctx:
                return
            logits = model.forward(np.asarray([token], dtype=np.int32), context.cache)[-1]
            context.tokens.append(token)
    finally:
        context.truncate(len(context.tokens))


def stream_generate(
    engine: Engine,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampler: SamplerConfig | Sampler | None = None,
    stop: Sequence[str] = (),
    context: Context | None = None,
) -> Iterator[GenerationResponse]:
    """Text chunks of the reply to `prompt` (text is tokenized with the model's BOS rule)."""
    t0 = time.perf_counter()
    tok = engine.tokenizer
    ids = tok.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise EdgeseekError("the prompt is empty")
    context = context or engine.new_context()
    if len(ids) >= context.n_ctx:
        raise EdgeseekError(f"the prompt has {len(ids)} tokens; the context holds {context.n_ctx}")
    if not isinstance(sampler, Sampler):
        sampler = Sampler(sampler or SamplerConfig())
    n_cached = sum(1 for _ in _common_prefix(context.tokens, ids))
    n_prompt = len(ids) - min(n_cached, len(ids) - 1)

    decoder = tok.stream_decoder()
    stops = _StopMatcher(stop)
    ttft = prompt_tps = 0.0
    t_first = t0
    n = 0

    def response(text, token, reason=None):
        gen_time = time.perf_counter() - t_first
        return GenerationResponse(
            text, token, n_prompt, prompt_tps, n, (n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            ttft, reason,
        )

    steps = generate_step(engine, ids, context, sampler)
    try:
        for token in steps:
            if n == 0:
                t_first = time.perf_counter()
                ttft = t_first - t0
                prompt_tps = n_prompt / ttft if ttft > 0 else 0.0
            n += 1
            if token in tok.stop_ids:
                yield response(stops.flush(decoder.flush()), None, "stop")
                return
            text, hit = stops.feed(decoder.add(token))
            if hit:
                yield response(text, token, "stop")
                return
            if n >= max_tokens or len(context.tokens) >= context.n_ctx:
                yield response(text + stops.flush(decoder.flush()), token, "length")
                return
            yield response(text, token)
    finally:
        steps.close()


def _common_prefix(a: Sequence[int], b: Sequence[int]):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


class _StopMatcher:
    """Holds back text that may be the start of a stop string, so a stop string is never shown."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self, text: str = "") -> str:
        out, hit = self.feed(text)
        if hit:
            return out
        out, self.pending = out + self.pending, ""
        return out


def generate(engine: Engine, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole reply as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(engine, prompt, **kwargs))

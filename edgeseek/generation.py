"""Generation in layers: `generate_step` yields token ids, `stream_generate` yields text with stats,
`BatchGenerator` decodes several sequences together, one forward pass per step.

Both drivers end a sequence by the same rules (`Continuation`): an end-of-generation token or a stop
string finishes it with "stop" (a stop string is held back until it can no longer match, and never
shown); `max_tokens` tokens or a full context finish it with "length". Frontends (the chat,
`edgeseek generate`, the batch runner) only consume what these yield.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Hashable, Iterator, Sequence

import numpy as np

from .errors import EdgeseekError
from .models import common as model_common
from .sampler import Sampler, SamplerConfig

if TYPE_CHECKING:
    from .engine import Context, Engine
    from .tokenizer import Tokenizer


class StopMatcher:
    """Holds back text that may be the start of a stop string, so a stop string is never shown."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text that can be shown now, whether a stop string was completed)."""
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
        """Everything still held (the sequence ended), cut at a stop string if `text` completes one."""
        out, hit = self.feed(text)
        if hit:
            return out
        out, self.pending = out + self.pending, ""
        return out


class Continuation:
    """The text of one sequence's sampled tokens and the reason it ends, token by token."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, stop: Sequence[str] = (), ignore_eos: bool = False):
        self.stop_ids = frozenset() if ignore_eos else tokenizer.stop_ids  # ignore_eos: benchmarks' fixed lengths
        self.decoder = tokenizer.stream_decoder()
        self.stops = StopMatcher(stop)
        self.max_tokens = max_tokens
        self.n = 0  # tokens sampled, an end-of-generation token included
        self.finish_reason: str | None = None  # "stop", "length", or None while it runs

    def add(self, token: int, context_full: bool) -> str:
        """The text `token` adds ("" while text is held back). `context_full`: the token cannot be
        fed back (every position of the cache is taken), so it is the last."""
        self.n += 1
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.stops.flush(self.decoder.flush())
        text, hit = self.stops.feed(self.decoder.add(token))
        if hit:
            self.finish_reason = "stop"
        elif self.n >= self.max_tokens or context_full:
            self.finish_reason = "length"
            text += self.stops.flush(self.decoder.flush())
        return text


def check_prompt(ids: Sequence[int], n_ctx: int) -> None:
    """Refuses a prompt that is empty or leaves no room in a context of n_ctx for a reply."""
    if not ids:
        raise EdgeseekError("the prompt is empty")
    if len(ids) >= n_ctx:
        raise EdgeseekError(f"the prompt has {len(ids)} tokens; the context holds {n_ctx}")


def cached_prefix(context: Context, ids: Sequence[int]) -> int:
    """How many leading `ids` the context already holds, leaving at least one to run (its logits
    pick the next token)."""
    n = 0
    for a, b in zip(context.tokens, ids):
        if a != b:
            break
        n += 1
    return min(n, len(ids) - 1)


def _context_full(context: Context) -> bool:
    return len(context.tokens) >= context.n_ctx


@contextmanager
def _interruptible():
    """Ctrl+C that lands as a numba kernel returns surfaces as SystemError ("... returned a result
    with an exception set") caused by the KeyboardInterrupt: callers get the KeyboardInterrupt, so
    that stopping a reply stops the reply and not the program."""
    try:
        yield
    except SystemError as e:
        if isinstance(e.__cause__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise


def _steps(engine: Engine, new: Sequence[int], context: Context, sampler: Sampler) -> Iterator[int]:
    """Prefill `new` after what the context holds, then yield one sampled token per decode step
    (several per step with multi-token prediction); ends when the context is full. Rolls the cache
    back to `context.tokens` when stopped."""
    with _interruptible():
        if engine.mtp is not None and engine.mtp.k > 0:
            yield from _mtp_steps(engine, new, context, sampler)
        else:
            yield from _plain_steps(engine, new, context, sampler)


def _plain_steps(engine: Engine, new: Sequence[int], context: Context, sampler: Sampler) -> Iterator[int]:
    model = engine.model
    try:
        logits = model.forward(np.asarray(new, dtype=np.int32), context.cache)[-1]
        context.tokens.extend(new)
        while True:
            token = sampler(logits, context.tokens)
            yield token
            if _context_full(context):
                return
            logits = model.forward(np.asarray([token], dtype=np.int32), context.cache)[-1]
            context.tokens.append(token)
    finally:
        context.truncate(len(context.tokens))


def _mtp_steps(engine: Engine, new: Sequence[int], context: Context, sampler: Sampler) -> Iterator[int]:
    """Self-speculative decoding with the model's MTP block: it drafts k tokens from the main
    model's last hidden state (k > 1 by feeding the block its own output, as vLLM reuses DeepSeek's
    one module); the main model verifies the pending token and the drafts in one forward pass; the
    longest agreeing prefix is kept (greedy: argmax equality; sampling: the speculative-sampling rule,
    which leaves the sampler's distribution unchanged) and both caches roll back the rest.

    The MTP cache entry at position i pairs the main hidden state h_i with token i+1; the context's
    `mtp_valid` counts the positions whose entries are written."""
    model, mtp, b = engine.model, engine.mtp, engine.model.backend
    cache = context.cache
    if context.mtp_valid < len(context.tokens):  # entries missing (a context filled without MTP): redo them
        new = context.tokens[context.mtp_valid:] + list(new)
        context.truncate(context.mtp_valid)
    try:
        start = len(context.tokens)
        logits, hidden = model.forward(np.asarray(new, dtype=np.int32), cache, hidden=True)
        context.tokens.extend(new)
        token = sampler(logits[-1], context.tokens)
        yield token
        q_logits, g = _mtp_catch_up(model, hidden, list(new[1:]) + [token], start, cache, context, mtp.draft_rows)
        while not _context_full(context):
            n = len(context.tokens)  # the pending token's position
            if mtp.k == 0 or mtp.measuring_plain():  # auto: plain steps timed first; or decided off
                keep = mtp.k > 0  # still measuring: the MTP entries stay written
                t0 = time.perf_counter()
                out = model.forward(np.asarray([token], dtype=np.int32), cache, hidden=keep)
                logits, hidden = out if keep else (out, None)
                if keep:
                    mtp.plain_step(time.perf_counter() - t0)
                context.tokens.append(token)
                token = sampler(logits[-1], context.tokens)
                if keep:
                    q_logits, g = _mtp_catch_up(model, hidden, [token], n, cache, context, mtp.draft_rows)
                yield token
                continue
            k = min(mtp.k, context.n_ctx - n - 1)  # 0 at the context's end: a plain step
            t0 = time.perf_counter()
            drafts, q_dists = [], []
            for j in range(k):
                hist = context.tokens + [token] + drafts
                d, q = _draft(sampler, q_logits[-1], hist)
                drafts.append(d)
                q_dists.append(q)
                if j + 1 < k:  # the block again, on its own output and the draft, at position n + j
                    q_logits, g = model.mtp_step(g[-1:], b.tokens([d]), np.array([n + j]), cache, mtp.draft_rows)
            verify = [token] + drafts
            if cache.lora:  # the adapters' head rows as the pass assigned them
                logits, hidden = model.forward(np.asarray(verify, dtype=np.int32), cache, all_logits=True, hidden=True)
            else:  # the head over the rows _accept reads, up to the first rejected draft
                _, hidden = model.forward(np.asarray(verify, dtype=np.int32), cache, hidden=True, head=False)
                logits = _HeadRows(model, hidden)
            accepted, nxt = _accept(sampler, logits, drafts, q_dists, context.tokens + [token])
            cache.truncate(n + accepted + 1)  # the main cache keeps the pending token and the accepted drafts
            token = nxt
            q_logits, g = _mtp_catch_up(model, hidden[:accepted + 1], drafts[:accepted] + [token], n, cache, context,
                                        mtp.draft_rows)
            mtp.step(len(drafts), accepted, time.perf_counter() - t0, (drafts[:accepted] + [token])[0] if drafts else None)
            for fed, t in zip(verify, drafts[:accepted] + [token]):
                context.tokens.append(fed)  # as one token per step would have it when t is drawn
                yield t
    finally:
        context.truncate(len(context.tokens))


class _HeadRows:
    """A verification's logits, row j the output head over hidden row j when first read (_accept
    reads them in order and stops at the first rejected draft): what a decode step of that token
    computes, one row through the same product."""

    def __init__(self, model, hidden):
        self.model, self.hidden, self.rows = model, hidden, {}

    def __getitem__(self, j: int) -> np.ndarray:
        if j not in self.rows:
            m = self.model
            self.rows[j] = m.backend.host(m.output(self.hidden[j:j + 1]))[0]
        return self.rows[j]


def _mtp_catch_up(model, hidden, next_tokens: list[int], start: int, cache, context: Context, rows=None):
    """MTP entries for positions start.. (hidden row j with next_tokens[j]) -> the block's logits
    (over the head's first `rows` tokens where given) and output of the last chunk (a prompt's rows
    PROMPT_CHUNK at a time), whose last row drafts the next token."""
    chunk = model_common.PROMPT_CHUNK
    for a in range(0, len(next_tokens), chunk):
        b = min(len(next_tokens), a + chunk)
        q_logits, g = model.mtp_step(hidden[a:b], model.backend.tokens(next_tokens[a:b]), np.arange(start + a, start + b),
                                     cache, rows)
        context.mtp_valid = start + b
    return q_logits, g


def _draft(sampler: Sampler, logits: np.ndarray, history: list[int]) -> tuple[int, tuple]:
    """A draft token from the MTP block's logits, through the sampler's own chain, and the
    distribution it was drawn from (greedy: the argmax)."""
    ids, p = sampler.distribution(logits, history)
    if sampler.config.temperature <= 0:
        return int(ids[0]), (ids, p)
    return int(ids[sampler.rng.choice(len(ids), p=p)]), (ids, p)


def _accept(sampler: Sampler, logits: np.ndarray, drafts: list[int], q_dists: list, history: list[int]):
    """How many drafts the main model's logits (k+1, V) keep, and the token that follows them.
    Greedy: drafts equal to the argmax. Sampling: draft d kept with probability min(1, p(d)/q(d)),
    the first rejected position drawn from max(0, p - q) normalized, so that every token is
    distributed as the sampler would draw it without drafts (Leviathan et al., Chen et al. 2023)."""
    greedy = sampler.config.temperature <= 0
    hist = list(history)
    for j, d in enumerate(drafts):
        if greedy:
            best = sampler(logits[j], hist)
            if best != d:
                return j, best
        else:
            ids, p = sampler.distribution(logits[j], hist)
            q_ids, q = q_dists[j]
            pd = float(p[ids == d].sum())
            qd = float(q[q_ids == d].sum())
            if sampler.rng.random() >= min(1.0, pd / qd if qd > 0 else 0.0):
                V = len(logits[j])
                res = np.zeros(V)
                res[ids] += p
                res[q_ids] -= q
                res = np.maximum(res, 0.0)
                if res.sum() <= 0:  # p == q: any draw from p
                    return j, int(ids[sampler.rng.choice(len(ids), p=p)])
                nz = np.nonzero(res)[0]
                return j, int(nz[sampler.rng.choice(len(nz), p=res[nz] / res[nz].sum())])
        hist.append(d)
    return len(drafts), sampler(logits[len(drafts)], hist)


def generate_step(
    engine: Engine, prompt_ids: Sequence[int], context: Context, sampler: Sampler
) -> Iterator[int]:
    """Yields token ids until the context is full: prefill runs once (batched, after the prefix the
    context already holds), then one decode step per token.

    The context's cache always holds exactly `context.tokens`; an interrupted step (Ctrl+C) rolls
    back what it had written.
    """
    ids = list(prompt_ids)
    n = cached_prefix(context, ids)
    context.truncate(n)
    yield from _steps(engine, ids[n:], context, sampler)


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


def stream_generate(
    engine: Engine,
    prompt: str | Sequence[int],
    *,
    max_tokens: int = 256,
    sampler: SamplerConfig | Sampler | None = None,
    stop: Sequence[str] = (),
    context: Context | None = None,
) -> Iterator[GenerationResponse]:
    """Text chunks of the reply to `prompt` (text is tokenized with the model's BOS rule). With a
    `context` kept between calls, only the tokens after the prefix it already holds are processed."""
    t0 = time.perf_counter()
    ids = engine.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    context = context or engine.new_context()
    check_prompt(ids, context.n_ctx)
    sampler = _sampler(sampler)
    n_cached = cached_prefix(context, ids)
    context.truncate(n_cached)
    n_prompt = len(ids) - n_cached
    reply = Continuation(engine.tokenizer, max_tokens, stop)
    ttft = prompt_tps = 0.0
    t_first = t0

    steps = _steps(engine, ids[n_cached:], context, sampler)
    try:
        for token in steps:
            if reply.n == 0:
                t_first = time.perf_counter()
                ttft = t_first - t0
                prompt_tps = n_prompt / ttft if ttft > 0 else 0.0
            text = reply.add(token, _context_full(context))
            n, gen_time = reply.n, time.perf_counter() - t_first
            yield GenerationResponse(
                text, None if token in reply.stop_ids else token, n_prompt, prompt_tps, n,
                (n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0, ttft, reply.finish_reason,
            )
            if reply.finish_reason:
                return
    finally:
        steps.close()


def generate(engine: Engine, prompt: str | Sequence[int], **kwargs) -> str:
    """The whole reply as one string (see `stream_generate` for the options)."""
    return "".join(r.text for r in stream_generate(engine, prompt, **kwargs))


def _sampler(sampler: SamplerConfig | Sampler | None) -> Sampler:
    return sampler if isinstance(sampler, Sampler) else Sampler(sampler or SamplerConfig())


@dataclass
class Delta:
    """What one sequence of a `BatchGenerator` produced in one step."""

    uid: Hashable  # the sequence, as `BatchGenerator.add` named it
    text: str  # new text ("" while a possible stop string is held back)
    token: int | None  # the sampled token (None when an end-of-generation token ended the sequence)
    prompt_tokens: int  # the sequence's prompt length
    generation_tokens: int  # tokens sampled so far, an end-of-generation token included
    finish_reason: str | None  # "stop", "length", or None while the sequence runs
    cached_tokens: int = 0  # prompt tokens the sequence's context already held (not prefilled again)


@dataclass
class _Row:
    context: Context
    sampler: Sampler
    reply: Continuation
    n_prompt: int
    n_cached: int = 0  # prompt tokens its context already held
    last: int = 0  # the sampled token that the next step feeds back
    draft_from: tuple | None = None  # with MTP: the block's last logits and output, the next drafts' source


PREFILL_TOKENS = 2048  # prompt tokens of one joint prefill pass (activations of a few MB per layer)


def _prefill_passes(queued: list, limit: int) -> Iterator[list]:
    """The queued prompts in runs of at most `limit` tokens (a longer prompt alone)."""
    part, n = [], 0
    for q in queued:
        if part and n + len(q[2]) > limit:
            yield part
            part, n = [], 0
        part.append(q)
        n += len(q[2])
    if part:
        yield part


class BatchGenerator:
    """Sequences decoded together: each step is one `model.forward_rows` over the last token of
    every active sequence, so every weight, and each routed expert, is read once per step for all
    the sequences that use it. Each sequence has its own KV cache, sampler, stop strings and
    max_tokens; sequences are added and removed between steps (those queued together are prefilled
in one forward pass).

        gen = BatchGenerator(engine)
        first = gen.add(ids, max_tokens=64, stop=["\\n\\n"])   # the first token's Delta
        gen.queue(ids2); gen.queue(ids3); firsts = gen.prefill()  # two prompts, one pass
        while gen:
            for d in gen.step():
                ...  # d.uid, d.text, d.finish_reason; a finished sequence leaves the batch
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.rows: dict[Hashable, _Row] = {}  # the active sequences, in the order they were added
        self._queued: list[tuple[Hashable, _Row, list[int]]] = []  # (uid, row, prompt tokens to run)
        self._uids = itertools.count()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, prompt_ids: Sequence[int], **options) -> Delta:
        """Prefills a new sequence (one `model.forward` of its prompt) and samples its first token:
        `queue` then `prefill` (see `queue` for the options). Returns the first token's Delta; the
        sequence joins the next step unless that Delta already finished it."""
        if self._queued:
            raise ValueError("prompts are queued: prefill() them first")
        self.queue(prompt_ids, **options)
        return self.prefill()[0]

    def queue(self, prompt_ids: Sequence[int], *, max_tokens: int = 256,
              sampler: SamplerConfig | Sampler | None = None, stop: Sequence[str] = (),
              n_ctx: int | None = None, uid: Hashable | None = None, context: Context | None = None,
              ignore_eos: bool = False, adapters: tuple | None = None) -> Hashable:
        """Queues a new sequence for the next `prefill`, which runs every queued prompt in one
        forward pass; returns its uid. Its KV cache holds min(n_ctx, the engine's context, prompt +
        max_tokens) positions; a prompt that leaves no room raises EdgeseekError (nothing queued).
        With a `context` (a finished sequence's, from a ContextPool), the sequence continues it:
        only the prompt after the prefix it already holds is prefilled, and the cache keeps its
        size. `ignore_eos`: only stop strings, max_tokens and the context end the sequence (vLLM's
        option; for benchmarks). `adapters` are the LoRA adapters it runs with (default: the
        engine's, or the context's own): sequences with different adapters still share each step.
        `uid` names the sequence in its Deltas (default: 0, 1, 2, ... in the order of adding)."""
        ids = list(prompt_ids)
        limit = min(n_ctx or self.engine.n_ctx, self.engine.n_ctx) if context is None else context.n_ctx
        check_prompt(ids, limit)
        taken = set(self.rows) | {q[0] for q in self._queued}
        if uid is None:
            uid = next(u for u in self._uids if u not in taken)
        elif uid in taken:
            raise ValueError(f"sequence {uid!r} is already in the batch")
        if context is None:
            context = self.engine.new_context(min(limit, len(ids) + max_tokens), adapters)
        elif adapters is not None:
            context.use_adapters(adapters)  # a cache computed with other adapters is dropped
        n = cached_prefix(context, ids)
        if self._mtp():  # the reused prefix's MTP entries must be written (a context filled without MTP), and
            # the last one is redone: it pairs the hidden state at n-1 with the token the old sequence had at n
            n = max(0, min(n, context.mtp_valid) - 1)
        context.truncate(n)
        reply = Continuation(self.engine.tokenizer, max_tokens, stop, ignore_eos)
        self._queued.append((uid, _Row(context, _sampler(sampler), reply, len(ids), n), ids[n:]))
        return uid

    @_interruptible()
    def prefill(self) -> list[Delta]:
        """Prefills the queued prompts and samples each one's first token -> their Deltas, in the
        order they were queued; each sequence joins the next step unless its Delta finished it.
        Several prompts go through one `model.forward_rows` (up to PREFILL_TOKENS tokens a pass),
        so each weight and each routed expert is read once for all their tokens (32 prompts of 11
        tokens on V2-Lite Q4_0: 0.42 s a prompt alone, mostly reading experts); with multi-token
        prediction, one at a time."""
        queued, self._queued = self._queued, []
        model = self.engine.model
        deltas: list[Delta] = []
        try:
            for part in _prefill_passes(queued, 1 if self._mtp() else PREFILL_TOKENS):
                if len(part) == 1:
                    deltas.append(self._prefill_one(*part[0]))
                    continue
                logits = model.forward_rows(np.array([t for _, _, new in part for t in new], np.int32),
                                            [row.context.cache for _, row, _ in part],
                                            [len(new) for _, _, new in part], last=True)  # (len(part), V)
                for (uid, row, new), lg in zip(part, logits):
                    row.context.tokens.extend(new)
                    deltas.append(self._advance(uid, row, lg))
        finally:  # an interrupted prefill leaves each cache as its tokens say
            for _, row, _ in queued:
                row.context.truncate(len(row.context.tokens))
        for (uid, row, _), delta in zip(queued, deltas):
            if delta.finish_reason is None:
                self.rows[uid] = row
        return deltas

    def _prefill_one(self, uid: Hashable, row: _Row, new: list[int]) -> Delta:
        model, context, n = self.engine.model, row.context, row.n_cached
        if self._mtp():
            logits, hidden = model.forward(np.asarray(new, np.int32), context.cache, hidden=True)
            context.tokens.extend(new)
            delta = self._advance(uid, row, logits[-1])
            row.draft_from = _mtp_catch_up(model, hidden, new[1:] + [row.last], n, context.cache, context,
                                           self.engine.mtp.draft_rows)
            return delta
        logits = model.forward(np.asarray(new, np.int32), context.cache)[-1]
        context.tokens.extend(new)
        return self._advance(uid, row, logits)

    def _mtp(self) -> bool:
        return self.engine.mtp is not None and self.engine.mtp.k > 0

    def remove(self, uid: Hashable) -> Context | None:
        """Drops a sequence from the batch and returns its context (None if it already finished)."""
        row = self.rows.pop(uid, None)
        return row.context if row is not None else None

    @_interruptible()
    def step(self) -> list[Delta]:
        """One decode step of every active sequence: a Delta each, in the order they were added
        (with multi-token prediction, one per token the step kept, up to the one that finishes the
        sequence). Sequences whose Delta carries a finish_reason leave the batch."""
        if not self.rows:
            return []
        mtp = self.engine.mtp
        drafting = self._mtp() and all(r.draft_from is not None for r in self.rows.values())
        if drafting and not mtp.measuring_plain():
            return self._mtp_step()
        # --mtp auto's first steps run plain and are timed (each row its share), the MTP entries kept written
        measure = drafting
        uids, rows = list(self.rows), list(self.rows.values())
        model = self.engine.model
        t0 = time.perf_counter()
        try:
            out = model.forward_rows(np.array([r.last for r in rows], np.int32), [r.context.cache for r in rows],
                                     hidden=measure)
            logits, hidden = out if measure else (out, None)  # (B, V), (B, D)
            for r in rows:
                r.context.tokens.append(r.last)
        finally:  # an interrupted pass leaves every cache as its tokens say
            for r in rows:
                r.context.truncate(len(r.context.tokens))
        if measure:
            for _ in rows:
                mtp.plain_step((time.perf_counter() - t0) / len(rows))
        deltas = [self._advance(uid, r, lg) for uid, r, lg in zip(uids, rows, logits)]
        if measure:
            for i, (r, d) in enumerate(zip(rows, deltas)):
                if not d.finish_reason:  # the entry pairing the fed token's hidden state with the new token
                    n = len(r.context.tokens) - 1
                    r.draft_from = _mtp_catch_up(model, hidden[i:i + 1], [r.last], n, r.context.cache, r.context,
                                                 mtp.draft_rows)
        for d in deltas:
            if d.finish_reason:
                del self.rows[d.uid]
        return deltas

    def _mtp_step(self) -> list[Delta]:
        """Every sequence drafts with the MTP block; one forward_rows verifies all of them (the
        pending token and the drafts of each); each keeps its agreeing prefix (as _mtp_steps)."""
        model, mtp, b = self.engine.model, self.engine.mtp, self.engine.model.backend
        uids, rows = list(self.rows), list(self.rows.values())
        t0 = time.perf_counter()
        chunks, drafts_of, q_of = [], [], []
        for r in rows:
            n = len(r.context.tokens)
            k = max(0, min(mtp.k, r.context.n_ctx - n - 1))
            q_logits, g = r.draft_from
            drafts, qs = [], []
            for j in range(k):
                d, q = _draft(r.sampler, q_logits[-1], r.context.tokens + [r.last] + drafts)
                drafts.append(d)
                qs.append(q)
                if j + 1 < k:
                    q_logits, g = model.mtp_step(g[-1:], b.tokens([d]), np.array([n + j]), r.context.cache, mtp.draft_rows)
            chunks.append([r.last] + drafts)
            drafts_of.append(drafts)
            q_of.append(qs)
        counts = [len(c) for c in chunks]
        try:
            logits, hidden = model.forward_rows(np.array([t for c in chunks for t in c], np.int32),
                                                [r.context.cache for r in rows], counts, hidden=True)
        finally:
            for r in rows:
                r.context.truncate(len(r.context.tokens))
        deltas, start = [], 0
        for uid, r, chunk, drafts, qs, cnt in zip(uids, rows, chunks, drafts_of, q_of, counts):
            n = len(r.context.tokens)
            lg, hd = logits[start:start + cnt], hidden[start:start + cnt]
            start += cnt
            accepted, nxt = _accept(r.sampler, lg, drafts, qs, r.context.tokens + [r.last])
            r.context.tokens.extend(chunk[:accepted + 1])
            r.context.cache.pos = n + accepted + 1
            r.draft_from = _mtp_catch_up(model, hd[:accepted + 1], drafts[:accepted] + [nxt], n, r.context.cache,
                                         r.context, mtp.draft_rows)
            mtp.step(len(drafts), accepted, (time.perf_counter() - t0) / len(rows),
                     (drafts[:accepted] + [nxt])[0] if drafts else None)
            for j, token in enumerate(drafts[:accepted] + [nxt]):
                d = self._emit(uid, r, token, n + 1 + j >= r.context.n_ctx)  # full as one token per step has it
                deltas.append(d)
                if d.finish_reason:
                    break
        for d in deltas:
            if d.finish_reason:
                del self.rows[d.uid]
        return deltas

    @staticmethod
    def _advance(uid: Hashable, row: _Row, logits: np.ndarray) -> Delta:
        return BatchGenerator._emit(uid, row, row.sampler(logits, row.context.tokens))

    @staticmethod
    def _emit(uid: Hashable, row: _Row, token: int, full: bool | None = None) -> Delta:
        text = row.reply.add(token, _context_full(row.context) if full is None else full)
        row.last = token
        return Delta(uid, text, None if token in row.reply.stop_ids else token, row.n_prompt, row.reply.n,
                     row.reply.finish_reason, row.n_cached)


class ContextPool:
    """KV caches of finished sequences, kept for the requests that continue them: the next turn of a
    conversation renders the whole conversation again, and its prompt begins with the tokens a
    finished sequence's cache holds (the earlier turns, the reply) — as a chat session reuses its one
    context between turns. `take` hands out the pooled context sharing the longest prefix with a
    prompt (else a free one, reset; else a new one); `give` returns it once its sequence is done.
    Up to `size` idle contexts are kept, the least recently given dropped first.

    Contexts are made with the engine's full context length: numpy's zeros are mapped lazily, so on
    the CPU a cache costs memory only for the positions its sequence wrote (on a GPU, its whole
    size)."""

    def __init__(self, engine: Engine, size: int, n_ctx: int | None = None):
        self.engine = engine
        self.size = size
        self.n_ctx = n_ctx or engine.n_ctx
        self.idle: list[Context] = []  # least recently given first

    def take(self, ids: Sequence[int]) -> Context:
        best, n_best = None, 0
        for c in self.idle:
            n = cached_prefix(c, ids)
            if n > n_best:
                best, n_best = c, n
        if best is None and self.idle and len(self.idle) >= self.size:
            best = self.idle[0]  # nothing to reuse: recycle the oldest cache's memory
            best.reset()
        if best is None:
            return self.engine.new_context(self.n_ctx)
        self.idle.remove(best)
        return best

    def give(self, context: Context | None) -> None:
        if context is None or self.size <= 0:
            return
        self.idle.append(context)
        del self.idle[:-self.size]

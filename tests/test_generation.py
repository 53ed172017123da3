"""The generation layer on the real SmolLM2 model: BatchGenerator's step (rows finishing at
different steps, stop strings split across tokens, sequences added and removed between steps) and
stream_generate ending sequences by the same rules."""
import pytest

import edgeseek
from edgeseek.chat import single_turn_ids
from edgeseek.errors import EdgeseekError
from edgeseek.generation import BatchGenerator, generate_step, stream_generate
from edgeseek.sampler import Sampler, SamplerConfig

GREEDY = SamplerConfig.greedy()
PROMPTS = ["Write a sentence about the sea.", "What is the capital of France?", "Name three colours.",
           "Tell me about bread."]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    return edgeseek.load(smollm2_path, n_ctx=256)


@pytest.fixture(scope="module")
def prompts(engine):
    return [single_turn_ids(engine, p) for p in PROMPTS]


def alone(engine, ids, **kw):
    """The Deltas of one sequence decoded by itself."""
    gen = BatchGenerator(engine)
    out = [gen.add(ids, sampler=GREEDY, **kw)]
    while gen:
        out += gen.step()
    return out


def tokens(deltas, uid=None):
    return [d.token for d in deltas if uid is None or d.uid == uid]


def text(deltas, uid=None):
    return "".join(d.text for d in deltas if uid is None or d.uid == uid)


def test_one_sequence_gives_what_stream_generate_gives(engine, prompts):
    got = alone(engine, prompts[0], max_tokens=16)
    want = list(stream_generate(engine, prompts[0], max_tokens=16, sampler=GREEDY))
    assert tokens(got) == [r.token for r in want] and len(got) == 16
    assert text(got) == "".join(r.text for r in want)
    assert [d.finish_reason for d in got] == [r.finish_reason for r in want] == [None] * 15 + ["length"]
    assert got[-1].prompt_tokens == len(prompts[0]) and got[-1].generation_tokens == 16


def test_kept_context_runs_only_the_new_tokens(engine, prompts):
    ctx = engine.new_context()
    first = list(stream_generate(engine, prompts[0], max_tokens=4, sampler=GREEDY, context=ctx))
    assert first[-1].prompt_tokens == len(prompts[0])
    assert ctx.tokens == prompts[0] + [r.token for r in first[:3]]  # the last token was never fed back
    again = prompts[0] + [r.token for r in first] + prompts[1]
    second = list(stream_generate(engine, again, max_tokens=4, sampler=GREEDY, context=ctx))
    assert second[-1].prompt_tokens == len(again) - len(prompts[0]) - 3
    fresh = [r.token for r in stream_generate(engine, again, max_tokens=4, sampler=GREEDY)]
    assert [r.token for r in second] == fresh
    steps = generate_step(engine, again, ctx, Sampler(GREEDY))
    assert [next(steps) for _ in range(4)] == fresh
    steps.close()
    assert ctx.tokens == again + fresh[:3] and ctx.cache.pos == len(ctx.tokens)


def test_rows_finish_at_different_steps_by_length_and_by_stop(engine, prompts):
    free = alone(engine, prompts[1], max_tokens=12)
    # a stop string that the sixth token completes: the row ends there, the others go on
    k, stop = next((k, free[k - 1].text) for k in range(6, 12) if free[k - 1].text.strip()
                   and text(free[:k]).find(free[k - 1].text) == len(text(free[:k - 1])))
    gen = BatchGenerator(engine)
    firsts = [gen.add(prompts[0], max_tokens=3, sampler=GREEDY, uid="short"),
              gen.add(prompts[1], max_tokens=12, sampler=GREEDY, stop=[stop], uid="stopped"),
              gen.add(prompts[2], max_tokens=10, sampler=GREEDY, uid="long")]
    assert [d.finish_reason for d in firsts] == [None] * 3 and len(gen) == 3
    finished, deltas, step = {}, list(firsts), 1
    while gen:
        for d in gen.step():
            deltas.append(d)
            if d.finish_reason:
                finished[d.uid] = (step, d.finish_reason, d.generation_tokens)
        step += 1
    assert finished == {"short": (2, "length", 3), "stopped": (k - 1, "stop", k), "long": (9, "length", 10)}
    assert text(deltas, "stopped") == text(free[:k - 1])  # the stop string is not shown
    assert tokens(deltas, "short") == tokens(alone(engine, prompts[0], max_tokens=3))
    assert tokens(deltas, "long") == tokens(alone(engine, prompts[2], max_tokens=10))


def test_stop_string_split_across_tokens_is_held_back(engine, prompts):
    free = alone(engine, prompts[0], max_tokens=24)
    full = text(free)
    for k in range(3, 23):  # tokens k and k+1 (1-based) both carry text: the stop spans their boundary
        a, b = free[k - 1].text, free[k].text
        if len(a.strip()) >= 2 and b.strip():
            stop = a[-2:] + b[:2]
            end_k = len(text(free[:k]))
            if full.find(stop) == end_k - len(a[-2:]):
                break
    else:
        pytest.fail(f"no two neighbouring tokens with text in {full!r}")
    got = alone(engine, prompts[0], max_tokens=24, stop=[stop])
    assert len(got) == k + 1 and got[-1].finish_reason == "stop"
    assert tokens(got) == tokens(free[:k + 1])
    cut = full.find(stop)
    assert text(got[:k]) == full[:cut]  # after token k the start of the stop string waits
    assert got[-1].text == "" and text(got) == full[:cut]


def test_sequence_added_between_steps_decodes_as_alone(engine, prompts):
    want = {i: tokens(alone(engine, prompts[i], max_tokens=10)) for i in (0, 3)}
    gen = BatchGenerator(engine)
    deltas = [gen.add(prompts[0], max_tokens=10, sampler=GREEDY, uid=0)]
    for _ in range(3):
        deltas += gen.step()
    deltas.append(gen.add(prompts[3], max_tokens=10, sampler=GREEDY, uid=3))
    assert len(gen) == 2
    while gen:
        deltas += gen.step()
    assert tokens(deltas, 0) == want[0] and tokens(deltas, 3) == want[3]


def test_removed_sequence_leaves_the_others_as_they_were(engine, prompts):
    want = {i: tokens(alone(engine, prompts[i], max_tokens=8)) for i in (0, 2)}
    gen = BatchGenerator(engine)
    deltas = [gen.add(prompts[i], max_tokens=8, sampler=GREEDY) for i in (0, 1, 2)]
    assert [d.uid for d in deltas] == [0, 1, 2]
    deltas += gen.step() + gen.step()
    gen.remove(1)
    gen.remove(1)  # gone already: nothing to do
    assert len(gen) == 2
    later = []
    while gen:
        later += gen.step()
    assert {d.uid for d in later} == {0, 2}
    assert tokens(deltas + later, 0) == want[0] and tokens(deltas + later, 2) == want[2]
    assert gen.add(prompts[1], max_tokens=1, sampler=GREEDY).finish_reason == "length"


def test_full_context_ends_both_drivers_alike(engine, prompts):
    ids = prompts[1]
    got = alone(engine, ids, max_tokens=50, n_ctx=len(ids) + 2)
    # two tokens fit after the prompt; the token sampled from the last position is the third
    assert [d.finish_reason for d in got] == [None, None, "length"]
    streamed = list(stream_generate(engine, ids, max_tokens=50, sampler=GREEDY,
                                    context=engine.new_context(len(ids) + 2)))
    assert [r.token for r in streamed] == tokens(got) and streamed[-1].finish_reason == "length"


def test_end_of_generation_token_ends_both_drivers_alike(engine, prompts, monkeypatch):
    free = tokens(alone(engine, prompts[2], max_tokens=6))
    monkeypatch.setattr(engine.tokenizer, "stop_ids", frozenset({free[3]}) - set(free[:3]))
    got = alone(engine, prompts[2], max_tokens=6)
    assert tokens(got) == free[:3] + [None] and got[-1].finish_reason == "stop" and got[-1].generation_tokens == 4
    streamed = list(stream_generate(engine, prompts[2], max_tokens=6, sampler=GREEDY))
    assert [r.token for r in streamed] == tokens(got) and streamed[-1].finish_reason == "stop"
    assert "".join(r.text for r in streamed) == text(got)


def test_prompts_that_do_not_fit_are_refused(engine, prompts):
    gen = BatchGenerator(engine)
    with pytest.raises(EdgeseekError, match=f"the prompt has {len(prompts[0])} tokens; the context holds 8"):
        gen.add(prompts[0], n_ctx=8)
    with pytest.raises(EdgeseekError, match="the prompt is empty"):
        gen.add([])
    gen.add(prompts[0], max_tokens=4, uid="a")
    with pytest.raises(ValueError, match="already in the batch"):
        gen.add(prompts[1], uid="a")
    assert len(gen) == 1


def test_ctrl_c_inside_a_kernel_reaches_the_caller_as_keyboard_interrupt(engine, prompts, monkeypatch):
    """Ctrl+C landing as a numba kernel returns surfaces as SystemError caused by the interrupt
    (seen in the terminal chat: the chat died instead of stopping the reply)."""
    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as ki:
            raise SystemError("CPUDispatcher(...) returned a result with an exception set") from ki
    monkeypatch.setattr(engine.model, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(stream_generate(engine, prompts[0], max_tokens=4, sampler=GREEDY))
    monkeypatch.setattr(engine.model, "forward_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        BatchGenerator(engine).add(prompts[0], max_tokens=4, sampler=GREEDY)


def test_prompts_prefilled_together_decode_as_alone(engine, prompts):
    want = {i: tokens(alone(engine, prompts[i], max_tokens=8)) for i in range(4)}
    gen = BatchGenerator(engine)
    assert [gen.queue(prompts[i], max_tokens=8, sampler=GREEDY) for i in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="prefill"):
        gen.add(prompts[0], sampler=GREEDY)
    with pytest.raises(EdgeseekError, match="context holds"):
        gen.queue(prompts[0] * 40)  # refused, nothing queued
    firsts = gen.prefill()
    assert [d.uid for d in firsts] == [0, 1, 2, 3] and len(gen) == 4
    assert [d.prompt_tokens for d in firsts] == [len(p) for p in prompts]
    deltas = list(firsts)
    while gen:
        deltas += gen.step()
    assert all(tokens(deltas, i) == want[i] for i in range(4))
    assert gen.prefill() == []

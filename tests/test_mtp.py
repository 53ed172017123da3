"""Multi-token prediction: the MTP block of a DeepSeek-V3 file (our converter's --keep-mtp output of
a tiny V3 checkpoint with one nextn layer) drafts, the main model verifies. Greedy output equals
decoding without MTP token for token, whatever the drafts (random ones, rejected; an oracle's, mostly
accepted); under sampling the token distribution is unchanged (a chi-square test over many seeds)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "convert"))

import edgeseek  # noqa: E402
from edgeseek import generation  # noqa: E402
from edgeseek.errors import EdgeseekError, GGUFError  # noqa: E402
from gguf_f32 import dequantized_f32  # noqa: E402

GREEDY = edgeseek.SamplerConfig.greedy()
PROMPT = list(range(5, 25))
FIXTURE = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_0.gguf"  # no MTP layer


@pytest.fixture(scope="module")
def mtp_file(tmp_path_factory):
    pytest.importorskip("torch")
    import checkpoints as C
    from edgeseek.convert.convert import convert
    out = tmp_path_factory.mktemp("mtp") / "v3-mtp-f32.gguf"
    convert(C.checkpoint("v3fp8"), out, "f32", force=True, keep_mtp=True)
    return out


def tokens(engine, sampler=GREEDY, n=40, prompt=PROMPT):
    return [r.token for r in edgeseek.stream_generate(engine, prompt, max_tokens=n, sampler=sampler)
            if r.token is not None]


def test_the_main_model_leaves_the_mtp_block_out(mtp_file):
    on, off = edgeseek.load(mtp_file, mtp=1), edgeseek.load(mtp_file, mtp="off")
    assert on.model.config.n_mtp == 1 and on.model.config.n_layer == len(on.model.layers) == 2
    assert on.mtp is not None and off.mtp is None and off.model.mtp is None
    ids = np.array(PROMPT)
    a = on.model.forward(ids, on.model.new_cache(), all_logits=True)
    b = off.model.forward(ids, off.model.new_cache(), all_logits=True)
    assert np.array_equal(a, b)


def test_the_block_over_several_rows_drafts_as_row_by_row(mtp_file):
    """The MTP block over several rows (a verification's accepted drafts, a prompt's catch-up) runs
    only the last one through attention, the feed-forward and the head, the others writing their
    cache entries: its logits, output and every entry are those of the rows one at a time."""
    e = edgeseek.load(mtp_file, mtp=1)
    m = e.model
    rng = np.random.default_rng(3)
    hidden = rng.standard_normal((6, m.config.n_embd)).astype(np.float32)
    ids, pos = np.array([11, 40, 7, 99, 3, 58]), np.arange(len(PROMPT), len(PROMPT) + 6)
    caches = [m.new_cache(), m.new_cache()]
    for c in caches:
        m.forward(np.array(PROMPT), c)
    q_all, g_all = m.mtp_step(hidden, ids, pos, caches[0])
    for t in range(6):
        q_one, g_one = m.mtp_step(hidden[t:t + 1], ids[t:t + 1], pos[t:t + 1], caches[1])
    L, end = m.config.n_layer, pos[-1] + 1
    np.testing.assert_allclose(caches[0].c[L, :end], caches[1].c[L, :end], atol=1e-3)  # float16 entries
    np.testing.assert_allclose(caches[0].k_pe[L, :end], caches[1].k_pe[L, :end], atol=1e-3)
    assert g_all.shape == g_one.shape == (1, m.config.n_embd)
    np.testing.assert_allclose(g_all, g_one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q_all, q_one, atol=1e-4 * float(np.ptp(q_one)))
    assert int(np.argmax(q_all)) == int(np.argmax(q_one))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_output_equals_decoding_without_mtp(mtp_file, k):
    plain = tokens(edgeseek.load(mtp_file, mtp="off"))
    e = edgeseek.load(mtp_file, mtp=k)
    assert tokens(e) == plain
    assert e.mtp.steps > 0 and e.mtp.drafted == k * e.mtp.steps


def test_a_prompt_in_chunks_drafts_as_one_pass(mtp_file, monkeypatch):
    """A prompt longer than PROMPT_CHUNK: the main model and the MTP block's catch-up both run it
    chunk by chunk; the greedy output is the same."""
    from edgeseek.models import common
    plain = tokens(edgeseek.load(mtp_file, mtp="off"))
    monkeypatch.setattr(common, "PROMPT_CHUNK", 6)
    e = edgeseek.load(mtp_file, mtp=2)
    assert tokens(e) == plain and e.mtp.steps > 0


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_output_on_the_gpu_path_equals_decoding_without_mtp(mtp_file, k):
    """The CUDA backend's path with its kernels emulated (test_cuda_backend.py runs it on a GPU):
    the verification of k + 1 positions, the MTP block and the caches' rollback on the device arrays."""
    from cuda_emulation import EmulatedCUDABackend
    plain = tokens(edgeseek.load(mtp_file, backend=EmulatedCUDABackend(), mtp="off"))
    e = edgeseek.load(mtp_file, backend=EmulatedCUDABackend(), mtp=k)
    assert e.device == "cuda" and tokens(e) == plain
    assert e.mtp.steps > 0 and e.mtp.drafted == k * e.mtp.steps


@pytest.mark.parametrize("k", [1, 3])
def test_accepted_drafts_keep_both_caches_right(mtp_file, k, monkeypatch):
    """Drafts from an oracle that knows the plain transcript, wrong one time in four: most are
    accepted, the rest roll back, and the transcript (and a second turn that reuses the cache) stay
    those of plain decoding."""
    off = edgeseek.load(mtp_file, mtp="off")
    plain = tokens(off, n=60)
    rng = np.random.default_rng(0)

    def oracle(sampler, logits, history):
        i = len(history) - len(PROMPT)
        right = plain[i] if i < len(plain) else 0
        d = right if rng.random() < 0.75 else (right + 1) % len(logits)
        return d, (np.array([d]), np.ones(1))

    monkeypatch.setattr(generation, "_draft", oracle)
    e = edgeseek.load(mtp_file, mtp=k)
    ctx = e.new_context()
    got = [r.token for r in edgeseek.stream_generate(e, PROMPT, max_tokens=60, sampler=GREEDY, context=ctx)
           if r.token is not None]
    assert got == plain
    assert e.mtp.accepted > e.mtp.drafted // 3 and e.mtp.accepted < e.mtp.drafted
    second = PROMPT + plain[:30] + [7, 8, 9]  # a next turn: the cached prefix is reused
    ref = [r.token for r in edgeseek.stream_generate(off, second, max_tokens=20, sampler=GREEDY) if r.token is not None]
    got = [r.token for r in edgeseek.stream_generate(e, second, max_tokens=20, sampler=GREEDY, context=ctx)
           if r.token is not None]
    assert got == ref


def _chi2_critical(df: int, alpha_z: float = 3.29) -> float:
    """The chi-square quantile at a one-sided normal z (3.29: p = 0.0005), Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3


def test_sampling_distribution_unchanged(mtp_file):
    """The 2nd and 3rd tokens (the first that drafts decide) over 600 seeds, with and without MTP
    (k = 2): a chi-square test of homogeneity at p = 0.0005 on the joint (2nd, 3rd) outcomes."""
    cfg = dict(temperature=1.0, top_k=4, top_p=1.0, min_p=0.0)
    counts = {}
    for mode in ("off", 2):
        e = edgeseek.load(mtp_file, mtp=mode)
        c = counts[mode] = {}
        for seed in range(600):
            t = tokens(e, edgeseek.SamplerConfig(seed=seed, **cfg), n=3)
            c[tuple(t[1:3])] = c.get(tuple(t[1:3]), 0) + 1
        if mode == 2:
            assert e.mtp.accepted > 0 and e.mtp.accepted < e.mtp.drafted  # both paths of the rule taken
    keys = sorted(set(counts["off"]) | set(counts[2]))
    a = np.array([counts["off"].get(k, 0) for k in keys], float)
    b = np.array([counts[2].get(k, 0) for k in keys], float)
    pooled = (a + b) / (a.sum() + b.sum())
    keep = pooled * min(a.sum(), b.sum()) >= 5  # outcomes frequent enough for the test
    other = ~keep
    a = np.append(a[keep], a[other].sum())
    b = np.append(b[keep], b[other].sum())
    exp_a, exp_b = (a + b) * a.sum() / (a.sum() + b.sum()), (a + b) * b.sum() / (a.sum() + b.sum())
    mask = (exp_a > 0) & (exp_b > 0)
    stat = float((((a - exp_a) ** 2 / exp_a) + ((b - exp_b) ** 2 / exp_b))[mask].sum())
    df = int(mask.sum()) - 1
    assert df >= 3 and stat < _chi2_critical(df), (stat, df)


def test_mtp_asked_of_a_file_without_it():
    with pytest.raises(EdgeseekError, match="no multi-token-prediction layer"):
        edgeseek.load(FIXTURE, mtp=1)
    assert edgeseek.load(FIXTURE, mtp="auto").mtp is None
    with pytest.raises(EdgeseekError, match="expected auto, off or a number"):
        edgeseek.load(FIXTURE, mtp="7")


def test_an_incomplete_mtp_block_is_named(mtp_file, tmp_path):
    broken = dequantized_f32(mtp_file, tmp_path / "broken.gguf", drop=("blk.2.nextn.eh_proj.weight",))
    with pytest.raises(GGUFError, match=r"blk\.2\.nextn\.eh_proj\.weight"):
        edgeseek.load(broken, mtp=1)
    e = edgeseek.load(broken, mtp="auto")
    assert e.mtp is None and any("blk.2.nextn.eh_proj.weight" in n for n in e.notes)


def _batch(engine, prompts, n):
    gen = generation.BatchGenerator(engine)
    out = {}
    for i, p in enumerate(prompts):
        d = gen.add(p, max_tokens=n, sampler=GREEDY, uid=i)
        out[i] = [d.token]
    while gen:
        for d in gen.step():
            if d.token is not None:
                out[d.uid].append(d.token)
    return [out[i] for i in range(len(prompts))]


@pytest.mark.parametrize("oracle", [False, True])
def test_batch_mode_greedy_output_equals_decoding_without_mtp(mtp_file, oracle, monkeypatch):
    prompts = [PROMPT, list(range(30, 42)), list(range(7, 11))]
    off = edgeseek.load(mtp_file, mtp="off")
    plain = [tokens(off, n=30, prompt=p) for p in prompts]
    if oracle:  # drafts mostly right: rows accept different numbers of tokens in the same step
        rng = np.random.default_rng(1)

        def draft(sampler, logits, history):
            for p, ref in zip(prompts, plain):
                if history[:len(p)] == p:
                    i = len(history) - len(p)
                    right = ref[i] if i < len(ref) else 0
                    d = right if rng.random() < 0.7 else (right + 1) % len(logits)
                    return d, (np.array([d]), np.ones(1))
            raise AssertionError("unknown sequence")
        monkeypatch.setattr(generation, "_draft", draft)
    e = edgeseek.load(mtp_file, mtp=2)
    assert _batch(e, prompts, 30) == plain
    if oracle:
        assert 0 < e.mtp.accepted < e.mtp.drafted


def test_a_full_context_ends_where_it_ends_without_mtp(mtp_file):
    """The reply stops at the same token ('length') when the context fills up mid-step."""
    def run(mode):
        e = edgeseek.load(mtp_file, mtp=mode)
        ctx = e.new_context(len(PROMPT) + 13)
        rs = list(edgeseek.stream_generate(e, PROMPT, max_tokens=100, sampler=GREEDY, context=ctx))
        return [r.token for r in rs], rs[-1].finish_reason
    assert run(3) == run("off")


class ModelClock:
    """generation's clock, advanced by the model's work instead of the wall: a forward pass one unit
    plus half a unit for each position beyond the first (verifying drafts costs more than a step),
    the MTP block half a unit a call. The tiny model's steps take about a millisecond, so on a
    loaded machine one preempted plain step (timed 8 times) once made random drafts look as if they
    paid; the decision is the code's, not the machine's, under this clock."""

    def __init__(self, model):
        self.now = 0.0
        for name, cost in (("forward", lambda tokens, *a, **k: 0.5 + 0.5 * len(tokens)),
                           ("mtp_step", lambda *a, **k: 0.5)):
            self._charge(model, name, cost)

    def _charge(self, model, name, cost):
        run = getattr(model, name)

        def charged(*a, **k):
            self.now += cost(*a, **k)
            return run(*a, **k)
        setattr(model, name, charged)

    def perf_counter(self) -> float:
        return self.now


def test_auto_measures_and_turns_off_drafts_that_do_not_pay(mtp_file, monkeypatch):
    """--mtp auto: plain steps timed, then MTP steps; random drafts are never accepted, so each MTP
    step costs more for the same one token and auto turns MTP off. The output is unchanged."""
    plain = tokens(edgeseek.load(mtp_file, mtp="off"), n=60)
    e = edgeseek.load(mtp_file, mtp="auto")
    monkeypatch.setattr(generation, "time", ModelClock(e.model))
    assert tokens(e, n=60) == plain
    assert e.mtp.plain_steps == 8 and e.mtp.steps == 16 and e.mtp.k == 0 and not e.mtp.auto


def test_auto_in_batch_mode_measures_then_decides(mtp_file):
    """--mtp auto in the batch runner and the server (BatchGenerator): the first steps run plain and
    are timed, each row its share, the MTP entries kept written; then MTP steps until the decision.
    The output is unchanged; the decision is made (it once divided by the unmeasured plain time)."""
    prompts = [PROMPT, list(range(30, 42)), list(range(7, 11))]
    off = edgeseek.load(mtp_file, mtp="off")
    plain = [tokens(off, n=30, prompt=p) for p in prompts]
    e = edgeseek.load(mtp_file, mtp="auto")
    assert _batch(e, prompts, 30) == plain
    assert e.mtp.plain_steps >= 8 and e.mtp.steps >= 16 and not e.mtp.auto


def test_drafts_take_the_whole_head_where_the_text_lies_past_the_draft_rows():
    """The MTP state counts the steps whose first drafted position held a token past the draft rows;
    past DRAFT_MISS_MAX of DRAFT_MISS_STEPS or more steps, drafts take every row again."""
    from edgeseek.engine import DRAFT_MISS_MAX, DRAFT_MISS_STEPS, MTP

    within = MTP(1, draft_rows=128)
    for _ in range(200):
        within.step(1, 1, 0.01, 127)
    assert within.draft_rows == 128 and within.draft_misses == 0
    past = MTP(1, draft_rows=128)
    for i in range(4 * DRAFT_MISS_STEPS):
        past.step(1, 0, 0.01, 500 if i % 10 == 0 else 3)  # one step in ten: above DRAFT_MISS_MAX
        if i < DRAFT_MISS_STEPS - 1:
            assert past.draft_rows == 128  # too few steps to tell
    assert past.draft_rows is None and DRAFT_MISS_MAX < 0.1
    plain = MTP(1)  # no draft rows (a GPU's head, a head without a tiled layout)
    plain.step(1, 0, 0.01, 10 ** 6)
    assert plain.draft_rows is None and plain.draft_misses == 0

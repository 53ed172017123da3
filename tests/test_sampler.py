import numpy as np
import pytest

from edgeseek.generation import StopMatcher
from edgeseek.sampler import Sampler, SamplerConfig


def test_greedy_takes_argmax():
    logits = np.array([0.1, 3.0, -1.0, 2.9], np.float32)
    assert Sampler(SamplerConfig.greedy())(logits) == 1


def test_repeat_penalty_follows_llama_cpp_rule():
    # positive logits are divided, negative ones multiplied (llama.cpp's penalties sampler)
    logits = np.array([2.0, 1.9, -0.5, -0.6], np.float32)
    s = Sampler(SamplerConfig(temperature=0, repeat_penalty=1.1))
    assert s(logits, history=[0]) == 1
    logits = np.array([-0.5, -0.52], np.float32)
    assert s(logits, history=[0]) == 1


def test_seed_reproducible_and_draws_follow_the_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.2], np.float32))
    cfg = SamplerConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    s1, s2 = Sampler(cfg), Sampler(cfg)
    assert [s1(logits) for _ in range(50)] == [s2(logits) for _ in range(50)]
    s = Sampler(cfg)
    counts = np.bincount([s(logits) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.2], atol=0.03), counts


def test_top_k_top_p_min_p_cut_the_tail():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32))

    def draws(cfg):
        s = Sampler(cfg)
        return {s(logits) for _ in range(300)}

    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1)
    assert draws(SamplerConfig(**{**base, "top_k": 2})) == {0, 1}
    assert draws(SamplerConfig(**{**base, "top_p": 0.65})) == {0, 1}
    assert draws(SamplerConfig(**{**base, "min_p": 0.6})) == {0, 1}
    assert draws(SamplerConfig(**base)) == {0, 1, 2, 3}


def test_updated_rejects_unknown_option():
    with pytest.raises(ValueError, match="tempreature"):
        SamplerConfig().updated(tempreature=0.5)
    assert SamplerConfig().updated(top_k=5).top_k == 5


def test_stop_strings_are_held_back_and_never_shown():
    m = StopMatcher(["</s>", "STOP"])
    out = []
    for chunk in ["Hello <", "/", "s", "> world"]:
        text, hit = m.feed(chunk)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "Hello " and hit
    m = StopMatcher(["STOP"])
    assert m.feed("ST")[0] == "" and m.feed("AY")[0] == "STAY"
    assert m.feed("x S")[0] == "x " and m.flush() == "S"


@pytest.mark.parametrize("option, value", [("temperature", float("nan")), ("top_p", float("inf")),
                                           ("top_p", 1.5), ("min_p", -0.1), ("repeat_penalty", 0.0)])
def test_options_that_make_no_sense_are_refused_by_name(option, value):
    with pytest.raises(ValueError, match=option):
        SamplerConfig(**{option: value})

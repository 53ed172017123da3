"""DeepSeek V3-style and V2-Lite-style models (tiny, random) against llama.cpp and transformers.

Fixtures: tests/fixtures/deepseek2_fixtures.py builds the checkpoints with transformers and converts
them with llama.cpp's own converter (F32, Q8_0, legacy attn_kv_b layout, Q4_K_M, Q4_0).

Tolerances: F32 files agree with llama.cpp and transformers to float rounding at every position.
Quantized files: llama.cpp also quantizes activations to 8 bits; random weights route on near-ties,
so a quantization difference can flip one expert at a few positions (llama.cpp's own quantized
logits differ from transformers' the same way). Those files must agree closely at most positions.
"""
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeseek
from conftest import requires_llama_cpp, requires_torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
import deepseek2_fixtures as F  # noqa: E402

pytestmark = [requires_llama_cpp, requires_torch]
FILES = ["F32", "F32-legacy", "Q8_0", "Q4_K_M", "Q4_K_M-legacy", "Q4_0"]


@pytest.fixture(scope="module", params=["v3", "v2lite"])
def kind(request):
    return request.param, F.fixtures(request.param)


def _ours(path, tokens):
    engine = edgeseek.load(path, n_ctx=128)
    return engine, engine.model.forward(tokens, engine.model.new_cache(), all_logits=True)


@pytest.mark.parametrize("name", FILES)
def test_logits_match_llama_cpp(kind, name):
    k, meta = kind
    tokens = meta["tokens"]
    ref = F.llama_cpp_logits(meta["files"][name], tokens)
    _, ours = _ours(meta["files"][name], tokens)
    per_pos = np.abs(ours - ref).max(axis=1)  # (64,) worst logit difference at each position
    if name.startswith("F32"):
        assert per_pos.max() < 5e-3, per_pos.max()
        assert np.abs(ours - meta["transformers"]).max() < 1e-3
    elif k == "v2lite":
        assert per_pos.max() < 0.05, per_pos.max()
    else:
        assert np.median(per_pos) < 0.1, np.median(per_pos)
        assert np.mean(per_pos < 0.2) >= 0.85, np.sort(per_pos)[-10:]


@pytest.mark.parametrize("name", ["F32", "Q4_K_M"])
def test_prefill_equals_step_by_step_decode(kind, name):
    _, meta = kind
    tokens = meta["tokens"][:24]
    engine, prefill = _ours(meta["files"][name], tokens)
    cache = engine.model.new_cache()
    steps = np.concatenate([engine.model.forward(tokens[i:i + 1], cache) for i in range(len(tokens))])
    assert np.abs(steps - prefill).max() < 1e-3 * max(1.0, np.abs(prefill).max())


def test_both_mla_layouts_give_the_same_model(kind):
    _, meta = kind
    tokens = meta["tokens"][:16]
    _, a = _ours(meta["files"]["F32"], tokens)
    _, b = _ours(meta["files"]["F32-legacy"], tokens)
    assert np.abs(a - b).max() < 1e-4

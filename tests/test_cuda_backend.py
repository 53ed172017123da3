"""The CUDA backend on a GPU against the CPU path: logits of every fixture, each quantized file's
distance from its own exact math (the file dequantized to F32), experts split between VRAM and the
CPU, greedy tokens of a trained model. Marked cuda: skipped where no GPU is (CI)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cuda
pytest.importorskip("cupy")
from edgeseek.backends.cuda import probe  # noqa: E402

if probe() is not None:
    pytest.skip(f"no usable GPU: {probe()}", allow_module_level=True)

import edgeseek  # noqa: E402
from edgeseek.gguf_file import GGUFFile  # noqa: E402
from edgeseek.placement import plan_gpu  # noqa: E402
from gguf_f32 import dequantized_f32  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "deepseek2"
F32 = ["v3-f32.gguf", "v3-f32-legacy.gguf", "v2lite-f32.gguf"]
QUANTIZED = ["v2lite-q8_0.gguf", "v2lite27-q8_0.gguf", "v3-q4_0.gguf", "v3-q4_k_m.gguf", "v3-q8_0.gguf",
             "v3-q8_0-legacy.gguf", "v3h256-q4_k_m.gguf"]
PROMPT = np.array([1, 5, 9, 3, 7, 2, 11, 4, 6, 8, 10, 12], np.int64)


def _logits(engine, steps=4, prompt=PROMPT):
    """The prompt's logits (a prompt product), then `steps` decode steps (decode products)."""
    ctx = engine.new_context()
    out = [engine.model.forward(prompt, ctx.cache, all_logits=True)]
    for t in range(steps):
        out.append(engine.model.forward(np.array([t + 2]), ctx.cache))
    return np.concatenate(out)


def _distance(x, exact):
    """The median over positions of the RMS distance relative to the exact logits' spread: random
    weights route on near-ties, and one position whose expert flips (under any rounding: the CPU's
    int8 activations, the GPU's float16 prompt products) would otherwise stand for the whole file."""
    return float(np.median(np.sqrt(np.mean((x - exact) ** 2, axis=-1)) / np.std(exact, axis=-1)))


@pytest.mark.parametrize("name", F32)
def test_f32_logits_within_half_a_percent_of_the_cpu_path(name):
    ref = _logits(edgeseek.load(FIXTURES / name, device="cpu"))
    got = _logits(edgeseek.load(FIXTURES / name, device="cuda"))
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.005 * (ref.max() - ref.min())


@pytest.mark.parametrize("name", QUANTIZED)
def test_quantized_file_no_further_from_its_exact_math_than_the_cpu_path(name, tmp_path_factory):
    exact_path = dequantized_f32(FIXTURES / name, tmp_path_factory.getbasetemp() / name.replace(".gguf", "-f32.gguf"))
    exact = _logits(edgeseek.load(exact_path, device="cpu"))
    cpu = _distance(_logits(edgeseek.load(FIXTURES / name, device="cpu")), exact)
    gpu = _distance(_logits(edgeseek.load(FIXTURES / name, device="cuda")), exact)
    print(f"{name}: distance from exact math: CPU {cpu:.4f}, GPU {gpu:.4f}")
    assert gpu <= 1.25 * cpu + 1e-3


def test_experts_split_between_vram_and_the_cpu(monkeypatch):
    path = FIXTURES / "v3-f32.gguf"
    full = plan_gpu(GGUFFile(path), 1 << 40, 4096)
    per_expert = full.expert_bytes // full.experts_total
    budget = full.used - full.expert_bytes + per_expert * (full.experts_total // 2)
    half = edgeseek.load(path, device="cuda", gpu_budget=budget)
    assert 0 < half.gpu_plan.experts_on_gpu < half.gpu_plan.experts_total
    ref = _logits(edgeseek.load(path, device="cpu"))
    got = _logits(half)
    assert np.abs(got - ref).max() <= 0.005 * (ref.max() - ref.min())
    s = half.expert_stats()
    assert s["expert_pairs_gpu"] > 0 and s["expert_pairs_cpu"] > 0
    # a long prompt: the CPU's experts copied to the GPU a few at a time (cuda.STREAM_BYTES shrunk to
    # two experts' blocks, so that each layer takes several fills of the buffer)
    from edgeseek.backends import cuda
    monkeypatch.setattr(cuda, "STREAM_BYTES", 2 * per_expert)
    prompt = np.arange(cuda.STREAM_MIN_TOKENS + 9) % 13 + 1
    got = _logits(half, steps=1, prompt=prompt)
    ref = _logits(edgeseek.load(path, device="cpu"), steps=1, prompt=prompt)
    assert np.abs(got - ref).max() <= 0.005 * (ref.max() - ref.min())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_query_decode_graph_equals_the_cpu_path(arch, tmp_path):
    """llama / qwen2 decode steps captured and replayed as a CUDA graph (store and attention read the
    position on the device) against the CPU path."""
    from random_llama import random_llama
    path = random_llama(tmp_path / f"{arch}.gguf", arch)
    ref = _logits(edgeseek.load(path, device="cpu"), steps=6)
    got = _logits(edgeseek.load(path, device="cuda"), steps=6)
    assert np.abs(got - ref).max() <= 0.005 * (ref.max() - ref.min())


@pytest.mark.parametrize("k", [1, 2])
def test_mtp_greedy_output_equals_decoding_without_it(k, tmp_path_factory):
    """Multi-token prediction on the GPU: the MTP block drafts, the main model verifies k + 1
    positions on the device; greedy output as without MTP (a tiny V3 checkpoint's MTP layer)."""
    pytest.importorskip("torch")
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "convert"))
    import checkpoints as C
    from edgeseek.convert.convert import convert
    path = tmp_path_factory.mktemp("mtp") / "v3-mtp-f32.gguf"
    convert(C.checkpoint("v3fp8"), path, "f32", force=True, keep_mtp=True)
    greedy = edgeseek.SamplerConfig.greedy()
    out = []
    for mtp in ("off", k):
        e = edgeseek.load(path, device="cuda", mtp=mtp)
        out.append([r.token for r in edgeseek.stream_generate(e, list(range(5, 25)), max_tokens=40, sampler=greedy)
                    if r.token is not None])
    assert out[0] == out[1] and e.mtp.steps > 0


SMOLLM2 = os.environ.get("EDGESEEK_SMOLLM2_F32")  # SmolLM2 dequantized from the PyPI Q4_1 file
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis briefly.",
           "List three prime numbers.", "Who wrote Hamlet?"]


@pytest.mark.skipif(not SMOLLM2, reason="EDGESEEK_SMOLLM2_F32 names SmolLM2's F32 file")
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_f32_greedy_tokens_equal_the_cpu_path(prompt):
    from edgeseek.chat import single_turn_ids
    tokens = []
    for device in ("cpu", "cuda"):
        e = _smollm2(device)
        ids = single_turn_ids(e, prompt)
        tokens.append([r.token for r in edgeseek.stream_generate(e, ids, max_tokens=64,
                                                                  sampler=edgeseek.SamplerConfig.greedy())
                       if r.token is not None])
    assert tokens[0] == tokens[1]


_engines: dict = {}


def _smollm2(device):
    if device not in _engines:
        _engines[device] = edgeseek.load(SMOLLM2, device=device, n_ctx=512)
    return _engines[device]

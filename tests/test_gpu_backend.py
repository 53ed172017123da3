"""The CUDA backend's logic without a GPU: its kernels emulated with numpy (cuda_emulation.py), the
rest as it runs on a GPU: the VRAM plan, the experts split between VRAM and the CPU's store, decode
and prompt paths, the engine and the command's device options and errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cuda_emulation import EmulatedCUDABackend
from random_llama import random_llama
from edgeseek.budget import parse_size
from edgeseek.engine import load, resolve_device
from edgeseek.errors import EdgeseekError
from edgeseek.gguf_file import GGUFFile
from edgeseek.placement import WORKSPACE, GPUBudgetError, plan_gpu

FIXTURES = Path(__file__).parent / "fixtures" / "deepseek2"
PROMPT = np.array([1, 5, 9, 3, 7, 2, 11, 4, 6, 8, 10, 12], np.int64)  # 12 tokens: more than a decode product takes


def _logits(engine, tokens=PROMPT, steps=3):
    """All logits of the prompt, then `steps` decode steps of fixed tokens."""
    ctx = engine.new_context()
    out = [engine.model.forward(tokens, ctx.cache, all_logits=True)]
    for t in range(steps):
        out.append(engine.model.forward(np.array([t + 2]), ctx.cache))
    return np.concatenate(out)


@pytest.mark.parametrize("name", ["v3-f32.gguf", "v3-f32-legacy.gguf", "v2lite-f32.gguf"])
def test_emulated_gpu_path_equals_the_cpu_path_on_f32(name):
    cpu = load(FIXTURES / name, device="cpu")
    gpu = load(FIXTURES / name, backend=EmulatedCUDABackend())
    assert gpu.device == "cuda" and gpu.gpu_plan.experts_on_gpu == gpu.gpu_plan.experts_total
    ref, got = _logits(cpu), _logits(gpu)
    assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_emulated_gpu_grouped_query_decode_equals_the_cpu_path(arch, tmp_path):
    """llama / qwen2 decode on the GPU path: the new entry stored and attended by the backend from
    the position on the device (what lets a CUDA graph capture the step), the fused feed-forward."""
    path = random_llama(tmp_path / f"{arch}.gguf", arch)
    ref = _logits(load(path, device="cpu"), steps=5)
    got = _logits(load(path, backend=EmulatedCUDABackend()), steps=5)
    assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())


@pytest.mark.parametrize("name, split", [("v3h256-q4_k_m.gguf", False), ("v2lite-q8_0.gguf", False),
                                         ("v3-q4_0.gguf", True)])
def test_emulated_grouped_prompt_experts_equal_the_dequantized_tiles(name, split):
    """A prompt's routed experts through the grouped products (pairs sorted by expert, tiles of one
    expert, each token's rows added in routing order; the bookkeeping on the device when every
    expert is in VRAM, on the host when half of them are and the CPU's pairs join in) give the
    logits of the dequantized tiles and cuBLAS, both on float16 operands, and the same usage
    counts."""
    kw = {}
    if split:
        full = plan_gpu(GGUFFile(FIXTURES / name), 1 << 40, 4096)
        per_layer = full.expert_bytes // len(full.on_gpu) // full.n_expert
        kw["gpu_budget"] = full.used - full.expert_bytes + per_layer * full.experts_total // 2
    runs, counts = [], []
    for grouped in (True, False):
        b = EmulatedCUDABackend()
        engine = load(FIXTURES / name, backend=b, **kw)
        b.prompt_mma = grouped
        calls = []
        b.kernels.moe_glu_mma = (lambda f: lambda *a: calls.append(1) or f(*a))(b.kernels.moe_glu_mma)
        runs.append(_logits(engine))
        assert bool(calls) == grouped
        counts.append(engine.experts.take_counts())
    ref, got = runs[1], runs[0]
    assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())
    assert counts[0].sum() > 0 and (counts[0] == counts[1]).all()


def test_experts_left_out_of_vram_run_on_the_cpu_with_the_same_result():
    path = FIXTURES / "v3-f32.gguf"
    g = GGUFFile(path)
    full = plan_gpu(g, 1 << 40, 4096)
    per_layer = full.expert_bytes // len(full.on_gpu) // full.n_expert
    budget = full.used - full.expert_bytes + per_layer * full.experts_total // 2  # half the experts
    half = load(path, backend=EmulatedCUDABackend(), gpu_budget=budget)
    assert half.gpu_plan.experts_on_gpu == full.experts_total // 2
    everything = load(path, backend=EmulatedCUDABackend())
    ref, got = _logits(everything), _logits(half)
    assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())
    s = half.expert_stats()
    assert s["expert_pairs_gpu"] > 0 and s["expert_pairs_cpu"] > 0


def test_plan_refuses_a_budget_below_the_resident_weights_with_the_figure():
    g = GGUFFile(FIXTURES / "v3-q4_0.gguf")
    with pytest.raises(GPUBudgetError, match=r"needs at least .*MiB") as e:
        plan_gpu(g, WORKSPACE // 2, 4096)
    assert "v3-q4_0.gguf" in str(e.value)
    with pytest.raises(GPUBudgetError):
        load(FIXTURES / "v3-q4_0.gguf", backend=EmulatedCUDABackend(), gpu_budget="100M")


def test_plan_takes_the_hottest_experts_first():
    g = GGUFFile(FIXTURES / "v3-q4_0.gguf")
    full = plan_gpu(g, 1 << 40, 4096)
    layers = sorted(full.on_gpu)
    profile = np.zeros((g.arch_meta("block_count"), full.n_expert))
    hot = {(layers[-1], full.n_expert - 1), (layers[0], 2)}
    for i, e in hot:
        profile[i, e] = 100
    per = {i: sum(g.tensor(f"blk.{i}.{k}.weight").n_bytes for k in ("ffn_gate_exps", "ffn_up_exps",
                                                                     "ffn_down_exps")) // full.n_expert
           for i in layers}
    budget = full.used - full.expert_bytes + sum(per[i] for i, _ in hot)
    plan = plan_gpu(g, budget, 4096, profile)
    assert {(i, int(e)) for i, ids in plan.on_gpu.items() for e in ids} == hot
    even = plan_gpu(g, budget, 4096)  # no profile: the same number of experts in every layer
    assert sorted(len(v) for v in even.on_gpu.values())[-1] - sorted(len(v) for v in even.on_gpu.values())[0] <= 1


def test_device_choice_and_its_errors():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(EdgeseekError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    try:
        import cupy  # noqa: F401
        has_cupy = True
    except Exception:
        has_cupy = False
    if not has_cupy:  # CI: no extra, no GPU
        assert resolve_device("auto") == "cpu"
        with pytest.raises(EdgeseekError, match=r"--device cuda: the cuda extra is not installed"):
            resolve_device("cuda")


def test_command_without_a_gpu_says_why_in_one_line(tmp_path):
    pytest.importorskip("typer")
    try:
        from edgeseek.backends.cuda import probe
        reason = probe()
    except Exception:
        reason = "?"
    if reason is None:
        pytest.skip("this machine has a usable GPU")
    r = subprocess.run([sys.executable, "-m", "edgeseek.app.cli", "generate", str(FIXTURES / "v3-q4_0.gguf"),
                        "--device", "cuda", "-p", "hi", "-n", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: ")


def test_inspect_shows_the_vram_split():
    r = subprocess.run([sys.executable, "-m", "edgeseek.app.cli", "inspect", str(FIXTURES / "v3-q4_0.gguf"),
                        "--gpu-budget", "600M", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    split = json.loads(r.stdout)["gpu_budget"]
    assert split["budget"] == parse_size("600M") and split["experts_on_gpu"] == split["experts_total"] > 0
    r = subprocess.run([sys.executable, "-m", "edgeseek.app.cli", "inspect", str(FIXTURES / "v3-q4_0.gguf"),
                        "--gpu-budget", "10M", "--json"], capture_output=True, text=True, timeout=120)
    assert "needs at least" in json.loads(r.stdout)["gpu_budget"]["refused"]

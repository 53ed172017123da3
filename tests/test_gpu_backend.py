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
    """Float32 weights: the same logits as the CPU path, up to the float16 operands of the prompt's
    attention products (queries and weights rounded to float16, as on the tensor cores; the decode
    steps read the cache the prompt wrote): 1.7e-4 of the spread at most on these fixtures."""
    cpu = load(FIXTURES / name, device="cpu")
    gpu = load(FIXTURES / name, backend=EmulatedCUDABackend())
    assert gpu.device == "cuda" and gpu.gpu_plan.experts_on_gpu == gpu.gpu_plan.experts_total
    ref, got = _logits(cpu), _logits(gpu)
    spread = ref.max() - ref.min()
    assert np.abs(got - ref).max() <= 1e-3 * spread


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
    counts. The prompt's logits within 5e-4 of the spread (the grouped products round the hidden
    rows to float16 between gate-up and down, the tiles keep them in float32: 1.6e-4 measured on
    the V2-Lite Q8_0 fixture, 7e-5 on the others); the decode steps after it, which read the cache
    the prompt wrote, within 1e-2 (their int8 activations can round a value the other way: 3.4e-3
    on V2-Lite Q8_0, 0 on the others)."""
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
    diff = np.abs(got - ref).max(axis=1) / (ref.max() - ref.min())
    assert diff[:len(PROMPT)].max() <= 5e-4 and diff[len(PROMPT):].max() <= 1e-2
    assert counts[0].sum() > 0 and (counts[0] == counts[1]).all()


def _record_launches(kernels, names, what=lambda m, a: m) -> list:
    """Wrap the launchers `names` of emulated kernels: each launch the backend makes appends
    what(name, args) to the list returned (the launches an emulated launch makes are not counted)."""
    calls, inner = [], []

    def record(f, m):
        def launch(*a, **kw):
            if not inner:
                calls.append(what(m, a))
            inner.append(m)
            try:
                return f(*a, **kw)
            finally:
                inner.pop()
        return launch
    for m in names:
        setattr(kernels, m, record(getattr(kernels, m), m))
    return calls


@pytest.mark.parametrize("name, int8", [("v3h256-q4_k_m.gguf", {"Q4_K", "Q5_K", "Q6_K"}),
                                        ("v2lite-q8_0.gguf", {"Q8_0"}), ("v3-q4_k_m.gguf", {"Q5_0", "Q8_0"})])
def test_emulated_decode_runs_every_quantized_product_on_int8_activations(name, int8):
    """Decode steps send the one-token products of every quantized format (attention, shared and
    routed experts, output head) to the int8 kernels; the float decode products see only F32
    matrices (the router)."""
    b = EmulatedCUDABackend()
    engine = load(FIXTURES / name, backend=b)
    ctx = engine.new_context()
    engine.model.forward(PROMPT, ctx.cache)
    calls = _record_launches(b.kernels, ("mmv", "glu_ids", "down_ids", "mmv1_q8", "glu_q8", "down_q8", "mmv1_sq8",
                                         "mmv3_sq8"), lambda m, a: (m, a[0].name))
    for t in range(2):
        engine.model.forward(np.array([t + 2]), ctx.cache)
    assert {q for m, q in calls if m.endswith("q8")} == int8
    assert {q for m, q in calls if not m.endswith("q8")} == {"F32"}


def test_a_decode_steps_norms_are_made_by_the_launches_that_read_them():
    """In a decode step the layer's input norm is made inside the launch of its first products (q
    and kv_a), the feed-forward's inside the router's launch, and the attention output is quantized
    inside the output projection's: no launch of their own. What still launches: the first
    (dense) layer's feed-forward norm, the head's norm, and each MoE layer's hidden rows' q8."""
    b = EmulatedCUDABackend()
    engine = load(FIXTURES / "v2lite-q8_0.gguf", backend=b)
    ctx = engine.new_context()
    engine.model.forward(PROMPT, ctx.cache)
    calls = _record_launches(b.kernels, [m for m in vars(type(b.kernels)) if not m.startswith("_")])
    engine.model.forward(np.array([7]), ctx.cache)
    layers = engine.model.layers
    moe = sum(not L.dense for L in layers)
    assert (calls.count("rms_norm"), calls.count("norm_router_route")) == (len(layers) - moe + 1, moe)
    assert (calls.count("mmv3_sq8"), calls.count("mmv3_q8")) == (len(layers), 0)
    assert calls.count("quantize_q8") == moe


@pytest.mark.parametrize("name, tol", [("v3-f32.gguf", 1e-4), ("v2lite-q8_0.gguf", 1e-2)])
@pytest.mark.parametrize("share", [0.75, 0.0])
def test_experts_left_out_of_vram_run_on_the_cpu_with_the_same_result(name, tol, share):
    """Three quarters of the routed experts in VRAM (a whole layer, half of the other: without a
    profile the plan fills whole layers first), or none: the same logits as with all of them there (float32
    weights: to 1e-4 of the spread, float32 sums in another order: 2e-7 measured on an AVX-512 CPU,
    1.1e-5 on an AVX2 one; Q8_0: the CPU's int8 products against the GPU's, 1e-2, 5e-3 measured), every
    decode step's MoE layers through the split step (the CPU's pairs between two graphs on a GPU),
    the pairs counted by the tier that served them."""
    path = FIXTURES / name
    full = plan_gpu(GGUFFile(path), 1 << 40, 4096)
    per_layer = full.expert_bytes // len(full.on_gpu) // full.n_expert
    budget = full.used - full.expert_bytes + per_layer * int(full.experts_total * share)
    b = EmulatedCUDABackend()
    split = load(path, backend=b, gpu_budget=budget)
    assert split.gpu_plan.experts_on_gpu == int(full.experts_total * share)
    calls = []
    b._split_step = (lambda f: lambda *a: calls.append(1) or f(*a))(b._split_step)
    everything = load(path, backend=EmulatedCUDABackend())
    ref, got = _logits(everything), _logits(split)
    assert np.abs(got - ref).max() <= tol * (ref.max() - ref.min())
    split_layers = [i for i, ids in split.gpu_plan.on_gpu.items() if len(ids) < full.n_expert]
    assert len(split_layers) == (1 if share else len(full.on_gpu))
    assert len(calls) == 3 * len(split_layers)  # every decode step's MoE layers with experts on the CPU
    s = split.expert_stats()
    assert s["expert_pairs_cpu"] > 0 and (s["expert_pairs_gpu"] > 0) == (share > 0)


@pytest.mark.parametrize("share", [0.75, 0.0])
def test_a_captured_split_step_lets_the_host_run_beside_the_gpus_own_part(share):
    """While a decode step is captured, a layer with experts on the CPU ends a graph after the copies
    of its token's row and choices (the host waits for that graph), queues the GPU's own part of the
    layer (its experts in VRAM with the shared experts, or the shared experts alone) into the next
    one and hands the CPU's experts to the host without a wait: they run once that graph is
    launched, beside it. The emulated capture runs each host part at its cut, so the logits are
    those of the uncaptured step."""
    path = FIXTURES / "v3-f32.gguf"
    full = plan_gpu(GGUFFile(path), 1 << 40, 4096)
    per_expert = full.expert_bytes // full.experts_total
    budget = full.used - full.expert_bytes + per_expert * int(full.experts_total * share)
    log = []

    class Capture:  # what _DecodeGraph gives the backend while it records
        capturing, pos = True, None

        def routed(self, layer: int):
            return np.zeros((1, full_engine.model.config.n_expert_used), np.int32)

        def cut(self, wait: bool = True, fn=None):
            log.append(("cut", wait, fn is not None))
            if fn is not None:
                fn()

    b = EmulatedCUDABackend()
    engine, full_engine = load(path, backend=b, gpu_budget=budget), load(path, backend=EmulatedCUDABackend())
    for name in ("_routed_glu", "ffn"):  # the GPU's own part: experts in VRAM (with the shared), or the shared
        setattr(b, name, (lambda f: lambda *a, **k: log.append(("gpu",)) or f(*a, **k))(getattr(b, name)))
    ctx, ref_ctx = engine.new_context(), full_engine.new_context()
    engine.model.forward(PROMPT, ctx.cache)
    full_engine.model.forward(PROMPT, ref_ctx.cache)
    for t in range(3):
        step = b._step = Capture()
        step.pos = np.array([ctx.cache.pos], np.int32)
        try:
            got = engine.model.forward(np.array([t + 2]), ctx.cache)
        finally:
            b._step = None
        ref = full_engine.model.forward(np.array([t + 2]), ref_ctx.cache)
        assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())
    split_layers = [i for i, ids in engine.gpu_plan.on_gpu.items() if len(ids) < full.n_expert]
    assert split_layers and log.count(("cut", False, True)) == 3 * len(split_layers)
    assert ("cut", True, True) not in log  # the host never waits for the GPU's own part
    for i, e in enumerate(log):
        if e == ("cut", False, True):
            assert log[i - 2:i] == [("cut", True, False), ("gpu",)]


@pytest.mark.parametrize("share, buffer", [(0.75, 2), (0.0, 2), (0.0, 1 / 3)])
def test_a_long_prompts_cpu_experts_are_copied_to_the_gpu_with_the_same_result(share, buffer, monkeypatch):
    """A prompt of STREAM_MIN_TOKENS tokens or more: the pairs of experts left on the CPU run on the
    GPU on copies of their blocks, a few experts a buffer (the buffer shrunk here to two experts, so
    that a layer takes several fills, or to a third of one: one expert a fill; gathered into the two
    page-locked staging buffers by turns), with the logits of the all-VRAM path (F32: 1e-4 of the
    spread, 2e-5 measured: a token's pairs are added a bufferful at a time, not in routing order) and no CPU
    products; a shorter prompt keeps them on the CPU. The CPU's experts are packed at load."""
    from edgeseek.backends import cuda
    path = FIXTURES / "v3-f32.gguf"
    full = plan_gpu(GGUFFile(path), 1 << 40, 4096)
    per_expert = full.expert_bytes // len(full.on_gpu) // full.n_expert
    monkeypatch.setattr(cuda, "STREAM_BYTES", int(buffer * per_expert))
    budget = full.used - full.expert_bytes + per_expert * int(full.experts_total * share)
    b = EmulatedCUDABackend()
    split = load(path, backend=b, gpu_budget=budget)
    streamed, on_cpu = [], []
    b._streamed_experts = (lambda f: lambda *a: streamed.append(1) or f(*a))(b._streamed_experts)
    tiers = split.model.experts
    left = [m for layer, slots in tiers._slots.items()
            for tr in tiers.cpu_store.experts(layer, np.flatnonzero(slots < 0)) for m in tr]
    assert left and all(m._packed is not None for m in left)  # packed at load, not by the first tokens
    tiers.cpu_part = (lambda f: lambda x, *a: on_cpu.append(len(x)) or f(x, *a))(tiers.cpu_part)
    everything = load(path, backend=EmulatedCUDABackend())
    prompt = np.arange(cuda.STREAM_MIN_TOKENS + 3) % 13 + 1
    ref, got = _logits(everything, prompt, steps=1), _logits(split, prompt, steps=1)
    assert np.abs(got - ref).max() <= 1e-4 * (ref.max() - ref.min())
    split_layers = [i for i, ids in split.gpu_plan.on_gpu.items() if len(ids) < full.n_expert]
    assert len(streamed) == len(split_layers)  # every MoE layer of the prompt with experts on the CPU
    assert b._staging and len(b._staging[0][0]) >= per_expert  # sized for one expert where it is above STREAM_BYTES
    assert set(on_cpu) <= {1}  # the decode step's pairs only, where its choices left any on the CPU
    streamed.clear()
    short = _logits(split, PROMPT, steps=0)
    assert not streamed and len(PROMPT) in on_cpu
    assert np.abs(short - _logits(everything, PROMPT, steps=0)).max() <= 1e-4 * (ref.max() - ref.min())  # as above


def test_staged_experts_lie_side_by_side_in_the_page_locked_buffer():
    """A chunk's experts of every projection gathered into one staging buffer, one projection after
    the other (the copies queued from it read while the next gather fills the other buffer: nothing
    may overlap), and copied into each projection's device buffer."""
    rng = np.random.default_rng(0)
    raws = [rng.integers(0, 256, (8, 6, 18), dtype=np.uint8), rng.integers(0, 256, (8, 4, 34), dtype=np.uint8)]
    b = EmulatedCUDABackend()
    chunk = np.array([1, 2, 6])
    bufs = [np.zeros((5, *r.shape[1:]), np.uint8) for r in raws]
    for i in (0, 1, 0):
        b._staged_copy(i, raws, chunk, bufs)
    for raw, buf in zip(raws, bufs):
        assert np.array_equal(buf[:3], raw[chunk]) and not buf[3:].any()
    host = b._staging[0][0]
    sizes = [raw[chunk].nbytes for raw in raws]
    assert np.array_equal(host[:sizes[0]], raws[0][chunk].reshape(-1))
    assert np.array_equal(host[sizes[0]:sum(sizes)], raws[1][chunk].reshape(-1))


def test_a_decode_chain_waits_where_its_cuts_say_and_runs_the_host_parts_between_launches():
    """_DecodeGraph.run over a chain recorded with three cuts (a layer's copies: wait, no host part;
    the GPU's own part: no wait, the CPU's experts; an older-style cut: wait, then a host part): each
    graph launched in order, the host waiting only where a cut says, each host part after the launch
    of the graph it follows, the logits read after the last launch."""
    from types import SimpleNamespace
    from edgeseek.backends.cuda import _DecodeGraph
    log = []
    stream = SimpleNamespace(synchronize=lambda: log.append("wait"))
    g = object.__new__(_DecodeGraph)
    g.stream, g.model, g.moe_layers = stream, SimpleNamespace(), []
    g.graphs = [SimpleNamespace(launch=lambda s, i=i: log.append(f"graph {i}")) for i in range(4)]
    g.host_calls = [(True, None), (False, lambda: log.append("cpu experts")), (True, lambda: log.append("host"))]
    g.inputs = SimpleNamespace(set=lambda a, stream: log.append("inputs"))
    g.host_inputs, g.host_logits = np.zeros(2, np.int32), np.zeros(3, np.float32)
    g.logits = SimpleNamespace(get=lambda stream, out, blocking: log.append("logits"))
    g.run(5, 7)
    assert log == ["inputs", "graph 0", "wait", "graph 1", "cpu experts", "graph 2", "wait", "host", "graph 3",
                   "logits", "wait"]
    assert g.host_inputs.tolist() == [5, 7]


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
    # no profile: whole layers first (each one a wait for the host less), then a part of the next
    per_layer = per[layers[0]] * full.n_expert
    flat = plan_gpu(g, full.used - full.expert_bytes + per_layer + 3 * per[layers[0]], 4096)
    assert sorted(len(v) for v in flat.on_gpu.values()) == [3, full.n_expert]


def test_plan_with_experts_of_several_sizes_leaves_no_expert_that_fits():
    """Layers whose experts differ in size (a Q4_K_M mix: some layers' down in Q6_K): the knapsack
    counts in steps with sizes rounded up, then fills what the rounding left; no expert of a layer
    not whole would still fit, and without a profile whole layers come first."""
    from edgeseek.placement import _choose
    per = np.array([1000, 1153, 1000, 1153, 1153], np.int64)
    E = 8
    for room in (3 * 8 * 1000 + 500, 8 * 1153 + 5 * 1000 + 999, 17 * 1077):
        m = np.array([len(ids) for ids in _choose(np.zeros((5, E)), per, room)])
        used = int((m * per).sum())
        assert used <= room and not ((m < E) & (per <= room - used)).any()
        assert (m == E).sum() >= used // (E * per.max())  # as many whole layers as that many bytes make
    hot = np.zeros((5, E))
    hot[3, 5] = 10  # one hot expert: held first
    assert 5 in _choose(hot, per, 1153)[3]


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


def _blocks(qtype, w: np.ndarray) -> np.ndarray:
    """(..., N, K) float32 -> the GGUF bytes (..., N, row_bytes) (Q4_K, Q5_K, Q6_K by edgeseek's
    quantizers, which gguf-py lacks)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants
    from edgeseek.quantize import get_format
    rows = w.reshape(-1, w.shape[-1])
    raw = get_format(qtype).quantize(rows) if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else quants.quantize(rows, qtype)
    return np.ascontiguousarray(raw).view(np.uint8).reshape(*w.shape[:-1], -1)


def test_a_k_quant_mix_layer_runs_its_two_downs_in_one_int8_launch(monkeypatch):
    """A decode step of a MoE layer whose routed down fell back to Q8_0 (rows of 64 values, as a
    Q4_K_M file's 1408-value rows do) while the shared down stays Q6_K: the shared experts join the
    routed experts' gate-up and down launches on int8 activations (down_q8 with a Q6_K shared part,
    the down_ids_q8_0_q6_k_q8 kernel), with the output of the separate launches (shared gate-up,
    then a Q6_K mmv1 adding the routed sum and the residual) on the same q8_1 values."""
    from gguf import GGMLQuantizationType as Q
    from edgeseek.backends import cuda
    from edgeseek.backends.cuda import DeviceExperts, DeviceMatrix
    from edgeseek.models.moe import RouterConfig
    E, k, D, F, F2, T = 8, 3, 256, 64, 256, 1
    rng = np.random.default_rng(7)
    b = EmulatedCUDABackend()
    w = lambda *shape: (rng.standard_normal(shape) * 0.1).astype(np.float32)  # noqa: E731
    gate = DeviceExperts(b, Q.Q4_K, _blocks(Q.Q4_K, w(E, F, D)), (F, D), "ffn_gate_exps")
    up = DeviceExperts(b, Q.Q4_K, _blocks(Q.Q4_K, w(E, F, D)), (F, D), "ffn_up_exps")
    down = DeviceExperts(b, Q.Q8_0, _blocks(Q.Q8_0, w(E, D, F)), (D, F), "ffn_down_exps")
    shared = (DeviceMatrix(b, Q.Q4_K, _blocks(Q.Q4_K, w(F2, D)), (F2, D), "ffn_gate_shexp"),
              DeviceMatrix(b, Q.Q4_K, _blocks(Q.Q4_K, w(F2, D)), (F2, D), "ffn_up_shexp"),
              DeviceMatrix(b, Q.Q6_K, _blocks(Q.Q6_K, w(D, F2)), (D, F2), "ffn_down_shexp"))

    class Store:  # every expert in VRAM
        all_on_device = staticmethod(lambda layer: True)
        device = staticmethod(lambda layer: (gate, up, down))
        count = staticmethod(lambda layer, ids: None)

    x, residual, router_w = w(T, D), w(T, D), w(E, D)
    calls = []
    for m in ("glu_q8", "down_q8", "mmv1_q8"):
        f = getattr(b.kernels, m)
        monkeypatch.setattr(b.kernels, m, (lambda f, m: lambda *a: calls.append((m, a)) or f(*a))(f, m))

    def layer():
        calls.clear()
        return b.moe(x, router_w, RouterConfig(E, k), None, Store(), 0, shared=shared, residual=residual)

    fused = layer()
    assert [m for m, _ in calls] == ["glu_q8", "down_q8"]
    glu, dn = calls[0][1], calls[1][1]
    assert glu[-1] is not None and dn[0] == Q.Q8_0 and dn[13][0] == Q.Q6_K  # shared gate-up; (qtype2, ...)
    monkeypatch.setattr(cuda, "MIXED_DOWN", frozenset())  # the shared experts in launches of their own
    apart = layer()
    assert [m for m, _ in calls] == ["glu_q8", "down_q8", "glu_q8", "mmv1_q8"]
    assert calls[1][1][13] is None and calls[3][1][0] == Q.Q6_K
    np.testing.assert_allclose(fused, apart, rtol=1e-5, atol=1e-5 * np.abs(apart).max())

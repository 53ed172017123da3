"""Models larger than RAM: the cached expert store (edgeseek/expert_store.py) against the whole-file
mmap, its policy, its budget and its profile; and a run inside a memory cgroup half the size of
the model file."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import models_cache
from edgeseek.engine import load
from edgeseek.errors import BudgetError, EdgeseekError
from edgeseek.budget import parse_size, resident_set_bytes
from edgeseek.expert_store import CachedExpertStore
from edgeseek.gguf_file import GGUFFile
from edgeseek.profile import load_profile, profile_path

FIXTURES = Path(__file__).parent / "fixtures" / "deepseek2"


def _store(path: Path, capacity_experts: int, **kw) -> CachedExpertStore:
    g = GGUFFile(path)
    m = g.arch_meta
    per = sum(g.tensor(f"blk.1.{k}.weight").n_bytes for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"))
    per = per // m("expert_count")
    # packed experts are a little larger than in the file: room for capacity_experts, not one more
    return CachedExpertStore(g, m("block_count"), m("expert_count"), m("embedding_length"),
                             m("expert_feed_forward_length"), int(per * 1.3 * capacity_experts), **kw)


@pytest.mark.parametrize("name, capacity", [("v2lite-q8_0", 4), ("v3-q4_k_m", 6)])  # top-3 of 8, top-4 of 16
def test_cached_store_gives_the_mmap_logits(name, capacity):
    """Every expert read from disk, the cache far smaller than the experts in use: the same logits,
    to the bit, in prefill and in step-by-step decode."""
    path = FIXTURES / f"{name}.gguf"
    tokens = np.load(FIXTURES / f"{name}.npz")["tokens"][:24]
    ref = load(path, n_ctx=64)
    store = _store(path, capacity_experts=capacity)
    eng = load(path, n_ctx=64, expert_store=store)
    want = ref.model.forward(tokens, ref.model.new_cache(), all_logits=True)
    got = eng.model.forward(tokens, eng.model.new_cache(), all_logits=True)
    np.testing.assert_array_equal(got, want)
    cache = eng.model.new_cache()
    for i, t in enumerate(tokens):
        np.testing.assert_array_equal(eng.model.forward(np.array([t]), cache)[0],
                                      ref.model.forward(tokens[: i + 1], ref.model.new_cache())[0])
    s = store.stats()
    assert s["expert_misses"] > 0 and s["expert_hits"] > 0 and s["bytes_read"] > 0
    assert s["expert_cache_bytes"] <= s["expert_cache_capacity"]
    store.close()


def test_frequent_expert_stays_cached():
    """Expert 0 is chosen every token; five others take turns through a cache of three. LRU would
    keep whichever came last; frequency with aging keeps expert 0."""
    store = _store(FIXTURES / "v2lite-q8_0.gguf", capacity_experts=3)
    for step in range(30):
        store.begin_step()
        for _ in store.fetch(1, np.array([0, 1 + step % 5])):
            pass
    assert (1, 0) in store.cache
    hits_before = store.n_hit
    list(store.fetch(1, np.array([0])))
    assert store.n_hit == hits_before + 1
    store.close()


def test_prefetch_reads_ahead_and_counts_accuracy():
    store = _store(FIXTURES / "v2lite-q8_0.gguf", capacity_experts=8)
    store.prefetch(2, np.array([3, 4]))
    list(store.fetch(1, np.array([0])))
    list(store.fetch(2, np.array([3, 5])))  # 3 was prefetched and used, 4 was not
    s = store.stats()
    assert s["prefetch_issued"] == 2 and s["prefetch_accuracy"] == 0.5
    store.close()


def test_profile_counts_every_choice_and_is_saved_by_the_engine(tmp_path, monkeypatch):
    """A prompt's tokens that choose the same expert count once each (the store is handed each
    expert once); the engine adds the counts to the saved profile, run after run."""
    monkeypatch.setenv("EDGESEEK_CACHE", str(tmp_path))
    path = FIXTURES / "v2lite-q8_0.gguf"
    tokens = np.load(FIXTURES / "v2lite-q8_0.npz")["tokens"][:10]
    for run in (1, 2):
        e = load(path, n_ctx=32)
        e.model.forward(tokens, e.model.new_cache())
        e.close()
        counts = load_profile(profile_path(e.gguf), 3, 8)
        assert counts[0].sum() == 0  # layer 0 is dense
        assert (counts[1:].sum(axis=1) == run * len(tokens) * 3).all()  # top-3 of 8, every token


def test_profile_warms_and_pins(tmp_path):
    path = FIXTURES / "v2lite-q8_0.gguf"
    counts = np.zeros((3, 8), np.int64)
    counts[1, 2] = counts[1, 5] = counts[2, 7] = 5
    warm = _store(path, capacity_experts=6, profile=counts)
    assert {(1, 2), (1, 5), (2, 7)} <= set(warm.cache)
    assert warm.pinned and warm.pinned <= set(warm.cache)
    list(warm.fetch(1, np.array([2, 5])))
    assert warm.stats()["expert_hit_rate"] == 1.0
    warm.close()


def test_budget_too_small_is_refused_before_loading():
    with pytest.raises(BudgetError, match=r"needs at least [0-9.]+ [MG]iB.*resident weights"):
        load(FIXTURES / "v2lite27-q8_0.gguf", ram_budget="16M")


@pytest.mark.parametrize("text, value", [("4G", 4 << 30), ("512M", 512 << 20), ("1.5GB", int(1.5 * (1 << 30))),
                                         ("100", 100), ("64 MiB", 64 << 20)])
def test_parse_size(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(EdgeseekError, match="cannot read 'lots'"):
        parse_size("lots")


# --- bigger than RAM, for real: a memory cgroup ------------------------------------------------

CGROUP = Path("/sys/fs/cgroup/memory")
LIMIT = 450 << 20
BUDGET = "420M"

RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import edgeseek
    path, budget = sys.argv[1], (None if sys.argv[2] == "none" else sys.argv[2])
    e = edgeseek.load(path, n_ctx=128, ram_budget=budget, use_profile=False)
    m = e.model
    cache = m.new_cache()
    seq = np.random.default_rng(0).integers(300, 32000, 40).astype(np.int32)
    logits = m.forward(seq[:8], cache)[-1]
    next_ids = [int(np.argmax(logits))]
    for t in seq[8:]:  # one token at a time, as decode runs
        next_ids.append(int(np.argmax(m.forward(np.array([t]), cache)[-1])))
    print(json.dumps({"next_ids": next_ids, "stats": e.expert_stats()}))
""")


def _cgroup_v1() -> bool:
    return os.geteuid() == 0 and (CGROUP / "memory.limit_in_bytes").exists() and os.access(CGROUP, os.W_OK)


@pytest.mark.skipif(not _cgroup_v1(), reason="needs root and a writable cgroup v1 memory controller")
def test_model_twice_the_memory_limit_runs_inside_it(tmp_path):
    model = models_cache.offload_model()
    assert model.stat().st_size >= 2 * LIMIT
    script = tmp_path / "run.py"
    script.write_text(RUN)
    ref = subprocess.run([sys.executable, str(script), str(model), "none"], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-2000:]
    group = CGROUP / f"edgeseek-test-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(LIMIT))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(LIMIT))
        inner = f"echo $$ > {group}/cgroup.procs && exec {sys.executable} {script} {model} {BUDGET}"
        run = subprocess.run(["sh", "-c", inner], capture_output=True, text=True)
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        oom_kills = [line for line in (group / "memory.oom_control").read_text().splitlines()
                     if line.startswith("oom_kill ")]
    finally:
        group.rmdir()
    assert run.returncode == 0, f"exit {run.returncode} (137: killed by the OOM killer)\n{run.stderr[-2000:]}"
    assert not oom_kills or oom_kills[0].split()[1] == "0"
    assert peak <= LIMIT
    got, want = json.loads(run.stdout.splitlines()[-1]), json.loads(ref.stdout.splitlines()[-1])
    assert got["next_ids"] == want["next_ids"]
    s = got["stats"]
    assert s["bytes_read"] > 0 and 0 < s["expert_hit_rate"] < 1


# --- the profile on the command line --------------------------------------------------------


def test_experts_command_shows_the_recorded_profile(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from edgeseek.app.cli import app

    monkeypatch.setenv("EDGESEEK_CACHE", str(tmp_path / "cache"))
    model = str(FIXTURES / "v3-q8_0.gguf")
    runner = CliRunner()
    r = runner.invoke(app, ["experts", model])
    assert r.exit_code == 1 and "no expert-usage profile" in r.output
    import edgeseek
    e = edgeseek.load(model, n_ctx=32)
    edgeseek.generate(e, "hello there", max_tokens=6, sampler=edgeseek.SamplerConfig.greedy())
    e.close()  # saves the profile (the CLI closes its engine at exit)
    store_closed = runner.invoke(app, ["experts", model, "--json"])
    assert store_closed.exit_code == 0, store_closed.output
    data = json.loads(store_closed.stdout)
    counts = np.array(data["counts"])
    assert counts.shape == (3, 16) and counts[0].sum() == 0 and counts[1:].sum() > 0  # layer 0 is dense
    png = tmp_path / "experts.png"
    r = runner.invoke(app, ["experts", model, "--png", str(png)])
    assert r.exit_code == 0, r.output
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"  # the figure itself: tests/test_plot.py


def test_experts_command_refuses_a_dense_model(smollm2_path):
    from typer.testing import CliRunner

    from edgeseek.app.cli import app

    r = CliRunner().invoke(app, ["experts", str(smollm2_path)])
    assert r.exit_code == 1 and "not a mixture-of-experts model" in r.output


def test_inspect_shows_what_a_budget_leaves_for_experts():
    from typer.testing import CliRunner

    from edgeseek.app.cli import app

    model = str(FIXTURES / "v2lite27-q8_0.gguf")
    budget = resident_set_bytes("RssAnon") + (1 << 30)  # the plan counts this process as the runtime
    r = CliRunner().invoke(app, ["inspect", model, "--json", "--ram-budget", str(budget)])
    assert r.exit_code == 0, r.output
    b = json.loads(r.stdout)["ram_budget"]
    assert b["budget"] == budget and b["expert_cache_bytes"] > 0 and "expert cache" in b["split"]
    r = CliRunner().invoke(app, ["inspect", model, "--json", "--ram-budget", "16M"])
    assert "needs at least" in json.loads(r.stdout)["ram_budget"]["refused"]

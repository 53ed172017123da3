"""Kernels are compiled (or loaded from numba's cache) when a model loads, the formats of the file
only: the first token then compiles nothing, and the first run after an install says that it is
compiling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DEEPSEEK2 = Path(__file__).parent / "fixtures" / "deepseek2"


# In a fresh process: in this one, earlier tests have compiled kernels already, and a dispatcher
# that already holds a signature compiles nothing whether or not load prepared it.
AFTER_LOAD = """
import json, sys
from numba.core import caching, event
import edgeseek

engine = edgeseek.load(sys.argv[1])
names = []  # every signature a dispatcher compiles or loads from numba's cache from here on

class Compiles(event.Listener):
    def on_start(self, ev):
        f = ev.data["dispatcher"].py_func
        names.append(f.__module__ + "." + f.__qualname__)
    def on_end(self, ev):
        pass

load_overload = caching.Cache.load_overload
def spy(self, sig, target_context):
    names.append(self._py_func.__module__ + "." + self._py_func.__qualname__)
    return load_overload(self, sig, target_context)
caching.Cache.load_overload = spy

with event.install_listener("numba:compile", Compiles()):
    sampler = edgeseek.SamplerConfig(temperature=0)
    if sys.argv[2:] == ["batch"]:  # steps of 2, 3 and 4 sequences: their (token, expert) pairs come in tuple
        # lengths a decode step does not use
        from edgeseek import batch
        for n in (2, 3, 4):
            reqs = [batch.Request(f"r{i}", i, "completion", f"Request {i}: hello", 3, sampler, []) for i in range(n)]
            batch.run(engine, reqs, lambda line: None, parallel=n)
    else:
        for _ in edgeseek.stream_generate(engine, "Hello, how are you today?", max_tokens=4, sampler=sampler):
            pass
print(json.dumps(sorted(set(names))))
"""


def _compiled_after_load(path, *args) -> list[str]:
    out = subprocess.run([sys.executable, "-c", AFTER_LOAD, str(path), *args], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["v3-q4_k_m", "v3h256-q4_k_m", "v3-q4_0", "v2lite-f32"])
def test_nothing_compiles_after_load(name):
    """A prompt (several tokens) and decode steps (one) after load: every kernel they call was
    prepared by load."""
    assert _compiled_after_load(DEEPSEEK2 / f"{name}.gguf") == []


@pytest.mark.parametrize("name", ["v3-q4_k_m", "v3-q4_0"])
def test_a_batch_of_a_few_sequences_compiles_nothing_after_load(name):
    """A batch step of 2-4 sequences without MTP: its experts go as runs (any count), not as (token,
    expert) pairs in a matmul_many tuple length that load did not compile."""
    assert _compiled_after_load(DEEPSEEK2 / f"{name}.gguf", "batch") == []


def test_nothing_compiles_after_load_on_a_real_model(smollm2_path):
    assert _compiled_after_load(smollm2_path) == []


PREPARE = """
import json, sys
from gguf import GGMLQuantizationType as T
from edgeseek import kernels
said = []
cold = kernels.prepare([T.F32, T.Q8_0], notify=said.append)
print(json.dumps({"cold": cold, "said": said}))
"""


def test_first_run_says_it_compiles_and_the_next_does_not(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    runs = [json.loads(subprocess.run([sys.executable, "-c", PREPARE], env=env, capture_output=True, text=True,
                                      check=True).stdout) for _ in range(2)]
    assert runs[0]["cold"] and runs[0]["said"] == ["compiling kernels for Q8_0, F32 (first run only)"]
    assert runs[1] == {"cold": False, "said": []}


@pytest.mark.slow
def test_first_run_after_install_compiles_every_kernel_at_load(tmp_path, smollm2_path):
    """An empty numba cache, as after an install: `edgeseek generate` says it is compiling, then
    replies; the next run loads the kernels from the cache and says nothing of it. (Every kernel
    of Q4_1, Q8_0 and F32 is compiled: some 10 s on two cores, hence `slow`.)"""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"), NO_COLOR="1")
    cmd = [sys.executable, "-m", "edgeseek.app.cli", "generate", str(smollm2_path), "-p", "Hi", "-n", "4",
           "--temp", "0"]
    first, second = (subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "compiling kernels for Q4_1, Q8_0, F32 (first run only)" in first.stderr
    assert "compiling" not in second.stderr
    assert first.stdout == second.stdout and first.stdout.strip()

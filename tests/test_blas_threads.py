"""One BLAS thread while the kernels run, whatever the program imported first: numpy's own
OpenBLAS pool beside numba's threads cut decode from 34 to 7 tokens/s on two cores."""
import json
import os
import subprocess
import sys
from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q8_0.gguf"

# numpy first, as most programs do; the BLAS thread count is read inside a forward pass
PROGRAM = f"""
import json, numpy, threadpoolctl
before = [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
import edgeseek
engine = edgeseek.load({str(FIXTURE)!r})
seen = []
forward = engine.model.forward
def spy(*args, **kw):
    seen.extend(p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas")
    return forward(*args, **kw)
engine.model.forward = spy
for _ in edgeseek.stream_generate(engine, "Hello", max_tokens=2, sampler=edgeseek.SamplerConfig(temperature=0)):
    pass
print(json.dumps({{"before": before, "inside": seen}}))
"""


def test_one_blas_thread_inside_a_forward_pass_after_numpy_was_imported_first():
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                                             "OMP_NUM_THREADS", "BLIS_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"  # what numpy starts with on a 2-core machine, on any machine
    out = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, env=env, check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["before"] and max(seen["before"]) > 1  # the pool really was larger to begin with
    assert seen["inside"] and set(seen["inside"]) == {1}

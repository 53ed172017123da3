"""The first reply as a user meets it: a whole process that starts, loads a model and writes 64 greedy
tokens, edgeseek beside llama.cpp on the same file, same threads.

    python bench/bench_first_reply.py [FILE] [--tokens 64] [--runs 2] [--threads 2] [--user-env DIR]

edgeseek: `edgeseek generate FILE -p PROMPT -n 64 --temp 0 --json` in a fresh process, first with
its packed-weights cache off (weights packed as they are first used), then with the cache built
(the build run's time is reported apart), then cached, both from this environment and, with
--user-env, from a virtual environment holding edgeseek as `pip install .` installs it (its
dependencies only: an environment with the test extras has SciPy, which numba imports at its start
where present, 0.1-0.2 s of a start that a user's install does not pay); llama.cpp: a fresh Python process with
llama-cpp-python loading the file (mmap, no repacking: its repacking buffer aborts on deepseek2
files on CPUs with AMX) and generating the same number of greedy tokens. Wall time of each
process (the best of --runs, the cached runs of both engines taking turns), time to first token and
decode rate as each reports them. Writes
bench/results/first_reply.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = "The capital of France is"


def timed(cmd: list[str], env: dict) -> tuple[float, dict]:
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def user_env(folder: Path) -> Path | None:
    """The Python of a virtual environment with edgeseek installed from this checkout without extras,
    made on first use (pip reaches PyPI for the dependencies); None where it cannot be made."""
    python = folder / "bin" / "python"
    if python.exists():
        return python
    print(f"making {folder}: python -m venv, pip install {HERE.parent}", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-e", str(HERE.parent)], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        print(f"no user environment: {e}", file=sys.stderr)
        return None
    return python


def llama_side(path: str, n: int, threads: int) -> None:
    import llama_cpp
    t0 = time.perf_counter()
    defaults = llama_cpp.llama_model_default_params

    def plain_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama.llama_cpp.llama_model_default_params = plain_buffers
    llm = llama_cpp.Llama(path, n_ctx=256, n_threads=threads, verbose=False, seed=0)
    load = time.perf_counter() - t0
    ids = llm.tokenize(PROMPT.encode(), add_bos=True)
    t1 = time.perf_counter()
    first = None
    count = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count == n:
            break
    end = time.perf_counter()
    print(json.dumps({"load_s": load, "ttft_s": first - t1,
                      "generation_tps": (count - 1) / (end - first) if count > 1 else 0.0}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=str(HERE / "data" / "v2lite-q4_0.gguf"))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "first_reply.json")
    p.add_argument("--user-env", type=Path, default=None, metavar="DIR",
                   help="also run edgeseek from a virtual environment at DIR holding its own install "
                        "(made there on first use; bench/.user-env is git-ignored)")
    p.add_argument("--llama-side", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llama_side:
        return llama_side(a.model, a.tokens, a.threads)
    args = ["-m", "edgeseek.app.cli", "generate", a.model, "-p", PROMPT, "-n", str(a.tokens), "--temp", "0", "--json"]
    es = [sys.executable, *args]
    cache = tempfile.mkdtemp(prefix="edgeseek-packed-")
    from bench_runtime import user_python_env  # beside this script
    env = {**user_python_env(), "EDGESEEK_CACHE": cache, "NUMBA_NUM_THREADS": str(a.threads)}
    rows = {}

    def best(variants: dict):
        """Each variant (name -> command, environment) run --runs times, the variants in turns."""
        runs = {name: [] for name in variants}
        for _ in range(a.runs):
            for name, (cmd, e) in variants.items():
                runs[name].append(timed(cmd, e))
        for name, done in runs.items():
            wall, info = min(done, key=lambda r: r[0])
            rows[name] = {"wall_s": round(wall, 2), **{k: info[k] for k in ("load_s", "ttft_s", "generation_tps")}}
            print(name, rows[name], flush=True)

    best({"edgeseek, no packed cache": (es, {**env, "EDGESEEK_PACKED_CACHE": "0"})})
    wall, info = timed(es, env)
    rows["edgeseek, building the cache"] = {"wall_s": round(wall, 2), "load_s": info["load_s"]}
    print("edgeseek, building the cache", rows["edgeseek, building the cache"], flush=True)
    cached = {"edgeseek, cache built": (es, env)}
    own = user_env(a.user_env) if a.user_env is not None else None
    if own is not None:
        timed([str(own), *args], env)  # its numba kernels compiled or loaded into the shared cache
        cached["edgeseek, its own install, cache built"] = ([str(own), *args], env)
    cached["llama.cpp"] = ([sys.executable, __file__, a.model, "--tokens", str(a.tokens), "--threads",
                            str(a.threads), "--llama-side"], env)
    best(cached)
    size = sum(f.stat().st_size for f in Path(cache, "packed").glob("*.pack"))
    result = {"model": Path(a.model).name, "model_bytes": Path(a.model).stat().st_size, "cache_bytes": size,
              "tokens": a.tokens, "threads": a.threads, "runs": rows,
              "whole_process_ratio": round(rows["llama.cpp"]["wall_s"] / rows["edgeseek, cache built"]["wall_s"], 2),
              "decode_ratio": round(rows["edgeseek, cache built"]["generation_tps"]
                                    / rows["llama.cpp"]["generation_tps"], 2) if a.tokens > 1 else None}
    if own is not None:
        result["whole_process_ratio_own_install"] = round(
            rows["llama.cpp"]["wall_s"] / rows["edgeseek, its own install, cache built"]["wall_s"], 2)
    for f in Path(cache, "packed").glob("*"):
        f.unlink()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"cache {size / 1e9:.2f} GB for a {result['model_bytes'] / 1e9:.2f} GB file; whole process "
          f"{result['whole_process_ratio']}x llama.cpp's speed"
          + (f" ({result['whole_process_ratio_own_install']}x from its own install)" if own is not None else "")
          + (f", decode {result['decode_ratio']}x" if a.tokens > 1 else ""))


if __name__ == "__main__":
    main()

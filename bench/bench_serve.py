"""OpenAI-compatible servers under concurrent clients, on the DeepSeek-V2-Lite-shaped file: `edgeseek
serve` (continuous batching, -P 16) beside llama-cpp-python's own server (`python -m
llama_cpp.server`, which runs one request at a time), same file, 2 threads, loopback only.

At 1, 4, 8 and 16 concurrent clients, each client streams /v1/completions requests one after
another (greedy, a fixed number of new tokens: end-of-sequence ignored, `ignore_eos` on ours,
`logit_bias` against EOS on llama.cpp's, whose `interrupt_requests` is turned off: by default a new
request stops the one it is streaming) until max(4, 2 x clients) requests are done. Reported per
level: completion tokens per second over the level's wall time, and p50 / p95 time to first token
as the client sees it (queueing and prefill included).

    python bench/bench_serve.py [--model bench/data/v2lite-q4_0.gguf] [--tokens 16] [--levels 1 4 8 16]

Each server runs in its own process, one after the other, its files first read through the page cache
(the two sides' files do not fit in RAM together); the 1-minute load average before and after each
side is recorded, since other work on the 2 cores lowers both sides' figures. llama.cpp starts with its repacked CPU
buffers (its fastest path); if that process dies before it answers, it is started again with plain
buffers (as bench_first_reply.py does) and the result says which. Writes bench/results/serve.json and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOPICS = ["the sea", "a mountain", "bread", "a library", "rain", "a train", "the moon", "a garden"]

# llama-cpp-python's server with llama.cpp's repacked ("extra") buffer types off, as
# bench_first_reply.py loads it where the repacked path aborts.
LLAMA_PLAIN = f"""
import sys
sys.path.insert(0, {str(HERE)!r})
from llama_cpp_side import disable_repack
disable_repack()
from llama_cpp.server.__main__ import main
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
main()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 900) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the server did not start")


def stream_one(base: str, prompt: str, tokens: int, extra: dict) -> tuple[float, int]:
    """(seconds to the first streamed chunk, completion tokens) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, **extra}
    req = urllib.request.Request(base + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, chunks, usage = None, 0, None
    with urllib.request.urlopen(req, timeout=900) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(obj["error"])
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            if obj.get("choices"):
                if first is None:
                    first = time.perf_counter() - t0
                chunks += obj["choices"][0].get("finish_reason") is None  # one a token; the last only ends
    return first, usage if usage is not None else chunks


def level(base: str, clients: int, tokens: int, extra: dict) -> dict:
    n = max(4, 2 * clients)
    todo = list(range(n))
    lock = threading.Lock()
    ttft, counts, errors = [], [], []

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop(0)
            try:
                f, c = stream_one(base, f"Request {i}: write two sentences about {TOPICS[i % 8]}.", tokens, extra)
            except Exception as e:  # noqa: BLE001  (reported, not hidden)
                errors.append(repr(e))
                continue
            with lock:
                ttft.append(f)
                counts.append(c)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:  # a server that dropped requests (or died) gives no figure
        raise RuntimeError(f"{len(errors)} of {n} requests of {clients} clients failed: {errors[:3]}")
    if sum(counts) != n * tokens:
        print(f"warning: {sum(counts)} tokens where {n} x {tokens} were asked", file=sys.stderr)
    q = statistics.quantiles(ttft, n=20, method="inclusive") if len(ttft) > 1 else ttft * 19
    return {"clients": clients, "requests": n,
            "completion_tokens": sum(counts), "seconds": round(wall, 2),
            "tokens_per_s": round(sum(counts) / wall, 2),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_p95_s": round(q[18], 3)}


def warm(paths: list[Path]) -> float:
    """Reads files through the page cache, so that a side starts with its weights in RAM whatever the
    other side left there (the two sides' files do not fit in RAM together). Seconds taken."""
    t0 = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    return time.perf_counter() - t0


def run_side(name: str, cmd: list[str], levels: list[int], tokens: int, extra: dict, env=None,
             files: list[Path] = ()) -> dict:
    warmed = warm(list(files))
    load_before = os.getloadavg()[0]
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in cmd]
    log = open(HERE / "results" / f".serve-{name}-{port}.log", "w")  # the server's own output, git-ignored
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = wait_ready(proc, base)
        stream_one(base, "warm up", 2, extra)  # kernels loaded, first pages read
        out = {"command": " ".join(cmd), "page_cache_warm_s": round(warmed, 1), "ready_s": round(ready, 1),
               "load_average_before": load_before, "levels": []}
        for c in levels:
            r = level(base, c, tokens, extra)
            print(f"{name}: {c} clients: {r['tokens_per_s']} tok/s, TTFT p50 {r['ttft_p50_s']} s, "
                  f"p95 {r['ttft_p95_s']} s", file=sys.stderr, flush=True)
            out["levels"].append(r)
        out["load_average_after"] = os.getloadavg()[0]  # the 1-minute figure: other work on the 2 cores
        return out
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=HERE / "data" / "v2lite-q4_0.gguf")
    p.add_argument("--tokens", type=int, default=16, help="new tokens per request")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--side", choices=["edgeseek", "llama.cpp", "both"], default="both")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve.json")
    a = p.parse_args()
    if not a.model.exists():
        sys.exit(f"{a.model}: not found; bench/make_v2lite.py writes it")
    model = str(a.model)
    (HERE / "results").mkdir(exist_ok=True)
    parallel = max(a.levels)
    rows = json.loads(a.out.read_text())["servers"] if a.out.exists() and a.side != "both" else {}
    if a.side in ("edgeseek", "both"):
        cmd = [sys.executable, "-m", "edgeseek.app.cli", "serve", model, "--port", "{port}", "-P", str(parallel),
               "--ctx", "512", "--mtp", "off"]
        from edgeseek import packed_cache
        from edgeseek.gguf_file import GGUFFile

        packed = packed_cache.path_for(GGUFFile(model))
        rows["edgeseek"] = run_side("edgeseek", cmd, a.levels, a.tokens, {"ignore_eos": True, "stream_options":
                                                                          {"include_usage": True}},
                                    env={**os.environ, "NO_COLOR": "1"},
                                    files=[packed] if packed.exists() else [a.model])
    if a.side in ("llama.cpp", "both"):
        from llama_cpp import Llama

        eos = Llama(model, vocab_only=True, verbose=False).token_eos()
        extra = {"logit_bias": {str(eos): -100.0}}
        # interrupt_requests off: by default a new request stops the one streaming (it serves one at a time)
        args = ["--model", model, "--host", "127.0.0.1", "--port", "{port}", "--n_threads", "2",
                "--n_threads_batch", "2", "--n_ctx", "512", "--interrupt_requests", "False"]
        try:
            rows["llama.cpp"] = run_side("llama.cpp", [sys.executable, "-m", "llama_cpp.server", *args], a.levels,
                                         a.tokens, extra, files=[a.model])
            rows["llama.cpp"]["buffers"] = "repacked (default)"
        except RuntimeError as e:
            print(f"llama.cpp with repacked buffers: {e}; again with plain buffers", file=sys.stderr)
            rows["llama.cpp-repacked-failure"] = str(e)
            rows["llama.cpp"] = run_side("llama.cpp", [sys.executable, "-c", LLAMA_PLAIN, *args], a.levels,
                                         a.tokens, extra, files=[a.model])
            rows["llama.cpp"]["buffers"] = "plain (use_extra_bufts = False)"
    a.out.write_text(json.dumps({"model": a.model.name, "tokens_per_request": a.tokens, "threads": 2,
                                 "servers": rows}, indent=1))
    print("| server | clients | tok/s | TTFT p50 (s) | TTFT p95 (s) | vs llama.cpp tok/s |")
    print("|---|---|---|---|---|---|")
    base = {r["clients"]: r["tokens_per_s"] for r in rows.get("llama.cpp", {}).get("levels", [])}
    for name, side in rows.items():
        for r in side["levels"] if isinstance(side, dict) else []:
            ratio = f"{r['tokens_per_s'] / base[r['clients']]:.2f}x" if base.get(r["clients"]) else "-"
            print(f"| {name} | {r['clients']} | {r['tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_p95_s']} "
                  f"| {ratio} |")


if __name__ == "__main__":
    main()

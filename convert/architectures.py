"""Hugging Face architectures -> GGUF: the one table of tensor names, the metadata keys, and the plan
of output tensors (name, shape, how its float32 rows are produced) for each architecture.

Keys and transforms follow llama.cpp's converter (conversion/base.py TextModel, conversion/llama.py,
conversion/qwen.py, conversion/deepseek.py) and ../shared/reference/deepseek2-gguf.md; where this
converter writes something else it says why.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
from gguf import ExpertGatingFuncType, GGUFWriter, RopeScalingType

from edgeseek.errors import UnsupportedError

from .checkpoint import Checkpoint, TensorError

CHUNK_BYTES = 32 << 20  # float32 bytes per chunk of rows: what bounds the converter's working memory

# GGUF tensor name -> Hugging Face tensor name ({bid}: layer, {xid}: routed expert). The only place
# that knows Hugging Face names.
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_q.bias": "model.layers.{bid}.self_attn.q_proj.bias",
    "blk.{bid}.attn_k.weight": "model.layers.{bid}.self_attn.k_proj.weight",
    "blk.{bid}.attn_k.bias": "model.layers.{bid}.self_attn.k_proj.bias",
    "blk.{bid}.attn_v.weight": "model.layers.{bid}.self_attn.v_proj.weight",
    "blk.{bid}.attn_v.bias": "model.layers.{bid}.self_attn.v_proj.bias",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.attn_output.bias": "model.layers.{bid}.self_attn.o_proj.bias",
    "blk.{bid}.attn_q_a.weight": "model.layers.{bid}.self_attn.q_a_proj.weight",
    "blk.{bid}.attn_q_a_norm.weight": "model.layers.{bid}.self_attn.q_a_layernorm.weight",
    "blk.{bid}.attn_q_b.weight": "model.layers.{bid}.self_attn.q_b_proj.weight",
    "blk.{bid}.attn_kv_a_mqa.weight": "model.layers.{bid}.self_attn.kv_a_proj_with_mqa.weight",
    "blk.{bid}.attn_kv_a_norm.weight": "model.layers.{bid}.self_attn.kv_a_layernorm.weight",
    "blk.{bid}.attn_kv_b.weight": "model.layers.{bid}.self_attn.kv_b_proj.weight",
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
    "blk.{bid}.ffn_gate_inp.weight": "model.layers.{bid}.mlp.gate.weight",
    "blk.{bid}.exp_probs_b.bias": "model.layers.{bid}.mlp.gate.e_score_correction_bias",
    "blk.{bid}.ffn_gate_exps.weight": "model.layers.{bid}.mlp.experts.{xid}.gate_proj.weight",
    "blk.{bid}.ffn_up_exps.weight": "model.layers.{bid}.mlp.experts.{xid}.up_proj.weight",
    "blk.{bid}.ffn_down_exps.weight": "model.layers.{bid}.mlp.experts.{xid}.down_proj.weight",
    "blk.{bid}.ffn_gate_shexp.weight": "model.layers.{bid}.mlp.shared_experts.gate_proj.weight",
    "blk.{bid}.ffn_up_shexp.weight": "model.layers.{bid}.mlp.shared_experts.up_proj.weight",
    "blk.{bid}.ffn_down_shexp.weight": "model.layers.{bid}.mlp.shared_experts.down_proj.weight",
    # DeepSeek-V3 multi-token-prediction layers (model.layers.{>= num_hidden_layers})
    "blk.{bid}.nextn.eh_proj.weight": "model.layers.{bid}.eh_proj.weight",
    "blk.{bid}.nextn.enorm.weight": "model.layers.{bid}.enorm.weight",
    "blk.{bid}.nextn.hnorm.weight": "model.layers.{bid}.hnorm.weight",
    "blk.{bid}.nextn.embed_tokens.weight": "model.layers.{bid}.embed_tokens.weight",
    "blk.{bid}.nextn.shared_head_head.weight": "model.layers.{bid}.shared_head.head.weight",
    "blk.{bid}.nextn.shared_head_norm.weight": "model.layers.{bid}.shared_head.norm.weight",
}
# Checkpoint tensors that hold nothing a GGUF needs.
IGNORED = re.compile(r".*(rotary_emb\.inv_freq|_scale_inv|\.input_scale|\.k_scale|\.v_scale)$")


def hf_name(template: str, bid: int | None = None, xid: int | None = None) -> str:
    """The checkpoint name of a GGUF tensor given as its template ("blk.{bid}.attn_q.weight")."""
    return HF_NAMES[template].format(bid=bid, xid=xid)


@dataclass
class Planned:
    """One output tensor: its GGUF name, numpy shape (outermost first) and its rows as float32 chunks
    of shape (n, shape[-1]), produced lazily so that only one chunk is in memory at a time."""
    name: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[np.ndarray]]
    source_bytes: int
    sources: list[str] = field(default_factory=list)
    kind: str = "direct"  # direct, stacked (routed experts), derived, extra (from the config alone)
    rows_fn: Callable[[np.ndarray], np.ndarray] | None = None  # a derived tensor that is its source's rows
    # reordered (rope permutation): the same reordering applies to a LoRA B (convert/lora.py)


def _row_chunks(rows: int, ne0: int):
    step = max(1, CHUNK_BYTES // (4 * max(ne0, 1)))
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class Plan:
    """Collects the output tensors of an architecture, checking every source's shape on the way."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.tensors: list[Planned] = []
        self.used: set[str] = set()

    def _use(self, name: str, shape) -> int:
        ref = self.ckpt.ref(name, tuple(shape))
        self.used.add(name)
        if ref.dtype == "F8_E4M3":
            self.used.add(name + "_scale_inv")
        return ref.nbytes

    def direct(self, gname: str, shape, bid=None, optional=False):
        """A tensor copied as it is (numpy shape = the checkpoint's)."""
        src = hf_name(gname, bid)
        if optional and not self.ckpt.has(src):
            return
        nbytes = self._use(src, shape)
        ck = self.ckpt
        ne0 = shape[-1]
        rows = int(np.prod(shape[:-1], dtype=np.int64))

        def chunks():
            if len(shape) == 1:
                yield ck.rows(src).reshape(1, ne0)
                return
            for r0, r1 in _row_chunks(shape[0], rows // shape[0] * ne0):
                yield ck.rows(src, r0, r1).reshape(-1, ne0)

        self.tensors.append(Planned(gname.format(bid=bid), tuple(shape), chunks, nbytes, [src]))

    def stacked(self, gname: str, n_expert: int, shape, bid: int):
        """Routed experts stacked on axis 0: (n_expert, *shape), one expert read at a time."""
        srcs = [hf_name(gname, bid, e) for e in range(n_expert)]
        nbytes = sum(self._use(s, shape) for s in srcs)
        ck = self.ckpt

        def chunks():
            for s in srcs:
                for r0, r1 in _row_chunks(shape[0], shape[1]):
                    yield ck.rows(s, r0, r1)

        self.tensors.append(Planned(gname.format(bid=bid), (n_expert, *shape), chunks, nbytes, srcs, "stacked"))

    def derived(self, gname: str, shape, bid, src_gname: str, src_shape, fn: Callable[[np.ndarray], np.ndarray],
                rows_only: bool = False):
        """A tensor computed from a whole source tensor (kv_b split, rope permutation); `rows_only`:
        fn only reorders the source's rows (whatever their width)."""
        src = hf_name(src_gname, bid)
        nbytes = self._use(src, src_shape)
        ck = self.ckpt
        ne0 = shape[-1]

        def chunks():
            out = fn(ck.rows(src)).reshape(-1, ne0)
            for r0, r1 in _row_chunks(out.shape[0], ne0):
                yield np.ascontiguousarray(out[r0:r1])

        self.tensors.append(Planned(gname.format(bid=bid), tuple(shape), chunks, nbytes, [src], "derived",
                                    fn if rows_only else None))

    def extra(self, gname: str, values: np.ndarray):
        """A tensor computed from the config alone (rope_freqs)."""
        v = np.asarray(values, np.float32)
        self.tensors.append(Planned(gname, v.shape, lambda: iter([v.reshape(-1, v.shape[-1])]), 0, [], "extra"))

    def check_all_used(self, skip: Callable[[str], bool] = lambda n: False):
        left = [n for n in self.ckpt.tensors if n not in self.used and not IGNORED.match(n) and not skip(n)]
        if left:
            raise TensorError(f"{self.ckpt.folder}: {len(left)} checkpoint tensor(s) the converter does not map, "
                              f"e.g. {', '.join(left[:3])}: not the architecture config.json names?")


# ------------------------------------------------------------------------------------ metadata

def rope_params(cfg: dict) -> dict:
    """config.json's rope settings, as llama.cpp's TextModel reads them (transformers 5 writes
    `rope_parameters`; released checkpoints carry `rope_scaling` and a top-level `rope_theta`)."""
    rp = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "rope_theta" not in rp and cfg.get("rope_theta") is not None:
        rp["rope_theta"] = cfg["rope_theta"]
    if "rope_type" not in rp and rp.get("type") is not None:
        rp["rope_type"] = rp["type"]
    if "original_max_position_embeddings" not in rp and cfg.get("original_max_position_embeddings") is not None:
        rp["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return rp


def need(cfg: dict, key: str, where: str = "config.json"):
    if cfg.get(key) is None:
        raise TensorError(f"{where}: key {key!r} is missing")
    return cfg[key]


def common_keys(w: GGUFWriter, cfg: dict, n_head_kv: int | None, block_count: int | None = None):
    """The keys every architecture gets (llama.cpp TextModel.set_gguf_parameters)."""
    w.add_block_count(block_count if block_count is not None else need(cfg, "num_hidden_layers"))
    if cfg.get("max_position_embeddings") is not None:
        w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(need(cfg, "hidden_size"))
    if cfg.get("intermediate_size") is not None:
        w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(need(cfg, "num_attention_heads"))
    if n_head_kv is not None:
        w.add_head_count_kv(n_head_kv)
    rp = rope_params(cfg)
    rope_type, factor = rp.get("rope_type"), rp.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(need(rp, "original_max_position_embeddings", "config.json rope parameters"))
        if rp.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(rp["extrapolation_factor"])
        if rp.get("attention_factor", rp.get("attn_factor")) is not None:
            w.add_rope_scaling_yarn_attn_factor(rp.get("attention_factor", rp.get("attn_factor")))
        if rp.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])
        if rp.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
    elif rope_type not in (None, "default", "llama3"):
        raise UnsupportedError(f"config.json: rope type {rope_type!r} is not converted (default, linear, yarn, llama3)")
    if rp.get("rope_theta") is not None:
        w.add_rope_freq_base(rp["rope_theta"])
    if cfg.get("rms_norm_eps") is not None:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])


@dataclass
class Options:
    legacy_mla: bool = False  # DeepSeek: attn_kv_b instead of attn_k_b / attn_v_b
    keep_mtp: bool = False  # DeepSeek: write the multi-token-prediction layers as nextn blocks


# ------------------------------------------------------------------------------------ DeepSeek V2 / V3

def deepseek2(ckpt: Checkpoint, w: GGUFWriter, opts: Options) -> Plan:
    cfg = ckpt.config
    is_v3 = cfg["architectures"][0] == "DeepseekV3ForCausalLM"
    H, V = need(cfg, "hidden_size"), need(cfg, "vocab_size")
    L, nh = need(cfg, "num_hidden_layers"), need(cfg, "num_attention_heads")
    nope, rope, vd = need(cfg, "qk_nope_head_dim"), need(cfg, "qk_rope_head_dim"), need(cfg, "v_head_dim")
    q_lora, kv_lora = cfg.get("q_lora_rank") or 0, need(cfg, "kv_lora_rank")
    E, Fe = cfg.get("n_routed_experts"), cfg.get("moe_intermediate_size")
    F = need(cfg, "intermediate_size")
    n_sh = cfg.get("n_shared_experts") or 0
    dense = cfg.get("first_k_dense_replace")
    dense = (L if E is None else 0) if dense is None else dense
    if (cfg.get("moe_layer_freq") or 1) != 1:
        raise UnsupportedError(f"config.json: moe_layer_freq {cfg['moe_layer_freq']} is not converted (only 1)")
    n_mtp = (cfg.get("num_nextn_predict_layers") or 0) if opts.keep_mtp else 0

    # --- metadata (llama.cpp DeepseekV2Model.set_gguf_parameters, MLA layout unless legacy) ---
    common_keys(w, cfg, nh if opts.legacy_mla else 1, L + n_mtp)
    if E is not None:
        w.add_expert_count(E)
        w.add_expert_used_count(need(cfg, "num_experts_per_tok"))
    if cfg.get("n_group") is not None:
        w.add_expert_group_count(cfg["n_group"])
    if cfg.get("topk_group") is not None:
        w.add_expert_group_used_count(cfg["topk_group"])
    # transformers does not save scoring_func; llama.cpp falls back to softmax without the key, wrong
    # for V3's sigmoid router (reference §6), so the key is always written.
    scoring = cfg.get("scoring_func") or ("sigmoid" if is_v3 else "softmax")
    if scoring not in ("sigmoid", "softmax"):
        raise UnsupportedError(f"config.json: scoring_func {scoring!r} is not converted (sigmoid, softmax)")
    w.add_expert_gating_func(ExpertGatingFuncType.SIGMOID if scoring == "sigmoid" else ExpertGatingFuncType.SOFTMAX)
    w.add_leading_dense_block_count(dense)
    w.add_vocab_size(V)
    # 0 when there is no q-LoRA: llama.cpp demands the key unless the model has 26/27 layers (reference §6)
    w.add_q_lora_rank(q_lora)
    w.add_kv_lora_rank(kv_lora)
    if opts.legacy_mla:
        w.add_key_length(nope + rope)
        w.add_value_length(vd)
    else:
        w.add_key_length(kv_lora + rope)
        w.add_value_length(kv_lora)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(vd)
    w.add_expert_feed_forward_length(Fe if Fe is not None else F)
    w.add_expert_shared_count(n_sh)
    if cfg.get("routed_scaling_factor") is not None:
        w.add_expert_weights_scale(cfg["routed_scaling_factor"])
    if cfg.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_rope_dimension_count(rope)
    rp = rope_params(cfg)
    if rp.get("mscale_all_dim") is not None:
        # llama.cpp stores 0.1 * mscale_all_dim and divides by 0.1 on load (TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"])
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)

    # --- tensors ---
    p = Plan(ckpt)
    p.direct("token_embd.weight", (V, H))
    qk = nope + rope
    for i in range(L + n_mtp):
        if i >= L:  # MTP block: its own norms and projection, then a regular decoder layer
            p.direct("blk.{bid}.nextn.eh_proj.weight", (H, 2 * H), i)
            p.direct("blk.{bid}.nextn.enorm.weight", (H,), i)
            p.direct("blk.{bid}.nextn.hnorm.weight", (H,), i)
            p.direct("blk.{bid}.nextn.embed_tokens.weight", (V, H), i, optional=True)
            p.direct("blk.{bid}.nextn.shared_head_head.weight", (V, H), i, optional=True)
            p.direct("blk.{bid}.nextn.shared_head_norm.weight", (H,), i, optional=True)
        p.direct("blk.{bid}.attn_norm.weight", (H,), i)
        if q_lora:
            p.direct("blk.{bid}.attn_q_a.weight", (q_lora, H), i)
            p.direct("blk.{bid}.attn_q_a_norm.weight", (q_lora,), i)
            p.direct("blk.{bid}.attn_q_b.weight", (nh * qk, q_lora), i)
        else:
            p.direct("blk.{bid}.attn_q.weight", (nh * qk, H), i)
        p.direct("blk.{bid}.attn_kv_a_mqa.weight", (kv_lora + rope, H), i)
        p.direct("blk.{bid}.attn_kv_a_norm.weight", (kv_lora,), i)
        kv_b = "blk.{bid}.attn_kv_b.weight"
        kv_b_shape = (nh * (nope + vd), kv_lora)
        if opts.legacy_mla:
            p.direct(kv_b, kv_b_shape, i)
        else:
            # kv_b rows per head: [k_nope (nope) | v (vd)]; k_b is transposed for the absorbed q @ k_b
            p.derived("blk.{bid}.attn_k_b.weight", (nh, kv_lora, nope), i, kv_b, kv_b_shape,
                      lambda x: x.reshape(nh, nope + vd, kv_lora)[:, :nope, :].transpose(0, 2, 1))
            p.derived("blk.{bid}.attn_v_b.weight", (nh, vd, kv_lora), i, kv_b, kv_b_shape,
                      lambda x: x.reshape(nh, nope + vd, kv_lora)[:, nope:, :])
        p.direct("blk.{bid}.attn_output.weight", (H, nh * vd), i)
        p.direct("blk.{bid}.ffn_norm.weight", (H,), i)
        if i < dense:
            p.direct("blk.{bid}.ffn_gate.weight", (F, H), i)
            p.direct("blk.{bid}.ffn_up.weight", (F, H), i)
            p.direct("blk.{bid}.ffn_down.weight", (H, F), i)
            continue
        p.direct("blk.{bid}.ffn_gate_inp.weight", (E, H), i)
        p.direct("blk.{bid}.exp_probs_b.bias", (E,), i, optional=True)
        p.stacked("blk.{bid}.ffn_gate_exps.weight", E, (Fe, H), i)
        p.stacked("blk.{bid}.ffn_up_exps.weight", E, (Fe, H), i)
        p.stacked("blk.{bid}.ffn_down_exps.weight", E, (H, Fe), i)
        if n_sh:
            p.direct("blk.{bid}.ffn_gate_shexp.weight", (Fe * n_sh, H), i)
            p.direct("blk.{bid}.ffn_up_shexp.weight", (Fe * n_sh, H), i)
            p.direct("blk.{bid}.ffn_down_shexp.weight", (H, Fe * n_sh), i)
    p.direct("output_norm.weight", (H,))
    if not cfg.get("tie_word_embeddings"):
        p.direct("output.weight", (V, H))
    mtp_layer = re.compile(r"model\.layers\.(\d+)\.")
    p.check_all_used(lambda n: (m := mtp_layer.match(n)) is not None and int(m.group(1)) >= L + n_mtp
                     or (n == "lm_head.weight" and cfg.get("tie_word_embeddings", False)))
    return p


# ------------------------------------------------------------------------------------ Llama / Qwen2

def _permute_head_rows(n_head: int):
    """HF's rotate-half q/k rows -> llama.cpp's adjacent-pair rope (llama.cpp LlamaModel.permute):
    within each head, rows [first half | second half] interleave as (0, hd/2, 1, hd/2 + 1, ...)."""
    def fn(x: np.ndarray) -> np.ndarray:
        return x.reshape(n_head, 2, x.shape[0] // n_head // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
    return fn


def llama3_rope_factors(cfg: dict) -> np.ndarray | None:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp LlamaModel.generate_extra_tensors)."""
    rp = rope_params(cfg)
    if str(rp.get("rope_type", "")).lower() != "llama3":
        return None
    base = rp.get("rope_theta", 10000.0)
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rp.get("factor", 8.0), rp.get("low_freq_factor", 1.0), rp.get("high_freq_factor", 4.0)
    old = rp.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def dense_decoder(ckpt: Checkpoint, w: GGUFWriter, opts: Options, permute: bool) -> Plan:
    """Llama and Qwen2: GQA attention (Qwen2 with q/k/v biases) and a SwiGLU MLP per layer."""
    cfg = ckpt.config
    H, V, L = need(cfg, "hidden_size"), need(cfg, "vocab_size"), need(cfg, "num_hidden_layers")
    nh = need(cfg, "num_attention_heads")
    nkv = cfg.get("num_key_value_heads") or nh
    hd = cfg.get("head_dim") or H // nh
    F = need(cfg, "intermediate_size")
    common_keys(w, cfg, nkv)
    if cfg.get("head_dim") is not None:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if permute:  # llama.cpp LlamaModel.set_gguf_parameters
        w.add_vocab_size(V)
        w.add_rope_dimension_count(hd)

    p = Plan(ckpt)
    if permute and (factors := llama3_rope_factors(cfg)) is not None:
        p.extra("rope_freqs.weight", factors)
    p.direct("token_embd.weight", (V, H))
    for i in range(L):
        p.direct("blk.{bid}.attn_norm.weight", (H,), i)
        for t, n in (("q", nh), ("k", nkv)):
            for kind, shape in (("weight", (n * hd, H)), ("bias", (n * hd,))):
                name = f"blk.{{bid}}.attn_{t}.{kind}"
                if kind == "bias" and not ckpt.has(hf_name(name, i)):
                    continue
                if permute:
                    p.derived(name, shape, i, name, shape, _permute_head_rows(n), rows_only=True)
                else:
                    p.direct(name, shape, i)
        p.direct("blk.{bid}.attn_v.weight", (nkv * hd, H), i)
        p.direct("blk.{bid}.attn_v.bias", (nkv * hd,), i, optional=True)
        p.direct("blk.{bid}.attn_output.weight", (H, nh * hd), i)
        p.direct("blk.{bid}.attn_output.bias", (H,), i, optional=True)
        p.direct("blk.{bid}.ffn_norm.weight", (H,), i)
        p.direct("blk.{bid}.ffn_gate.weight", (F, H), i)
        p.direct("blk.{bid}.ffn_up.weight", (F, H), i)
        p.direct("blk.{bid}.ffn_down.weight", (H, F), i)
    p.direct("output_norm.weight", (H,))
    if not cfg.get("tie_word_embeddings"):
        p.direct("output.weight", (V, H))
    p.check_all_used(lambda n: n == "lm_head.weight" and cfg.get("tie_word_embeddings", False))
    return p


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str
    build: Callable[[Checkpoint, GGUFWriter, Options], Plan]
    pre_names: tuple[str, ...]  # preferred pre-tokenizer names when only the regexes identify it


ARCHITECTURES = {
    "DeepseekV3ForCausalLM": Architecture("deepseek2", deepseek2, ("deepseek-v3",)),
    "DeepseekV2ForCausalLM": Architecture("deepseek2", deepseek2, ("deepseek-llm", "deepseek-v3")),
    "LlamaForCausalLM": Architecture("llama", lambda c, w, o: dense_decoder(c, w, o, permute=True),
                                     ("llama-bpe", "smollm", "gpt-2")),
    "Qwen2ForCausalLM": Architecture("qwen2", lambda c, w, o: dense_decoder(c, w, o, permute=False), ("qwen2",)),
}


def architecture_of(ckpt: Checkpoint) -> tuple[str, Architecture]:
    names = ckpt.config.get("architectures") or []
    if not names:
        raise UnsupportedError(f"{ckpt.folder / 'config.json'}: no 'architectures' entry")
    if names[0] not in ARCHITECTURES:
        raise UnsupportedError(f"{ckpt.folder / 'config.json'}: architecture {names[0]!r} is not converted; "
                               f"supported: {', '.join(ARCHITECTURES)}")
    return names[0], ARCHITECTURES[names[0]]

"""The converter against llama.cpp: same keys and tensor bytes as convert_hf_to_gguf.py (F32, Q8_0), the
same K-quant tensors as llama_model_quantize, files llama.cpp loads with logits near transformers'.

Checkpoints and llama.cpp's outputs are built once and cached (tests/fixtures/convert/checkpoints.py);
the first run takes about a minute more.
"""
from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import requires_llama_cpp, requires_torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "convert"))
import checkpoints as C  # noqa: E402

from edgeseek.convert.convert import convert  # noqa: E402

pytestmark = [requires_torch, requires_llama_cpp]
ARCHS = ["v3", "v2lite", "llama", "qwen2", "v3fp8"]


def fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {f.name: (tuple(t.name for t in f.types), f.contents()) for f in r.fields.values()
            if not f.name.startswith("GGUF.")}


def tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def differences(ours, theirs) -> tuple[list[str], list[str]]:
    """(keys that differ in type or value or presence, tensors that differ in type, shape or bytes)."""
    a, b = fields(ours), fields(theirs)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    ta, tb = tensors(ours), tensors(theirs)
    names = sorted(set(ta) | set(tb))
    bad = [n for n in names if n not in ta or n not in tb or ta[n].tensor_type != tb[n].tensor_type
           or list(ta[n].shape) != list(tb[n].shape) or ta[n].data.tobytes() != tb[n].data.tobytes()]
    return keys, bad


@pytest.fixture(scope="session")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


_converted: dict = {}


def ours(name: str, recipe: str, out_dir: Path, **kw) -> Path:
    key = (name, recipe, tuple(sorted(kw.items())))
    if key not in _converted:
        path = out_dir / f"{name}-{recipe}{'-'.join([''] + [k for k, v in sorted(kw.items()) if v])}.gguf"
        _converted[key] = convert(C.checkpoint(name), path, recipe, force=True, **kw)
    return Path(_converted[key].output)


@pytest.mark.parametrize("recipe", ["f32", "q8_0"])
@pytest.mark.parametrize("name", ARCHS)
def test_same_file_as_llama_cpp_converter(name, recipe, out_dir):
    """Every key (type and value) and every tensor (type, shape, bytes) equal llama.cpp's; the FP8
    checkpoint is dequantized (e4m3 table x block scales) to the same float32 values as torch's."""
    keys, bad = differences(ours(name, recipe, out_dir), C.reference(name, recipe))
    assert keys == [] and bad == []


def test_keys_that_legitimately_differ(out_dir, tmp_path):
    """Where config.json lacks scoring_func / q_lora_rank, llama.cpp omits expert_gating_func (llama.cpp
    then routes a V3 model by softmax instead of sigmoid) and attention.q_lora_rank (llama.cpp refuses a
    model without it unless it has 26/27 layers); we write sigmoid for V3 and q_lora_rank 0."""
    import json
    import shutil
    src = tmp_path / "hf"
    shutil.copytree(C.checkpoint("v2lite"), src)
    cfg = json.loads((src / "config.json").read_text())
    del cfg["scoring_func"], cfg["q_lora_rank"]
    (src / "config.json").write_text(json.dumps(cfg))
    f = fields(convert(src, tmp_path / "x.gguf", "f32").output)
    assert f["deepseek2.attention.q_lora_rank"] == (("UINT32",), 0)
    assert f["deepseek2.expert_gating_func"] == (("UINT32",), 1)  # softmax: V2


@pytest.mark.parametrize("recipe", ["q4_k_m", "q5_k_s", "q6_k", "q4_0"])
def test_quantized_file_equals_llama_quantize(recipe, out_dir):
    """Our Q4_K_M (etc.) file equals llama_model_quantize's from our F32 file, tensor for tensor: the same
    type chosen for every tensor (mixture rules, fallbacks: attn_k_b ne0 = 32 -> Q5_0 / Q5_1 / Q8_0) and
    the same bytes (K-quants bit-exact with llama.cpp's reference quantizer)."""
    ref = out_dir / f"v3h256-llama-quantize-{recipe}.gguf"
    if not ref.exists():
        C.llama_quantize(ours("v3h256", "f32", out_dir), ref, recipe)
    mine = ours("v3h256", recipe, out_dir)
    keys, bad = differences(mine, ref)
    assert bad == []
    assert keys == []
    kinds = {t.tensor_type.name for t in tensors(mine).values()}
    assert {"Q4_K": "Q4_K", "q5_k_s": "Q5_K", "q6_k": "Q6_K", "q4_0": "Q4_0"}.get(recipe, "Q4_K") in kinds


def rel_rms(a, b) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)) / b.std())


# (name, recipe, kwargs) -> rms(llama.cpp - transformers) / std(transformers) allowed, about twice what
# was measured. Quantized files are judged loosely: llama.cpp also quantizes activations to 8 bits, and
# the random routers of the DeepSeek models sit on near-ties that quantization flips (measured: Q8_0 up
# to 0.09, Q4_K_M up to 0.35, Q4_0 up to 0.47 of the logit spread; Llama / Qwen2 a third of that).
TOL = {"f32": 0.002, "f16": 0.004, "bf16": 0.02, "q8_0": 0.15, "q6_k": 0.3, "q5_k_s": 0.5, "q4_k_m": 0.7,
       "q4_0": 0.9}
LOGIT_CASES = [(n, r, {}, TOL[r] / (3 if n in ("llama", "qwen2") and r != "f32" else 1))
               for n in ["v3", "v2lite", "llama", "qwen2"] for r in ["f32", "f16", "bf16", "q8_0", "q4_k_m", "q4_0"]]
LOGIT_CASES += [("v3", "f32", {"legacy_mla": True}, TOL["f32"]), ("v3", "q8_0", {"legacy_mla": True}, TOL["q8_0"]),
                ("v3h256", "q4_k_m", {}, TOL["q4_k_m"]), ("v3h256", "q5_k_s", {}, TOL["q5_k_s"]),
                ("v3h256", "q6_k", {}, TOL["q6_k"]), ("v3fp8", "f32", {}, TOL["f32"]),
                ("v3fp8", "q4_k_m", {}, TOL["q4_k_m"]), ("v3fp8", "f32", {"keep_mtp": True}, TOL["f32"])]


@pytest.mark.parametrize("name,recipe,kw,tol", LOGIT_CASES,
                         ids=[f"{n}-{r}{'-' + '-'.join(k) if k else ''}" for n, r, k, _ in LOGIT_CASES])
def test_llama_cpp_runs_our_files(name, recipe, kw, tol, out_dir):
    """llama.cpp loads every file we write and its logits follow transformers' (for the FP8 checkpoint:
    transformers on the weights dequantized by torch)."""
    path = ours(name, recipe, out_dir, **kw)
    ref = C.transformers_logits(name)
    got = C.llama_logits(path, C.ds.sequence())
    assert got.shape == ref.shape
    assert rel_rms(got, ref) < tol, rel_rms(got, ref)


def test_mtp_layers(out_dir):
    """MTP layers are skipped by default (llama.cpp checks the tensor count) and kept as nextn blocks on
    request: block_count grows by one and nextn_predict_layers is written."""
    skipped = tensors(ours("v3fp8", "f32", out_dir))
    kept_path = ours("v3fp8", "f32", out_dir, keep_mtp=True)
    kept = tensors(kept_path)
    assert not any(n.startswith("blk.2.") for n in skipped)
    assert {"blk.2.nextn.eh_proj.weight", "blk.2.nextn.enorm.weight", "blk.2.ffn_gate_exps.weight"} <= set(kept)
    f = fields(kept_path)
    assert f["deepseek2.block_count"][1] == 3 and f["deepseek2.nextn_predict_layers"][1] == 1


def test_fp8_table_matches_torch():
    import torch
    from edgeseek.convert.safetensors import E4M3FN
    want = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(E4M3FN), np.isnan(want))
    assert np.array_equal(E4M3FN[~np.isnan(want)], want[~np.isnan(want)])


def test_edgeseek_runs_our_file(out_dir):
    """The runtime reads a converted Q4_K_M file: the recipe's types, the MLA layout, the router, the
    tokenizer as the checkpoint's own, and logits that follow transformers' as llama.cpp's do."""
    from tokenizers import Tokenizer as HF

    from edgeseek.engine import load
    engine = load(ours("v3h256", "q4_k_m", out_dir))
    types = {name: t.qtype.name for name, t in engine.gguf.tensors.items()}
    assert (types["blk.1.ffn_gate_exps.weight"], types["blk.1.attn_k_b.weight"], types["output.weight"]) == \
        ("Q4_K", "Q5_0", "Q6_K")
    cfg = engine.model.config
    assert cfg.mla_layout and (cfg.router.n_expert, cfg.router.n_used, cfg.router.gating) == (8, 2, 2)
    text = "Hello world, 123 tokens!"
    hf = HF.from_file(str(C.checkpoint("v3h256") / "tokenizer.json"))
    assert engine.tokenizer.encode(text, add_special=False) == hf.encode(text, add_special_tokens=False).ids
    tokens = np.array(C.ds.sequence())
    logits = engine.model.forward(tokens, engine.model.new_cache(len(tokens)), all_logits=True)
    assert rel_rms(logits, C.transformers_logits("v3h256")) < TOL["q4_k_m"]


def test_report(out_dir):
    """Per-tensor report: the type chosen and the relative error of the quantized tensor."""
    ours("v3h256", "q4_k_m", out_dir)
    rep = _converted[("v3h256", "q4_k_m", ())]
    by = {t.name: t for t in rep.tensors}
    assert by["blk.1.ffn_gate_exps.weight"].type == "Q4_K" and 0.02 < by["blk.1.ffn_gate_exps.weight"].rel_error < 0.2
    assert by["blk.1.attn_k_b.weight"].type == "Q5_0"  # ne0 = 32 (qk_nope): Q4_K falls back
    assert by["output.weight"].type == "Q6_K" and by["output_norm.weight"].rel_error == 0
    assert by["blk.1.ffn_gate_exps.weight"].shape == [256, 256, 8]
    assert rep.vocab["pre"] == "deepseek-v3"


def test_pre_tokenizer_identified_as_llama_cpp_does(deepseek_tokenizer_json):
    """DeepSeek-V3's real tokenizer: our emulation of the Hugging Face pipeline encodes llama.cpp's probe
    text (and more) exactly as `tokenizers` does, bos added as transformers adds it when
    tokenizer_config.json asks, and its hash is the one llama.cpp lists for deepseek-v3."""
    import json
    from tokenizers import Tokenizer as HF
    from edgeseek.convert.pre_hashes import PROBE_TEXT
    from edgeseek.convert.vocab import HFTokenizer, identify_pre
    tok = json.loads(Path(deepseek_tokenizer_json).read_text(encoding="utf-8"))
    ref = HF.from_file(str(deepseek_tokenizer_json))
    ours_tok = HFTokenizer(tok, {})
    for text in [PROBE_TEXT, "Hello world! 12345 ümlaut 日本語のテキスト and <｜User｜>hi", "  x\n\n\ty = 3.14159;"]:
        assert ours_tok.encode(text) == ref.encode(text).ids
    cfg = {"add_bos_token": True, "bos_token": {"content": "<｜begin▁of▁sentence｜>"}}
    name, how = identify_pre(tok, cfg, ("deepseek-v3",), "tokenizer.json")
    assert name == "deepseek-v3" and "deepseek-ai/DeepSeek-V3" in how

"""The converter's errors, its output-file discipline and its command line, on checkpoints written
here in a few lines (no torch): one-line EdgeseekErrors naming the file, tensor or key at fault."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "convert"))
from checkpoints import write_safetensors  # noqa: E402

import edgeseek.convert.convert as conv  # noqa: E402
from edgeseek.convert.cli import convert_command  # noqa: E402
from edgeseek.convert.convert import OutputExistsError, convert  # noqa: E402
from edgeseek.errors import EdgeseekError, UnsupportedError  # noqa: E402

V, H, F, NH, NKV = 300, 32, 64, 4, 2  # tiny Llama: vocab, hidden, ffn, heads, kv heads
CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": V, "hidden_size": H, "intermediate_size": F,
          "num_hidden_layers": 2, "num_attention_heads": NH, "num_key_value_heads": NKV, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 64, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "bos_token_id": 0, "eos_token_id": 1}


def _tokenizer(folder: Path):
    """A byte-level BPE tokenizer: 2 specials, the 256 byte tokens, 21 merges' results (the rest of the
    vocabulary unused)."""
    from edgeseek.tokenizer import _byte_alphabet
    chars = list(_byte_alphabet()[0].values())
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    merges = []
    for a, b in zip("abcdefghijklmnopqrstu", "etaoinshrdlucmfwypvbg"):
        merges.append(f"{a} {b}")
        vocab[a + b] = len(vocab)
    tok = {"version": "1.0", "added_tokens": [
        {"id": 0, "content": "<s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False,
         "single_word": False},
        {"id": 1, "content": "</s>", "special": True, "normalized": False, "lstrip": False, "rstrip": False,
         "single_word": False}],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel"}, "decoder": {"type": "ByteLevel"},
        "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "add_bos_token": True}))


def tensors() -> dict[str, tuple[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    f = lambda *s: ("F32", rng.standard_normal(s).astype(np.float32))  # noqa: E731
    hd = H // NH
    t = {"model.embed_tokens.weight": f(V, H), "model.norm.weight": f(H), "lm_head.weight": f(V, H)}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": f(H), p + "post_attention_layernorm.weight": f(H),
              p + "self_attn.q_proj.weight": f(NH * hd, H), p + "self_attn.k_proj.weight": f(NKV * hd, H),
              p + "self_attn.v_proj.weight": f(NKV * hd, H), p + "self_attn.o_proj.weight": f(H, NH * hd),
              p + "mlp.gate_proj.weight": f(F, H), p + "mlp.up_proj.weight": f(F, H),
              p + "mlp.down_proj.weight": f(H, F)}
    return t


def make(folder: Path, t=None, config=None, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    t = tensors() if t is None else t
    if shards == 1:
        write_safetensors(folder / "model.safetensors", t)
    else:
        names = list(t)
        weight_map = {}
        for s in range(shards):
            part = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            chunk = {n: t[n] for n in names[s::shards]}
            write_safetensors(folder / part, chunk)
            weight_map |= {n: part for n in chunk}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _tokenizer(folder)
    return folder


def test_tiny_llama_sharded_converts(tmp_path):
    """A sharded checkpoint converts; a tokenizer llama.cpp's table does not know is identified by how its
    pre-tokenizer splits the probe text (plain ByteLevel: gpt-2's regex)."""
    src = make(tmp_path / "hf", shards=3)
    rep = convert(src, tmp_path / "out.gguf", "q8_0")
    assert rep.vocab["pre"] == "gpt-2"
    assert {t.type for t in rep.tensors} == {"F32", "Q8_0"}
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*partial"))


def expect(tmp_path, err_type, match, src=None, **kw):
    with pytest.raises(err_type, match=match):
        convert(src or tmp_path / "hf", tmp_path / "out.gguf", kw.pop("recipe", "q8_0"), **kw)
    assert not (tmp_path / "out.gguf").exists()


def test_missing_config(tmp_path):
    src = make(tmp_path / "hf")
    (src / "config.json").unlink()
    expect(tmp_path, EdgeseekError, r"config\.json is missing")


def test_missing_shard(tmp_path):
    src = make(tmp_path / "hf", shards=2)
    (src / "model-00002-of-00002.safetensors").unlink()
    expect(tmp_path, EdgeseekError, r"shard\(s\) named by model.safetensors.index.json are missing: "
                                    r"model-00002-of-00002")


def test_unsupported_architecture(tmp_path):
    make(tmp_path / "hf", config=dict(CONFIG, architectures=["MistralForCausalLM"]))
    expect(tmp_path, UnsupportedError, r"architecture 'MistralForCausalLM' is not converted")


def test_missing_tensor(tmp_path):
    t = tensors()
    del t["model.layers.1.mlp.up_proj.weight"]
    make(tmp_path / "hf", t)
    expect(tmp_path, EdgeseekError, r"tensor 'model.layers.1.mlp.up_proj.weight' is missing")


def test_wrong_shape(tmp_path):
    t = tensors()
    t["model.layers.0.self_attn.k_proj.weight"] = ("F32", np.zeros((NH * H // NH, H), np.float32))
    make(tmp_path / "hf", t)
    expect(tmp_path, EdgeseekError, r"'model.layers.0.self_attn.k_proj.weight' has shape \[32, 32\], "
                                    r"the config implies \[16, 32\]")


def test_unreadable_dtype(tmp_path):
    t = tensors()
    t["model.layers.0.mlp.gate_proj.weight"] = ("I8", np.zeros((F, H), np.int8))
    make(tmp_path / "hf", t)
    expect(tmp_path, UnsupportedError, r"'model.layers.0.mlp.gate_proj.weight' has dtype I8")


def test_unmapped_tensor(tmp_path):
    t = tensors()
    t["model.layers.0.self_attn.q_norm.weight"] = ("F32", np.ones(H // NH, np.float32))
    make(tmp_path / "hf", t)
    expect(tmp_path, EdgeseekError, r"does not map, e.g. model.layers.0.self_attn.q_norm.weight")


def test_bad_recipe_and_override(tmp_path):
    make(tmp_path / "hf")
    expect(tmp_path, EdgeseekError, r"unknown type 'q3_k_m'", recipe="q3_k_m")
    expect(tmp_path, EdgeseekError, r"expected REGEX=TYPE", tensor_types=["ffn_down"])


def test_existing_output_needs_force(tmp_path):
    src = make(tmp_path / "hf")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert(src, out, "f16")
    assert out.read_bytes() == b"keep me"
    convert(src, out, "f16", force=True)
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("exc", [KeyboardInterrupt, MemoryError])
def test_interrupted_conversion_leaves_no_file(tmp_path, monkeypatch, exc):
    """Interrupted half-way (Ctrl-C, or any failure), no file at the output path, and no temporary left;
    an existing output survives a failed --force run."""
    src = make(tmp_path / "hf")
    out = tmp_path / "out.gguf"
    calls = {"n": 0}
    real = conv._quantize

    def flaky(qtype, x):
        calls["n"] += 1
        if calls["n"] == 10:
            raise exc()
        return real(qtype, x)

    monkeypatch.setattr(conv, "_quantize", flaky)
    with pytest.raises(exc):
        convert(src, out, "q8_0")
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    out.write_bytes(b"old")
    calls["n"] = 0
    with pytest.raises(exc):
        convert(src, out, "q8_0", force=True)
    assert out.read_bytes() == b"old"


def test_tensor_type_override(tmp_path):
    src = make(tmp_path / "hf")
    rep = convert(src, tmp_path / "out.gguf", "q8_0", tensor_types=["ffn_down=q4_0", r"attn_(q|k)\.=f16"])
    types = {t.name: t.type for t in rep.tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"


# ------------------------------------------------------------------ command line

@pytest.fixture
def app():
    a = typer.Typer()
    a.command("convert")(convert_command)

    @a.command("other")
    def other():  # a second command keeps "convert" a subcommand, as in the real app
        pass
    return a


def test_cli_json_report(tmp_path, app):
    src = make(tmp_path / "hf")
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "o.gguf"), "-t", "q4_0", "--json",
                                 "--tensor-type", "output=q8_0", "--threads", "1"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["recipe"] == "q4_0" and rep["architecture"] == "LlamaForCausalLM"
    types = {t["name"]: t["type"] for t in rep["tensors"]}
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_0"
    assert all(0 <= t["rel_error"] < 0.2 for t in rep["tensors"])


def test_cli_refuses_existing_output(tmp_path, app):
    src = make(tmp_path / "hf")
    (tmp_path / "o.gguf").write_bytes(b"x")
    r = CliRunner().invoke(app, ["convert", str(src), "-o", str(tmp_path / "o.gguf")])
    assert r.exit_code != 0 and isinstance(r.exception, OutputExistsError)


def test_cli_help_has_examples(app):
    r = CliRunner().invoke(app, ["convert", "--help"])
    assert r.exit_code == 0 and "--tensor-type" in r.output and "q4_k_m" in r.output


def test_copy_is_self_contained(tmp_path):
    """A checkpoint moved elsewhere converts the same (no absolute paths kept)."""
    src = make(tmp_path / "a")
    shutil.copytree(src, tmp_path / "b")
    r1 = convert(src, tmp_path / "1.gguf", "q8_0")
    r2 = convert(tmp_path / "b", tmp_path / "2.gguf", "q8_0")
    assert [t.rel_error for t in r1.tensors] == [t.rel_error for t in r2.tensors]

"""Bad GGUF input gets an error that names the file and what is wrong, never a crash."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

import edgeseek
from edgeseek.errors import GGUFError, UnsupportedError
from edgeseek.gguf_file import GGUFFile


def _write(path, arch="llama", tensors=(), keys=None):
    w = GGUFWriter(path, arch)
    for k, v in (keys or {}).items():
        w.add_uint32(k, v)
    for name, arr, raw_dtype in tensors:
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(GGUFError, match=r"x\.gguf: not a GGUF file"):
        GGUFFile(p)


@pytest.mark.parametrize("keep", [10, 200, 5_000_000])
def test_truncated_file(tmp_path, smollm2_path, keep):
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(keep))
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated"):
        GGUFFile(p)


def test_unknown_architecture(tmp_path):
    p = _write(tmp_path / "m.gguf", arch="mamba9", tensors=[("a", np.zeros(32, np.float32), None)])
    with pytest.raises(UnsupportedError, match="architecture 'mamba9' is not supported"):
        edgeseek.load(p)


def test_missing_metadata_key_is_named(tmp_path):
    p = _write(tmp_path / "m.gguf", tensors=[("a", np.zeros(32, np.float32), None)])
    with pytest.raises(GGUFError, match="llama.embedding_length"):
        edgeseek.load(p)


def _tiny_llama(tmp_path, drop=None, bad_shape=None, qtype=None):
    D, F, V = 32, 64, 16
    keys = {"llama.embedding_length": D, "llama.block_count": 1, "llama.feed_forward_length": F,
            "llama.attention.head_count": 2, "llama.context_length": 64}
    t = {"token_embd.weight": (V, D), "output_norm.weight": (D,), "blk.0.attn_norm.weight": (D,),
         "blk.0.attn_q.weight": (D, D), "blk.0.attn_k.weight": (D, D), "blk.0.attn_v.weight": (D, D),
         "blk.0.attn_output.weight": (D, D), "blk.0.ffn_norm.weight": (D,),
         "blk.0.ffn_gate.weight": (F, D), "blk.0.ffn_up.weight": (F, D), "blk.0.ffn_down.weight": (D, F)}
    if bad_shape:
        t[bad_shape] = (t[bad_shape][0] * 2,) + t[bad_shape][1:]
    tensors = []
    for name, shape in t.items():
        if name == drop:
            continue
        arr = np.zeros(shape, np.float32)
        raw_dtype = None
        if qtype is not None and name == "blk.0.attn_q.weight":
            arr = np.zeros((shape[0], shape[1] // 32 * 18), np.uint8)  # Q4_0-sized bytes, type set below
            raw_dtype = qtype
        tensors.append((name, arr, raw_dtype))
    w = GGUFWriter(tmp_path / "m.gguf", "llama")
    for k, v in keys.items():
        w.add_uint32(k, v)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([chr(ord("a") + i) for i in range(V)])
    w.add_token_merges([])
    for name, arr, raw in tensors:
        w.add_tensor(name, arr, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "m.gguf"


def test_tiny_model_loads(tmp_path):
    engine = edgeseek.load(_tiny_llama(tmp_path))
    logits = engine.model.forward(np.array([1, 2, 3], np.int32), engine.model.new_cache(16))
    assert logits.shape == (1, 16) and np.isfinite(logits).all()


def test_missing_tensor_is_named(tmp_path):
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight.*missing"):
        edgeseek.load(_tiny_llama(tmp_path, drop="blk.0.ffn_up.weight"))


def test_misshaped_tensor_is_named(tmp_path):
    with pytest.raises(GGUFError, match=r"blk.0.ffn_gate.weight.*shape \(128, 32\), expected \(64, 32\)"):
        edgeseek.load(_tiny_llama(tmp_path, bad_shape="blk.0.ffn_gate.weight"))


def test_unsupported_quant_type_is_named(tmp_path):
    with pytest.raises(UnsupportedError, match="IQ4_NL"):
        edgeseek.load(_tiny_llama(tmp_path, qtype=GGMLQuantizationType.IQ4_NL))

"""Bad GGUF input gets an error that names the file and what is wrong, never a crash."""
import re
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from typer.testing import CliRunner

import edgeseek
import gguf_patch as G
from edgeseek.app.cli import app
from edgeseek.errors import EdgeseekError, GGUFError, UnsupportedError
from edgeseek.gguf_file import GGUFFile

V = GGUFValueType
DEEPSEEK = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q8_0.gguf"
runner = CliRunner()


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


def _tiny_llama(tmp_path, drop=None, bad_shape=None, qtype=None, meta=None, tokens=None):
    """A one-layer llama file; `meta` replaces or adds keys: {key: (value, GGUFValueType[, item type])}
    (a value of None leaves the key out); `tokens` replaces the 16 token texts."""
    D, F, V = 32, 64, 16
    keys = {"llama.embedding_length": D, "llama.block_count": 1, "llama.feed_forward_length": F,
            "llama.attention.head_count": 2, "llama.context_length": 64}
    meta = dict(meta or {})
    for k in list(keys):
        if k in meta:
            del keys[k]
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
    if "tokenizer.ggml.tokens" not in meta:
        w.add_token_list(tokens or [chr(ord("a") + i) for i in range(V)])
    if "tokenizer.ggml.merges" not in meta:
        w.add_token_merges([])
    for k, (v, *types) in meta.items():
        if v is not None:
            w.add_key_value(k, v, *types)
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


# --- files that break the spec: one line naming the file and the key or tensor, exit 1 ---------------

def _one_line_error(args, path) -> str:
    """Runs the CLI; asserts exit 1 and a single 'error: <path>: ...' line on stderr; returns it."""
    r = runner.invoke(app, args)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 1, r.output
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), r.stderr
    return lines[0]


def _patched(tmp_path, patch) -> Path:
    """The DeepSeek V3 fixture with `patch(data, parts)` applied to its bytes."""
    data = bytearray(DEEPSEEK.read_bytes())
    patch(data, G.layout(data))
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


def _byte(role, owner, index=-1, value=0xFF, at=0):
    def patch(data, parts):
        data[G.find(parts, role, owner, index).offset + at] = value
    return patch


def _int(role, owner, value, index=-1):
    def patch(data, parts):
        G.put_int(data, G.find(parts, role, owner, index), value)
    return patch


def _same_length_names(role):
    """Renames the second of two names of equal length (keys or tensors) to the first."""
    def patch(data, parts):
        named = [p for p in parts if p.role == role]
        a, b = next((a, b) for i, a in enumerate(named) for b in named[i + 1:] if a.size == b.size)
        data[b.offset: b.offset + b.size] = data[a.offset: a.offset + a.size]
    return patch


def _retyped_huge_array(data, parts):
    """token_type as 2^40 one-byte elements: gguf-py's reader loops over them past the end of the file."""
    G.put_int(data, G.find(parts, "array_type", "tokenizer.ggml.token_type"), int(V.UINT8))
    G.put_int(data, G.find(parts, "array_len", "tokenizer.ggml.token_type"), 2**40)


def _overlap(data, parts):
    offsets = [p for p in parts if p.role == "tensor_offset"]
    G.put_int(data, offsets[1], G.get_int(data, offsets[0]))


def _misaligned(data, parts):
    last = [p for p in parts if p.role == "tensor_offset"][-1]
    G.put_int(data, last, G.get_int(data, last) + 4)


def _nan(owner):
    def patch(data, parts):
        o = G.find(parts, "scalar", owner).offset
        data[o: o + 4] = np.float32("nan").tobytes()
    return patch


HEADER_CASES = {  # what is damaged: (patch, the message expected)
    "token text not UTF-8": (_byte("str", "tokenizer.ggml.tokens", 5),
                             r"metadata key 'tokenizer.ggml.tokens' element 5 is not valid UTF-8"),
    "merge not UTF-8": (_byte("str", "tokenizer.ggml.merges", 0),
                        r"'tokenizer.ggml.merges' element 0 is not valid UTF-8"),
    "template not UTF-8": (_byte("str", "tokenizer.chat_template", at=3),
                           r"'tokenizer.chat_template' is not valid UTF-8"),
    "name not UTF-8": (_byte("str", "general.name", value=0xC3), r"'general.name' is not valid UTF-8"),
    "key not UTF-8": (_byte("key", "general.name", at=2), r"the name of metadata key #\d+ is not valid UTF-8"),
    "tensor name not UTF-8": (_byte("name", "output_norm.weight"), r"the name of tensor #\d+ is not valid UTF-8"),
    "huge array count": (_int("array_len", "tokenizer.ggml.tokens", 2**62),
                         r"'tokenizer.ggml.tokens' claims 4611686018427387904 strings, more than the \d+ bytes"),
    "huge numeric array count": (_int("array_len", "tokenizer.ggml.token_type", 2**63),
                                 r"'tokenizer.ggml.token_type' claims \d+ elements"),
    "huge count of one-byte elements": (_retyped_huge_array,
                                        r"'tokenizer.ggml.token_type' claims 1099511627776 elements"),
    "huge key/value count": (_int("kv_count", "", 2**64 - 1), r"the key/value count claims \d+ key/values"),
    "huge tensor count": (_int("tensor_count", "", 2**40), r"the tensor count claims \d+ tensors"),
    "huge string length": (_int("str_len", "general.name", 2**63),
                           r"truncated or corrupt: metadata key 'general.name' needs \d+ bytes"),
    "tensor data past the end": (_int("tensor_offset", "output.weight", 2**40),
                                 r"truncated or corrupt: tensor 'output.weight' \(Q8_0, shape \(384, 64\)\) "
                                 r"ends at byte \d+, the file has 667328 bytes"),
    "huge dimension": (_int("dim", "output_norm.weight", 2**62, index=0),
                       r"tensor 'output_norm.weight' .* ends at byte"),
    "dimension of 0": (_int("dim", "output.weight", 0, index=1), r"tensor 'output.weight' has a dimension of 0"),
    "too many dimensions": (_int("n_dims", "output.weight", 7), r"tensor 'output.weight' has 7 dimensions"),
    "unknown quant type id": (_int("tensor_type", "output.weight", 99),
                              r"tensor 'output.weight' has unknown type id 99"),
    "removed quant type id": (_int("tensor_type", "output.weight", 4),
                              r"tensor 'output.weight' has unknown type id 4"),
    "overlapping tensors": (_overlap, r"tensors '.+' \(bytes \d+\.\.\d+\) and '.+' \(bytes \d+\.\.\d+\) overlap"),
    "misaligned tensor": (_misaligned, r"offset \d+ is not a multiple of the alignment 32"),
    "type id that changes a size": (_int("tensor_type", "blk.0.attn_q_a.weight", int(GGMLQuantizationType.Q4_0)),
                                    r"tensor '.+' starts at byte \d+, but 'blk.0.attn_q_a.weight' before it in "
                                    r"the table ends at byte \d+"),
    "duplicate tensor names": (_same_length_names("name"), r"tensor '.+' appears twice in the tensor table"),
    "duplicate keys": (_same_length_names("key"), r"metadata key '.+' appears twice"),
    "unknown value type": (_int("value_type", "general.name", 99),
                           r"metadata key 'general.name' has unknown value type id 99"),
    "bool neither 0 nor 1": (_byte("scalar", "tokenizer.ggml.add_bos_token", value=2),
                             r"'tokenizer.ggml.add_bos_token' holds the bool value 2"),
    "count stored as float": (_int("value_type", "deepseek2.expert_count", 6),
                              r"'deepseek2.expert_count' should be an integer, but holds the float32"),
    "more blocks than tensors": (_int("scalar", "deepseek2.block_count", 1000),
                                 r"'deepseek2.block_count' is 1000, but the tensors hold 3 blocks"),
    "zero block count": (_int("scalar", "deepseek2.block_count", 0),
                         r"'deepseek2.block_count' is 0; it should be between 1"),
    "huge expert count": (_int("scalar", "deepseek2.expert_count", 2**31), r"'deepseek2.expert_count' is 2147483648"),
    "NaN epsilon": (_nan("deepseek2.attention.layer_norm_rms_epsilon"),
                    r"'deepseek2.attention.layer_norm_rms_epsilon' is nan; it should be a finite number above 0"),
    "version 1": (lambda data, parts: data.__setitem__(slice(4, 8), b"\x01\0\0\0"), r"GGUF version 1 is not supported"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_broken_header_is_one_line_on_inspect(tmp_path, case):
    patch, message = HEADER_CASES[case]
    path = _patched(tmp_path, patch)
    t0 = time.perf_counter()
    line = _one_line_error(["inspect", str(path)], path)
    assert time.perf_counter() - t0 < 5  # a huge count is refused, not looped over
    assert re.search(message, line), line


LOAD_CASES = {  # a sound container whose values do not fit together
    "bos past the vocabulary": (_int("scalar", "tokenizer.ggml.bos_token_id", 384),
                                r"'tokenizer.ggml.bos_token_id' is 384, past the end of the vocabulary \(384 tokens\)"),
    "eos past the vocabulary": (_int("scalar", "tokenizer.ggml.eos_token_id", 2**32 - 1),
                                r"'tokenizer.ggml.eos_token_id' is 4294967295, past the end"),
    "more experts used than exist": (_int("scalar", "deepseek2.expert_used_count", 17),
                                     r"'deepseek2.expert_used_count' 17 should be between 1 and "
                                     r"'deepseek2.expert_count' 16"),
    "groups that do not divide the experts": (_int("scalar", "deepseek2.expert_group_count", 5),
                                              r"'deepseek2.expert_group_count' 5 should divide"),
    "unknown gating function": (_int("scalar", "deepseek2.expert_gating_func", 7),
                                r"'deepseek2.expert_gating_func' 7 is not supported"),
    "expert count against the tensors": (_int("scalar", "deepseek2.expert_count", 32),
                                         r"tensor 'blk.1.ffn_gate_exps.weight' has shape \(16, 64, 64\), "
                                         r"expected \(32, 64, 64\)"),
}


@pytest.mark.parametrize("case", LOAD_CASES)
@pytest.mark.parametrize("command", ["generate", "batch"])
def test_inconsistent_metadata_is_one_line_on_load(tmp_path, case, command):
    patch, message = LOAD_CASES[case]
    path = _patched(tmp_path, patch)
    assert runner.invoke(app, ["inspect", str(path)]).exit_code == 0  # the container itself is sound
    if command == "generate":
        args = ["generate", str(path), "-p", "hi", "-n", "1", "--ctx", "32"]
    else:
        requests = tmp_path / "in.jsonl"
        requests.write_text('{"custom_id": "a", "prompt": "hi", "max_tokens": 1}\n')
        args = ["batch", str(path), str(requests), "-o", str(tmp_path / "out.jsonl")]
    line = _one_line_error(args, path)
    assert re.search(message, line), line


def _tiny_error(tmp_path, **kw):
    """The message of the EdgeseekError that loading a broken tiny llama file raises."""
    with pytest.raises(EdgeseekError) as e:
        edgeseek.load(_tiny_llama(tmp_path, **kw))
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{tmp_path / 'm.gguf'}: ")
    return str(e.value)


@pytest.mark.parametrize("meta, tokens, message", [
    ({"tokenizer.ggml.token_type": ([1] * 15, V.ARRAY, V.INT32)}, None,
     "'tokenizer.ggml.token_type' has 15 entries, but tokenizer.ggml.tokens has 16"),
    ({"tokenizer.ggml.token_type": (["1"] * 16, V.ARRAY, V.STRING)}, None,
     "'tokenizer.ggml.token_type' should be an array of integers, but holds an array of string"),
    ({"tokenizer.ggml.tokens": (list(range(16)), V.ARRAY, V.INT32)}, None,
     "'tokenizer.ggml.tokens' should be an array of strings, but holds an array of int32"),
    ({"tokenizer.ggml.merges": (["ab"], V.ARRAY, V.STRING)}, None,
     "'tokenizer.ggml.merges' element 0 is 'ab', not two symbols joined by a space"),
    ({"llama.block_count": ("1", V.STRING)}, None,
     "'llama.block_count' should be an integer, but holds the string '1'"),
    ({"llama.attention.head_count": (-2, V.INT32)}, None,
     "'llama.attention.head_count' is -2; it should be between 1"),
    ({"llama.attention.head_count_kv": (3, V.UINT32)}, None,
     "'llama.attention.head_count' 2 is not a multiple of 'llama.attention.head_count_kv' 3"),
    ({"llama.rope.dimension_count": (17, V.UINT32)}, None,
     "'llama.rope.dimension_count' 17 should be even and at most the head size 16"),
    ({"llama.rope.freq_base": (float("inf"), V.FLOAT32)}, None,
     "'llama.rope.freq_base' is inf; it should be a finite"),
    ({"tokenizer.ggml.eos_token_id": (16, V.UINT32)}, None, "'tokenizer.ggml.eos_token_id' is 16, past the end"),
    ({"llama.vocab_size": (16, V.UINT32)}, [chr(ord("a") + i) for i in range(17)],
     "tokenizer.ggml.tokens has 17 tokens, but the model's vocabulary (token_embd.weight) has 16"),
])
def test_inconsistent_tokenizer_and_hyperparameters(tmp_path, meta, tokens, message):
    assert message in _tiny_error(tmp_path, meta=meta, tokens=tokens)


@pytest.mark.parametrize("command", ["chat", "experts"])
def test_broken_file_in_chat_and_experts_is_one_line(tmp_path, command):
    path = _patched(tmp_path, _byte("str", "tokenizer.ggml.tokens", 7))
    line = _one_line_error([command, str(path)], path)
    assert "'tokenizer.ggml.tokens' element 7 is not valid UTF-8" in line


def test_chat_template_that_fails_is_one_line(tmp_path):
    def patch(data, parts):  # the template now divides by zero
        p = G.find(parts, "str", "tokenizer.chat_template")
        data[p.offset: p.offset + p.size] = b"{{ 1/0 }}".ljust(p.size)
    path = _patched(tmp_path, patch)
    line = _one_line_error(["generate", str(path), "-p", "hi", "-n", "1", "--ctx", "32"], path)
    assert "the chat template failed: ZeroDivisionError" in line

"""LoRA adapters: `convert-lora` against llama.cpp's convert_lora_to_gguf.py (same keys and tensors),
`--lora` logits against transformers with the adapter merged and against llama.cpp with the same
adapter file, every decode path (a prompt, one token, a few, rows of several sequences with their
own adapters), the chat's /lora, batch lines with their own adapters, and bad adapters as one line.

The adapters are PEFT adapters on the converter tests' tiny checkpoints (tests/fixtures/convert/
adapters.py, cached with llama.cpp's files and the merged logits after the first run).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import _has, requires_llama_cpp, requires_torch

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "convert"))
import adapters as A  # noqa: E402
import checkpoints as C  # noqa: E402
from test_convert import TOL, differences, rel_rms  # noqa: E402

from edgeseek.app.cli import app  # noqa: E402
from edgeseek.convert.lora import convert_lora  # noqa: E402
from edgeseek.engine import load  # noqa: E402
from edgeseek.errors import EdgeseekError  # noqa: E402

pytestmark = [requires_torch, requires_llama_cpp, pytest.mark.skipif(not _has("peft"), reason="peft not installed")]
runner = CliRunner()
TOKENS = np.array(C.ds.sequence())


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


_files: dict = {}


def ours(name: str, outtype: str, out_dir: Path) -> Path:
    """Our convert-lora file of adapter `name`."""
    key = (name, outtype)
    if key not in _files:
        _files[key] = out_dir / f"{name}-{outtype}.gguf"
        convert_lora(A.adapter(name), C.checkpoint(A.SPECS[name]["base"]), _files[key], outtype, force=True)
    return _files[key]


def base_file(name: str) -> Path:
    return C.reference(A.SPECS[name]["base"], "f32")  # llama.cpp's F32 conversion of the base checkpoint


_engines: dict = {}


def engine(base: str):
    if base not in _engines:
        _engines[base] = load(C.reference(base, "f32"), mtp="off")
    return _engines[base]


def logits(e, adapters, tokens=TOKENS):
    ctx = e.new_context(len(tokens), adapters)
    return e.model.forward(tokens, ctx.cache, all_logits=True)


# ------------------------------------------------------------------------------------------ convert

@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "v3", "v2lite"])
def test_same_file_as_llama_cpp_lora_converter(name, outtype, out_dir):
    """Every key (type, value) and tensor (name, type, shape, bytes) as convert_lora_to_gguf.py writes
    them: Llama's permuted q / k and its embedding and head; DeepSeek's q_a / q_b / q / kv_a_mqa,
    output, dense and shared FFN, and the routed experts stacked; Q8_0 falling back to F16 on rank rows."""
    keys, bad = differences(ours(name, outtype, out_dir), A.reference(name, outtype))
    assert keys == [] and bad == []


def test_kv_b_proj_is_refused_naming_it(tmp_path):
    """MLA's kv_b_proj becomes attn_k_b / attn_v_b by a split and a transpose: no adapter layout."""
    from safetensors.numpy import load_file, save_file
    import shutil
    peft = tmp_path / "peft"
    shutil.copytree(A.adapter("v3"), peft)
    t = load_file(peft / "adapter_model.safetensors")
    p = "base_model.model.model.layers.0.self_attn.kv_b_proj"
    t[p + ".lora_A.weight"] = np.zeros((8, 64), np.float32)
    t[p + ".lora_B.weight"] = np.zeros((256, 8), np.float32)
    save_file(t, peft / "adapter_model.safetensors")
    r = runner.invoke(app, ["convert-lora", str(peft), "--base", str(C.checkpoint("v3")), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1
    assert "kv_b_proj" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_convert_lora_command(out_dir, tmp_path):
    out = tmp_path / "a.gguf"
    r = runner.invoke(app, ["convert-lora", str(A.adapter("llama")), "--base", str(C.checkpoint("llama")), "-o", str(out),
                            "-t", "f32", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["rank"] == 8 and report["alpha"] == 16 and len(report["tensors"]) == 2 * 16
    assert out.read_bytes() == ours("llama", "f32", out_dir).read_bytes()
    r = runner.invoke(app, ["convert-lora", str(A.adapter("llama")), "--base", str(C.checkpoint("llama")), "-o", str(out)])
    assert r.exit_code == 1 and "already exists" in r.stderr


@pytest.mark.parametrize("name", ["v3", "v2lite", "qwen2"])
def test_convert_lora_reports_the_rank(name, tmp_path):
    """The rank r of the PEFT config, not A's input width (which it equals only for an embedding's A)."""
    rank = A.SPECS[name]["r"]
    args = ["convert-lora", str(A.adapter(name)), "--base", str(C.checkpoint(A.SPECS[name]["base"])), "-t", "f32"]
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "a.gguf"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["rank"] == rank
    r = runner.invoke(app, [*args, "-o", str(tmp_path / "b.gguf")])
    assert r.exit_code == 0 and r.stderr.count("\n") == 1 and f" LoRA, rank {rank}, alpha " in r.stderr, r.output


# ------------------------------------------------------------------------------------------ logits

@pytest.mark.parametrize("name", ["llama", "qwen2", "v3", "v2lite"])
def test_logits_follow_transformers_with_the_adapter_merged(name, out_dir):
    """Unmerged y = Wx + s B(Ax) everywhere the adapter names (attention with MLA's q_a / q_b / q /
    kv_a_mqa, dense and shared FFN, routed experts, embedding, head) = the merged model's logits."""
    e = engine(A.SPECS[name]["base"])
    ad = e.lora.parse([str(ours(name, "f32", out_dir))])
    got = logits(e, ad)
    ref = A.merged_logits(name)
    assert rel_rms(got, ref) < TOL["f32"], rel_rms(got, ref)
    assert rel_rms(logits(e, ()), ref) > 0.3  # the adapter does something


@pytest.mark.parametrize("name", ["llama", "qwen2", "v3-out-ffn"])
def test_logits_follow_llama_cpp_with_the_same_adapter(name, out_dir):
    """llama.cpp (lora_path) on the same base file and adapter file. DeepSeek: an adapter on what
    llama.cpp's deepseek2 graph adapts (attn_output, the FFNs, the experts); its q / kv_a products
    take no LoRA (plain ggml_mul_mat in src/models/deepseek2.cpp), where ours follow transformers."""
    path = ours(name, "f32", out_dir)
    e = engine(A.SPECS[name]["base"])
    want = C.llama_logits(base_file(name), TOKENS.tolist(), path)
    got = logits(e, e.lora.parse([str(path)]))
    assert rel_rms(got, want) < TOL["f32"], rel_rms(got, want)
    half = logits(e, e.lora.parse([f"{path}:0.5"]))
    want_half = C.llama_logits(base_file(name), TOKENS.tolist(), path, 0.5)
    assert rel_rms(half, want_half) < TOL["f32"]


def test_every_decode_path_adds_the_same_deltas(out_dir):
    """A prompt (per-expert products), one token at a time (a decode step's expert kernel) and three
    at a time (the (token, expert) pairs kernel) give the same logits with the adapter."""
    e = engine("v3")
    ad = e.lora.parse([str(ours("v3", "f32", out_dir))])
    want = logits(e, ad)[:16]
    ctx = e.new_context(64, ad)
    ones = np.stack([e.model.forward(TOKENS[i:i + 1], ctx.cache)[0] for i in range(16)])
    assert rel_rms(ones, want) < 1e-4  # float32 rounding (measured 3e-5; a misplaced delta is > 0.1)
    ctx = e.new_context(64, ad)
    threes = np.concatenate([e.model.forward(TOKENS[i:i + 3], ctx.cache, all_logits=True) for i in range(0, 15, 3)])
    assert rel_rms(threes, want[:15]) < 1e-4


def test_f16_adapter_decodes_through_the_backend_kernel(out_dir):
    """An F16 adapter's pairs stay float16: a decode step's deltas come from the CPU backend's
    lora_pairs kernel (attention and experts), equal to numpy's on the same values and, like the
    float32 adapter, close to transformers merged."""
    e = engine("v3")
    ad = e.lora.parse([str(ours("v3", "f16", out_dir))])
    from edgeseek.models.lora import expert_delta
    pair = ad[0].pairs["blk.1.ffn_down_exps.weight"]
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    ids = np.array([0, 3, 3, 15, 7])
    got = e.backend.lora_pairs(pair.a, pair.b, ids, x, 0.7)
    assert pair.a.dtype == np.float16 and got is not None
    np.testing.assert_allclose(got, expert_delta(pair.a, pair.b, ids, x, 0.7), rtol=1e-4, atol=1e-5)

    def steps():
        ctx = e.new_context(64, ad)
        return np.stack([e.model.forward(TOKENS[i:i + 1], ctx.cache)[0] for i in range(12)])

    got = steps()
    kernel, e.model.lora.kernel = e.model.lora.kernel, None
    try:
        plain = steps()
    finally:
        e.model.lora.kernel = kernel
    assert rel_rms(got, plain) < 1e-4  # float32 sums in another order (measured 4e-5)
    # against float32 merged weights only on the first positions: further on, the adapter's float16
    # rounding flips near-tied random routers (0.3 of the spread at two of the 64 positions)
    assert rel_rms(got, A.merged_logits("v3")[:12]) < TOL["f16"]
    assert rel_rms(logits(e, ad)[:12], got) < 1e-4  # a prompt: the float16 pairs widened, the same deltas


def test_rows_of_one_step_each_run_their_own_adapter(out_dir):
    """forward_rows over sequences with adapter 1, adapter 2, both, and none: the base products once
    for all rows, each row's deltas its own; equal to each sequence decoded alone."""
    e = engine("v3")
    a1 = e.lora.parse([str(ours("v3", "f32", out_dir))])
    a2 = e.lora.parse([str(ours("v3-out-ffn", "f32", out_dir)) + ":0.7"])
    sets = [a1, a2, (), a1 + a2, a1]
    lens = [5, 9, 7, 4, 6]
    want, caches = [], []
    for s, n in zip(sets, lens):
        c = e.new_context(32, s).cache
        e.model.forward(TOKENS[:n - 1], c)
        want.append(e.model.forward(TOKENS[n - 1:n], c)[0])
        c = e.new_context(32, s).cache
        e.model.forward(TOKENS[:n - 1], c)
        caches.append(c)
    got = e.model.forward_rows(TOKENS[np.array(lens) - 1], caches)
    for g, w in zip(got, want):
        assert rel_rms(g, w) < 1e-4
    assert rel_rms(np.stack(want)[0], np.stack(want)[4]) > 0  # different positions, same adapter: rows differ


def test_router_pair_adds_to_the_router_logits(tmp_path):
    """llama.cpp's build_moe_ffn takes the router through build_lora_mm: a pair on ffn_gate_inp changes
    the routing as the merged router would."""
    e = engine("v3")
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((4, 64)).astype(np.float32) / 8, rng.standard_normal((16, 4)).astype(np.float32) / 2
    path = tmp_path / "router.gguf"
    write_adapter(path, "deepseek2", {"blk.2.ffn_gate_inp.weight.lora_a": a, "blk.2.ffn_gate_inp.weight.lora_b": b},
                  alpha=8.0)
    got = logits(e, e.lora.parse([str(path)]))
    L = e.model.layers[2]
    keep = L.ffn_gate_inp
    L.ffn_gate_inp = keep + 2.0 * (b @ a)  # s = alpha / r = 2
    try:
        want = logits(e, ())
    finally:
        L.ffn_gate_inp = keep
    assert rel_rms(got, want) < 1e-5 and rel_rms(got, logits(e, ())) > 1e-3


def test_alpha_missing_means_scale_alone(out_dir, tmp_path):
    """llama.cpp's get_scale: without adapter.lora.alpha, s = the user's scale (not scale * alpha / r)."""
    src = ours("v3-out-ffn", "f32", out_dir)
    no_alpha = tmp_path / "no-alpha.gguf"
    write_adapter(no_alpha, "deepseek2", read_tensors(src), alpha=None)
    e = engine("v3")
    spec = A.SPECS["v3-out-ffn"]
    got = logits(e, e.lora.parse([f"{no_alpha}:{spec['alpha'] / spec['r']}"]))
    np.testing.assert_allclose(got, logits(e, e.lora.parse([str(src)])), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ frontends

def test_greedy_text_with_an_adapter_differs_from_the_base(out_dir):
    from edgeseek import generate
    from edgeseek.sampler import SamplerConfig
    e = engine("v3")
    ids = TOKENS[:12].tolist()
    base = generate(e, ids, max_tokens=16, sampler=SamplerConfig.greedy(), context=e.new_context(64, ()))
    ad = e.lora.parse([str(ours("v3", "f32", out_dir))])
    tuned = generate(e, ids, max_tokens=16, sampler=SamplerConfig.greedy(), context=e.new_context(64, ad))
    assert tuned != base


def test_chat_switches_adapters_without_reloading(out_dir):
    from edgeseek.chat import ChatSession
    from edgeseek.sampler import SamplerConfig
    e = engine("v3")
    s = ChatSession(e, sampler=SamplerConfig.greedy(), max_tokens=8)
    model = e.model

    def reply():
        s.clear()
        return "".join(r.text for r in s.send("hello world"))

    base = reply()
    r = s.command(f"/lora {ours('v3', 'f32', out_dir)} 1.0")
    assert not r.error, r.message
    tuned = reply()
    assert s.command("/lora").message.endswith("(scale 1)")
    assert s.command("/lora off").message.startswith("LoRA off")
    assert reply() == base and tuned != base and e.model is model
    r = s.command("/lora /nonexistent.gguf")
    assert r.error and "no such LoRA adapter file" in r.message


def test_batch_lines_with_two_adapters_and_none_in_one_run(out_dir, tmp_path):
    """Lines naming adapter a, adapter b, the base and a file decode together (-P 4) and each equals
    its own run alone."""
    a, b = ours("v3", "f32", out_dir), ours("v3-out-ffn", "f32", out_dir)
    prompts = ["hello world", "the cat", "one two three", "abc"]
    loras = ["a", "b", None, f"{b}:0.5"]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "prompt": p, "max_tokens": 10, "temperature": 0,
                                       "lora": lo}) + "\n" for i, (p, lo) in enumerate(zip(prompts, loras))))
    base = str(base_file("v3"))
    r = runner.invoke(app, ["batch", base, str(src), "-o", str(tmp_path / "out.jsonl"), "-P", "4",
                            "--lora", f"a={a}", "--lora", f"b={b}"])
    assert r.exit_code == 0, r.output
    together = {o["custom_id"]: o["response"]["body"]["choices"][0]["text"]
                for o in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    alone = {}
    for i, (p, lo) in enumerate(zip(prompts, loras)):
        spec = {"a": str(a), "b": str(b)}.get(lo, lo)
        args = ["generate", base, "-p", p, "--raw", "--temp", "0", "-n", "10"] + (["--lora", spec] if spec else [])
        g = runner.invoke(app, args)
        assert g.exit_code == 0, g.output
        alone[f"r{i}"] = g.stdout[:-1]
    assert together == alone
    assert len(set(together.values())) > 1


# ------------------------------------------------------------------------------------------ bad input

def read_tensors(path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in gguf.GGUFReader(path).tensors}


def write_adapter(path, arch: str, tensors: dict, alpha: float | None = 16.0, kind: str = "adapter"):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_type(kind)
    w.add_string("adapter.type", "lora")
    if alpha is not None:
        w.add_float32("adapter.lora.alpha", alpha)
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _bad_cases(out_dir, tmp_path):
    good = read_tensors(ours("v3-out-ffn", "f32", out_dir))
    out = "blk.1.attn_output.weight"
    cases = {}

    def case(name, tensors, arch="deepseek2", kind="adapter"):
        path = tmp_path / f"{name}.gguf"
        write_adapter(path, arch, tensors, kind=kind)
        cases[name] = path

    case("other-base", {**good, out + ".lora_a": np.zeros((8, 96), np.float32)})
    case("suffix", {**good, out + ".lora_c": np.zeros((8, 128), np.float32)})
    case("rank", {**good, out + ".lora_b": np.zeros((64, 4), np.float32)})
    case("missing-half", {k: v for k, v in good.items() if k != out + ".lora_b"})
    case("k_b", {**good, "blk.1.attn_k_b.weight.lora_a": np.zeros((4, 8, 32), np.float32),
                 "blk.1.attn_k_b.weight.lora_b": np.zeros((4, 64, 8), np.float32)})
    case("not-adapter", good, kind="model")
    cases["other-arch"] = ours("llama", "f32", out_dir)
    cases["model-file"] = base_file("v3")
    cases["missing"] = tmp_path / "nothing-here.gguf"
    return cases


BAD = {"other-base": ["blk.1.attn_output.weight", "another base model"],
       "suffix": ["blk.1.attn_output.weight.lora_c", "unexpected suffix"],
       "rank": ["blk.1.attn_output.weight", "rank mismatch"],
       "missing-half": ["blk.1.attn_output.weight.lora_b", "missing"],
       "k_b": ["blk.1.attn_k_b.weight", "not supported"],
       "not-adapter": ["not a LoRA adapter", "general.type is 'model'"],
       "other-arch": ["'llama'", "'deepseek2'"],
       "model-file": ["not a LoRA adapter"],
       "missing": ["nothing-here.gguf", "no such LoRA adapter file"]}


def test_bad_adapters_are_one_line_each(out_dir, tmp_path):
    cases = _bad_cases(out_dir, tmp_path)
    e = engine("v3")
    for name, words in BAD.items():
        with pytest.raises(EdgeseekError) as err:
            e.lora.get(cases[name])
        assert all(w in str(err.value) for w in words), (name, str(err.value))
    e.device = "cuda"  # not run there yet: one line saying so
    try:
        with pytest.raises(EdgeseekError, match="CPU only"):
            e.lora.get(ours("v3", "f32", out_dir))
    finally:
        e.device = "cpu"
    r = runner.invoke(app, ["generate", str(ours("v3", "f32", out_dir)), "-p", "hi"])  # adapter as the model
    assert r.exit_code == 1 and "a LoRA adapter, not a model" in r.stderr and r.stderr.count("\n") == 1
    for name in ("other-base", "rank", "model-file", "missing"):  # the command line: exit 1, one line
        r = runner.invoke(app, ["generate", str(base_file("v3")), "-p", "hi", "-n", "1", "--lora", str(cases[name])])
        assert r.exit_code == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, (name, r.output)
        assert all(w in r.stderr for w in BAD[name])


def test_batch_line_with_a_bad_adapter_is_an_error_line(out_dir, tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "x", "prompt": "hi", "max_tokens": 2, "lora": "nope.gguf"}) + "\n"
                   + json.dumps({"custom_id": "y", "prompt": "hi", "max_tokens": 2, "lora": 3}) + "\n"
                   + json.dumps({"custom_id": "z", "prompt": "hi", "max_tokens": 2}) + "\n")
    r = runner.invoke(app, ["batch", str(base_file("v3")), str(src), "-o", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 1
    out = {o["custom_id"]: o for o in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())}
    assert "no such LoRA adapter file" in out["x"]["error"]["message"]
    assert "lora must be" in out["y"]["error"]["message"]
    assert out["z"]["error"] is None


def test_scale_spec_read_alike_by_lora_batch_and_chat(out_dir, tmp_path):
    """FILE:SCALE and FILE SCALE go through one parser: a scale that is not a number after an existing
    file is said as such; a path holding a colon or a space is taken whole where that file exists."""
    from edgeseek.lora import parse_spec
    adapter = ours("v3", "f32", out_dir)
    colon, spaced = tmp_path / "tuned:v2.gguf", tmp_path / "my adapter.gguf"
    colon.write_bytes(adapter.read_bytes())
    spaced.write_bytes(adapter.read_bytes())
    assert parse_spec(f"{adapter}:0.5") == parse_spec(f"{adapter} 0.5") == (str(adapter), 0.5)
    assert parse_spec(str(colon)) == (str(colon), 1.0) and parse_spec(f"{colon}:2") == (str(colon), 2.0)
    assert parse_spec(str(spaced)) == (str(spaced), 1.0) and parse_spec(f"{spaced} 2") == (str(spaced), 2.0)
    assert parse_spec(str(tmp_path / "gone.gguf:abc")) == (str(tmp_path / "gone.gguf:abc"), 1.0)  # no such file
    for spec in (f"{adapter}:abc", f"{adapter} abc", f"{adapter}:"):
        with pytest.raises(EdgeseekError, match="is not a number"):
            parse_spec(spec)
    base = str(base_file("v3"))
    r = runner.invoke(app, ["generate", base, "-p", "hi", "-n", "1", "--lora", f"{adapter}:abc"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.output
    assert "the scale 'abc' is not a number" in r.stderr and "no such" not in r.stderr
    r = runner.invoke(app, ["generate", base, "-p", "hi", "-n", "1", "--temp", "0", "--lora", f"{colon}:0.5"])
    assert r.exit_code == 0, r.output

    from edgeseek.chat import ChatSession
    s = ChatSession(engine("v3"))
    for arg in (f"{adapter}:0.5", f"{adapter} 0.5"):
        r = s.command(f"/lora {arg}")
        assert not r.error and s.command("/lora").message.endswith("(scale 0.5)"), r.message
    r = s.command(f"/lora {colon}")
    assert not r.error and s.command("/lora").message.endswith("(scale 1)"), r.message
    r = s.command(f"/lora {adapter} abc")
    assert r.error and "the scale 'abc' is not a number" in r.message

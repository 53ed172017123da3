"""convert_lora(): a Hugging Face PEFT LoRA adapter -> llama.cpp's LoRA adapter GGUF.

The file is what llama.cpp's convert_lora_to_gguf.py writes (its LoraModel over conversion/base.py):
general.type `adapter`, general.architecture the base's, adapter.type `lora`, adapter.lora.alpha
(f32), the general.* keys of the adapter folder's model card; for each adapted weight
`<GGUF name>.lora_a` (r, K) and `.lora_b` (N, r) (numpy order) in F32, F16 or Q8_0 (Q8_0 falls back to
F16 where a row is no multiple of 32, as llama.cpp's does). Names come from the base converter's plan
(convert/architectures.py, the one table of HF names), built on the base checkpoint: a direct tensor
takes the pair as it is; Llama's rope-permuted q / k take B's rows in the same permuted order (W = B A,
so the permutation of W's rows is that of B's); routed experts are stacked, A (E, r, K) and B (E, N, r);
token_embd's A is transposed to (V, r) (llama.cpp's llm_build_inp_embd takes A's rows by token id).
DeepSeek's kv_b_proj, which MLA splits and transposes into attn_k_b / attn_v_b, has no such layout
(llama.cpp's converter raises NotImplementedError on it): refused, naming it.

Written to a temporary file beside the output and renamed once complete.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter

from edgeseek.errors import EdgeseekError, UnsupportedError
from edgeseek.quantize import get_format

from .architectures import Options, architecture_of
from .checkpoint import Checkpoint, MissingFileError, TensorError, read_json
from .convert import check_output, written_atomically
from .safetensors import read_header, read_raw, to_f32

TYPES = {"f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}
ADAPTER_FILE = "adapter_model.safetensors"
# a PEFT tensor name -> (the base weight's name, "a" or "b")
PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
                       r"lora_embedding_B)$")


@dataclass
class LoraTensor:
    name: str
    shape: list[int]  # GGUF order (ne0 first)
    type: str
    bytes: int


@dataclass
class LoraReport:
    output: str
    architecture: str
    rank: int
    alpha: float
    seconds: float = 0.0
    output_bytes: int = 0
    tensors: list[LoraTensor] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def read_peft(folder: Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(adapter_config.json, base weight name -> {"a": A, "b": B} float32)."""
    if not folder.is_dir():
        raise MissingFileError(f"{folder}: no such PEFT adapter folder")
    config = read_json(folder / "adapter_config.json", "adapter_config.json")
    path = folder / ADAPTER_FILE
    if not path.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise UnsupportedError(f"{folder}: only safetensors adapters are converted (found adapter_model.bin)")
        raise MissingFileError(f"{folder}: no {ADAPTER_FILE}")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, ref in read_header(path).items():
        m = PEFT_NAME.match(name)
        if m is None:
            if ".base_layer." in name or name.endswith(".base_layer.weight"):  # saved embedding / head copies
                continue
            raise TensorError(f"{path.name}: tensor {name!r} is not a LoRA A or B tensor (a full weight, such "
                              f"as an embedding with new tokens, cannot go in a LoRA adapter)")
        base, which = m.group(1), m.group(2)
        key = base + ".weight"
        pairs.setdefault(key, {})["a" if "A" in which else "b"] = to_f32(read_raw(ref), ref.dtype)
    for key, ab in pairs.items():
        if len(ab) < 2:
            raise TensorError(f"{path.name}: {key!r} has lora_{'B' if 'a' in ab else 'A'} missing")
        if ab["a"].ndim != 2 or ab["b"].ndim != 2 or ab["a"].shape[0] != ab["b"].shape[1]:
            raise TensorError(f"{path.name}: {key!r}: lora_A {list(ab['a'].shape)} and lora_B {list(ab['b'].shape)} "
                              f"differ in rank")
    return config, pairs


def _pair(pairs: dict, src: str, out_in: tuple[int, int], embedding: bool = False):
    """The (A, B) of checkpoint weight src, shapes checked against the base weight (N, K)."""
    ab = pairs.pop(src)
    a, b = ab["a"], ab["b"]
    N, K = out_in
    if embedding:  # nn.Embedding (V, D): lora_embedding_A (r, V), lora_embedding_B (D, r)
        N, K = K, N
    if a.shape[1] != K or b.shape[0] != N:
        raise TensorError(f"{src}: the adapter's lora_A is {list(a.shape)} and lora_B {list(b.shape)}, but the base "
                          f"weight is {list(out_in)} (an adapter for another base model?)")
    return a, b


def plan_lora(ckpt: Checkpoint, pairs: dict) -> tuple[str, list[tuple[str, np.ndarray]]]:
    """(GGUF architecture, [(GGUF tensor name, float32 array)]) in the base plan's order."""
    _, arch = architecture_of(ckpt)
    plan = arch.build(ckpt, GGUFWriter(None, arch.gguf_arch), Options())
    out = []
    for p in plan.tensors:
        hits = [s for s in p.sources if s in pairs]
        if not hits:
            continue
        if p.kind == "stacked":
            if len(hits) != len(p.sources):
                raise TensorError(f"{p.name}: the adapter has pairs for {len(hits)} of its {len(p.sources)} routed "
                                  f"experts (e.g. none for {next(s for s in p.sources if s not in pairs)!r})")
            ab = [_pair(pairs, s, p.shape[1:]) for s in p.sources]
            a, b = np.stack([x for x, _ in ab]), np.stack([y for _, y in ab])  # (E, r, K), (E, N, r)
        elif p.kind == "derived" and p.rows_fn is None:
            raise UnsupportedError(f"{hits[0]}: a LoRA on it has no llama.cpp adapter layout ({p.name} is derived from "
                                   f"it by a split and transpose; llama.cpp's converter fails on it too): leave it "
                                   f"out of target_modules")
        elif p.name == "token_embd.weight":
            a, b = _pair(pairs, hits[0], p.shape, embedding=True)
            a = a.T  # (V, r): rows taken by token id
        else:
            a, b = _pair(pairs, hits[0], p.shape)
            if p.rows_fn is not None:
                b = p.rows_fn(b)  # W's rows reordered: B's rows in the same order
        out += [(p.name + ".lora_a", np.ascontiguousarray(a, np.float32)),
                (p.name + ".lora_b", np.ascontiguousarray(b, np.float32))]
    if pairs:
        name = next(iter(pairs))
        tied = name == "lm_head.weight"
        raise TensorError(f"{name}: the adapter adapts it, but the base model " +
                          ("ties lm_head to embed_tokens (llama.cpp refuses this too)" if tied else
                           "has no such weight (an adapter for another base model?)"))
    return arch.gguf_arch, out


def _rank(tensors: list[tuple[str, np.ndarray]]) -> int:
    """The adapter's rank r: the last axis of every B, (..., N, r), token_embd's (D, r) too (A's last
    axis is the input width K, but token_embd's r). The largest where PEFT's rank_pattern gives
    modules different ranks."""
    return max((int(x.shape[-1]) for name, x in tensors if name.endswith(".lora_b")), default=0)


def _type(outtype: T, x: np.ndarray) -> T:
    """llama.cpp's choice: the out type, Q8_0 falling back to F16 where a row is no multiple of 32."""
    if outtype == T.Q8_0 and x.shape[-1] % 32:
        return T.F16
    return outtype


def convert_lora(peft_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16",
                 force: bool = False) -> LoraReport:
    """Converts the PEFT adapter folder `peft_dir` (adapter_config.json, adapter_model.safetensors) for
    the checkpoint folder `base` into the adapter GGUF `out`."""
    t0 = time.perf_counter()
    peft_dir, base, out = Path(peft_dir), Path(base), Path(out)
    if outtype not in TYPES:
        raise EdgeseekError(f"--type {outtype!r}: choose one of {', '.join(TYPES)}")
    check_output(out, force)
    config, pairs = read_peft(peft_dir)
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise TensorError(f"{peft_dir / 'adapter_config.json'}: no lora_alpha (a number)")
    alpha = float(config["lora_alpha"])
    ckpt = Checkpoint(base)
    arch, tensors = plan_lora(ckpt, pairs)
    types = [_type(TYPES[outtype], x) for _, x in tensors]

    w = GGUFWriter(None, arch)
    scratch = GGUFWriter(None, arch)
    for (name, x), t in zip(tensors, types):
        scratch.add_tensor_info(name, x.shape, np.dtype(np.float32), 0, raw_dtype=t)
    total = scratch.get_total_parameter_count()[0]  # negative for adapters: no size label
    meta = gguf.Metadata.load(None, peft_dir, None, total)
    if meta.name is None:
        meta.name = base.name
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    meta.set_gguf_meta_model(w)
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    report = LoraReport(str(out), arch, _rank(tensors), alpha)
    blobs = []
    for (name, x), t in zip(tensors, types):
        q = x if t == T.F32 else get_format(t).quantize(x.reshape(-1, x.shape[-1]))
        blobs.append(np.ascontiguousarray(q))
        nbytes = blobs[-1].nbytes
        w.add_tensor_info(name, x.shape, np.dtype(np.float32), nbytes, raw_dtype=t)
        report.tensors.append(LoraTensor(name, list(reversed(x.shape)), t.name, nbytes))
    if not tensors:
        raise TensorError(f"{peft_dir}: the adapter holds no LoRA pairs")

    with written_atomically(w, out) as f:
        for q in blobs:
            f.write(b"\0" * (-f.tell() % w.data_alignment))
            f.write(memoryview(q).cast("B"))
    report.output_bytes = out.stat().st_size
    report.seconds = time.perf_counter() - t0
    return report

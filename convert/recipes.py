"""Conversion recipes: predicates (tensor name, shape) -> GGML type, the same choices llama.cpp makes.

f32 / f16 / bf16 / q8_0 follow llama.cpp's converter (conversion/base.py prepare_tensors); the other
mixtures follow `llama_model_quantize` without an importance matrix (src/llama-quant.cpp
tensor_allows_quantization, llama_tensor_get_type_impl, tensor_type_fallback), so a file converted here
holds the types llama.cpp's converter followed by llama-quantize would give it. `q4_k` / `q5_k` are
"pure" mixtures (llama-quantize --pure): the one type on every quantizable tensor.

Note on the MLA layout: llama.cpp's categories count attn_v / attn_kv_b as "attention V" (Q6_K on some
layers under Q4_K_M) but not attn_v_b, which gets the default type like attn_k_b; the recipes here do
the same, so `--tensor-type attn_v_b=q6_k` is the way to give it more bits.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT
from gguf.constants import GGML_QUANT_SIZES

from edgeseek.errors import EdgeseekError


def output_types() -> dict[str, T]:
    """Types a tensor may be given (--tensor-type), by their lower-case names: every format of
    edgeseek.quantize that has a quantizer. (Imported here, not at the top: it loads numba, which
    the command line does not need to start.)"""
    from edgeseek.quantize import FORMATS

    return {t.name.lower(): t for t, fmt in FORMATS.items() if fmt.quantizes}


class RecipeError(EdgeseekError):
    """An unknown recipe or type, or a malformed --tensor-type."""


@dataclass(frozen=True)
class Model:
    """What llama.cpp's rules look at besides the tensor: hparams of the model being written."""
    n_layer: int  # block_count, MTP blocks included (llama.cpp's n_layer_all)
    n_expert: int  # 0 for dense models
    n_attn_v: int  # number of attn_v / attn_qkv / attn_kv_b tensors
    has_output: bool  # False: output tied to token_embd, which then gets the output's type


@dataclass(frozen=True)
class Recipe:
    name: str
    ftype: FT
    default: T
    mixture: bool  # llama.cpp's per-tensor rules apply (llama-quantize), not just the default


RECIPES = {r.name: r for r in (
    Recipe("f32", FT.ALL_F32, T.F32, False),
    Recipe("f16", FT.MOSTLY_F16, T.F16, False),
    Recipe("bf16", FT.MOSTLY_BF16, T.BF16, False),
    Recipe("q8_0", FT.MOSTLY_Q8_0, T.Q8_0, False),
    Recipe("q4_0", FT.MOSTLY_Q4_0, T.Q4_0, True),
    Recipe("q4_1", FT.MOSTLY_Q4_1, T.Q4_1, True),
    Recipe("q5_0", FT.MOSTLY_Q5_0, T.Q5_0, True),
    Recipe("q5_1", FT.MOSTLY_Q5_1, T.Q5_1, True),
    Recipe("q4_k_s", FT.MOSTLY_Q4_K_S, T.Q4_K, True),
    Recipe("q4_k_m", FT.MOSTLY_Q4_K_M, T.Q4_K, True),
    Recipe("q5_k_s", FT.MOSTLY_Q5_K_S, T.Q5_K, True),
    Recipe("q5_k_m", FT.MOSTLY_Q5_K_M, T.Q5_K, True),
    Recipe("q6_k", FT.MOSTLY_Q6_K, T.Q6_K, True),
    Recipe("q4_k", FT.MOSTLY_Q4_K_S, T.Q4_K, False),
    Recipe("q5_k", FT.MOSTLY_Q5_K_S, T.Q5_K, False),
)}


def get_recipe(name: str) -> Recipe:
    r = RECIPES.get(name.lower())
    if r is None:
        raise RecipeError(f"unknown type {name!r}; recipes: {', '.join(RECIPES)}")
    return r


def parse_overrides(specs: list[str] | tuple[str, ...]) -> list[tuple[re.Pattern, T]]:
    """--tensor-type REGEX=TYPE, tried in order, first match wins (regex searched in the GGUF name)."""
    out = []
    types = output_types()
    for spec in specs:
        pattern, sep, tname = spec.rpartition("=")
        if not sep or not pattern:
            raise RecipeError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. 'ffn_down_exps=q6_k'")
        if tname.lower() not in types:
            raise RecipeError(f"--tensor-type {spec!r}: unknown type {tname!r}; types: {', '.join(types)}")
        try:
            out.append((re.compile(pattern), types[tname.lower()]))
        except re.error as e:
            raise RecipeError(f"--tensor-type {spec!r}: bad regex: {e}") from None
    return out


def block_size(t: T) -> int:
    return GGML_QUANT_SIZES[t][0]


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Tensors that may take a type other than F32 (llama.cpp keeps 1-D tensors, norms and the router
    F32, in the converter and in tensor_allows_quantization alike)."""
    return (len([d for d in shape]) >= 2 and name.endswith(".weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def fallback(t: T, ne0: int) -> T:
    """A type whose block fits the row (llama.cpp tensor_type_fallback; the converter's Q8_0 -> F16)."""
    if ne0 % block_size(t) == 0:
        return t
    t = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}.get(t, t)
    return t if ne0 % block_size(t) == 0 else T.F16


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else 0


def _mixture(r: Recipe, name: str, ne0: int, m: Model, t: T) -> T:
    """llama.cpp llama_tensor_get_type_impl for the file types above (no imatrix, not Falcon)."""
    ft = r.ftype
    if name == "output.weight" or (not m.has_output and name == "token_embd.weight"):
        if ne0 % block_size(t) != 0:
            return T.Q8_0
        return t if t == T.Q8_0 else T.Q6_K
    if name == "token_embd.weight":
        return t
    if any(s in name for s in ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")):
        i = _layer(name)  # llama.cpp counts these tensors in file order: the layer index
        if ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, m.n_attn_v):
            t = T.Q6_K
        elif ft == FT.MOSTLY_Q4_K_S and i < 4:
            t = T.Q5_K
        if m.n_expert == 8:
            t = T.Q8_0
        if "attn_qkv.weight" in name:
            t = {FT.MOSTLY_Q4_K_M: T.Q5_K, FT.MOSTLY_Q5_K_M: T.Q6_K}.get(ft, t)
        return t
    if "attn_k.weight" in name:
        return T.Q8_0 if m.n_expert == 8 else t
    if "ffn_down" in name:
        i, n = _layer(name), m.n_layer
        if ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and _use_more_bits(i, n):
            return T.Q6_K
        if ft == FT.MOSTLY_Q4_K_S and i < n // 8:
            return T.Q5_K
        return t
    if "attn_output.weight" in name:
        if m.n_expert == 8 and ft in (FT.MOSTLY_Q4_K_S, FT.MOSTLY_Q4_K_M):
            return T.Q5_K
        return t
    return t


def choose(r: Recipe, name: str, shape: tuple[int, ...], m: Model,
           overrides: list[tuple[re.Pattern, T]] = ()) -> T:
    """The GGML type of one tensor (numpy shape, outermost first)."""
    if not quantizable(name, shape):
        return T.F32
    ne0 = shape[-1]
    for rx, t in overrides:
        if rx.search(name):
            return fallback(t, ne0)
    t = r.default
    if r.mixture:
        t = _mixture(r, name, ne0, m, t)
    return fallback(t, ne0)

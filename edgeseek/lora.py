"""LoRA adapter files (llama.cpp's format, as `edgeseek convert-lora` and convert_lora_to_gguf.py
write them) read and checked against the loaded base model, the way llama.cpp's
llama_adapter_lora_init_impl (src/llama-adapter.cpp) checks them, each problem one line naming the
file and tensor: general.type must be `adapter`, adapter.type `lora`, general.architecture the
base's; every tensor `<base tensor>.lora_a` / `.lora_b` (norm vectors, which llama.cpp skips, are
skipped too); both halves present; the base tensor present and one the model multiplies with an
adapter (not a norm, nor MLA's per-head k_b / v_b, which llama.cpp leaves without LoRA too); A (r, K)
and B (N, r) matching the base (N, K), the same rank r in both.

The math lives in models/lora.py; this module loads files into its `Adapter`s, keeps them by path
(one copy of each file's tensors, whatever scales it is used at) and attaches the model's wrappers.
"""
from __future__ import annotations

import math

import os
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from .errors import EdgeseekError, GGUFError, UnsupportedError
from .gguf_file import GGUFFile
from .models import lora as L
from .quantize import get_format

SUFFIXES = (".lora_a", ".lora_b")


def parse_spec(spec: str) -> tuple[str, float]:
    """An adapter and its scale -> (FILE, SCALE): `FILE:SCALE` (--lora, batch lines) or `FILE SCALE`
    (chat's /lora), SCALE 1 when absent. The files on disk settle what the last colon or space
    means: a path that holds one is taken whole where that file exists and FILE does not; a tail
    that is not a number after an existing FILE is a bad scale, said in one line."""
    spec = spec.strip()
    cut = max(spec.rfind(":"), spec.rfind(" "), spec.rfind("\t"))
    path, tail = spec[:cut].rstrip(" \t:"), spec[cut + 1:].strip()
    if cut < 0 or not path:
        return spec, 1.0
    whole, head = Path(spec).is_file(), Path(path).is_file()
    try:
        scale = float(tail)
    except ValueError:
        if head and not whole:
            raise EdgeseekError(f"LoRA {spec}: the scale {tail!r} is not a number") from None
        return spec, 1.0  # a path with a colon or space in it (missing: read_adapter names it whole)
    if whole and not head:
        return spec, 1.0
    if not math.isfinite(scale):
        raise EdgeseekError(f"LoRA {spec}: the scale must be a finite number, got {tail}")
    return path, scale


def check_specs(specs) -> None:
    """--lora values read as they will be at load (batch's NAME=FILE[:SCALE] too): a bad scale or
    a missing file is one line before the model loads."""
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if eq and name and "/" not in name and rest:
            spec = rest
        path, _ = parse_spec(spec)
        if not Path(path).is_file():
            raise GGUFError(f"{path}: no such LoRA adapter file")


def _f32(f: GGUFFile, t) -> np.ndarray:
    try:
        fmt = get_format(t.qtype)
    except UnsupportedError as e:
        raise UnsupportedError(f"{f.path}: tensor {t.name!r}: {e}") from None
    return fmt.dequantize(np.ascontiguousarray(t.raw).reshape(-1, fmt.type_size)).reshape(t.shape)


def read_adapter(path: str | os.PathLike, base: GGUFFile, targets: set[str], name: str | None = None,
                 scale: float = 1.0, xp=np) -> L.Adapter:
    """An adapter file checked against the base file `base` and the tensor names the model can
    adapt (`targets`, models/lora.targets) -> an Adapter of float32 (A, B) pairs in xp's memory."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such LoRA adapter file")
    f = GGUFFile(path)
    kind = f.meta("general.type", None)
    if kind != "adapter":
        raise GGUFError(f"{path}: not a LoRA adapter: general.type is {kind!r}, expected 'adapter' "
                        f"(a model file passed as --lora?)")
    if f.meta("adapter.type", None) != "lora":
        raise UnsupportedError(f"{path}: adapter.type is {f.meta('adapter.type', None)!r}; only 'lora' is supported")
    if f.arch != base.arch:
        raise GGUFError(f"{path}: an adapter for architecture {f.arch!r}, but the model {base.path.name} is "
                        f"{base.arch!r}")
    alpha = float(f.meta("adapter.lora.alpha", 0.0))
    halves: dict[str, dict[str, np.ndarray]] = {}
    for tname, t in f.tensors.items():
        suffix = next((s for s in SUFFIXES if tname.endswith(s)), None)
        if suffix is None:
            if tname.endswith("_norm.weight"):  # llama.cpp skips them (mergekit-extract-lora adds them)
                continue
            raise GGUFError(f"{path}: tensor {tname!r} has an unexpected suffix; a LoRA adapter holds "
                            f"<base tensor>.lora_a and .lora_b")
        halves.setdefault(tname[: -len(suffix)], {})[suffix] = t
    pairs = {}
    for bname, h in halves.items():
        if len(h) < 2:
            missing = next(s for s in SUFFIXES if s not in h)
            raise GGUFError(f"{path}: tensor {bname + missing!r} is missing (its pair has only {next(iter(h))})")
        ta, tb = h[".lora_a"], h[".lora_b"]
        if not base.has(bname):
            raise GGUFError(f"{path}: tensor {ta.name!r}: the model has no tensor {bname!r} (an adapter for "
                            f"another model?)")
        if bname not in targets:
            raise UnsupportedError(f"{path}: tensor {ta.name!r}: LoRA on {bname!r} is not supported (not one of "
                                   f"the model's matrix products that take an adapter)")
        _check_shapes(path, bname, base.tensor(bname).shape, ta, tb)
        if bname != "token_embd.weight" and ta.qtype == tb.qtype == GGMLQuantizationType.F16:
            # float16 kept: half the bytes a decode step reads (backend.lora_pairs); B stored as
            # (..., r, N) so that each rank's column of B is contiguous, seen as (..., N, r)
            a = np.array(ta.raw).view(np.float16).reshape(ta.shape)
            b = np.ascontiguousarray(np.array(tb.raw).view(np.float16).reshape(tb.shape).swapaxes(-1, -2))
            pairs[bname] = L.LoraPair(xp.asarray(a), xp.asarray(b).swapaxes(-1, -2))
            continue
        else:
            a, b = _f32(f, ta), _f32(f, tb)
        pairs[bname] = L.LoraPair(xp.asarray(np.ascontiguousarray(a)), xp.asarray(np.ascontiguousarray(b)))
    if not pairs:
        raise GGUFError(f"{path}: the adapter holds no .lora_a / .lora_b tensors")
    return L.Adapter(name or str(path), alpha, scale, pairs)


def _check_shapes(path, bname: str, w: tuple, ta, tb) -> None:
    """A (r, K), B (N, r) for a weight (N, K), with a leading expert axis for stacked experts;
    token_embd (V, D): A (V, r), B (D, r)."""
    a, b = ta.shape, tb.shape
    if len(a) != len(w) or len(b) != len(w):
        raise GGUFError(f"{path}: tensor {ta.name!r} has shape {a} and {tb.name!r} {b}, but the model's "
                        f"{bname!r} is {w} (an adapter for another model?)")
    if bname == "token_embd.weight":
        ok, rank_a, rank_b = a[0] == w[0] and b[0] == w[1], a[1], b[1]
        want = f"A ({w[0]}, r) and B ({w[1]}, r)"
    else:
        ok = a[-1] == w[-1] and b[-2] == w[-2] and a[:-2] == w[:-2] and b[:-2] == w[:-2]
        rank_a, rank_b = a[-2], b[-1]
        want = f"A ({', '.join(map(str, w[:-2] + ('r',) + w[-1:]))}) and B ({', '.join(map(str, w[:-1] + ('r',)))})"
    if not ok:
        raise GGUFError(f"{path}: tensor {bname!r}: the adapter's A is {a} and B {b}, but the model's weight is "
                        f"{w}, which needs {want} (an adapter for another base model?)")
    if rank_a != rank_b:
        raise GGUFError(f"{path}: tensor {bname!r}: rank mismatch, {ta.name!r} has rank {rank_a} but "
                        f"{tb.name!r} has rank {rank_b}")


class Adapters:
    """The adapters of one loaded model: each file read once (its tensors shared by every scale it
    is used at), the model's products wrapped on first use."""

    def __init__(self, engine):
        self.engine = engine
        self.files: dict[Path, L.Adapter] = {}
        self.uses: dict[tuple, L.Adapter] = {}  # (file, scale, name) -> one Adapter: rows that share it group

    def get(self, path: str | os.PathLike, scale: float = 1.0, name: str | None = None) -> L.Adapter:
        """The adapter in `path` at `scale`."""
        e = self.engine
        if e.device != "cpu":
            raise UnsupportedError("LoRA adapters run on the CPU only for now: use --device cpu")
        key = Path(path).resolve()
        if key not in self.files:
            self.files[key] = read_adapter(path, e.gguf, L.targets(e.model), name=name or str(path))
        L.attach(e.model)
        base = self.files[key]
        use = (key, float(scale), name)
        if use not in self.uses:
            self.uses[use] = base.with_scale(scale) if name is None else L.Adapter(name, base.alpha, scale, base.pairs)
        return self.uses[use]

    def parse(self, specs) -> tuple[L.Adapter, ...]:
        """--lora FILE[:SCALE] values -> the adapters, in order."""
        return tuple(self.get(*parse_spec(s)) for s in specs or ())

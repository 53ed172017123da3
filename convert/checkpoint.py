"""A Hugging Face checkpoint folder: config.json, safetensors (single or sharded with its index), and
the decoding of every tensor to float32 rows (FP8 e4m3 with `weight_scale_inv` block scales included).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from edgeseek.errors import EdgeseekError, UnsupportedError

from .safetensors import TensorRef, read_header, read_raw, to_f32

INDEX = "model.safetensors.index.json"


class MissingFileError(EdgeseekError):
    """A file the checkpoint needs is absent: config.json, a shard named by the index."""


class TensorError(EdgeseekError):
    """A tensor the architecture needs is missing, or has a shape other than the config implies."""


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MissingFileError(f"{path}: {what} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeseekError(f"{path}: not valid JSON: {e}") from None


class Checkpoint:
    def __init__(self, folder: Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise MissingFileError(f"{folder}: no such checkpoint folder")
        self.folder = folder
        self.config = read_json(folder / "config.json", "config.json")
        self.tensors: dict[str, TensorRef] = {}
        for shard in self._shards():
            self.tensors.update(read_header(shard))
        qc = self.config.get("quantization_config") or {}
        self.quant_method = qc.get("quant_method")
        if self.quant_method not in (None, "fp8"):
            raise UnsupportedError(f"{folder / 'config.json'}: quantization_config.quant_method "
                                   f"{self.quant_method!r} is not supported (only unquantized and fp8 checkpoints)")
        self.fp8_block = tuple(qc.get("weight_block_size") or (128, 128))

    def _shards(self) -> list[Path]:
        index = self.folder / INDEX
        if index.is_file():
            weight_map = read_json(index, INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise EdgeseekError(f"{index}: no weight_map")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.folder / s).is_file()]
            if missing:
                raise MissingFileError(f"{self.folder}: shard(s) named by {INDEX} are missing: {', '.join(missing)}")
            self._weight_map = weight_map
            return [self.folder / s for s in shards]
        self._weight_map = None
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        parts = sorted(self.folder.glob("model-*-of-*.safetensors"))
        if parts:
            m = re.match(r"model-\d+-of-(\d+)\.safetensors", parts[0].name)
            if m and len(parts) != int(m.group(1)):
                raise MissingFileError(f"{self.folder}: {len(parts)} of {int(m.group(1))} model-*-of-*.safetensors "
                                       "shards present and no index")
            return parts
        if any(self.folder.glob("*.bin")) or any(self.folder.glob("*.pt")):
            raise UnsupportedError(f"{self.folder}: only safetensors checkpoints are converted (found PyTorch .bin)")
        raise MissingFileError(f"{self.folder}: no model.safetensors, shards or {INDEX}")

    def check_index(self):
        """Every tensor the index names is in the shards (a truncated or replaced shard otherwise)."""
        if self._weight_map:
            missing = [n for n in self._weight_map if n not in self.tensors]
            if missing:
                raise TensorError(f"{self.folder}: {len(missing)} tensor(s) named by {INDEX} are in no shard, e.g. "
                                  f"{missing[0]!r} (expected in {self._weight_map[missing[0]]})")

    # --- access ---------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors

    def ref(self, name: str, shape: tuple[int, ...] | None = None) -> TensorRef:
        ref = self.tensors.get(name)
        if ref is None:
            raise TensorError(f"{self.folder}: tensor {name!r} is missing from the checkpoint")
        if shape is not None and tuple(ref.shape) != tuple(shape):
            raise TensorError(f"{ref.path.name}: tensor {name!r} has shape {list(ref.shape)}, the config implies "
                              f"{list(shape)}")
        ref.check_readable()
        if ref.dtype == "F8_E4M3" and name + "_scale_inv" not in self.tensors:
            raise UnsupportedError(f"{ref.path.name}: FP8 tensor {name!r} has no {name}_scale_inv block scales")
        return ref

    def rows(self, name: str, r0: int = 0, r1: int | None = None) -> np.ndarray:
        """Rows [r0, r1) of a tensor as float32; FP8 weights multiplied by their block scales
        (DeepSeek-V3's fp8 format: W = fp8 * weight_scale_inv[i // 128, j // 128])."""
        ref = self.ref(name)
        r1 = ref.rows if r1 is None else r1
        x = to_f32(read_raw(ref, r0, r1), ref.dtype)
        if ref.dtype == "F8_E4M3":
            bo, bi = self.fp8_block
            s_ref = self.ref(name + "_scale_inv")
            out_f, in_f = ref.shape
            want = (-(-out_f // bo), -(-in_f // bi))
            if tuple(s_ref.shape) != want:
                raise TensorError(f"{s_ref.path.name}: {s_ref.name!r} has shape {list(s_ref.shape)}, blocks of "
                                  f"{bo}x{bi} over {list(ref.shape)} need {list(want)}")
            s = to_f32(read_raw(s_ref, r0 // bo, -(-r1 // bo)), s_ref.dtype)  # (row blocks, col blocks)
            s = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)  # (rows of those blocks, >= in_f)
            x *= s[r0 - (r0 // bo) * bo:][: r1 - r0, :in_f]
        return x

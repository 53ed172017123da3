"""A GGUF file, memory-mapped: metadata by key, tensors by name, with errors that name what is wrong.

The header is parsed here rather than by gguf-py's GGUFReader, because a file that breaks the spec
must end in one error naming the key or tensor at fault, never in a traceback or a hang: GGUFReader
loops over whatever element count an array claims, on past the end of the file (a count of 2^40
one-byte elements: 1.7 GB and still looping after 15 s), and raises UnicodeDecodeError, KeyError,
IndexError or ValueError on other damage. Here no count or length is trusted before the bytes it
claims are known to be in the file.

Layout (ggml/src/gguf.cpp, docs/gguf.md of llama.cpp), little-endian:
    magic "GGUF", version u32 (2 or 3), tensor count u64, key/value count u64,
    key/value: key string, value type u32, value,
    tensor info: name string, n_dims u32, dims u64 * n_dims (innermost first), type u32, offset u64,
    padding to general.alignment (default 32), then tensor data (each offset relative to its start).
A string is a u64 byte length and UTF-8 bytes; an array is an element type u32, a u64 count and
the elements.

Tensor data are read-only views on the mmap; nothing is copied here.
Shapes are given in numpy order (outermost first), the reverse of the GGUF dims list.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf.constants import GGML_QUANT_SIZES

from .errors import GGUFError, UnsupportedError

_MISSING = object()
V = GGUFValueType
# Scalar value types: struct format (little-endian) and numpy dtype.
_SCALARS = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
            V.UINT64: "<Q", V.INT64: "<q", V.FLOAT32: "<f", V.FLOAT64: "<d", V.BOOL: "<B"}
_INTS = {V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64}
_FLOATS = {V.FLOAT32, V.FLOAT64}
MAX_DIMS = 4  # GGML_MAX_DIMS
U32 = 2**32 - 1

# The metadata keys edgeseek reads and what each must hold (llama.cpp's src/llama-arch.cpp and
# llama-model.cpp read the same keys as u32, f32, bool or string). Keys under the architecture's
# prefix (`deepseek2.block_count`) are listed without it. (kind, least, most): integers lie in
# [least, most]; floats are finite and, with a least, above it.
KEYS: dict[str, tuple] = {
    "general.architecture": ("str",),
    "general.name": ("str",),
    "general.file_type": ("int", 0, U32),
    "general.alignment": ("int", 1, 1 << 30),
    "tokenizer.ggml.model": ("str",),
    "tokenizer.ggml.pre": ("str",),
    "tokenizer.ggml.tokens": ("str[]",),
    "tokenizer.ggml.token_type": ("int[]",),
    "tokenizer.ggml.merges": ("str[]",),
    "tokenizer.chat_template": ("str",),
    "tokenizer.ggml.add_bos_token": ("bool",),
    "tokenizer.ggml.add_eos_token": ("bool",),
    **{f"tokenizer.ggml.{k}_token_id": ("int", 0, U32)
       for k in ("bos", "eos", "eot", "eom", "unknown", "padding", "seperator")},
    "vocab_size": ("int", 1, U32),
    "context_length": ("int", 1, U32),
    "embedding_length": ("int", 1, U32),
    "feed_forward_length": ("int", 1, U32),
    "block_count": ("int", 1, U32),
    "leading_dense_block_count": ("int", 0, U32),
    "attention.head_count": ("int", 1, U32),
    "attention.head_count_kv": ("int", 1, U32),
    "attention.key_length": ("int", 1, U32),
    "attention.value_length": ("int", 1, U32),
    "attention.key_length_mla": ("int", 0, U32),
    "attention.value_length_mla": ("int", 0, U32),
    "attention.q_lora_rank": ("int", 0, U32),
    "attention.kv_lora_rank": ("int", 1, U32),
    "attention.layer_norm_rms_epsilon": ("float", 0),
    "rope.dimension_count": ("int", 1, U32),
    "rope.freq_base": ("float", 1),  # YaRN divides by log(base)
    "rope.scaling.type": ("str",),
    "rope.scaling.factor": ("float", 0),
    "rope.scaling.attn_factor": ("float", 0),
    "rope.scaling.original_context_length": ("int", 1, U32),
    "rope.scaling.yarn_beta_fast": ("float", 0),
    "rope.scaling.yarn_beta_slow": ("float", 0),
    "rope.scaling.yarn_log_multiplier": ("float",),
    "expert_count": ("int", 0, 1 << 16),  # DeepSeek V3 has 256; a larger count is corrupt, not a model
    "expert_used_count": ("int", 0, 1 << 16),
    "expert_shared_count": ("int", 0, 1 << 16),
    "expert_feed_forward_length": ("int", 0, U32),
    "expert_group_count": ("int", 0, 1 << 16),
    "expert_group_used_count": ("int", 0, 1 << 16),
    "expert_gating_func": ("int", 0, U32),
    "expert_weights_scale": ("float",),
    "expert_weights_norm": ("bool",),
    "nextn_predict_layers": ("int", 0, 16),  # multi-token-prediction blocks at the end of block_count
}
_KIND_NAMES = {"str": "a string", "int": "an integer", "float": "a number", "bool": "a bool",
               "str[]": "an array of strings", "int[]": "an array of integers"}


@dataclass(frozen=True)
class Field:
    """One metadata value: its GGUF type (and element type for arrays), and the Python value."""
    type: GGUFValueType
    item_type: GGUFValueType | None
    value: object

    def describe(self) -> str:
        if self.type == V.ARRAY:
            return f"an array of {self.item_type.name.lower()}"
        return f"the {self.type.name.lower()} {self.value!r}"[:80]


@dataclass(frozen=True)
class TensorInfo:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order: (..., rows, row_length)
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int
    raw: np.ndarray  # uint8 view on the mmap: (..., rows, row_bytes) for every type

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return self.shape[-1] // block * size


_U64 = struct.Struct("<Q")


class _Header:
    """A cursor over the header bytes that refuses to read past the end of the file."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.size, self.pos = buf, path, len(buf), 0
        self.what = "the header"  # what is being read, for errors

    def error(self, message: str) -> GGUFError:
        return GGUFError(f"{self.path}: {self.what} {message}")

    def need(self, n: int) -> None:
        if n > self.size - self.pos:
            raise GGUFError(f"{self.path}: truncated or corrupt: {self.what} needs {n} bytes at byte {self.pos}, "
                            f"past the end of the file ({self.size} bytes)")

    def scalar(self, vtype: GGUFValueType):
        fmt = _SCALARS[vtype]
        n = struct.calcsize(fmt)
        self.need(n)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        if vtype == V.BOOL:
            if value > 1:
                raise self.error(f"holds the bool value {value} (0 or 1 allowed)")
            return bool(value)
        return value

    def u32(self) -> int:
        return self.scalar(V.UINT32)

    def u64(self) -> int:
        return self.scalar(V.UINT64)

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        raw = bytes(self.buf[self.pos: self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.error(f"is not valid UTF-8 (byte 0x{raw[e.start]:02x} at {e.start} of {n})") from None

    def strings(self, n: int) -> list[str]:
        """n strings in a row (a vocabulary: 100k and more): one tight loop over lengths and bytes,
        then the checks (an element cut off makes the loop run past the end: read again, checked);
        an element that is cut off or not UTF-8 is named as string() names it."""
        buf, pos, length = self.buf, self.pos, _U64.unpack_from
        items = [b""] * n
        try:
            for i in range(n):
                k = length(buf, pos)[0]
                pos += 8
                items[i] = buf[pos:pos + k]
                pos += k
        except (struct.error, OverflowError):  # a length past the end
            pos = self.size + 1
        if pos > self.size:
            items, pos = self._checked_strings(n)
        self.pos = pos
        try:
            return list(map(bytes.decode, items))
        except UnicodeDecodeError:
            for i, b in enumerate(items):
                try:
                    b.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise self.error(f"element {i} is not valid UTF-8 (byte 0x{b[e.start]:02x} at {e.start} of "
                                     f"{len(b)})") from None
            raise

    def _checked_strings(self, n: int) -> tuple[list, int]:
        """strings()'s loop with a check at every element: raises naming the element cut off."""
        buf, pos, size = self.buf, self.pos, self.size
        length = _U64.unpack_from
        items = [b""] * n
        for i in range(n):
            k = length(buf, pos)[0] if size - pos >= 8 else size
            if size - pos - 8 < k:
                self.pos, self.what = pos, f"{self.what} element {i}"
                self.string()  # raises with the element's name and position
            items[i] = buf[pos + 8: pos + 8 + k]
            pos += 8 + k
        return items, pos

    def count(self, n: int, least_bytes: int, of: str) -> int:
        """A count of items of at least `least_bytes` each, checked against the bytes left."""
        if n * least_bytes > self.size - self.pos:
            raise GGUFError(f"{self.path}: truncated or corrupt: {self.what} claims {n} {of}, more than the "
                            f"{self.size - self.pos} bytes left in the file can hold")
        return n

    def value(self, vtype: int) -> Field:
        vtype = self.value_type(vtype)
        if vtype == V.STRING:
            return Field(vtype, None, self.string())
        if vtype != V.ARRAY:
            return Field(vtype, None, self.scalar(vtype))
        item = self.value_type(self.u32())
        if item == V.ARRAY:
            raise UnsupportedError(f"{self.path}: {self.what} is an array of arrays, which edgeseek does not read")
        if item == V.STRING:
            return Field(vtype, item, self.strings(self.count(self.u64(), 8, "strings")))
        dtype = np.dtype(_SCALARS[item])
        n = self.count(self.u64(), dtype.itemsize, "elements")
        values = np.frombuffer(self.buf, dtype, n, self.pos)
        self.pos += n * dtype.itemsize
        if item == V.BOOL:
            if n and values.max() > 1:
                raise self.error("holds bool values other than 0 and 1")
            values = values.astype(bool)
        return Field(vtype, item, values.tolist())

    def value_type(self, code: int) -> GGUFValueType:
        try:
            return GGUFValueType(code)
        except ValueError:
            raise self.error(f"has unknown value type id {code}") from None


class GGUFFile:
    """Opens `path` and checks that its header, metadata and tensor table are whole and consistent."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
                if magic != b"GGUF":
                    raise GGUFError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(f"{self.path}: cannot read the file ({e.strerror or e})") from e
        self.data = np.frombuffer(self._mmap, np.uint8)  # the whole file, read-only
        h = _Header(self._mmap, self.path)
        h.pos = 4
        version = h.u32()
        if version & 0xFFFF == 0:
            raise UnsupportedError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise UnsupportedError(f"{self.path}: GGUF version {version} is not supported (only 2 and 3)")
        n_tensors, n_kv = h.u64(), h.u64()
        self.fields = self._read_fields(h, n_kv)
        self.arch = self._arch()
        for key, field in self.fields.items():
            self._check_key(key, field)
        infos = self._read_tensor_infos(h, n_tensors)
        align = self.meta("general.alignment", 32)
        if align & (align - 1):
            raise GGUFError(f"{self.path}: metadata key 'general.alignment' is {align}, not a power of two")
        data_start = -(-h.pos // align) * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, qtype, rel in infos:
            self.tensors[name] = self._tensor(name, dims, qtype, data_start, rel, align, size)
        self._check_layout(data_start, align)
        self._check_block_count()

    # --- parsing ----------------------------------------------------------------------------------
    def _read_fields(self, h: _Header, n: int) -> dict[str, Field]:
        fields: dict[str, Field] = {}
        h.what = "the key/value count"
        h.count(n, 8 + 4 + 1, "key/values")
        for i in range(n):
            h.what = f"the name of metadata key #{i}"
            key = h.string()
            h.what = f"metadata key {key!r}"
            if key in fields:
                raise h.error("appears twice")
            fields[key] = h.value(h.u32())
        return fields

    def _read_tensor_infos(self, h: _Header, n: int) -> list[tuple]:
        infos, names = [], set()
        h.what = "the tensor count"
        h.count(n, 8 + 4 + 8 + 4 + 8, "tensors")
        for i in range(n):
            h.what = f"the name of tensor #{i}"
            name = h.string()
            h.what = f"tensor {name!r}"
            if name in names:
                raise h.error("appears twice in the tensor table")
            names.add(name)
            n_dims = h.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise h.error(f"has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
            h.need(8 * n_dims)
            dims = [h.u64() for _ in range(n_dims)]
            if 0 in dims:
                raise h.error(f"has a dimension of 0 (dims {dims})")
            code = h.u32()
            try:
                qtype = GGMLQuantizationType(code)
            except ValueError:
                raise h.error(f"has unknown type id {code}") from None
            if qtype not in GGML_QUANT_SIZES:
                raise h.error(f"has unknown type {qtype.name}")
            infos.append((name, dims, qtype, h.u64()))
        return infos

    def _tensor(self, name, dims, qtype, data_start, rel, align, size) -> TensorInfo:
        shape = tuple(reversed(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        if shape[-1] % block:
            raise GGUFError(f"{self.path}: tensor {name!r} row length {shape[-1]} is not a multiple "
                            f"of the {qtype.name} block size {block}")
        if rel % align:
            raise GGUFError(f"{self.path}: tensor {name!r} offset {rel} is not a multiple of the alignment {align}")
        start = data_start + rel
        n_bytes = math.prod(shape) // block * type_size
        end = start + n_bytes
        if end > size:
            raise GGUFError(f"{self.path}: truncated or corrupt: tensor {name!r} ({qtype.name}, shape {shape}) "
                            f"ends at byte {end}, the file has {size} bytes")
        raw = self.data[start:end].reshape(*shape[:-1], shape[-1] // block * type_size)
        return TensorInfo(name, qtype, shape, start, n_bytes, raw)

    def _check_layout(self, data_start: int, align: int) -> None:
        """Tensor data lie one after the other in table order, each padded to the alignment, as
        ggml's gguf.cpp requires: a damaged type id or dimension, which changes a size, shows."""
        spans = sorted(self.tensors.values(), key=lambda t: t.offset)
        for a, b in zip(spans, spans[1:]):
            if a.offset + a.n_bytes > b.offset:
                raise GGUFError(f"{self.path}: tensors {a.name!r} (bytes {a.offset}..{a.offset + a.n_bytes}) and "
                                f"{b.name!r} (bytes {b.offset}..{b.offset + b.n_bytes}) overlap")
        end, before = data_start, None
        for t in self.tensors.values():
            if t.offset != end:
                after = f"{before.name!r} before it in the table ends" if before else "the tensor data start"
                raise GGUFError(f"{self.path}: tensor {t.name!r} starts at byte {t.offset}, but {after} at byte "
                                f"{end} (sizes and offsets of the tensor table disagree)")
            end, before = t.offset + -(-t.n_bytes // align) * align, t

    def _check_block_count(self) -> None:
        """The layer count bounds loops and per-layer arrays: it may not exceed the layers present."""
        blocks = [int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", name) for name in self.tensors) if m]
        n = self.arch_meta("block_count", None)
        if blocks and n is not None and n > max(blocks) + 1:
            raise GGUFError(f"{self.path}: metadata key '{self.arch}.block_count' is {n}, but the tensors "
                            f"hold {max(blocks) + 1} blocks (blk.0 to blk.{max(blocks)})")

    def _arch(self) -> str:
        field = self.fields.get("general.architecture")
        if field is None:
            raise GGUFError(f"{self.path}: metadata key 'general.architecture' is missing")
        self._check_key("general.architecture", field)
        return field.value

    def _check_key(self, key: str, field: Field) -> None:
        """A key of KEYS holds the kind of value and the range that KEYS gives."""
        spec = KEYS.get(key) or (KEYS.get(key[len(self.arch) + 1:]) if key.startswith(self.arch + ".") else None)
        if spec is None:
            return
        kind, *bounds = spec
        t, v = field.type, field.value
        ok = {"str": t == V.STRING, "bool": t == V.BOOL, "int": t in _INTS, "float": t in _INTS | _FLOATS,
              "str[]": t == V.ARRAY and (field.item_type == V.STRING or not v),
              "int[]": t == V.ARRAY and (field.item_type in _INTS or not v)}[kind]
        if not ok:
            raise GGUFError(f"{self.path}: metadata key {key!r} should be {_KIND_NAMES[kind]}, "
                            f"but holds {field.describe()}")
        if kind == "int" and not bounds[0] <= v <= bounds[1]:
            raise GGUFError(f"{self.path}: metadata key {key!r} is {v}; it should be between {bounds[0]} "
                            f"and {bounds[1]}")
        if kind == "float" and not (math.isfinite(v) and (not bounds or v > bounds[0])):
            raise GGUFError(f"{self.path}: metadata key {key!r} is {v}; it should be a finite number"
                            + (f" above {bounds[0]}" if bounds else ""))

    # --- access -----------------------------------------------------------------------------------
    def meta(self, key: str, default=_MISSING):
        """The value of a metadata key, as a Python scalar, string or list (checked against KEYS)."""
        field = self.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
            return default
        return field.value

    def arch_meta(self, key: str, default=_MISSING):
        """`meta` of a key under the architecture prefix, e.g. `deepseek2.block_count`."""
        return self.meta(f"{self.arch}.{key}", default)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, shape: tuple[int, ...] | None = None) -> TensorInfo:
        """The tensor `name`; with `shape` (numpy order), check that it has that shape."""
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        if shape is not None and tuple(shape) != t.shape:
            raise GGUFError(f"{self.path}: tensor {name!r} has shape {t.shape}, expected {tuple(shape)}")
        return t

    def release_pages(self, tensor: TensorInfo | None = None) -> None:
        """Drop this process's mapping of a tensor's pages, or of the whole file (they stay in the
        page cache; pages touched later fault back in). For weights already copied into another
        layout: their file pages would otherwise count twice in the resident set."""
        if tensor is None:
            self._mmap.madvise(mmap.MADV_DONTNEED)
            return
        start = tensor.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = tensor.offset + tensor.n_bytes
        inner_end = end // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages only: neighbours stay
        if inner_end > start:
            self._mmap.madvise(mmap.MADV_DONTNEED, start, inner_end - start)

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, arch={self.arch!r}, tensors={len(self.tensors)})"

"""Reading safetensors files without the safetensors package: row ranges of one tensor at a time.

Format (huggingface/safetensors README): an 8-byte little-endian header length N, N bytes of JSON
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the raw
little-endian data; offsets count from the end of the header.

Rows are read with os.pread into fresh buffers rather than through a memory map, so the only pages a
conversion keeps resident are the rows it is working on (file pages stay in the page cache, outside
the process's RSS).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeseek.errors import EdgeseekError, UnsupportedError

# safetensors dtype -> (bytes per value, numpy dtype of the raw values)
RAW_DTYPES = {
    "F32": (4, np.float32), "F16": (2, np.float16), "BF16": (2, np.uint16), "F8_E4M3": (1, np.uint8),
    "F64": (8, np.float64),
}
# Dtypes that exist in checkpoints but hold no weights we convert (integer buffers, other FP8 kinds).
KNOWN_DTYPES = set(RAW_DTYPES) | {"I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E5M2", "U16", "U32", "U64"}


def _e4m3fn_table() -> np.ndarray:
    """float32 value of each FP8 e4m3fn byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
    infinities, 0x7F / 0xFF are NaN; subnormals at exponent 0 (OCP 8-bit floating point spec)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(exp == 15) & (man == 7)] = np.nan
    return val.astype(np.float32)


E4M3FN = _e4m3fn_table()  # (256,) float32


def bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie."""
    name: str
    path: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def rows(self) -> int:  # leading dimension (1 for a scalar)
        return self.shape[0] if self.shape else 1

    @property
    def row_values(self) -> int:  # values per row: the product of the other dimensions
        return int(np.prod(self.shape[1:], dtype=np.int64))

    def check_readable(self):
        if self.dtype not in RAW_DTYPES:
            raise UnsupportedError(f"{self.path.name}: tensor {self.name!r} has dtype {self.dtype}, which the converter "
                                   f"cannot read (readable: F32, F16, BF16, F8_E4M3 with weight_scale_inv)")


def read_header(path: Path) -> dict[str, TensorRef]:
    """Tensor name -> TensorRef for one .safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EdgeseekError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100 << 20:
                raise EdgeseekError(f"{path}: not a safetensors file (header length {n} beyond the file)")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeseekError(f"{path}: cannot read the safetensors header: {e}") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        ref = TensorRef(name, path, info["dtype"], tuple(info["shape"]), base + begin, end - begin)
        if base + end > size:
            raise EdgeseekError(f"{path}: tensor {name!r} runs past the end of the file (truncated download?)")
        if ref.dtype in RAW_DTYPES:
            want = RAW_DTYPES[ref.dtype][0] * int(np.prod(ref.shape, dtype=np.int64))
            if want != ref.nbytes:
                raise EdgeseekError(f"{path}: tensor {name!r} has {ref.nbytes} bytes, {ref.dtype} {list(ref.shape)} "
                                    f"needs {want}")
        out[name] = ref
    return out


def read_raw(ref: TensorRef, r0: int = 0, r1: int | None = None) -> np.ndarray:
    """Rows [r0, r1) of a tensor as its raw dtype, shape (r1 - r0, *shape[1:])."""
    ref.check_readable()
    r1 = ref.rows if r1 is None else r1
    itemsize, dt = RAW_DTYPES[ref.dtype]
    row_bytes = itemsize * ref.row_values
    buf = np.empty((r1 - r0) * row_bytes, np.uint8)
    fd = os.open(ref.path, os.O_RDONLY)
    try:
        view, pos, done = memoryview(buf), ref.offset + r0 * row_bytes, 0
        while done < len(buf):
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise EdgeseekError(f"{ref.path}: unexpected end of file reading {ref.name!r}")
            done += n
    finally:
        os.close(fd)
    return buf.view(dt).reshape((r1 - r0, *ref.shape[1:]) if ref.shape else ())


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw values of a safetensors dtype -> float32 (FP8 unscaled)."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    if dtype == "F8_E4M3":
        return E4M3FN[raw]
    return raw.astype(np.float32, copy=False)

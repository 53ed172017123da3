"""One table of quant formats: each format module registers a `QuantFormat` subclass here.

A format owns its block layout, its numba dequantizer, its repacked layout for the kernels and the
kernels themselves (matrix-vector for decode, matrix-matrix for prefill); nothing outside the
format's module knows its bytes. Block and byte sizes come from gguf's GGML_QUANT_SIZES table.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from edgeseek.errors import UnsupportedError

FORMATS: dict[GGMLQuantizationType, "QuantFormat"] = {}


class QuantFormat:
    """Base of every format. Subclasses set `qtype` and are registered on definition."""

    qtype: GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.qtype]
        if "qtype" in cls.__dict__:  # a shared base class names no type of its own
            FORMATS[cls.qtype] = cls()

    # --- reference ------------------------------------------------------------------------------
    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """(n_blocks, type_size) uint8 -> (n_blocks * block_size,) float32, bit-exact with gguf-py."""
        raise NotImplementedError

    # --- kernels --------------------------------------------------------------------------------
    def pack(self, raw: np.ndarray):
        """(rows, row_bytes) uint8 rows of the file -> the layout the kernels read (any object)."""
        raise NotImplementedError

    def matvec(self, packed, x: np.ndarray) -> np.ndarray:
        """W @ x for one activation vector: x (K,) float32 -> (N,) float32."""
        raise NotImplementedError

    def matmul(self, packed, x: np.ndarray) -> np.ndarray:
        """Batched: x (T, K) float32 -> (T, N) float32 (prompt processing, several sequences)."""
        raise NotImplementedError

    def matmul_many(self, packeds: list, x: np.ndarray, rows) -> np.ndarray | None:
        """Several matrices of one shape at once (a layer's routed experts for one token): matrix j
        times activation row rows[j] of x (R, K) -> (len(packeds), N), in one parallel region;
        each row equal to what matvec gives. None where the format has no such kernel."""
        return None

    # --- compiling ------------------------------------------------------------------------------
    def warmup(self, n_many: int = 0) -> None:
        """Run each kernel of the format once on a small matrix, so that numba compiles it (or loads
        it from its cache) now rather than at the first token: with the argument types the model
        passes (a read-only matrix as the file's mmap gives it, or a writable copy; one and two
        activation rows; `n_many` matrices in one matmul_many call, a decode step's experts)."""
        rng = np.random.default_rng(0)
        rows, k = 64, 256  # one tile of rows; whole blocks of every format, K-quants' 256 included
        # (rows, row_bytes) of random bytes: the values do not matter, and quantizing would compile
        # the quantizer, which running a model never needs
        raw = rng.integers(0, 256, (rows, k // self.block_size * self.type_size), dtype=np.uint8)
        x = rng.standard_normal((2, k)).astype(np.float32)
        mapped = raw.copy()
        mapped.setflags(write=False)
        for r in (raw, mapped):
            packed = self.pack(r)
            self.dequantize(r[:1].reshape(-1, self.type_size))
        self.matvec(packed, x[0])
        self.matmul(packed, x)
        if n_many > 1:
            self.matmul_many([packed] * n_many, x[:1], [0] * n_many)


def get_format(qtype) -> QuantFormat:
    fmt = FORMATS.get(GGMLQuantizationType(qtype))
    if fmt is None:
        raise UnsupportedError(
            f"quant type {GGMLQuantizationType(qtype).name} is not supported; supported: "
            + ", ".join(sorted(f.name for f in FORMATS))
        )
    return fmt

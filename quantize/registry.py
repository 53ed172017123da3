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


def get_format(qtype) -> QuantFormat:
    fmt = FORMATS.get(GGMLQuantizationType(qtype))
    if fmt is None:
        raise UnsupportedError(
            f"quant type {GGMLQuantizationType(qtype).name} is not supported; supported: "
            + ", ".join(sorted(f.name for f in FORMATS))
        )
    return fmt

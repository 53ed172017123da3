"""F32, F16 and BF16 weights. Packing converts to float32 rows once and the products go to numpy's
BLAS. llama.cpp rounds activations to the weight's type before an F16/BF16 product; so do these."""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .registry import QuantFormat


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def _round_bf16(x: np.ndarray) -> np.ndarray:
    # round to nearest even on the upper 16 bits, as ggml's fp32 -> bf16
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return _bf16_to_f32(((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16))


class _Float(QuantFormat):
    qtype = GGMLQuantizationType.F32  # block and byte sizes; each subclass names its own type

    def to_f32(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def round_activations(self, x: np.ndarray) -> np.ndarray:
        return x

    def dequantize(self, blocks):
        return self.to_f32(np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1))

    def pack(self, raw):
        return self.to_f32(np.ascontiguousarray(raw).reshape(-1)).reshape(raw.shape[0], -1)  # (N, K)

    def matvec(self, packed, x):
        return packed @ self.round_activations(x)

    def matmul(self, packed, x):
        return self.round_activations(x) @ packed.T


class F32(_Float):
    qtype = GGMLQuantizationType.F32

    def to_f32(self, raw):
        return raw.view(np.float32).copy()


class F16(_Float):
    qtype = GGMLQuantizationType.F16

    def to_f32(self, raw):
        return raw.view(np.float16).astype(np.float32)

    def round_activations(self, x):
        return x.astype(np.float16).astype(np.float32)


class BF16(_Float):
    qtype = GGMLQuantizationType.BF16

    def to_f32(self, raw):
        return _bf16_to_f32(raw.view(np.uint16))

    def round_activations(self, x):
        return _round_bf16(x)

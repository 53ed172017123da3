"""F32, F16 and BF16 weights.

No repacking: the kernels read the file's rows as they are (a view on the mmap), so a big F16 or
BF16 matrix is never doubled into float32. matvec decodes each half inside a numba loop over the
row (vectorized, float32 sums); matmul decodes a chunk of rows at a time into float32 and hands it
to BLAS, so the prefill runs at BLAS speed with one chunk of extra memory. F32: the same numba
matvec, BLAS for the matmul. As llama.cpp does (vec_dot_type of F16 and BF16 in ggml-cpu.c), the activations are
rounded to the weight's type before the product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType
from llvmlite import ir
from numba import njit, prange, types, uint32
from numba.extending import intrinsic

from .activations import f32_from_bits
from .registry import QuantFormat

F32 = np.float32
CHUNK_VALUES = 1 << 22  # float32 values decoded per BLAS call in matmul (16 MB)


@intrinsic
def f16_to_f32(typingctx, bits):
    """IEEE half bits (uint16) -> float32, exact: LLVM's fpext from half, which x86 with F16C runs
    as vcvtph2ps (numba has no float16 type of its own)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@njit(cache=True, inline="always")
def bf16_to_f32(h):
    return f32_from_bits(uint32(uint32(h) << uint32(16)))


# One kernel per stored type, written out: numba's cache cannot keep a closure over another
# dispatcher (a kernel built around a `decode` argument), so such kernels were compiled anew in
# every process. fastmath reassoc lets LLVM keep vector partial sums along a row (as llama.cpp's
# ggml_vec_dot_f16 does). w (N, K) rows of the file, x (K,) float32 -> y (N,).

@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _matvec_f32(w, x, y):
    for i in prange(w.shape[0]):
        s = F32(0.0)
        for k in range(w.shape[1]):
            s += w[i, k] * x[k]
        y[i] = s


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _matvec_f16(w, x, y):
    for i in prange(w.shape[0]):
        s = F32(0.0)
        for k in range(w.shape[1]):
            s += f16_to_f32(w[i, k]) * x[k]
        y[i] = s


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def _matvec_bf16(w, x, y):
    for i in prange(w.shape[0]):
        s = F32(0.0)
        for k in range(w.shape[1]):
            s += bf16_to_f32(w[i, k]) * x[k]
        y[i] = s


@njit(parallel=True, cache=True)
def _to_f32_f16(w, out):
    # w (n, K) rows of the file -> out (n, K) float32
    for i in prange(w.shape[0]):
        for k in range(w.shape[1]):
            out[i, k] = f16_to_f32(w[i, k])


@njit(parallel=True, cache=True)
def _to_f32_bf16(w, out):
    for i in prange(w.shape[0]):
        for k in range(w.shape[1]):
            out[i, k] = bf16_to_f32(w[i, k])


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 values as uint16 bits (ggml_compute_fp32_to_bf16: round to
    nearest even, nan kept quiet), as gguf-py's BF16 quantizer."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    u = np.where((u & 0x7FFFFFFF) > 0x7F800000, (u & np.uint32(0xFFFF0000)) | np.uint32(64 << 16), u)
    return ((u.astype(np.uint64) + (0x7FFF + ((u >> 16) & 1))) >> 16).astype(np.uint16)


def _bf16_bits_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


def round_f16(x: np.ndarray) -> np.ndarray:
    """Activations rounded to fp16 and back, as llama.cpp rounds them before an F16 product."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def round_bf16_f32(x: np.ndarray) -> np.ndarray:
    """Activations rounded to bf16 and back, as llama.cpp rounds them before a BF16 product."""
    return _bf16_bits_to_f32(round_bf16(x))


@dataclass(frozen=True)
class RowKernels:
    """The file's rows as they are: (N, K) of `dtype`, a view on the mmap. matvec: the numba kernel
    `matvec_kernel(w, x, y)`; matmul: BLAS, F16 and BF16 rows decoded by `to_f32(w, out)` a chunk
    at a time. `round_activations` rounds x to the weight's type first (None for F32)."""

    dtype: type
    matvec_kernel: Callable
    to_f32: Callable | None = None
    round_activations: Callable | None = None

    def pack(self, blocks):
        return blocks.reshape(blocks.shape[0], -1).view(self.dtype)  # (N, K), a view on the file

    def blocks_per_row(self, w) -> int:
        return w.shape[1]

    def matvec(self, w, x):
        # numba rather than BLAS: on a few cores, BLAS's own thread pool next to numba's
        # oversubscribes them
        if self.round_activations is not None:
            x = self.round_activations(x)
        y = np.empty(w.shape[0], np.float32)
        self.matvec_kernel(w, x, y)
        return y

    def matvecs(self, ws, x):
        return [self.matvec(w, x) for w in ws]

    def matmul(self, w, x):
        if self.to_f32 is None:
            return x @ w.T
        x = self.round_activations(x)  # (T, K)
        n, k = w.shape
        y = np.empty((x.shape[0], n), np.float32)
        rows = max(64, CHUNK_VALUES // max(k, 1))
        buf = np.empty((min(rows, n), k), np.float32)
        for i in range(0, n, rows):
            chunk = buf[:min(rows, n - i)]
            self.to_f32(w[i:i + rows], chunk)
            np.matmul(x, chunk.T, out=y[:, i:i + rows])
        return y

    def matmul_many(self, ws, x, rows):
        return None


class F32Format(QuantFormat):
    qtype = GGMLQuantizationType.F32
    portable = RowKernels(np.float32, _matvec_f32)

    def quantize_blocks(self, x):
        return x.view(np.uint8)  # (n, 1) float32 -> (n, 4) uint8

    def dequantize_blocks(self, blocks):
        return blocks.view(np.float32).copy()


class F16(QuantFormat):
    qtype = GGMLQuantizationType.F16
    portable = RowKernels(np.uint16, _matvec_f16, _to_f32_f16, round_f16)
    round_activations = staticmethod(round_f16)

    def quantize_blocks(self, x):
        """Round to nearest even, as numpy and ggml."""
        return x.astype(np.float16).view(np.uint8)

    def dequantize_blocks(self, blocks):
        return blocks.view(np.float16).astype(np.float32)


class BF16(QuantFormat):
    qtype = GGMLQuantizationType.BF16
    portable = RowKernels(np.uint16, _matvec_bf16, _to_f32_bf16, round_bf16_f32)
    round_activations = staticmethod(round_bf16_f32)

    def quantize_blocks(self, x):
        """Bit-identical to gguf-py's BF16."""
        return round_bf16(x).view(np.uint8)

    def dequantize_blocks(self, blocks):
        return _bf16_bits_to_f32(blocks.view(np.uint16))

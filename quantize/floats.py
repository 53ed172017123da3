"""F32, F16 and BF16 weights.

No repacking: the kernels read the file's rows as they are (a view on the mmap), so a big F16 or
BF16 matrix is never doubled into float32. matvec decodes each half inside a numba loop over the
row (vectorized, float32 sums); matmul decodes a chunk of rows at a time into float32 and hands it
to BLAS, so the prefill runs at BLAS speed with one chunk of extra memory. F32: the same numba
matvec, BLAS for the matmul. As llama.cpp does (vec_dot_type of F16 and BF16 in ggml-cpu.c), the activations are
rounded to the weight's type before the product.
"""
from __future__ import annotations

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


class F32Format(QuantFormat):
    qtype = GGMLQuantizationType.F32

    def dequantize(self, blocks):
        return np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1).view(np.float32).copy()

    def quantize(self, x):
        """(..., K) float32 -> (..., 4 K) uint8."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x.view(np.uint8).reshape(*x.shape[:-1], -1)

    def pack(self, raw):
        return np.asarray(raw, dtype=np.uint8).view(np.float32)  # (N, K), a view on the file

    def matvec(self, packed, x):
        # numba rather than BLAS: on a few cores, BLAS's own thread pool next to numba's
        # oversubscribes them
        y = np.empty(packed.shape[0], np.float32)
        _matvec_f32(packed, np.ascontiguousarray(x, dtype=np.float32), y)
        return y

    def matmul(self, packed, x):
        return np.asarray(x, dtype=np.float32) @ packed.T


class _Half(QuantFormat):
    """F16 and BF16: rows of 16-bit floats, read in place."""

    qtype = GGMLQuantizationType.F16  # block and byte sizes; each subclass names its own type

    def pack(self, raw):
        return np.asarray(raw, dtype=np.uint8).view(np.uint16)  # (N, K), a view on the file

    def dequantize(self, blocks):
        return self.bits_to_f32(np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1).view(np.uint16))

    def matvec(self, packed, x):
        x = self.round_activations(x)
        y = np.empty(packed.shape[0], np.float32)
        self._matvec(packed, x, y)
        return y

    def matmul(self, packed, x):
        x = self.round_activations(x)  # (T, K)
        n, k = packed.shape
        y = np.empty((x.shape[0], n), np.float32)
        rows = max(64, CHUNK_VALUES // max(k, 1))
        buf = np.empty((min(rows, n), k), np.float32)
        for i in range(0, n, rows):
            w = buf[:min(rows, n - i)]
            self._to_f32(packed[i:i + rows], w)
            np.matmul(x, w.T, out=y[:, i:i + rows])
        return y


class F16(_Half):
    qtype = GGMLQuantizationType.F16
    _matvec = staticmethod(_matvec_f16)
    _to_f32 = staticmethod(_to_f32_f16)

    @staticmethod
    def bits_to_f32(u16):
        return u16.view(np.float16).astype(np.float32)

    @staticmethod
    def round_activations(x):
        return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)

    def quantize(self, x):
        """(..., K) float32 -> (..., 2 K) uint8 (round to nearest even, as numpy and ggml)."""
        h = np.ascontiguousarray(x, dtype=np.float32).astype(np.float16)
        return h.view(np.uint8).reshape(*h.shape[:-1], -1)


class BF16(_Half):
    qtype = GGMLQuantizationType.BF16
    _matvec = staticmethod(_matvec_bf16)
    _to_f32 = staticmethod(_to_f32_bf16)

    @staticmethod
    def bits_to_f32(u16):
        return _bf16_bits_to_f32(u16)

    @staticmethod
    def round_activations(x):
        return _bf16_bits_to_f32(round_bf16(x))

    def quantize(self, x):
        """(..., K) float32 -> (..., 2 K) uint8, bit-identical to gguf-py's BF16."""
        h = round_bf16(x)
        return h.view(np.uint8).reshape(*h.shape[:-1], -1)

"""Bootstrap: every supported type through gguf-py's numpy dequantizer and a dense product.

Slow and memory-hungry (it dequantizes whole matrices); each numba format module that registers
the same qtype later replaces the entry. Kept only until every format has its own module.
"""
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

from .registry import FORMATS, QuantFormat


def _make(qt):
    if qt in FORMATS:
        return

    class _Ref(QuantFormat):
        qtype = qt

        def dequantize(self, blocks):
            return quants.dequantize(blocks.reshape(-1), qt).reshape(-1).astype(np.float32)

        def pack(self, raw):
            n = raw.shape[0]
            return quants.dequantize(np.ascontiguousarray(raw), qt).reshape(n, -1).astype(np.float32)

        def matvec(self, packed, x):
            return packed @ x

        def matmul(self, packed, x):
            return x @ packed.T

    _Ref.__name__ = f"Reference{qt.name}"


for _qt in (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K):
    _make(_qt)

"""QMatrix: a weight matrix in its quantized form, with the kernels of its format attached.

The model code only ever does `W(x)`: x (K,) for decode or (T, K) for a batch of tokens.
The repacked layout is built lazily on first use, so loading a model touches no weight bytes.
"""
from __future__ import annotations

import numpy as np

from .activations import FEW_ROWS
from .registry import get_format


def packed_nbytes(packed) -> int:
    """Bytes of the arrays of a packed layout (a NamedTuple of arrays, or one array)."""
    if isinstance(packed, np.ndarray):
        return packed.nbytes
    return sum(a.nbytes for a in packed if isinstance(a, np.ndarray))


class QMatrix:
    __slots__ = ("fmt", "raw", "shape", "_packed", "name", "_bound")

    def __init__(self, qtype, raw: np.ndarray, shape: tuple[int, int], name: str = ""):
        self.fmt = get_format(qtype)
        self.raw = raw  # (N, row_bytes) uint8, a view on the file's mmap
        self.shape = shape  # (N, K): y = W @ x
        self.name = name
        self._packed = None
        self._bound = None  # (the layout it was bound to, the format's bound product of it)

    @property
    def packed(self):
        if self._packed is None:
            self._packed = self.fmt.pack(self.raw)
        return self._packed

    @classmethod
    def from_packed(cls, qtype, packed, shape: tuple[int, int], name: str = "") -> "QMatrix":
        """A matrix that exists only in the kernel layout (an expert read from disk and packed):
        it computes, it has no file bytes to dequantize."""
        m = cls(qtype, None, shape, name)
        m._packed = packed
        return m

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized weights as the file holds them."""
        return self.raw.nbytes if self.raw is not None else packed_nbytes(self._packed)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim == 2 and 0 < len(x) <= FEW_ROWS and x.shape[1] == self.shape[1]:  # a decode step's token, a
            call = self.bound()  # verification's few: the bound product
            if call is not None:
                return call(x)[0]
        if x.ndim == 1:
            return self.fmt.matvec(self.packed, x)
        if x.shape[0] == 1:
            return self.fmt.matvec(self.packed, x[0])[None, :]
        return self.fmt.matmul(self.packed, x)

    def bound(self):
        """The format's bound product of this matrix (QuantFormat.bind), made on first use and again
        when the layout changes (a fused group's view); None where the format has none."""
        b, packed = self._bound, self.packed
        if b is None or b[0] is not packed:
            b = self._bound = (packed, self.fmt.bind([packed]))
        return b[1]

    @property
    def resident_bytes(self) -> int:
        """Bytes this matrix holds in RAM in the kernel layout (0 until packed)."""
        return packed_nbytes(self._packed) if self._packed is not None else 0

    def dequantize(self) -> np.ndarray:
        """The whole matrix as float32 (N, K): for small tensors and tests, never a hot path."""
        n, k = self.shape
        blocks = self.raw.reshape(-1, self.fmt.type_size)
        return self.fmt.dequantize(blocks).reshape(n, k)

    def __repr__(self) -> str:
        return f"QMatrix({self.name!r}, {self.fmt.qtype.name}, {self.shape})"

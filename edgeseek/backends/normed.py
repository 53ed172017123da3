"""A decode token's norm handed to the products that read it (models/backend.py `normed`)."""
from __future__ import annotations

import numpy as np


class Normed:
    """rms_norm(x, weight, eps) of one decode token, not yet made: the backend's products that
    read it (a layer's first products; on a GPU also the router) normalize x in their own launch
    or call, so that the norm costs none of its own; any other reader gets the norm's output,
    made once (rows(), or numpy's conversion where the backend's arrays are numpy's)."""

    __slots__ = ("x", "weight", "eps", "y", "_make")
    ndim = 2

    def __init__(self, x, weight, eps: float, make):
        self.x, self.weight, self.eps, self.y, self._make = x, weight, eps, None, make

    @property
    def shape(self) -> tuple[int, int]:
        return self.x.shape

    def __len__(self) -> int:
        return len(self.x)

    def rows(self):
        """The norm's output (T, D), made on first use."""
        if self.y is None:
            self.y = self._make(self.x, self.weight, self.eps)
        return self.y

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.rows(), dtype=dtype)


def rows(x):
    """x, or a Normed's rows."""
    return x.rows() if isinstance(x, Normed) else x

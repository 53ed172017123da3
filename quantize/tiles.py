"""The rows-innermost tile layout and the kernel drivers shared by the 32-value block formats.

A matrix of N rows is cut into tiles of TILE rows; within a tile, for each block and each byte
position, that byte of every row of the tile sits side by side. The inner loops then run over rows
with unit stride, which LLVM vectorizes (one zmm register holds 16 rows' int32 sums). Scales and
mins are pre-converted to float32 at pack time. Activations are int8 per 32-value block
(activations.py), products are summed in int32 per block, then scaled in float32.

Each format writes its block dot product `dot(qs, qh, xq, isum)` (qs (bytes, TILE) of one block,
qh (TILE,) uint32 high bits or a placeholder, xq (32,) int8 -> isum (TILE,) int32) and the two
small prange drivers `_matvec` / `_matmul` around it (alike in every format); numba cannot cache kernels
that take a function as an argument, so each format compiles its own.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .activations import QK, quantize_q8

TILE = 64


def to_tiles(a: np.ndarray) -> np.ndarray:
    """(N, nb, *rest) -> (n_tiles, nb, *rest, TILE), rows padded with zeros to a whole tile."""
    n = a.shape[0]
    nt = (n + TILE - 1) // TILE
    padded = np.zeros((nt * TILE,) + a.shape[1:], a.dtype)
    padded[:n] = a
    t = padded.reshape((nt, TILE) + a.shape[1:])
    return np.ascontiguousarray(np.moveaxis(t, 1, -1))


def fp16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of each block, as float32: (N, nb, type_size) -> (N, nb)."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


@njit(cache=True, inline="always")
def scale_add(acc, isum, d, m, xd, xs, has_min):
    if has_min:
        for r in range(acc.shape[0]):
            acc[r] += np.float32(isum[r]) * (d[r] * xd) + m[r] * xs
    else:
        for r in range(acc.shape[0]):
            acc[r] += np.float32(isum[r]) * (d[r] * xd)


NO_QH = np.zeros((1, 1, TILE), np.uint32)


def matvec(kernel, p, x: np.ndarray) -> np.ndarray:
    """p: a packed tuple (qs, qh, d, m, n_rows) as the formats build it; x (K,) -> (N,)."""
    qs, qh, d, m, n = p
    xq, xd, xs = quantize_q8(x.reshape(1, -1))
    y = np.empty((qs.shape[0], TILE), np.float32)
    kernel(qs, qh, d, m if m is not None else d, m is not None, xq[0], xd[0], xs[0], y)
    return y.reshape(-1)[:n]


def matmul(kernel, p, x: np.ndarray) -> np.ndarray:
    """x (T, K) -> (T, N); `kernel` reads each block of a tile once for all T tokens."""
    qs, qh, d, m, n = p
    xq, xd, xs = quantize_q8(x)
    y = np.empty((qs.shape[0], x.shape[0], TILE), np.float32)
    kernel(qs, qh, d, m if m is not None else d, m is not None, xq, xd, xs, y)
    return y.transpose(1, 0, 2).reshape(x.shape[0], -1)[:, :n]


@njit(cache=True, inline="always")
def qh_at(qh, t, b):
    """The high bits of tile t, block b, or the placeholder's row for formats without them."""
    return qh[min(np.int64(t), qh.shape[0] - 1), min(np.int64(b), qh.shape[1] - 1)]

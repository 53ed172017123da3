"""The rows-innermost tile layout of the 32-value block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
and its packers.

A matrix of N rows is cut into tiles of TILE rows. Within a tile, for each block and each 32-bit
word (Q8_0: each byte) of the block's quants, that word of every row of the tile lies side by side:
(n_tiles, nb, words, TILE). The inner loops of the kernels run across the rows of a tile with unit
stride, which LLVM vectorizes: one zmm register holds 16 rows, products of 16-bit-range integers
become vpmaddwd / vpdpwssd. Scales and mins are float32 in the portable layouts; the VNNI layouts
keep the file's fp16 bits and their kernels widen them as they read (decode reads every byte of the
weights once: 18 bytes a Q4_0 block as in the file, not 20). Activations are int8 per 32-value block
(activations.py); products are summed in int32 per block and scaled in float32, as llama.cpp's
ggml_vec_dot_q4_0_q8_0 and its siblings do (ggml-cpu/arch/x86/quants.c).

Each format module writes its kernel `_matmul(p, xq, xd, xsum, xs, y)` the same way: prange over
row tiles; for each block of the tile, for each of the T activation rows, one vectorized loop over
the rows of the tile. A block is read from memory once and used for every token while it sits in
L1, so the matmul (prefill) is compute bound, not bound by memory bandwidth; the matvec is the
matmul of one token. The block products are inline="always" helpers: a call of a numba function
costs two atomic reference counts per array argument, too much per block; and the kernel is not a
shared driver taking the format's function as an argument: numba's cache cannot store functions
typed on another dispatcher, nor closures over one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from .simd import prefetch

TILE = 64  # rows per tile: 4 zmm registers of int32 lanes; small enough to balance 576-row matrices
# The VNNI kernels of the 4- and 5-bit formats ask for each of their weight arrays' lines this many
# blocks ahead of the block they multiply (`ahead`), on a tile's first row only: the hardware
# prefetcher alone left a matvec at 28-31 GB/s where the same kernel reaches 40-45 (Q4_0, Q4_1, Q5_0
# over 102400 x 2048 on 2 AVX2 cores, bench_kernels.py), a layer's routed experts at 23-27 GB/s
# against 30-37. Q8_0 and Q6_K gained nothing (Q6_K lost a tenth) and read without it.
PREFETCH_BLOCKS = 4
LINE = 64  # bytes of a cache line


class Packed(NamedTuple):
    """A matrix in the kernel layout. Unused fields hold an empty (0, 0, 0) array."""

    qs: np.ndarray  # (n_tiles, nb, words, TILE): uint32 words of 4-bit quants; Q8_0: (.., 32, TILE) uint8 q + 128
    qh: np.ndarray  # (n_tiles, nb, TILE) uint32: fifth bits of the 5-bit formats
    d: np.ndarray  # (n_tiles, nb, TILE) float32 scales; the VNNI layouts: uint16 fp16 bits
    m: np.ndarray  # (n_tiles, nb, TILE) mins (Q4_1, Q5_1), as d
    n: int  # rows of the matrix; the last tile is padded with zero rows


NONE = np.zeros((0, 0, 0), np.float32)


@njit(cache=True, inline="always")
def ahead(a, o, n):
    """Prefetch the n elements of `a` that lie PREFETCH_BLOCKS blocks past a.flat[o:o + n], a block's
    share of that array: one hint per cache line (past the array's end they are dropped)."""
    if PREFETCH_BLOCKS > 0:
        start = o + PREFETCH_BLOCKS * n
        for i in range(0, n, max(LINE // a.itemsize, 1)):
            prefetch(a, start + i)


def fp16_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 at byte `offset` of each block, as float32: (N, nb, type_size) -> (N, nb)."""
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


# --- packing in one pass (numba, without the GIL, so that packing can run beside other threads) --


# Loops run over the rows of a tile innermost: the writes are sequential and the rows' blocks
# being read stay in L1 across the words of a block.
F16_TO_F32 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, nogil=True)
def tile_words(blocks, start, out):
    """out[t, b, w, i] = little-endian uint32 at byte start + 4w of block b of row t * TILE + i:
    blocks (N, nb, type_size) uint8, out (n_tiles, nb, words, TILE) uint32 (zeroed padding rows)."""
    n = blocks.shape[0]
    for t in range(out.shape[0]):
        rows = min(TILE, n - t * TILE)
        for b in range(blocks.shape[1]):
            for w in range(out.shape[2]):
                o = start + 4 * w
                for i in range(rows):
                    r = t * TILE + i
                    out[t, b, w, i] = (np.uint32(blocks[r, b, o]) | (np.uint32(blocks[r, b, o + 1]) << np.uint32(8))
                                       | (np.uint32(blocks[r, b, o + 2]) << np.uint32(16))
                                       | (np.uint32(blocks[r, b, o + 3]) << np.uint32(24)))


@njit(cache=True, nogil=True)
def tile_bytes(blocks, start, flip, out):
    """out[t, b, j, i] = byte start + j of block b of row t * TILE + i, xor flip: (n_tiles, nb, n, TILE) uint8."""
    n = blocks.shape[0]
    for t in range(out.shape[0]):
        rows = min(TILE, n - t * TILE)
        for b in range(blocks.shape[1]):
            for j in range(out.shape[2]):
                for i in range(rows):
                    out[t, b, j, i] = blocks[t * TILE + i, b, start + j] ^ flip


@njit(cache=True, nogil=True)
def _tile_fp16(blocks, offset, table, out):
    n = blocks.shape[0]
    for t in range(out.shape[0]):
        rows = min(TILE, n - t * TILE)
        for b in range(blocks.shape[1]):
            for i in range(rows):
                r = t * TILE + i
                out[t, b, i] = table[np.int64(blocks[r, b, offset]) | (np.int64(blocks[r, b, offset + 1]) << 8)]


_HALF_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)


def tile_scales(n: int, blocks, offset, halves: bool) -> np.ndarray:
    """The fp16 at byte offset of each block of a matrix of n rows, (n_tiles, nb, TILE): as float32,
    or with `halves` its bits as they are (uint16), which the VNNI kernels widen with simd.load_h as
    they read them (2 bytes a row's block, not 4)."""
    out = tiled(n, blocks.shape[1], dtype=np.uint16 if halves else np.float32)
    _tile_fp16(blocks, offset, _HALF_BITS if halves else F16_TO_F32, out)
    return out


def zeros(shape: tuple, dtype=np.uint32) -> np.ndarray:
    """Zeros of `shape` from the start of a cache line, as the packed-weights cache lays its arrays:
    with numpy's 16-byte alignment three arrays in four would have a kernel's 64-byte loads straddle
    two lines."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = np.zeros(nbytes + LINE, np.uint8)
    start = -buf.ctypes.data % LINE
    return buf[start:start + nbytes].view(dtype).reshape(shape)


def aligned(a: np.ndarray, dtype=None) -> np.ndarray:
    """a's values as a C-contiguous array of `dtype` (a's own by default) from the start of a cache
    line (as zeros): a itself where it already is one, else one copy."""
    dtype = a.dtype if dtype is None else np.dtype(dtype)
    if a.dtype == dtype and a.flags.c_contiguous and a.ctypes.data % LINE == 0:
        return a
    out = zeros(a.shape, dtype)
    out[...] = a
    return out


def tiled(n: int, nb: int, *inner, dtype=np.uint32) -> np.ndarray:
    """Zeros of shape (n_tiles, nb, *inner, TILE) for a matrix of n rows, from a cache line's start."""
    return zeros((-(-n // TILE), nb, *inner, TILE), dtype)


def fused(packeds: list) -> tuple[Packed, list[Packed]] | None:
    """Matrices of one format and row width as one: their tiles one after another, so that a
    product of one input with all of them (a layer's q, k and v; a feed-forward's gate and up) is
    one kernel call and its output their outputs side by side. -> (the fused layout, each matrix's
    layout as a view of it), or None where the matrices are not Packed of one kind or a matrix but
    the last has rows that are no whole number of tiles."""
    if not all(type(p) is Packed for p in packeds) or any(p.n % TILE for p in packeds[:-1]):
        return None
    fields = []
    for f in ("qs", "qh", "d", "m"):
        arrays = [getattr(p, f) for p in packeds]
        if any(a.shape[1:] != arrays[0].shape[1:] or a.dtype != arrays[0].dtype for a in arrays):
            return None
        fields.append(arrays[0] if arrays[0].size == 0 else np.concatenate(arrays))
    whole = Packed(*fields, sum(p.n for p in packeds))
    views, t = [], 0
    for p in packeds:
        k = p.qs.shape[0]
        views.append(Packed(*(a if a.size == 0 else a[t:t + k] for a in fields), p.n))
        t += k
    return whole, views

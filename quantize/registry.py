"""One table of quant formats: each format module registers a `QuantFormat` subclass here.

A format's module holds its block layout, its quantizer and dequantizer of blocks, its packed
layouts and the numba kernels over them; nothing outside that module knows its bytes. What every
format shares lives here, as in gguf-py's quants.py: block and byte sizes from gguf's
GGML_QUANT_SIZES, rows <-> blocks reshaping and the checks of arguments, the choice between a
format's VNNI kernels and its portable ones, and the Python side of the tile kernels (activations
in, (T, N) out, several matrices in one call).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
from gguf import GGMLQuantizationType
from gguf.constants import GGML_QUANT_SIZES

from edgeseek.errors import UnsupportedError

from .activations import FEW_ROWS, FEW_VALUES, NO_NORM, PROLOGUES
from .simd import VNNI_KERNELS

FORMATS: dict[GGMLQuantizationType, "QuantFormat"] = {}


class Kernels(Protocol):
    """The products of a format on one packed layout: its portable set, or the set written on
    simd.dpbusd (vpdpbusd where the CPU has AVX512-VNNI, a portable expansion elsewhere). Each set
    packs for its own kernels; the two give the same results to the bit."""

    def pack(self, blocks: np.ndarray):
        """(N, nb, type_size) uint8 blocks of the file's rows -> the layout the kernels read."""

    def blocks_per_row(self, packed) -> int:
        """nb of the packed matrix."""

    def matvec(self, packed, x: np.ndarray) -> np.ndarray:
        """x (K,) float32 -> (N,) float32."""

    def matmul(self, packed, x: np.ndarray) -> np.ndarray:
        """x (T, K) float32 -> (T, N) float32."""

    def matvecs(self, packeds: list, x: np.ndarray) -> list:
        """Several matrices times one x (K,) -> [(N_i,), ...], x's activations made once."""

    def matmuls(self, packeds: list, x: np.ndarray, prologue=None) -> list:
        """Optional. Several matrices times the same x (T, K) -> [(T, N_i), ...], x's activations
        made once (after the prologue, where the set takes one)."""

    def matmul_many(self, packeds: list, x: np.ndarray, rows: np.ndarray) -> np.ndarray | None:
        """Matrix j times activation row rows[j] of x (R, K) -> (len(packeds), N); None where the
        set has no such kernel."""

    def matmul_groups(self, packeds: list, x: np.ndarray, spans: np.ndarray) -> np.ndarray | None:
        """Optional. Matrix j times rows spans[j, 0]..spans[j, 1]-1 of x (R, K) -> rows spans[j, 2]..
        of (rows, N); None where the set has no such kernel."""


def many_size(n: int) -> int:
    """The length of the weight tuples a matmul_many of n matrices passes its kernel: the next power of
    two (2 at least). numba compiles a kernel for each tuple length; a layer's CPU experts beside a GPU
    or a RAM budget's store come in every count from 1 to 6 (12 with gate and up), which would compile
    at their first tokens; padded, the counts of a model share a few lengths that load compiles."""
    return max(2, 1 << (n - 1).bit_length())


def _tile_rows(y: np.ndarray, n: int) -> np.ndarray:
    """A tile kernel's output (n_tiles, T, tile) as the product's rows (T, N), the last tile's padding
    cut (one row: a plain reshape)."""
    T = y.shape[1]
    return (y.reshape(1, -1) if T == 1 else y.transpose(1, 0, 2).reshape(T, -1))[:, :n]


@dataclass(frozen=True)
class TileKernels:
    """Kernels over a layout of row tiles (the rows of a tile side by side, so that the kernels'
    vector loops run across rows). `pack` returns a NamedTuple of arrays with `d` (n_tiles, nb,
    tile) and `n`, the rows of the matrix (the last tile is padded). Each numba kernel writes y in
    tiles of rows:

        matmul_kernel(*weights, *activations(x), y)                          y (n_tiles, T, tile)
        matvec_kernel(*weights, *vector_activations(x), y)                   y (n_tiles, tile)
        many_kernel(*(each weight as a tuple over matrices), rows, *activations(x), y)
                                                                             y (n_mats, n_tiles, tile)
        groups_kernel(at, n_tiles, nb, spans, *activations(x), y)            y (R, n_tiles * tile), zeroed
            at (n_mats, len(weights)) int64: the address of each weight array of each matrix

    `weights` names the fields of the packed tuple the kernels take, in order; () passes the tuple
    itself. `activations` maps x (T, K), or (K,) as one row, to the kernels' 8-bit activations.
    Without a matvec kernel, the matvec is the matmul of one row."""

    pack: Callable
    weights: tuple[str, ...]
    activations: Callable
    matmul_kernel: Callable
    matvec_kernel: Callable | None = None
    vector_activations: Callable | None = None
    many_kernel: Callable | None = None
    groups_kernel: Callable | None = None
    row_kernel: Callable | None = None  # (*weights, x (T, K), norm weight or NO_NORM, eps, y (n_tiles, T, tile)):
    # a few rows' 8-bit activations, after their norm where they have one, and the product in one call
    _weights: Callable = field(init=False, repr=False, compare=False)  # packed -> the kernels' weight arguments

    def __post_init__(self):
        if len(self.weights) > 1:
            get = operator.attrgetter(*self.weights)  # one call per product: it runs for every token
        elif self.weights:
            get = lambda p, name=self.weights[0]: (getattr(p, name),)  # noqa: E731
        else:
            get = lambda p: (p,)  # noqa: E731
        object.__setattr__(self, "_weights", get)

    def blocks_per_row(self, p) -> int:
        return p.d.shape[1]

    def matmul(self, p, x):
        if self.row_kernel is not None and x.ndim == 2 and len(x) <= FEW_ROWS:
            return self._row(p, x, None)
        return self._matmul(p, self.activations(x), 1 if x.ndim == 1 else x.shape[0])

    def _matmul(self, p, a, t: int):
        # p times t rows whose activations a are made
        y = np.empty((p.d.shape[0], t, p.d.shape[2]), np.float32)
        self.matmul_kernel(*self._weights(p), *a, y)
        return _tile_rows(y, p.n)

    @property
    def prologues(self) -> bool:
        """Whether the activation makers take a prologue (activations.quantize_q8's norm)."""
        return self.activations in PROLOGUES and (self.vector_activations is None or self.vector_activations in PROLOGUES)

    def _row(self, p, x, prologue):
        # the row kernel: the rows' activations (after their norm) and the product in one numba call;
        # x (T, K) -> (T, N)
        y = np.empty((p.d.shape[0], len(x), p.d.shape[2]), np.float32)
        w, eps = prologue["norm"] if prologue else (NO_NORM, 0.0)
        self.row_kernel(*self._weights(p), x, np.ascontiguousarray(w, dtype=np.float32), np.float32(eps), y)
        return _tile_rows(y, p.n)

    def matvec(self, p, x, prologue=None):
        if self.row_kernel is not None:
            return self._row(p, x[None], prologue)[0]
        pro = prologue or {}
        if self.matvec_kernel is None:  # the matmul kernel on one row
            return self._matmul(p, self.activations(x, **pro), 1)[0]
        y = np.empty((p.d.shape[0], p.d.shape[2]), np.float32)
        self.matvec_kernel(*self._weights(p), *self.vector_activations(x, **pro), y)
        return y.reshape(-1)[:p.n]

    def matvecs(self, ps, x, prologue=None):
        if self.row_kernel is not None:  # each its own call, x's activations made in it (a call costs about
            return [self._row(p, x[None], prologue)[0] for p in ps]  # what a separate quantization did)
        pro = prologue or {}
        if self.matvec_kernel is None:  # the matmul kernel on one row, as matvec
            kernel, a, rows = self.matmul_kernel, self.activations(x, **pro), (1,)
        else:
            kernel, a, rows = self.matvec_kernel, self.vector_activations(x, **pro), ()
        ys = []  # x's activations made once for every matrix
        for p in ps:
            y = np.empty((p.d.shape[0], *rows, p.d.shape[2]), np.float32)  # (n_tiles, [1,] tile)
            kernel(*self._weights(p), *a, y)
            ys.append(y.reshape(-1)[:p.n])
        return ys

    def bind(self, ps):
        """matvecs and matmuls with the arguments of ps looked up once: call(x (T, K) float32
        contiguous, T <= FEW_ROWS, norm weight (None: no prologue), eps) -> [(T, N_i), ...], what
        matvecs(ps, x[0], {"norm": (weight, eps)}) gives for one row and matmuls(ps, x, ...) for a
        few, x's activations made once; a decode step's products (and a verification's few rows) run
        through it without the lookups and checks of a call through those (10 of a 20 us product on
        SmolLM2's q, k and v)."""
        outs = [(self._weights(p), p.d.shape[0], p.d.shape[2], p.n) for p in ps]
        row, vector = self.row_kernel, self.matvec_kernel is not None

        def call(x, norm=None, eps=0.0):
            T, ys = len(x), []
            if row is not None:
                norm, eps = (NO_NORM, np.float32(0.0)) if norm is None else (norm, np.float32(eps))
                for w, tiles, tile, n in outs:
                    y = np.empty((tiles, T, tile), np.float32)
                    row(*w, x, norm, eps, y)
                    ys.append(_tile_rows(y, n))
                return ys
            pro = {} if norm is None else {"norm": (norm, eps)}
            if T == 1 and vector:
                a = self.vector_activations(x[0], **pro)
                for w, tiles, tile, n in outs:
                    y = np.empty((tiles, tile), np.float32)
                    self.matvec_kernel(*w, *a, y)
                    ys.append(y.reshape(1, -1)[:, :n])
                return ys
            a = self.activations(x, **pro)
            for w, tiles, tile, n in outs:
                y = np.empty((tiles, T, tile), np.float32)
                self.matmul_kernel(*w, *a, y)
                ys.append(_tile_rows(y, n))
            return ys
        return call

    def matmuls(self, ps, x, prologue=None):
        if self.row_kernel is not None and len(x) <= FEW_ROWS:  # a verification's few rows, as matvecs
            return [self._row(p, x, prologue) for p in ps]
        a = self.activations(x, **(prologue or {}))  # x's activations made once for every matrix
        return [self._matmul(p, a, len(x)) for p in ps]

    @staticmethod
    def _one_shape(ps, what: str):
        """The packed shape every matrix of ps shares (the grouped kernels take them as one)."""
        shape, n = ps[0].d.shape, ps[0].n
        for p in ps:  # (a loop: any() over a generator costs twice as much, four calls a decode layer)
            if p.d.shape != shape or p.n != n:
                raise ValueError(f"{what}: matrices of different shapes")
        return shape

    def matmul_many(self, ps, x, rows):
        call = self.bind_many(ps, rows)
        return None if call is None else call(x)

    def bind_many(self, ps, rows):
        """matmul_many(ps, x, rows) with the weight arguments gathered once: call(x) -> (n_mats, N)."""
        if self.many_kernel is None:
            return None
        # the kernel takes one tuple per weight field, that field of every matrix, padded to many_size
        # with the first matrix's (the kernel runs len(rows) of them)
        shape, n = self._one_shape(ps, "matmul_many"), ps[0].n
        weights = tuple(zip(*map(self._weights, [*ps, *[ps[0]] * (many_size(len(ps)) - len(ps))])))
        kernel, activations = self.many_kernel, self.activations

        def call(x):
            y = np.empty((len(ps), shape[0], shape[2]), np.float32)
            kernel(*weights, rows, *activations(x), y)
            return y.reshape(len(ps), -1)[:, :n]  # (n_mats, n_tiles * tile) -> (n_mats, N)
        return call

    def matmul_groups(self, ps, x, spans):
        if self.groups_kernel is None:
            return None
        shape = self._one_shape(ps, "matmul_groups")
        at = np.array([[a.ctypes.data for a in self._weights(p)] for p in ps], np.int64)  # (n_mats, fields)
        n_out = int(max(spans[:, 2] + spans[:, 1] - spans[:, 0]))
        y = np.zeros((n_out, shape[0] * shape[2]), np.float32)
        self.groups_kernel(at, shape[0], shape[1], spans, *self.activations(x), y)
        return y[:, :ps[0].n]


class QuantFormat:
    """Base of every format. A subclass that sets `qtype` is registered on definition; one that
    does not (a base shared by formats) is not. A format gives `quantize_blocks`,
    `dequantize_blocks` and its kernel sets `portable` and, where it has them, `vnni`."""

    qtype: GGMLQuantizationType
    block_size: int  # values per block
    type_size: int  # bytes per block
    portable: Kernels
    vnni: Kernels | None = None
    many_loaded = 0  # the longest matmul_many tuple whose kernel warmup has compiled or loaded

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "qtype" not in cls.__dict__:
            return
        if cls.qtype in FORMATS:
            raise ValueError(f"quant type {cls.qtype.name} is already registered by "
                             f"{type(FORMATS[cls.qtype]).__module__}.{type(FORMATS[cls.qtype]).__qualname__}")
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[cls.qtype]
        FORMATS[cls.qtype] = cls()

    def __init__(self):
        # the kernels this process computes with: the VNNI set where the CPU has VNNI (and
        # EDGESEEK_PORTABLE_KERNELS is unset) and the format has one
        self.kernels: Kernels = self.vnni if VNNI_KERNELS and self.vnni is not None else self.portable

    def with_kernels(self, which: str) -> "QuantFormat":
        """This format computing with its 'portable' or its 'vnni' kernel set, whatever the CPU
        (tests and benchmarks compare the two)."""
        kernels = getattr(self, which) if which in ("portable", "vnni") else None
        if kernels is None:
            raise ValueError(f"{self.qtype.name} has no {which!r} kernels")
        other = copy.copy(self)
        other.kernels = kernels
        return other

    # --- blocks ---------------------------------------------------------------------------------
    def quantize(self, x: np.ndarray) -> np.ndarray:
        """(..., K) float32 rows -> (..., K / block_size * type_size) uint8."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.shape[-1] % self.block_size:
            raise ValueError(f"{self.qtype.name}: row length {x.shape[-1]} is not a multiple of {self.block_size}")
        return self.quantize_blocks(x.reshape(-1, self.block_size)).reshape(*x.shape[:-1], -1)

    def quantize_blocks(self, x: np.ndarray) -> np.ndarray:
        """(n_blocks, block_size) float32, contiguous -> (n_blocks, type_size) uint8."""
        raise NotImplementedError

    @property
    def quantizes(self) -> bool:
        """Whether the format has a quantizer (what the converter can write)."""
        return type(self).quantize_blocks is not QuantFormat.quantize_blocks

    def dequantize(self, blocks: np.ndarray) -> np.ndarray:
        """Whole blocks, (n_blocks, type_size) or any shape of them, uint8 -> (n_blocks *
        block_size,) float32, bit-exact with gguf-py."""
        blocks = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(-1, self.type_size)
        return self.dequantize_blocks(blocks).reshape(-1)

    def dequantize_blocks(self, blocks: np.ndarray) -> np.ndarray:
        """(n_blocks, type_size) uint8, contiguous -> (n_blocks, block_size) float32."""
        raise NotImplementedError

    def blocks(self, raw: np.ndarray) -> np.ndarray:
        """(N, row_bytes) uint8 rows of the file -> (N, nb, type_size), a view where the rows are
        contiguous (a read-only mmap stays read-only)."""
        raw = np.asarray(raw, dtype=np.uint8)
        if raw.ndim != 2 or raw.shape[1] % self.type_size:
            raise ValueError(f"{self.qtype.name}: rows of {raw.shape} bytes are not whole blocks of "
                             f"{self.type_size} bytes")
        return np.ascontiguousarray(raw).reshape(raw.shape[0], -1, self.type_size)

    # --- kernels --------------------------------------------------------------------------------
    def pack(self, raw: np.ndarray):
        """(N, row_bytes) uint8 rows of the file -> the layout the kernels read (any object)."""
        return self.kernels.pack(self.blocks(raw))

    def matvec(self, packed, x: np.ndarray, prologue=None) -> np.ndarray:
        """W @ x for one activation vector: x (K,) float32 -> (N,) float32. `prologue` (where
        `prologues`): what x becomes before the product, made with its 8-bit activations in one
        call: {"norm": (weight, eps)}, rms_norm(x) * weight."""
        if prologue:
            return self.kernels.matvec(packed, self._activations(packed, x, 1, "matvec"), prologue)
        return self.kernels.matvec(packed, self._activations(packed, x, 1, "matvec"))

    @property
    def prologues(self) -> bool:
        """Whether matvec and matvecs take a prologue."""
        return getattr(self.kernels, "prologues", False)

    def matmul(self, packed, x: np.ndarray) -> np.ndarray:
        """Batched: x (T, K) float32 -> (T, N) float32 (prompt processing, several sequences)."""
        return self.kernels.matmul(packed, self._activations(packed, x, 2, "matmul"))

    def matvecs(self, packeds: list, x: np.ndarray, prologue=None) -> list:
        """Several matrices of this format times one activation vector x (K,) (a layer's q, k
        and v; a feed-forward's gate and up) -> [(N_i,), ...]: x quantized once for all of them
        (after the prologue, as matvec's)."""
        if prologue:
            return self.kernels.matvecs(packeds, self._activations(packeds[0], x, 1, "matvec"), prologue)
        return self.kernels.matvecs(packeds, self._activations(packeds[0], x, 1, "matvec"))

    def bind(self, packeds: list):
        """matvecs of these matrices with their arguments looked up once (the kernel set's `bind`):
        call(x (T, K) float32 contiguous, T <= FEW_ROWS, norm weight or None, eps) -> [(T, N_i), ...],
        the norm given only where `prologues`; None where the kernel set has no such binding."""
        bind = getattr(self.kernels, "bind", None)
        return bind(packeds) if bind is not None else None

    def matmuls(self, packeds: list, x: np.ndarray, prologue=None) -> list:
        """Several matrices of this format times the same rows x (T, K) (a few tokens' q and kv)
        -> [(T, N_i), ...]: x quantized once for all of them (after the prologue, where
        `prologues`, as matvec's)."""
        x = self._activations(packeds[0], x, 2, "matmul")
        many = getattr(self.kernels, "matmuls", None)
        if prologue:
            return many(packeds, x, prologue)
        return many(packeds, x) if many is not None else [self.kernels.matmul(p, x) for p in packeds]

    def matmul_many(self, packeds: list, x: np.ndarray, rows) -> np.ndarray | None:
        """Several matrices of one shape at once (a layer's routed experts for one token): matrix j
        times activation row rows[j] of x (R, K) -> (len(packeds), N), in one parallel region;
        each row equal to what matvec gives. None where the kernels have no such kernel."""
        x = self._activations(packeds[0], x, 2, "matmul_many")
        return self.kernels.matmul_many(packeds, x, self._rows(packeds, x, rows))

    def bind_many(self, packeds: list, rows, shape: tuple[int, int]):
        """matmul_many of these matrices and rows with their arguments gathered and checked once (a
        layer's per-head products, every decode step): call(x) -> (len(packeds), N), x float32 of
        `shape` (R, K), C-contiguous (call does not check it); None where the kernels have no
        matmul_many."""
        bind = getattr(self.kernels, "bind_many", None)
        if bind is None:
            return None
        x = self._activations(packeds[0], np.zeros(shape, np.float32), 2, "matmul_many")
        rows = self._rows(packeds, x, rows)
        return bind(packeds, rows)

    def _rows(self, packeds: list, x: np.ndarray, rows) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        listed = rows.tolist()  # checked as Python ints: a decode step makes four such calls a layer
        if len(listed) != len(packeds) or min(listed) < 0 or max(listed) >= x.shape[0]:
            raise ValueError(f"{self.qtype.name} matmul_many: rows {listed} for {len(packeds)} matrices and "
                             f"{x.shape[0]} activation rows")
        return rows

    def matmul_groups(self, packeds: list, x: np.ndarray, spans) -> np.ndarray | None:
        """Several matrices of one shape, each times a run of activation rows: matrix j times rows
        spans[j][0]..spans[j][1]-1 of x (R, K) -> rows spans[j][2].. of the result (rows, N), in
        one parallel region, the activations quantized once (a layer's routed experts, each with
        the rows routed to it; gate and up in one call). Each row equal to what matmul gives; rows
        no span writes are zero. None where the kernels have no such kernel."""
        x = self._activations(packeds[0], x, 2, "matmul_groups")
        spans = np.asarray(spans, np.int64).reshape(-1, 3)
        if len(spans) != len(packeds) or (spans < 0).any() or (spans[:, 1] > len(x)).any() \
                or (spans[:, 0] > spans[:, 1]).any():
            raise ValueError(f"{self.qtype.name} matmul_groups: spans {spans.tolist()} for {len(packeds)} matrices "
                             f"and {x.shape[0]} activation rows")
        groups = getattr(self.kernels, "matmul_groups", None)
        return groups(packeds, x, np.ascontiguousarray(spans)) if groups is not None else None

    def _activations(self, packed, x, ndim: int, op: str) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != ndim:
            raise ValueError(f"{self.qtype.name} {op}: activations of shape {x.shape}, expected {ndim} dimension(s)")
        k = self.kernels.blocks_per_row(packed) * self.block_size
        if x.shape[-1] != k:
            raise ValueError(f"{self.qtype.name} {op}: activations of length {x.shape[-1]} do not match "
                             f"rows of {k} values")
        return x

    # --- compiling ------------------------------------------------------------------------------
    def warmup(self, n_many: int | tuple = 0) -> None:
        """Run each kernel of the format once on a small matrix, so that numba compiles it (or loads
        it from its cache) now rather than at the first token: with the argument types the model
        passes (a read-only matrix as the file's mmap gives it, or a writable copy; one and two
        activation rows; `n_many` matrices in one matmul_many call, a decode step's experts, or
        a tuple of such counts: numba compiles one kernel per tuple length, many_size)."""
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
        if self.prologues:  # a decode step's norm, its weight from the file's pages or a copy
            weight = x[1].copy()
            weight.setflags(write=False)
            for w in (x[1], weight):
                self.matvec(packed, x[0], {"norm": (w, 1e-6)})
        self.matmul(packed, x)  # a verification's rows, quantized on one core
        self.matmul(packed, np.repeat(x, FEW_ROWS // 2 + 1, axis=0))  # more rows than the row kernels take
        self.matmul(packed, np.repeat(x, FEW_VALUES // k // 2 + 1, axis=0))  # a prompt's, quantized on both
        self.matmul_groups([packed, packed], x, [[0, 2, 0], [1, 2, 2]])
        top = max(n_many if isinstance(n_many, tuple) else (n_many,))
        if top > 1:  # every tuple length (many_size) up to the largest count's
            for n in (1 << i for i in range(1, many_size(top).bit_length())):
                self.matmul_many([packed] * n, x[:1], [0] * n)
            self.many_loaded = max(self.many_loaded, many_size(top))

    def many_compiled(self, n: int) -> bool:
        """Whether warmup compiled (or loaded) the matmul_many kernel that n matrices call: a length it
        did not would compile at that call, seconds to minutes."""
        return many_size(n) <= self.many_loaded


def get_format(qtype) -> QuantFormat:
    fmt = FORMATS.get(qtype)  # an int or the enum member: the same key (thousands of calls a load)
    if fmt is None:
        fmt = FORMATS.get(GGMLQuantizationType(qtype))
    if fmt is None:
        raise UnsupportedError(
            f"quant type {GGMLQuantizationType(qtype).name} is not supported; supported: "
            + ", ".join(sorted(f.name for f in FORMATS))
        )
    return fmt

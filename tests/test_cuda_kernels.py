"""The CUDA kernels of edgeseek/backends/cuda_kernels.cu, on a GPU through CuPy.

Oracles: gguf-py's dequantize (bit-exact for dequant_<t>_f32; dequant_<t>_f16 equals it rounded to
fp16) and float64 products of those same dequantized weights. The products take float32 activations
and sum in float32, so against W @ x in float64 they carry float32 rounding only:
    |y - W @ x| <= 1e-5 * (|W| @ |x|) + 1e-6.
Every output buffer is poisoned with NaN, with poisoned elements past its end: an element the
kernel fails to write, or one it writes out of bounds, fails the test.

Weights: gguf-py's quantizers (F16, BF16, Q4_0 .. Q8_0) or edgeseek's (Q4_K, Q5_K, Q6_K, which
gguf-py cannot quantize), and random bytes with finite fp16 scales, so that every bit of every
block field is exercised (high bits of the 6-bit scales, int8 signs, fifth bits).

Skipped without CuPy or without a CUDA device.
"""
from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES

cupy = pytest.importorskip("cupy")

import edgeseek.backends  # noqa: E402
from edgeseek.backends.cuda import (DOWN_THREADS, GLU_ROWS, GLU_THREADS, INT8_TYPES, MIXED_DOWN, MMV1_ROWS,  # noqa: E402
                                    SUFFIX, Kernels, ids_threads)
from edgeseek.quantize import get_format  # noqa: E402


def _device_count() -> int:
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CUDARuntimeError without a driver or a device
        return 0


pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_device_count() == 0, reason="no CUDA device")]


def load_module():
    return cupy.RawModule(code=Path(edgeseek.backends.__file__).with_name("cuda_kernels.cu").read_text(),
                          options=("-std=c++17",))


# kernel name suffix -> ggml type
TYPES = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0,
         "q5_1": Q.Q5_1, "q8_0": Q.Q8_0, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K}
QUANTIZED = [name for name in TYPES if not name.startswith(("f", "bf"))]
K_QUANTS = {Q.Q4_K, Q.Q5_K, Q.Q6_K}
# byte offsets of the fp16 fields of a block (d, and m or dmin)
FP16_FIELDS = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
               Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# (N, K): N not a multiple of 4 (the last block of mmv has idle warps); K of 24 units of 32 values
# (lanes 24..31 idle) and of 88 (lanes with three units and with two)
SHAPES = [(37, 768), (20, 2816)]
POISON = 64  # NaN elements past the end of each output


@pytest.fixture(scope="module")
def module():
    return load_module()


@pytest.fixture(scope="module")
def kernels():
    """The backend's launchers (all three sources compiled together)."""
    return Kernels()


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def weights(n: int, k: int, seed: int) -> np.ndarray:
    """(n, k) float32, with a different magnitude per 32 values so that block scales differ."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k // 32, 32)) * rng.uniform(0.05, 2.0, (n, k // 32, 1))
    return w.reshape(n, k).astype(np.float32)


def quantize(w: np.ndarray, qtype: Q) -> np.ndarray:
    """(N, K) float32 -> (N, row_bytes) uint8, the bytes of a GGUF tensor."""
    raw = get_format(qtype).quantize(w) if qtype in K_QUANTS else gguf_quants.quantize(w, qtype)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(w.shape[0], -1)
    block, type_size = GGML_QUANT_SIZES[qtype]
    assert raw.shape[1] == w.shape[1] // block * type_size
    return raw


def random_bytes(qtype: Q, n: int, k: int, seed: int) -> np.ndarray:
    """(n, row_bytes) random blocks whose fp16 fields are finite numbers of moderate size."""
    rng = np.random.default_rng(seed)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // block, type_size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        raw[:, :, off:off + 2] = rng.uniform(-1, 1, (n, k // block)).astype(np.float16).view(np.uint8).reshape(
            n, k // block, 2)
    return raw.reshape(n, -1)


@lru_cache(maxsize=None)
def matrix(name: str, n: int, k: int, source: str = "quantized") -> tuple[np.ndarray, np.ndarray]:
    """(raw (n, row_bytes) uint8, gguf-py's dequantization (n, k) float32) of a test matrix."""
    qtype = TYPES[name]
    seed = _seed(name, n, k, source)
    raw = quantize(weights(n, k, seed), qtype) if source == "quantized" else random_bytes(qtype, n, k, seed)
    deq = np.asarray(gguf_quants.dequantize(raw, qtype), dtype=np.float32).reshape(n, k)
    return raw, deq


def poisoned(size: int, dtype=np.float32):
    """A flat device buffer of size + POISON NaNs."""
    return cupy.full(size + POISON, np.nan, dtype=dtype)


def unpoisoned(buf, size: int) -> np.ndarray:
    """The first `size` elements of a poisoned buffer, after checking that its tail is still NaN."""
    host = buf.get()
    assert np.isnan(host[size:]).all(), "the kernel wrote past the end of its output"
    return host[:size]


def assert_product(got: np.ndarray, W: np.ndarray, x: np.ndarray, want: np.ndarray | None = None):
    """got (T, N) against x (T, K) @ W (N, K)^T in float64 (or `want`), within the module's bound."""
    W, x = W.astype(np.float64), x.astype(np.float64)
    want = x @ W.T if want is None else want
    bound = 1e-5 * (np.abs(x) @ np.abs(W).T) + 1e-6
    bad = ~(np.abs(got - want) <= bound)  # NaN is bad
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{bad.sum()} of {bad.size} outside the bound; at {i}: got {got[i]!r}, "
                             f"want {want[i]!r}, bound {bound[i]!r}")


# --- dequantize ---------------------------------------------------------------------------------

def dequant(module, name: str, raw: np.ndarray, k: int, rows: np.ndarray | None, out: str) -> np.ndarray:
    """dequant_<name>_<out> of the given rows (None: all, rows = NULL) -> (n_rows, k) host array."""
    n_rows = raw.shape[0] if rows is None else len(rows)
    units = n_rows * (k // 32)
    dtype = np.float32 if out == "f32" else np.float16
    buf = poisoned(n_rows * k, dtype)
    rows_arg = np.uint64(0) if rows is None else cupy.asarray(rows, dtype=np.int32)
    module.get_function(f"dequant_{name}_{out}")(
        ((units + 255) // 256,), (256,),
        (cupy.asarray(raw), np.int64(raw.shape[1]), rows_arg, np.int32(n_rows), np.int32(k), buf))
    return unpoisoned(buf, n_rows * k).reshape(n_rows, k)


def assert_bits_equal(got: np.ndarray, want: np.ndarray):
    bits = np.uint32 if got.dtype == np.float32 else np.uint16
    bad = got.view(bits) != want.view(bits)
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{bad.sum()} of {bad.size} values differ; at {i}: got {got[i]!r}, want {want[i]!r}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", TYPES)
def test_dequant_bit_exact(module, name, shape):
    raw, deq = matrix(name, *shape)
    k = shape[1]
    assert_bits_equal(dequant(module, name, raw, k, None, "f32"), deq)
    assert_bits_equal(dequant(module, name, raw, k, None, "f16"), deq.astype(np.float16))


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequant_every_bit(module, name):
    """Random blocks: every field bit takes both values somewhere."""
    raw, deq = matrix(name, 64, 768, "random")
    assert_bits_equal(dequant(module, name, raw, 768, None, "f32"), deq)
    assert_bits_equal(dequant(module, name, raw, 768, None, "f16"), deq.astype(np.float16))


@pytest.mark.parametrize("name", TYPES)
def test_dequant_rows(module, name):
    """Embedding lookups: out row r is row rows[r], repeated and out of order."""
    raw, deq = matrix(name, *SHAPES[0])
    rows = np.array([5, 0, 36, 5, 17, 36], dtype=np.int32)
    assert_bits_equal(dequant(module, name, raw, SHAPES[0][1], rows, "f32"), deq[rows])
    assert_bits_equal(dequant(module, name, raw, SHAPES[0][1], rows, "f16"), deq[rows].astype(np.float16))


# --- decode products ----------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", TYPES)
def test_mmv(module, name, shape, T):
    n, k = shape
    raw, deq = matrix(name, n, k)
    x = np.random.default_rng(_seed("x", name, n, k, T)).standard_normal((T, k)).astype(np.float32)
    y = poisoned(T * n)
    module.get_function(f"mmv_{name}")(
        ((n + 3) // 4,), (128,),
        (cupy.asarray(raw), np.int64(raw.shape[1]), cupy.asarray(x), y, np.int32(n), np.int32(k), np.int32(T),
         np.uint64(0), np.uint64(0)))
    assert_product(unpoisoned(y, T * n).reshape(T, n), deq, x)


@pytest.mark.parametrize("T", [1, 3])
def test_mmv_adds_in_the_graphs_order(module, T):
    """y = res + (add + x @ W.T): a residual folded into the product, bit for bit as the two adds after it."""
    n, k = 37, 768
    raw, deq = matrix("q4_0", n, k)
    rng = np.random.default_rng(T)
    x, add, res = (rng.standard_normal((T, m)).astype(np.float32) for m in (k, n, n))
    f = module.get_function("mmv_q4_0")
    args = (cupy.asarray(raw), np.int64(raw.shape[1]), cupy.asarray(x))
    plain, y = cupy.empty((T, n), np.float32), cupy.empty((T, n), np.float32)
    f(((n + 3) // 4,), (128,), args + (plain, np.int32(n), np.int32(k), np.int32(T), np.uint64(0), np.uint64(0)))
    f(((n + 3) // 4,), (128,), args + (y, np.int32(n), np.int32(k), np.int32(T), cupy.asarray(add), cupy.asarray(res)))
    assert_bits_equal(y.get(), res + (add + plain.get()))


@pytest.mark.parametrize("name", QUANTIZED)
def test_mmv_random_blocks(module, name):
    """The products read every bit of a block as the dequantizer does."""
    n, k = 37, 768
    raw, deq = matrix(name, n, k, "random")
    x = np.random.default_rng(_seed("xr", name)).standard_normal((2, k)).astype(np.float32)
    y = poisoned(2 * n)
    module.get_function(f"mmv_{name}")(
        ((n + 3) // 4,), (128,),
        (cupy.asarray(raw), np.int64(raw.shape[1]), cupy.asarray(x), y, np.int32(n), np.int32(k), np.int32(2),
         np.uint64(0), np.uint64(0)))
    assert_product(unpoisoned(y, 2 * n).reshape(2, n), deq, x)


# the glu and down kernels' trailing arguments without shared experts (and without a residual)
NO_SHARED_GLU = (np.uint64(0), np.uint64(0), np.int64(0), np.int32(0), np.uint64(0))
NO_SHARED_DOWN = (np.uint64(0), np.int64(0), np.int32(0), np.uint64(0), np.uint64(0))


def _ids_launch(module, kernel, n, grid_y, args):
    """mmv_ids: tpr threads a row (appended to args); glu: two rows a block, down: four."""
    if kernel.startswith("mmv_ids"):
        tpr = ids_threads(int(args[-2]))  # args end with (..., N, K, P)
        module.get_function(kernel)((-(-n // (128 // tpr)), grid_y), (128,), args + (np.int32(tpr),))
    else:
        rows = GLU_ROWS if kernel.startswith("mmv_glu") else MMV1_ROWS
        module.get_function(kernel)((-(-n // rows), grid_y), (128,), args)


@pytest.mark.parametrize("k", [768, 128])
@pytest.mark.parametrize("x_div", [3, 1])
@pytest.mark.parametrize("name", TYPES)
def test_mmv_ids(module, name, x_div, k):
    """A layer's routed experts in one launch: E = 5 stacked experts, P = 6 (token, expert) pairs,
    expert ids repeated and out of order (expert 2 unused); x_div = 3: two tokens of three experts
    each share their activation row (gate/up), x_div = 1: one row per pair (down). K = 768: four
    threads a row; K = 128 (MLA's per-head k_b): two, 64 rows a block."""
    if k % 256 and TYPES[name] in K_QUANTS:
        pytest.skip("K-quant rows hold multiples of 256 values")
    E, n, P = 5, 37, 6
    raw, deq = matrix(name, E * n, k)  # (E * N, row_bytes): the (E, N, K) GGUF tensor
    deq = deq.reshape(E, n, k)
    ids = np.array([3, 0, 3, 4, 1, 3], dtype=np.int32)
    x = np.random.default_rng(_seed("xi", name, x_div, k)).standard_normal((P // x_div, k)).astype(np.float32)
    y = poisoned(P * n)
    row_bytes = raw.shape[1]
    _ids_launch(module, f"mmv_ids_{name}", n, P,
                (cupy.asarray(raw), np.int64(row_bytes), np.int64(n * row_bytes), cupy.asarray(ids), cupy.asarray(x),
                 np.int32(x_div), np.int64(k), y, np.int32(n), np.int32(k), np.int32(P)))
    got = unpoisoned(y, P * n).reshape(P, n)
    for p in range(P):
        assert_product(got[p:p + 1], deq[ids[p]], x[p // x_div:p // x_div + 1])


@pytest.mark.parametrize("name", ["q4_0", "q6_k", "f32"])
def test_mmv_ids_strided_rows(module, name):
    """Activation rows read in place at a stride: the first K values of each (K + 64)-value row,
    as MLA's per-head products read q's first values of each head."""
    E, n, k, P = 3, 37, 768, 4
    raw, deq = matrix(name, E * n, k)
    deq = deq.reshape(E, n, k)
    ids = np.array([2, 0, 2, 1], dtype=np.int32)
    wide = np.random.default_rng(_seed("xs", name)).standard_normal((P, k + 64)).astype(np.float32)
    y = poisoned(P * n)
    _ids_launch(module, f"mmv_ids_{name}", n, P,
                (cupy.asarray(raw), np.int64(raw.shape[1]), np.int64(n * raw.shape[1]), cupy.asarray(ids),
                 cupy.asarray(wide), np.int32(1), np.int64(k + 64), y, np.int32(n), np.int32(k), np.int32(P)))
    got = unpoisoned(y, P * n).reshape(P, n)
    for p in range(P):
        assert_product(got[p:p + 1], deq[ids[p]], wide[p:p + 1, :k])


@pytest.mark.parametrize("name", TYPES)
def test_mmv_glu_ids(module, name):
    """gate, up and silu_mul in one launch: each sum within the float32 bound of its float64 product,
    and h = silu(g) * u of those sums within float32 rounding."""
    E, n, k, P, x_div = 4, 37, 768, 6, 3
    gate, gate_deq = matrix(name, E * n, k)
    up_raw, up_deq = matrix(name, E * n + 1, k)  # other weights of the same format
    up, up_deq = np.ascontiguousarray(up_raw[:E * n]), up_deq[:E * n]
    ids = np.array([3, 0, 3, 1, 2, 0], dtype=np.int32)
    x = np.random.default_rng(_seed("xg", name)).standard_normal((P // x_div, k)).astype(np.float32)
    rb = gate.shape[1]
    h = poisoned(P * n)
    _ids_launch(module, f"mmv_glu_ids_{name}", n, P, (cupy.asarray(gate), cupy.asarray(up), np.int64(rb),
                                                      np.int64(n * rb), cupy.asarray(ids), cupy.asarray(x),
                                                      np.int32(x_div), h, np.int32(n), np.int32(k), np.int32(P))
                + NO_SHARED_GLU)
    got = unpoisoned(h, P * n).reshape(P, n).astype(np.float64)
    for p in range(P):
        e, xr = ids[p], x[p // x_div].astype(np.float64)
        G, U = gate_deq.reshape(E, n, k)[e].astype(np.float64), up_deq.reshape(E, n, k)[e].astype(np.float64)
        g, u = G @ xr, U @ xr
        bg, bu = 1e-5 * (np.abs(G) @ np.abs(xr)) + 1e-6, 1e-5 * (np.abs(U) @ np.abs(xr)) + 1e-6
        sg = 1 / (1 + np.exp(-g))
        want = g * sg * u
        # |d(silu(g) u)| <= |silu'(g)| |u| bg + |silu(g)| bu, silu' <= 1.1; float32 rounding of the result
        bound = 1.1 * np.abs(u) * bg + np.abs(g * sg) * bu + 1e-6 * np.abs(want) + 1e-6
        bad = ~(np.abs(got[p] - want) <= bound)
        assert not bad.any(), f"pair {p}: {bad.sum()} of {n} outside the bound"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", TYPES)
def test_mmv1(module, name, shape):
    """One token, a block a row: the float32 bound of the float64 product, random blocks too."""
    n, k = shape
    for kind in ("quantized", "random") if name in QUANTIZED else ("quantized",):
        raw, deq = matrix(name, n, k, kind)
        x = np.random.default_rng(_seed("x1", name, n, k, kind)).standard_normal((1, k)).astype(np.float32)
        y = poisoned(n)
        module.get_function(f"mmv1_{name}")((-(-n // MMV1_ROWS),), (128,),
                                            (cupy.asarray(raw), np.int64(raw.shape[1]), cupy.asarray(x), y, np.int32(n),
                                             np.int32(k), np.uint64(0), np.uint64(0)))
        assert_product(unpoisoned(y, n).reshape(1, n), deq, x)


def test_mmv1_adds_in_the_graphs_order(module):
    """y = res + (add + W x), bit for bit as the two adds after the plain product."""
    n, k = 37, 768
    raw, _ = matrix("q4_0", n, k)
    rng = np.random.default_rng(11)
    x, add, res = (rng.standard_normal(m).astype(np.float32) for m in (k, n, n))
    f = module.get_function("mmv1_q4_0")
    args = (cupy.asarray(raw), np.int64(raw.shape[1]), cupy.asarray(x))
    plain, y = cupy.empty(n, np.float32), cupy.empty(n, np.float32)
    grid = (-(-n // MMV1_ROWS),)
    f(grid, (128,), args + (plain, np.int32(n), np.int32(k), np.uint64(0), np.uint64(0)))
    f(grid, (128,), args + (y, np.int32(n), np.int32(k), cupy.asarray(add), cupy.asarray(res)))
    assert_bits_equal(y.get(), res + (add + plain.get()))


@pytest.mark.parametrize("add", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_mmv_down_ids(module, name, add):
    """Each token's k experts' down projections weighted and summed (plus add) in one launch,
    against float64 sums of the dequantized experts."""
    E, n, k, T, used = 5, 37, 768, 2, 3
    raw, deq = matrix(name, E * n, k)
    deq = deq.reshape(E, n, k)
    rng = np.random.default_rng(_seed("xd", name, add))
    ids = np.array([4, 0, 2, 2, 1, 4], dtype=np.int32)
    h = rng.standard_normal((T * used, k)).astype(np.float32)
    w = rng.uniform(0.1, 1.0, (T, used)).astype(np.float32)
    base = rng.standard_normal((T, n)).astype(np.float32)
    y = poisoned(T * n)
    _ids_launch(module, f"mmv_down_ids_{name}", n, T,
                (cupy.asarray(raw), np.int64(raw.shape[1]), np.int64(n * raw.shape[1]), cupy.asarray(ids),
                 cupy.asarray(h), cupy.asarray(w), cupy.asarray(base) if add else np.uint64(0), y, np.int32(n),
                 np.int32(k), np.int32(used)) + NO_SHARED_DOWN)
    got = unpoisoned(y, T * n).reshape(T, n)
    for t in range(T):
        want = sum(float(w[t, j]) * (deq[ids[t * used + j]].astype(np.float64) @ h[t * used + j]) for j in range(used))
        want = want + (base[t] if add else 0.0)
        scale = sum(w[t, j] * (np.abs(deq[ids[t * used + j]]).astype(np.float64) @ np.abs(h[t * used + j]))
                    for j in range(used)) + (np.abs(base[t]) if add else 0.0)
        bad = ~(np.abs(got[t] - want) <= 2e-5 * scale + 1e-6)
        assert not bad.any(), f"token {t}: {bad.sum()} of {n} outside the bound"


def assert_glu_with_shared(hs, h2s, gate, up, g2, u2, ids, used, x):
    """The gate-up launch's outputs: pair p's silu(gate[ids[p]] @ x) * (up[ids[p]] @ x) on token
    p // used, token t's the shared experts' on token t, against float64 (gate, up (E, n, d))."""
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    for p in range(len(hs)):
        G, U = (m[ids[p]].astype(np.float64) for m in (gate, up))
        want = silu(G @ x[p // used]) * (U @ x[p // used])
        np.testing.assert_allclose(hs[p], want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    for t in range(len(h2s)):
        want = silu(g2.astype(np.float64) @ x[t]) * (u2.astype(np.float64) @ x[t])
        np.testing.assert_allclose(h2s[t], want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("name", ["q4_0", "q6_k", "f32"])
def test_glu_and_down_with_the_shared_experts_in_the_same_launches(module, name):
    """A MoE layer in two launches: the routed experts (256 rows of gate and up) and the shared
    experts (512, so the routed blocks past 256 leave) through gate-up, then down summing both and
    adding the residual in the graph's order, res + (routed + shared), against float64."""
    E, d, n, n2, T, used = 4, 768, 256, 512, 2, 3
    gate, gate_d = matrix(name, E * n, d)
    up, up_d = matrix(name, E * n + 1, d)
    up, up_d = np.ascontiguousarray(up[:E * n]), up_d[:E * n]
    g2, g2_d = matrix(name, n2, d)
    u2, u2_d = matrix(name, n2 + 1, d)
    u2, u2_d = np.ascontiguousarray(u2[:n2]), u2_d[:n2]
    down, down_d = matrix(name, E * d, n)
    d2, d2_d = matrix(name, d, n2)
    rng = np.random.default_rng(_seed("shared", name))
    x = rng.standard_normal((T, d)).astype(np.float32)
    res = rng.standard_normal((T, d)).astype(np.float32)
    ids = np.array([2, 0, 3, 3, 1, 0], dtype=np.int32)
    w = rng.uniform(0.1, 1.0, (T, used)).astype(np.float32)
    h, h2, y = poisoned(T * used * n), poisoned(T * n2), poisoned(T * d)
    rb, rb2 = gate.shape[1], g2.shape[1]
    module.get_function(f"mmv_glu_ids_{name}")(
        (-(-max(n, n2) // GLU_ROWS), T * used + T), (128,),
        (cupy.asarray(gate), cupy.asarray(up), np.int64(rb), np.int64(n * rb), cupy.asarray(ids), cupy.asarray(x),
         np.int32(used), h, np.int32(n), np.int32(d), np.int32(T * used), cupy.asarray(g2), cupy.asarray(u2),
         np.int64(rb2), np.int32(n2), h2))
    hs, h2s = unpoisoned(h, T * used * n).reshape(T * used, n), unpoisoned(h2, T * n2).reshape(T, n2)
    assert_glu_with_shared(hs, h2s, gate_d.reshape(E, n, d), up_d.reshape(E, n, d), g2_d, u2_d, ids, used, x)
    rbd, rbd2 = down.shape[1], d2.shape[1]
    module.get_function(f"mmv_down_ids_{name}")(
        (-(-d // MMV1_ROWS), T), (128,),
        (cupy.asarray(down), np.int64(rbd), np.int64(d * rbd), cupy.asarray(ids), cupy.asarray(hs), cupy.asarray(w),
         np.uint64(0), y, np.int32(d), np.int32(n), np.int32(used), cupy.asarray(d2), np.int64(rbd2), np.int32(n2),
         cupy.asarray(h2s), cupy.asarray(res)))
    got = unpoisoned(y, T * d).reshape(T, d)
    D, D2 = down_d.reshape(E, d, n).astype(np.float64), d2_d.astype(np.float64)
    for t in range(T):
        routed = sum(float(w[t, j]) * (D[ids[t * used + j]] @ hs[t * used + j]) for j in range(used))
        want = res[t] + (routed + D2 @ h2s[t])
        scale = np.abs(res[t]) + sum(w[t, j] * (np.abs(D[ids[t * used + j]]) @ np.abs(hs[t * used + j]))
                                     for j in range(used)) + np.abs(D2) @ np.abs(h2s[t])
        bad = ~(np.abs(got[t] - want) <= 2e-5 * scale + 1e-6)
        assert not bad.any(), f"token {t}: {bad.sum()} of {d} outside the bound"


# --- products on int8 activations -----------------------------------------------------------------

INT8 = [name for name in QUANTIZED if TYPES[name] in INT8_TYPES]
MIXED = sorted((SUFFIX[a], SUFFIX[b]) for a, b in MIXED_DOWN)  # (routed, shared) down formats


def q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy's q8_1 of float32 values (a multiple of 32): int8 rint(x / d), d = amax / 127, and
    (d, d * sum(q)) per 32 values, in float32 as the kernels compute them."""
    b = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(b).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d[:, None] == 0, 0, np.rint(b / d[:, None])).astype(np.int8)
    return q.reshape(-1), np.stack([d, d * q.sum(axis=1).astype(np.float32)], axis=1)


def q8_values(q8, k: int) -> np.ndarray:
    """The activations a q8_1 pair stands for, float64 (rows, k)."""
    xq, xs = (np.asarray(a.get() if hasattr(a, "get") else a) for a in q8)
    return (xq.reshape(-1, 32).astype(np.float64) * xs[:, :1]).reshape(-1, k)


def test_quantize_q8_1_equals_numpy(module):
    x = np.random.default_rng(5).standard_normal(4096).astype(np.float32)
    x[64:96] = 0.0  # a block of zeros: d = 0, q = 0
    xq, xs = cupy.empty(4096, np.int8), cupy.empty((128, 2), np.float32)
    module.get_function("quantize_q8_1")((32,), (128,), (cupy.asarray(x), xq, xs, np.int64(4096)))
    want_q, want_s = q8_1(x)
    np.testing.assert_array_equal(xq.get(), want_q)
    assert_bits_equal(xs.get(), want_s)


@pytest.mark.parametrize("d", [512, 2048])
def test_rms_norm_q8_is_rms_norm_f32_and_its_q8_1(module, d):
    rng = np.random.default_rng(d)
    x, w = (rng.standard_normal((2, d)).astype(np.float32), rng.standard_normal(d).astype(np.float32))
    args = (cupy.asarray(x), np.int64(d), cupy.asarray(w))
    y1, y2 = cupy.empty((2, d), np.float32), cupy.empty((2, d), np.float32)
    xq, xs = cupy.empty(2 * d, np.int8), cupy.empty((2 * d // 32, 2), np.float32)
    module.get_function("rms_norm_f32")((2,), (256,), args + (y1, np.int32(d), np.float32(1e-6)))
    module.get_function("rms_norm_q8")((2,), (256,), args + (y2, np.int32(d), np.float32(1e-6), xq, xs))
    assert_bits_equal(y2.get(), y1.get())
    want_q, want_s = q8_1(y1.get())
    np.testing.assert_array_equal(xq.get(), want_q)
    assert_bits_equal(xs.get(), want_s)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", INT8)
def test_mmv1_on_int8_activations(module, name, shape):
    """One token on q8_1 activations, quantized and random blocks (every field bit read as the
    dequantizer reads it): the float32 bound of the float64 product of the dequantized weights with
    the values the q8_1 blocks stand for."""
    n, k = shape
    for kind in ("quantized", "random"):
        raw, deq = matrix(name, n, k, kind)
        x = np.random.default_rng(_seed("x8", name, n, k, kind)).standard_normal((1, k)).astype(np.float32)
        xq, xs = (cupy.asarray(a) for a in q8_1(x))
        y = poisoned(n)
        module.get_function(f"mmv1_{name}_q8")((-(-n // MMV1_ROWS),), (128,),
                                               (cupy.asarray(raw), np.int64(raw.shape[1]), xq, xs, y, np.int32(n),
                                                np.int32(k), np.uint64(0), np.uint64(0)))
        assert_product(unpoisoned(y, n).reshape(1, n), deq, q8_values((xq, xs), k))


@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q8_0"])
@pytest.mark.parametrize("rows", [(3072, 576), (576, 192, 192)])
def test_two_or_three_matrices_in_one_launch_as_mmv1(module, name, rows):
    """mmv3_<t>_q8: q and kv_a (or q, k and v) of one token in one launch, each output equal to
    its own mmv1_<t>_q8 launch to the bit (partial last blocks included: 192 and 576 rows)."""
    from edgeseek.backends.cuda import Kernels as K
    k = 2048
    mats = [matrix(name, n, k)[0] for n in rows]
    x = np.random.default_rng(_seed("mmv3", name, *rows)).standard_normal((1, k)).astype(np.float32)
    q8 = tuple(cupy.asarray(a) for a in q8_1(x))
    kern = K()
    dev = [(cupy.asarray(m), m.shape[1], m.shape[0]) for m in mats]
    ys = [cupy.full(n, np.nan, np.float32) for n in rows]
    kern.mmv3_q8(getattr(Q, name.upper()), dev, q8, ys, k)
    for (w, rb, n), y in zip(dev, ys):
        want = cupy.full(n, np.nan, np.float32)
        kern.mmv1_q8(getattr(Q, name.upper()), w, rb, q8, want, n, k)
        np.testing.assert_array_equal(y.get(), want.get())


@pytest.mark.parametrize("k", [96, 2048, 16384])
@pytest.mark.parametrize("name", ["q4_0", "q4_k", "q6_k", "q8_0"])
def test_products_that_quantize_their_own_activations(kernels, name, k):
    """mmv1_<t>_sq8 and mmv3_<t>_sq8: x quantized by the launch's own blocks equals quantize_q8_1's
    q8 read by mmv1_<t>_q8, to the bit (six items of 16 values, fewer than a block's threads; and
    STAGE_MAX's eight a thread). With a norm weight: within the q8 error of mmv1_<t>_q8 on
    rms_norm_q8's copy (the sums of squares in another order: the scale may be an ulp away)."""
    qtype, rng = getattr(Q, name.upper()), np.random.default_rng(_seed("sq8", name, k))
    if k % 256 and qtype in K_QUANTS:
        pytest.skip("a K-quant row is a multiple of 256 values")
    rows = (37, 8, 5)
    mats = [(cupy.asarray(m), m.shape[1], m.shape[0]) for m in (matrix(name, n, k)[0] for n in rows)]
    x = cupy.asarray((rng.standard_normal((1, k)) * 2).astype(np.float32))
    nw = cupy.asarray(rng.uniform(0.5, 1.5, k).astype(np.float32))
    for norm in (None, (nw, 1e-6)):
        if norm is None:
            q8 = kernels.quantize_q8(x)
        elif k > 2048:
            continue  # rms_norm_q8 rows: at most 2048 values
        else:
            _, q8 = kernels.rms_norm(x, nw, 1e-6, q8=True)
        want = [cupy.full(n, np.nan, np.float32) for n in rows]
        for (w, rb, n), y in zip(mats, want):
            kernels.mmv1_q8(qtype, w, rb, q8, y, n, k)
        one = [cupy.full(n, np.nan, np.float32) for n in rows]
        for (w, rb, n), y in zip(mats, one):
            kernels.mmv1_sq8(qtype, w, rb, x, norm, y, n, k)
        three = [cupy.full(n, np.nan, np.float32) for n in rows]
        kernels.mmv3_sq8(qtype, mats, x, norm, three, k)
        for a, b, c in zip(one, three, want):
            np.testing.assert_array_equal(b.get(), a.get())
            if norm is None:
                np.testing.assert_array_equal(a.get(), c.get())
            else:
                np.testing.assert_allclose(a.get(), c.get(), rtol=0, atol=2e-3 * float(cupy.abs(c).max()))


@pytest.mark.parametrize("E, k, gating, D", [(64, 6, 1, 2048), (256, 8, 2, 7168)])
def test_norm_router_route_is_rms_norm_then_router_route(E, k, gating, D):
    """The router's launch that makes the layer's norm: y within an ulp or two of rms_norm_f32's, its
    q8 equal to quantize_q8_1 of y to the bit, and the logits, ids and weights router_route's on y to
    the bit; twice, so the counter is seen left at zero."""
    from edgeseek.models.moe import RouterConfig
    rng = np.random.default_rng(E + D)
    w = cupy.asarray((rng.standard_normal((E, D)) * 0.05).astype(np.float32))
    nw = cupy.asarray(rng.uniform(0.5, 1.5, D).astype(np.float32))
    cfg = RouterConfig(E, k, gating, 1, 1, True, 1.0)
    kern = Kernels()
    for run in range(2):
        x = cupy.asarray((rng.standard_normal((1, D)) * 3).astype(np.float32))
        y, xq, xs = poisoned(D), cupy.empty(D, np.int8), cupy.empty((D // 32, 2), np.float32)
        logits, ids, wts = cupy.full((1, E), np.nan, np.float32), cupy.full((1, k), -1, np.int32), \
            cupy.full((1, k), np.nan, np.float32)
        kern.norm_router_route(x, (nw, 1e-6), y, (xq, xs), w, logits, None, cfg, ids, wts)
        got = unpoisoned(y, D).reshape(1, D)
        np.testing.assert_allclose(got, kern.rms_norm(x, nw, 1e-6).get(), rtol=3e-7, atol=0)
        want_q, want_s = q8_1(got)
        np.testing.assert_array_equal(xq.get(), want_q)
        assert_bits_equal(xs.get(), want_s)
        want_logits, want_ids, want_w = cupy.empty((1, E), np.float32), cupy.empty((1, k), np.int32), \
            cupy.empty((1, k), np.float32)
        kern.router_route(w, cupy.asarray(got), want_logits, None, cfg, want_ids, want_w)
        np.testing.assert_array_equal(logits.get(), want_logits.get())
        np.testing.assert_array_equal(ids.get(), want_ids.get())
        np.testing.assert_array_equal(wts.get(), want_w.get())
        assert int(kern.counters.max()) == 0


def assert_down_with_shared(got, down, down2, ids, w, hv, h2v, add, res):
    """got (T, d) = res + ((add + routed) + shared) against float64: token t's `used` pairs of hv
    through down (E, d, n) weighted by w (T, used), token t's h2v through down2 (d, n2)."""
    T, used = w.shape
    D, D2 = down.astype(np.float64), down2.astype(np.float64)
    for t in range(T):
        routed = sum(float(w[t, j]) * (D[ids[t * used + j]] @ hv[t * used + j]) for j in range(used))
        want = res[t] + ((add[t] + routed) + D2 @ h2v[t])
        scale = (np.abs(res[t]) + np.abs(add[t]) + np.abs(D2) @ np.abs(h2v[t])
                 + sum(w[t, j] * (np.abs(D[ids[t * used + j]]) @ np.abs(hv[t * used + j])) for j in range(used)))
        bad = ~(np.abs(got[t] - want) <= 2e-5 * scale + 1e-6)
        assert not bad.any(), f"token {t}: {bad.sum()} of {len(want)} outside the bound"


@pytest.mark.parametrize("name", INT8)
def test_products_on_int8_activations(module, name):
    """mmv1 (add, res), the routed and shared experts' gate-up and down on q8_1 activations, against
    float64 products of the dequantized weights with the activations the q8_1 values stand for."""
    E, d, n, n2, T, used = 4, 768, 256, 512, 2, 3
    rng = np.random.default_rng(_seed("int8", name))
    gate, gate_d = matrix(name, E * n, d)
    up, up_d = matrix(name, E * n + 1, d)
    up, up_d = np.ascontiguousarray(up[:E * n]), up_d[:E * n]
    g2, g2_d = matrix(name, n2, d)
    u2, u2_d = matrix(name, n2 + 1, d)
    u2, u2_d = np.ascontiguousarray(u2[:n2]), u2_d[:n2]
    down, down_d = matrix(name, E * d, n)
    d2, d2_d = matrix(name, d, n2)
    x = rng.standard_normal((T, d)).astype(np.float32)
    xq, xs = (cupy.asarray(a) for a in q8_1(x))
    xv = q8_values((xq, xs), d)

    # one token through one matrix, add and res folded in
    sq, sq_d = matrix(name, d, d)
    add, res = rng.standard_normal(d).astype(np.float32), rng.standard_normal(d).astype(np.float32)
    y = poisoned(d)
    module.get_function(f"mmv1_{name}_q8")((-(-d // MMV1_ROWS),), (128,),
                                           (cupy.asarray(sq), np.int64(sq.shape[1]), xq, xs, y, np.int32(d),
                                            np.int32(d), cupy.asarray(add), cupy.asarray(res)))
    want = sq_d.astype(np.float64) @ xv[0]
    assert_product(unpoisoned(y, d).reshape(1, d) - res - add, sq_d, xv[:1], want)

    ids = np.array([2, 0, 3, 3, 1, 0], dtype=np.int32)
    w = rng.uniform(0.1, 1.0, (T, used)).astype(np.float32)
    h, h2 = poisoned(T * used * n), poisoned(T * n2)
    rb, rb2 = gate.shape[1], g2.shape[1]
    module.get_function(f"glu_ids_{name}_q8")(
        (-(-max(n, n2) // GLU_ROWS), T * used + T), (GLU_THREADS,),
        (cupy.asarray(gate), cupy.asarray(up), np.int64(rb), np.int64(n * rb), cupy.asarray(ids), xq, xs,
         np.int32(used), h, np.int32(n), np.int32(d), np.int32(T * used), cupy.asarray(g2), cupy.asarray(u2),
         np.int64(rb2), np.int32(n2), h2))
    hs, h2s = unpoisoned(h, T * used * n).reshape(T * used, n), unpoisoned(h2, T * n2).reshape(T, n2)
    assert_glu_with_shared(hs, h2s, gate_d.reshape(E, n, d), up_d.reshape(E, n, d), g2_d, u2_d, ids, used, xv)

    hq, hsc = (cupy.asarray(a) for a in q8_1(hs))
    hq2, hsc2 = (cupy.asarray(a) for a in q8_1(h2s))
    res2 = rng.standard_normal((T, d)).astype(np.float32)
    y = poisoned(T * d)
    rbd, rbd2 = down.shape[1], d2.shape[1]
    module.get_function(f"down_ids_{name}_q8")(
        (-(-d // MMV1_ROWS), T), (DOWN_THREADS,),
        (cupy.asarray(down), np.int64(rbd), np.int64(d * rbd), cupy.asarray(ids), hq, hsc, cupy.asarray(w),
         np.uint64(0), y, np.int32(d), np.int32(n), np.int32(used), cupy.asarray(d2), np.int64(rbd2), np.int32(n2),
         hq2, hsc2, cupy.asarray(res2)))
    assert_down_with_shared(unpoisoned(y, T * d).reshape(T, d), down_d.reshape(E, d, n), d2_d, ids, w,
                            q8_values((hq, hsc), n), q8_values((hq2, hsc2), n2), np.zeros((T, d)), res2)


@pytest.mark.parametrize("name, name2", MIXED, ids=lambda v: v)
def test_down_on_int8_activations_with_shared_experts_of_another_format(kernels, name, name2):
    """Kernels.down_q8 with the shared experts' down of another format (a K-quant mix's
    down_ids_<t>_<t2>_q8): y = res + ((add + routed) + shared) against float64, random blocks for
    the shared part (its every field bit read in its own format)."""
    E, d, n, n2, T, used = 4, 768, 256, 512, 2, 3
    rng = np.random.default_rng(_seed("mixed", name, name2))
    down, down_d = matrix(name, E * d, n)
    d2, d2_d = matrix(name2, d, n2, "random")
    ids = np.array([1, 3, 0, 2, 2, 1], dtype=np.int32)
    w = rng.uniform(0.1, 1.0, (T, used)).astype(np.float32)
    hq, hs = (cupy.asarray(a) for a in q8_1(rng.standard_normal((T * used, n)).astype(np.float32)))
    hq2, hs2 = (cupy.asarray(a) for a in q8_1(rng.standard_normal((T, n2)).astype(np.float32)))
    add, res = (rng.standard_normal((T, d)).astype(np.float32) for _ in range(2))
    y = poisoned(T * d)
    kernels.down_q8(TYPES[name], cupy.asarray(down), down.shape[1], d * down.shape[1], cupy.asarray(ids), (hq, hs),
                    cupy.asarray(w), cupy.asarray(add), y, d, n, T, used,
                    (TYPES[name2], cupy.asarray(d2), d2.shape[1], n2, (hq2, hs2)), cupy.asarray(res))
    assert_down_with_shared(unpoisoned(y, T * d).reshape(T, d), down_d.reshape(E, d, n), d2_d, ids, w,
                            q8_values((hq, hs), n), q8_values((hq2, hs2), n2), add, res)


# --- routing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("E, k, gating, groups, bias, norm, scale", [
    (64, 6, 1, (1, 1), False, False, 1.0),     # V2-Lite: softmax, one warp
    (160, 6, 1, (1, 1), False, False, 16.0),   # V2: softmax, scaled
    (256, 8, 2, (1, 1), True, True, 2.5),      # sigmoid with a selection bias, normalized, no groups
    (256, 8, 2, (8, 4), True, True, 2.5),      # V3: group-limited, the block path
    (300, 4, 1, (1, 1), False, True, 1.0),     # more experts than one warp holds: the block path
])
def test_route_topk_against_models_moe_route(E, k, gating, groups, bias, norm, scale):
    """The device router chooses models/moe.route's experts in its order, with its weights."""
    from edgeseek.models.moe import RouterConfig, route
    T = 5
    rng = np.random.default_rng(E * 31 + k)
    logits = rng.standard_normal((T, E)).astype(np.float32) * 3
    b = rng.uniform(0, 0.2, E).astype(np.float32) if bias else None
    cfg = RouterConfig(E, k, gating, groups[0], groups[1], norm, scale)
    ids, w = cupy.full((T, k), -1, np.int32), cupy.full((T, k), np.nan, np.float32)
    Kernels().module.get_function("route_topk")((T,), (256,), (
        cupy.asarray(logits), cupy.asarray(b) if bias else np.uint64(0), np.int32(E), np.int32(k), np.int32(gating),
        np.int32(groups[0]), np.int32(groups[1]), np.int32(norm), np.float32(scale), ids, w))
    want_ids, want_w = route(logits, cfg, b)
    np.testing.assert_array_equal(ids.get(), want_ids)
    np.testing.assert_allclose(w.get(), want_w, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("E, k, gating, bias, norm, scale", [
    (64, 6, 1, False, False, 1.0),     # V2-Lite
    (160, 6, 1, False, False, 16.0),   # V2
    (256, 8, 2, True, True, 2.5),      # sigmoid with a selection bias, normalized
])
def test_router_route_as_the_router_product_and_route_topk(E, k, gating, bias, norm, scale):
    """One token's router product and choice in one launch: the logits of mmv1_f32 and the ids and
    weights of route_topk, to the bit; run twice, so the counter is seen left at zero."""
    from edgeseek.models.moe import RouterConfig
    D = 2048
    rng = np.random.default_rng(E + k)
    w = cupy.asarray((rng.standard_normal((E, D)) * 0.05).astype(np.float32))
    b = cupy.asarray(rng.uniform(0, 0.2, E).astype(np.float32)) if bias else None
    cfg = RouterConfig(E, k, gating, 1, 1, norm, scale)
    kern = Kernels()
    for run in range(2):
        x = cupy.asarray(rng.standard_normal((1, D)).astype(np.float32))
        want_logits = cupy.empty((1, E), np.float32)
        kern.mmv(Q.F32, w.view(np.uint8), 4 * D, x, want_logits, E, D, 1)
        want_ids, want_w = cupy.empty((1, k), np.int32), cupy.empty((1, k), np.float32)
        kern.route(want_logits, b, cfg, want_ids, want_w)
        logits, ids, wts = cupy.full((1, E), np.nan, np.float32), cupy.full((1, k), -1, np.int32), \
            cupy.full((1, k), np.nan, np.float32)
        kern.router_route(w, x, logits, b, cfg, ids, wts)
        np.testing.assert_array_equal(logits.get(), want_logits.get())
        np.testing.assert_array_equal(ids.get(), want_ids.get())
        np.testing.assert_array_equal(wts.get(), want_w.get())
        assert int(kern.counters.max()) == 0


# --- elementwise helpers ------------------------------------------------------------------------

@pytest.mark.parametrize("d", [1000, 2048, 7168])
def test_rms_norm(module, d):
    R, eps = 3, 1e-6
    rng = np.random.default_rng(d)
    x = (rng.standard_normal((R, d)) * 3).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    x_gpu, w_gpu, y = cupy.asarray(x), cupy.asarray(w), poisoned(R * d)
    kernel = module.get_function("rms_norm_f32")
    kernel((R,), (256,), (x_gpu, np.int64(d), w_gpu, y, np.int32(d), np.float32(eps)))
    got = unpoisoned(y, R * d).reshape(R, d)
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + eps) * w
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    wide = cupy.asarray(np.concatenate([x, np.full((R, 40), np.nan, np.float32)], axis=1))  # rows at a stride
    y2 = poisoned(R * d)
    kernel((R,), (256,), (wide, np.int64(d + 40), w_gpu, y2, np.int32(d), np.float32(eps)))
    np.testing.assert_array_equal(unpoisoned(y2, R * d).reshape(R, d), got)
    kernel((R,), (256,), (x_gpu, np.int64(d), w_gpu, x_gpu, np.int32(d), np.float32(eps)))  # in place
    np.testing.assert_array_equal(x_gpu.get(), got)


@pytest.mark.parametrize("blocks", [None, 7])  # one thread per value; a grid that strides
def test_silu_mul(module, blocks):
    n = 100_003
    rng = np.random.default_rng(n)
    g = (rng.standard_normal(n) * 4).astype(np.float32)
    u = rng.standard_normal(n).astype(np.float32)
    h = poisoned(n)
    grid = (n + 255) // 256 if blocks is None else blocks
    module.get_function("silu_mul_f32")((grid,), (256,), (cupy.asarray(g), cupy.asarray(u), h, np.int64(n)))
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(unpoisoned(h, n), g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-30)


# --- grouped-query decode attention (cuda_decode.cu) --------------------------------------------

@pytest.mark.parametrize("d,n", [(64, 1), (64, 700), (128, 37), (96, 300)])
def test_gqa_decode_stores_and_attends(d, n):
    """The new entry written at the device position, then each query head against its kv head's
    positions 0..pos, split over positions and merged: against float64 softmax attention."""
    k = Kernels()
    G, group, s_max = 3, 3, 1024
    rng = np.random.default_rng(d + n)
    kc = rng.standard_normal((G, s_max, d)).astype(np.float16)
    vc = rng.standard_normal((G, s_max, d)).astype(np.float16)
    k_new = rng.standard_normal((G, d)).astype(np.float32)
    v_new = rng.standard_normal((G, d)).astype(np.float32)
    q = rng.standard_normal((G * group, d)).astype(np.float32)
    kc_d, vc_d, pos = cupy.asarray(kc), cupy.asarray(vc), cupy.asarray(np.array([n - 1], np.int32))
    k.store_kv(cupy.asarray(k_new), cupy.asarray(v_new), kc_d, vc_d, pos)
    got = k.gqa_decode(cupy.asarray(q), kc_d, vc_d, pos, group, 0.125).get()
    kc[:, n - 1], vc[:, n - 1] = k_new, v_new
    assert_bits_equal(kc_d.get(), kc)
    assert_bits_equal(vc_d.get(), vc)
    kv = np.arange(G * group) // group
    kk, vv = kc[kv, :n].astype(np.float64), vc[kv, :n].astype(np.float64)
    s = np.einsum("hd,hsd->hs", q.astype(np.float64), kk) * 0.125
    p = np.exp(s - s.max(1, keepdims=True))
    want = np.einsum("hs,hsd->hd", p / p.sum(1, keepdims=True), vv)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- MLA decode (cuda_decode.cu) ----------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 32, 37, 100, 700])
def test_mla_entry_and_decode_against_the_unfused_kernels_and_float64(n):
    """mla_entry leaves the cache entry and the rotary query bit for bit as rope_f32, rms_norm_f32
    and store_row_f16 do; mla_decode (its splits merged by the last of each head) against float64."""
    from types import SimpleNamespace
    k = Kernels()
    H, N, R, C, s_max, eps, scale = 16, 128, 64, 512, 1024, 1e-6, 0.07
    rng = np.random.default_rng(n)
    ang = np.arange(s_max)[:, None] * (10000.0 ** (-np.arange(0, R, 2) / R))[None, :]
    rope = SimpleNamespace(cos=cupy.asarray(np.cos(ang).astype(np.float32)),
                           sin=cupy.asarray(np.sin(ang).astype(np.float32)), dim=R, kind="norm")
    q = rng.standard_normal((H, N + R)).astype(np.float32)
    kv = (rng.standard_normal(C + R) * 2).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    cc = rng.standard_normal((s_max, C)).astype(np.float16)
    kp = rng.standard_normal((s_max, R)).astype(np.float16)
    pos = cupy.asarray(np.array([n - 1], np.int32))
    q_d, kv_d, w_d = cupy.asarray(q), cupy.asarray(kv), cupy.asarray(w)
    c1, k1, c2, k2 = (cupy.asarray(a) for a in (cc, kp, cc, kp))
    q_pe = k.mla_entry(q_d, kv_d, w_d, eps, rope, pos, H, N, c1, k1)
    # the unfused kernels
    want_pe = cupy.empty((1, H, R), np.float32)
    k.rope(q_d[None, :, N:], want_pe, pos, rope.cos, rope.sin, R, False)
    k.store_row(k.rms_norm(kv_d[None, :C], w_d, eps), c2, pos)
    k_pe = cupy.empty((1, 1, R), np.float32)
    k.rope(kv_d[None, None, C:], k_pe, pos, rope.cos, rope.sin, R, False)
    k.store_row(k_pe, k2, pos)
    assert_bits_equal(q_pe.get(), want_pe.get()[0])
    assert_bits_equal(c1.get(), c2.get())
    assert_bits_equal(k1.get(), k2.get())
    q_lat = rng.standard_normal((H, C)).astype(np.float32)
    for _ in range(2):  # the split counters are left at zero: a second launch merges as the first
        got = k.mla_decode(cupy.asarray(q_lat), q_pe, c1, k1, pos, scale).get()[0]
    lat, kpe = c1.get()[:n].astype(np.float64), k1.get()[:n].astype(np.float64)
    s = (q_lat.astype(np.float64) @ lat.T + q_pe.get().astype(np.float64) @ kpe.T) * scale
    p = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(got, (p / p.sum(1, keepdims=True)) @ lat, rtol=1e-4, atol=1e-5)
    assert not k.counters.get().any()


# --- a prompt's grouped expert products (cuda_prompt.cu) -----------------------------------------

def _tiles(e_of: np.ndarray, tile: int) -> np.ndarray:
    """(n_tiles, 3) (expert, first pair, pairs) of pairs sorted by expert, at most `tile` a tile."""
    out = []
    for e in np.unique(e_of):
        idx = np.nonzero(e_of == e)[0]
        out += [(e, idx[0] + j, min(tile, len(idx) - j)) for j in range(0, len(idx), tile)]
    return np.array(out, np.int32)


@pytest.mark.parametrize("name", [t for t in TYPES if t != "f32"])
def test_grouped_expert_products_of_a_prompt(name):
    """moe_glu_mma, moe_down_mma and moe_combine on a prompt's pairs: experts with several tiles (the
    last one partial), one with a single pair, one with none; weight rows past a 64-row tile; pairs
    left to the CPU (pos -1). Against float64 products of the float16-rounded operands."""
    from edgeseek.backends.cuda import GM_BM
    k = Kernels()
    qtype = TYPES[name]
    E, T, used, D = 4, 150, 3, 768
    F = 256 if qtype in K_QUANTS else 192  # a multiple of GM_BK: down's K
    rng = np.random.default_rng(_seed("grouped", name))
    gate, gate_deq = matrix(name, E * F, D)
    up_raw, up_deq = matrix(name, E * F + 1, D)
    up, up_deq = np.ascontiguousarray(up_raw[:E * F]), up_deq[:E * F]
    down, down_deq = matrix(name, E * D, F)
    choice = np.stack([rng.choice([0, 1, 3], used, replace=False, p=[0.6, 0.3, 0.1]) for _ in range(T)])
    choice[7] = [2, 0, 1]  # expert 2: one pair
    on_gpu = rng.random((T, used)) < 0.9
    tok, which = np.nonzero(on_gpu)
    order = np.argsort(choice[tok, which], kind="stable")
    tok, which = tok[order], which[order]
    e_of = choice[tok, which]
    P = len(tok)
    tiles = _tiles(e_of, GM_BM)
    assert (tiles[:, 2] == GM_BM).any() and (tiles[:, 2] < GM_BM).sum() >= 2
    x = rng.standard_normal((T, D)).astype(np.float32)
    wp = rng.uniform(0.1, 1.0, P).astype(np.float32)
    pos = np.full((T, used), -1, np.int32)
    pos[tok, which] = np.arange(P)

    h16 = poisoned(P * F, np.float16)
    k.moe_glu_mma(qtype, cupy.asarray(gate), cupy.asarray(up), gate.shape[1], F * gate.shape[1], cupy.asarray(tiles),
                  len(tiles), cupy.asarray(x.astype(np.float16)), cupy.asarray(tok.astype(np.int32)), h16, F, D)
    got_h = unpoisoned(h16, P * F).reshape(P, F).astype(np.float64)
    x16 = x.astype(np.float16).astype(np.float64)
    G16 = gate_deq.reshape(E, F, D).astype(np.float16).astype(np.float64)
    U16 = up_deq.reshape(E, F, D).astype(np.float16).astype(np.float64)
    g = np.einsum("pk,pnk->pn", x16[tok], G16[e_of])
    u = np.einsum("pk,pnk->pn", x16[tok], U16[e_of])
    bg = 1e-4 * np.einsum("pk,pnk->pn", np.abs(x16[tok]), np.abs(G16[e_of])) + 1e-6
    bu = 1e-4 * np.einsum("pk,pnk->pn", np.abs(x16[tok]), np.abs(U16[e_of])) + 1e-6
    sg = 1 / (1 + np.exp(-g))
    want_h = g * sg * u
    bound = 1.1 * np.abs(u) * bg + np.abs(g * sg) * bu + 1e-3 * np.abs(want_h) + 1e-6  # float16 result
    bad = ~(np.abs(got_h - want_h) <= bound)
    assert not bad.any(), f"h: {bad.sum()} of {bad.size} outside the bound, first at {np.argwhere(bad)[0]}"

    y = poisoned(P * D)
    hd = cupy.asarray(got_h.astype(np.float16))
    k.moe_down_mma(qtype, cupy.asarray(down), down.shape[1], D * down.shape[1], cupy.asarray(tiles), len(tiles), hd,
                   cupy.asarray(wp), y, D, F)
    got_y = unpoisoned(y, P * D).reshape(P, D)
    W16 = down_deq.reshape(E, D, F).astype(np.float16).astype(np.float64)
    h64 = got_h.astype(np.float16).astype(np.float64)
    want_y = wp[:, None] * np.einsum("pk,pnk->pn", h64, W16[e_of])
    bound_y = wp[:, None] * (1e-4 * np.einsum("pk,pnk->pn", np.abs(h64), np.abs(W16[e_of])) + 1e-6)
    bad = ~(np.abs(got_y - want_y) <= bound_y)
    assert not bad.any(), f"y: {bad.sum()} of {bad.size} outside the bound, first at {np.argwhere(bad)[0]}"

    base = rng.standard_normal((T, D)).astype(np.float32)
    out = cupy.asarray(base)
    k.moe_combine(cupy.asarray(got_y), cupy.asarray(pos), used, out)
    want = base.copy()
    for j in range(used):
        on = pos[:, j] >= 0
        want[on] += got_y[pos[on, j]]
    assert_bits_equal(out.get(), want)


@pytest.mark.parametrize("T, used, E", [(512, 6, 64), (5, 8, 256), (300, 4, 160)])
def test_moe_plan_sorts_pairs_as_the_host_does(kernels, T, used, E):
    """moe_plan's bookkeeping on the device equals the host's (pairs sorted stably by expert, tiles
    of at most GM_BM pairs in expert order, the rest empty): chunks of 1024 pairs (T * used = 3072),
    experts with no pair, a tile count at its bound."""
    from edgeseek.backends.cuda import GM_BM, _expert_tiles, _pairs_by_expert
    rng = np.random.default_rng(_seed("plan", T, used, E))
    hot = rng.random(E) ** 4  # a skewed profile: some experts get many pairs, many none
    ids = np.stack([rng.choice(E, used, replace=False, p=hot / hot.sum()) for _ in range(T)]).astype(np.int32)
    w = rng.random((T, used)).astype(np.float32)
    P = T * used
    max_tiles = P // GM_BM + min(E, P)
    tok, which, experts, start, count = _pairs_by_expert(ids, np.ones(ids.shape, bool))
    want_tiles = _expert_tiles(experts, start, count)
    want_pos = np.full((T, used), -1, np.int32)
    want_pos[tok, which] = np.arange(P)
    tiles, a_rows, pos, hist = (cupy.full(n, -7, np.int32) for n in (3 * max_tiles, P, P, E))
    wp = cupy.full(P, np.nan, np.float32)
    kernels.moe_plan(cupy.asarray(ids), cupy.asarray(w), P, used, E, max_tiles, tiles, a_rows, wp, pos, hist)
    got = tiles.get().reshape(max_tiles, 3)
    n = len(want_tiles)
    assert (got[:n] == want_tiles).all() and (got[n:] == 0).all()
    assert (a_rows.get() == tok).all() and (pos.get() == want_pos.reshape(-1)).all()
    assert (wp.get() == w[tok, which]).all()
    assert (hist.get() == np.bincount(ids.reshape(-1), minlength=E)).all()


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("T, H, start", [(37, 16, 0), (5, 3, 700), (300, 2, 20)])
def test_causal_softmax_against_float64(kernels, T, H, start, half):
    """causal_softmax: the two score products added, scaled, masked to the keys each query sees
    (several heads a token, a prompt chunk after earlier ones) and normalized, against float64,
    in place or as float16 (within its rounding); masked keys exactly 0."""
    rng = np.random.default_rng(_seed("softmax", T, H, start))
    S = start + T
    a = (4 * rng.standard_normal((T * H, S))).astype(np.float32)
    b = (4 * rng.standard_normal((T * H, S))).astype(np.float32)
    scale = 0.1352
    got = cupy.asarray(a)
    p16 = cupy.full(a.shape, np.nan, np.float16) if half else None
    kernels.causal_softmax(got, cupy.asarray(b), H, start, scale, p16)
    got = (p16 if half else got).get().astype(np.float32)
    v = scale * (a.astype(np.float64) + b)
    seen = np.arange(S)[None, :] <= start + np.arange(T * H)[:, None] // H
    v[~seen] = -np.inf
    want = np.exp(v - v.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert (got[~seen] == 0).all()
    assert (np.abs(got - want) <= (1e-3 * want if half else 0) + 1e-5 * want.max()).all()

"""The 32-value block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, the float formats F32, F16, BF16, and
the 8-bit activations their kernels multiply with.

Oracles: gguf-py's quantizers and dequantizers (bit-exact), llama.cpp's activation quantizers and
dot products through its ggml-cpu library (live when llama-cpp-python is installed), and float64
products of gguf-py's dequantized weights.

Bound for the quantized kernels. They multiply with int8 activations x^ = q * d (activations.py),
so against the float64 product of the dequantized weights W (N, K) and the exact x,
    |y - W @ x| <= |W| @ |x^ - x| + 1e-5 * |W| @ |x^| + minterm,
where the middle term covers float32 rounding of the per-block scaling and sums, and for Q4_1 and
Q5_1 minterm = sum over blocks of |m| * |s| * 2**-11: llama.cpp's min term uses s = fp16(d * sum q),
rounded once more. For Gaussian x, |W| @ |x^ - x| is about 0.3 % of |W| @ |x|. The integer sums
are exact, so against llama.cpp's own ggml_vec_dot_*_q8_* the kernels agree to float32 rounding.

Every kernel test runs each kernel set of a format explicitly: the portable one and, where the
format has one, the set written on simd.dpbusd ("vnni": vpdpbusd on a VNNI CPU, its portable
expansion elsewhere), whichever of the two this CPU would choose.
"""
from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from conftest import requires_llama_cpp
from edgeseek.gguf_file import GGUFFile
from edgeseek.quantize import QMatrix, get_format, tiles
from edgeseek.quantize.activations import fp16_round, quantize_q8

BLOCK_KINDS = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
FLOAT_KINDS = ["F32", "F16", "BF16"]
FP16_OFFSETS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2)}
WITH_MIN = {"Q4_1", "Q5_1"}


def fmt(kind):
    return get_format(T[kind])


def kernel_sets(kinds):
    """(kind, 'portable') for each format, and (kind, 'vnni') where the format has such kernels."""
    return [pytest.param(k, w, id=f"{k}-{w}") for k in kinds for w in ("portable", "vnni")
            if w == "portable" or fmt(k).vnni is not None]


def random_blocks(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, type_size) random bytes with random finite fp16 scales (and mins) of any sign and size."""
    blocks = rng.integers(0, 256, (n, fmt(kind).type_size), dtype=np.uint8)
    for off in FP16_OFFSETS[kind]:
        v = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, n)).astype(np.float16)
        blocks[:, off:off + 2] = v.view(np.uint8).reshape(n, 2)
    return blocks


def edge_rows(k: int) -> np.ndarray:
    """Rows that exercise the quantizers' corner cases: zeros, ties of +-max, constants, fp16
    subnormal and overflowing scales, one spike."""
    rows = [np.zeros(k), np.tile([3.0, -3.0], k // 2), np.tile([-3.0, 3.0], k // 2), np.full(k, 7.25),
            np.full(k, -1e-7), np.linspace(-1, 1, k) * 1e-6, np.linspace(-1, 1, k) * 9e5,
            np.where(np.arange(k) % 32 == 5, 1e4, 1e-3)]
    return np.array(rows, np.float32)


# --- dequantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_dequantize_random_blocks_bit_exact(kind):
    blocks = random_blocks(kind, 2000, np.random.default_rng(1))
    ours = fmt(kind).dequantize(blocks)
    assert ours.dtype == np.float32 and ours.shape == (2000 * 32,)
    np.testing.assert_array_equal(ours, quants.dequantize(blocks, T[kind]).reshape(-1))


@pytest.mark.parametrize("kind", FLOAT_KINDS)
def test_dequantize_floats_bit_exact(kind):
    raw = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)
    ref = quants.dequantize(raw, T[kind]) if kind != "BF16" else quants.dequantize(raw, T.BF16)
    ours = fmt(kind).dequantize(raw.reshape(-1, fmt(kind).type_size))
    np.testing.assert_array_equal(ours.view(np.uint32), np.asarray(ref, np.float32).reshape(-1).view(np.uint32))


def _dequantize_file_tensors(path, kinds, max_rows=4096):
    """Every tensor of the given types (its first max_rows rows: the embedding tables are large)."""
    seen = set()
    for t in GGUFFile(path).tensors.values():
        if t.qtype.name in kinds:
            blocks = np.asarray(t.raw.reshape(-1, t.raw.shape[-1])[:max_rows]).reshape(-1, fmt(t.qtype.name).type_size)
            np.testing.assert_array_equal(fmt(t.qtype.name).dequantize(blocks),
                                          quants.dequantize(blocks, t.qtype).reshape(-1), err_msg=t.name)
            seen.add(t.qtype.name)
    return seen


def test_dequantize_smollm2_tensors_bit_exact(smollm2_path):
    assert _dequantize_file_tensors(smollm2_path, {"Q4_1", "Q8_0", "F32"}) == {"Q4_1", "Q8_0", "F32"}


def test_dequantize_gemma_tensors_bit_exact(gemma3_path):
    assert _dequantize_file_tensors(gemma3_path, {"Q5_0", "Q8_0"}) == {"Q5_0", "Q8_0"}


# --- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BLOCK_KINDS + ["F16", "BF16"])
def test_quantize_bit_identical_to_gguf_py(kind):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((50, 512)) * rng.lognormal(0, 3, (50, 1))).astype(np.float32)
    x = np.concatenate([x, edge_rows(512)])
    ref = quants.quantize(x, T[kind]).view(np.uint8).reshape(x.shape[0], -1)
    np.testing.assert_array_equal(fmt(kind).quantize(x), ref)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_quantize_shapes_and_errors(kind):
    x = np.random.default_rng(4).standard_normal((2, 3, 64)).astype(np.float32)
    q = fmt(kind).quantize(x)
    assert q.shape == (2, 3, 2 * fmt(kind).type_size) and q.dtype == np.uint8
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt(kind).quantize(np.zeros((2, 48), np.float32))


# --- activations --------------------------------------------------------------------------------


def test_fp16_round_matches_numpy():
    from numba import njit

    @njit
    def run(a, out):
        for i in range(a.shape[0]):
            out[i] = fp16_round(a[i])

    rng = np.random.default_rng(5)
    a = (rng.standard_normal(200_000) * 10.0 ** rng.integers(-10, 6, 200_000)).astype(np.float32)
    a = np.concatenate([a, np.array([65504, 65519.996, 65520, -7e4, 2.98e-8, 2.99e-8, 6.1e-5, 0, -0.0,
                                     np.inf, -np.inf], np.float32)])
    out = np.empty_like(a)
    run(a, out)
    with np.errstate(over="ignore"):
        ref = a.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.view(np.uint32), ref.view(np.uint32))


def test_activations_per_block_definition():
    x = (np.random.default_rng(6).standard_normal((3, 256)) * 4).astype(np.float32)
    x[1, :32] = 0
    a = quantize_q8(x)
    xb = x.reshape(3, -1, 32)
    amax = np.abs(xb).max(-1)
    np.testing.assert_array_equal(a.d, (amax / np.float32(127)).astype(np.float16).astype(np.float32))
    idn = np.where(amax == 0, 0, np.float32(127) / np.where(amax == 0, 1, amax)).astype(np.float32)
    np.testing.assert_array_equal(a.q.reshape(3, -1, 32), np.rint(xb * idn[..., None]).astype(np.int8))
    np.testing.assert_array_equal(a.sums, a.q.reshape(3, -1, 32).sum(-1))
    assert a.d[1, 0] == 0 and not a.q[1, :32].any()
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8(np.zeros(40, np.float32))


# --- llama.cpp's ggml-cpu, through ctypes -------------------------------------------------------

_ggml = None


def ggml_cpu():
    global _ggml
    if _ggml is None:
        lib = Path(list(importlib.util.find_spec("llama_cpp").submodule_search_locations)[0]) / "lib"
        ctypes.CDLL(str(lib / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        _ggml = ctypes.CDLL(str(lib / "libggml-cpu.so"))
        _ggml.ggml_cpu_init.restype = None
        _ggml.ggml_cpu_init()  # fills the fp16 tables the dot products read
    return _ggml


def ggml_quantize_row(kind: str, x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0 / q8_1 as the CPU backend runs them on activations: (K,) -> (K/32, 34|36)."""
    x = np.ascontiguousarray(x, np.float32)
    size = {"q8_0": 34, "q8_1": 36}[kind]
    out = np.zeros((x.size // 32, size), np.uint8)
    f = getattr(ggml_cpu(), f"quantize_row_{kind}")
    f.restype, f.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    f(x.ctypes.data, out.ctypes.data, x.size)
    return out


def ggml_vec_dot(kind: str, row: np.ndarray, act: np.ndarray, k: int) -> float:
    """ggml_vec_dot_{kind}_q8_{0|1} over one row of k values."""
    f = getattr(ggml_cpu(), f"ggml_vec_dot_{kind.lower()}_{'q8_1' if kind in WITH_MIN else 'q8_0'}")
    f.restype = None
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                  ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    s = np.zeros(1, np.float32)
    row, act = np.ascontiguousarray(row), np.ascontiguousarray(act)
    f(k, s.ctypes.data, 0, row.ctypes.data, 0, act.ctypes.data, 0, 1)
    return float(s[0])


@requires_llama_cpp
def test_activations_bit_identical_to_llama_cpp():
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((6, 1024)) * rng.lognormal(0, 3, (6, 1))).astype(np.float32)
    x[0, :64] = 0
    a = quantize_q8(x)
    for t in range(x.shape[0]):
        q80, q81 = ggml_quantize_row("q8_0", x[t]), ggml_quantize_row("q8_1", x[t])
        np.testing.assert_array_equal(a.q[t], q80[:, 2:].view(np.int8).reshape(-1))
        np.testing.assert_array_equal(a.d[t], q80[:, :2].copy().view(np.float16)[:, 0].astype(np.float32))
        np.testing.assert_array_equal(a.s[t], q81[:, 2:4].copy().view(np.float16)[:, 0].astype(np.float32))
        np.testing.assert_array_equal(a.q[t], q81[:, 4:].view(np.int8).reshape(-1))


@requires_llama_cpp
@pytest.mark.parametrize("kind, kernels", kernel_sets(BLOCK_KINDS))
def test_matvec_matches_llama_cpp_vec_dot(kind, kernels):
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(8)
    n, k = 70, 1536
    raw = f.quantize(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal(k).astype(np.float32)
    y = f.matvec(f.pack(raw), x)
    act = ggml_quantize_row("q8_1" if kind in WITH_MIN else "q8_0", x)
    ref = np.array([ggml_vec_dot(kind, raw[i], act, k) for i in range(n)])
    np.testing.assert_allclose(y, ref, rtol=0, atol=2e-6 * np.abs(ref).max())


# --- kernels against float products -------------------------------------------------------------


def assert_within_q8_bound(kind, y, W, raw, x):
    """y (T, N) from the kernels, W (N, K) dequantized weights, raw (N, row_bytes) the blocks,
    x (T, K): the bound of the module docstring."""
    a = quantize_q8(x)
    xh = (a.q.reshape(x.shape[0], -1, 32) * a.d[..., None].astype(np.float64)).reshape(x.shape)
    W = W.astype(np.float64)
    bound = np.abs(xh - x) @ np.abs(W).T + 1e-5 * (np.abs(xh) @ np.abs(W).T)
    if kind in WITH_MIN:
        m = tiles.fp16_field(fmt(kind).blocks(raw), 2).astype(np.float64)  # (N, nb)
        bound += (np.abs(a.s).astype(np.float64) @ np.abs(m).T) * 2.0 ** -11
    err = np.abs(y - x.astype(np.float64) @ W.T)
    np.testing.assert_array_less(err, bound * (1 + 1e-6) + 1e-30)
    # the bound is not vacuous: well under 1 % of the product's scale for Gaussian activations
    assert np.median(bound) < 0.01 * np.median(np.abs(x) @ np.abs(W).T)


@pytest.mark.parametrize("kind, kernels", kernel_sets(BLOCK_KINDS))
@pytest.mark.parametrize("n, k", [(1, 32), (3, 64), (67, 160), (131, 1024), (200, 2048)])
def test_matvec_within_q8_bound(kind, kernels, n, k):
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(n * 7 + k)
    raw = f.quantize(rng.standard_normal((n, k)).astype(np.float32))
    W = quants.dequantize(raw, T[kind]).reshape(n, k)
    x = rng.standard_normal(k).astype(np.float32)
    y = f.matvec(f.pack(raw), x)
    assert y.shape == (n,) and y.dtype == np.float32
    assert_within_q8_bound(kind, y[None], W, raw, x[None])


@pytest.mark.parametrize("kind, kernels", kernel_sets(BLOCK_KINDS))
def test_matvec_random_blocks_within_q8_bound(kind, kernels):
    """Blocks of any bytes and scales of any size, not only what the quantizer makes."""
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(9)
    n, k = 77, 512
    raw = random_blocks(kind, n * k // 32, rng).reshape(n, -1)
    W = quants.dequantize(raw, T[kind]).reshape(n, k)
    x = rng.standard_normal(k).astype(np.float32)
    assert_within_q8_bound(kind, f.matvec(f.pack(raw), x)[None], W, raw, x[None])


@pytest.mark.parametrize("kind, kernels", kernel_sets(BLOCK_KINDS))
@pytest.mark.parametrize("n_tok", [1, 3, 64])
def test_matmul_within_q8_bound(kind, kernels, n_tok):
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(n_tok)
    n, k = 131, 512  # 131 rows: three tiles, the last one padded
    raw = f.quantize(rng.standard_normal((n, k)).astype(np.float32))
    W = quants.dequantize(raw, T[kind]).reshape(n, k)
    x = (rng.standard_normal((n_tok, k)) * rng.lognormal(0, 1, (n_tok, 1))).astype(np.float32)
    p = f.pack(raw)
    y = f.matmul(p, x)
    assert y.shape == (n_tok, n) and y.dtype == np.float32
    assert_within_q8_bound(kind, y, W, raw, x)
    np.testing.assert_array_equal(y[n_tok // 2], f.matvec(p, x[n_tok // 2]))


@pytest.mark.parametrize("kind, kernels", kernel_sets(BLOCK_KINDS))
def test_a_norm_made_with_the_activations_equals_the_norm_then_the_product(kind, kernels):
    """matvec and matvecs with a norm prologue (a decode step's norm made in the call that
    quantizes the activations), and matmuls of a verification's few rows with it: the same bits as
    the CPU backend's rms_norm, then the product; and those few rows (the row kernels, one call on
    one core) the same bits as the same rows among a prompt's many (quantized on both cores)."""
    from edgeseek.backends.cpu import CPUBackend
    f = fmt(kind).with_kernels(kernels)
    assert f.prologues
    rng = np.random.default_rng(17)
    n, k = 67, 576
    ps = [f.pack(f.quantize(rng.standard_normal((n, k)).astype(np.float32))) for _ in range(2)]
    x = (rng.standard_normal(k) * 3).astype(np.float32)
    w = rng.uniform(0.5, 1.5, k).astype(np.float32)
    normed = CPUBackend().rms_norm(x[None], w, 1e-6)[0]
    np.testing.assert_array_equal(f.matvec(ps[0], x, {"norm": (w, 1e-6)}), f.matvec(ps[0], normed))
    for got, want in zip(f.matvecs(ps, x, {"norm": (w, 1e-6)}), f.matvecs(ps, normed)):
        np.testing.assert_array_equal(got, want)
    rows = (rng.standard_normal((3, k)) * 3).astype(np.float32)
    normed_rows = CPUBackend().rms_norm(rows, w, 1e-6)
    for got, want in zip(f.matmuls(ps, rows, {"norm": (w, 1e-6)}), f.matmuls(ps, normed_rows)):
        np.testing.assert_array_equal(got, want)
    many = np.concatenate([normed_rows, normed_rows])
    np.testing.assert_array_equal(f.matmul(ps[0], normed_rows), f.matmul(ps[0], many)[:3])
    np.testing.assert_array_equal(f.matvec(ps[0], normed_rows[0]), f.matmul(ps[0], many)[0])


@pytest.mark.parametrize("kind", [k for k in BLOCK_KINDS if fmt(k).vnni is not None])
def test_vnni_kernels_equal_portable_kernels(kind):
    """The kernels on simd.dpbusd sum the same int32 block products and scale them in the same
    float32 order as the portable ones: the two sets agree to the bit."""
    rng = np.random.default_rng(13)
    n, k = 131, 1024
    raw = random_blocks(kind, n * k // 32, rng).reshape(n, -1)
    x = rng.standard_normal((5, k)).astype(np.float32)
    port, vnni = fmt(kind).with_kernels("portable"), fmt(kind).with_kernels("vnni")
    p, q = port.pack(raw), vnni.pack(raw)
    np.testing.assert_array_equal(vnni.matmul(q, x), port.matmul(p, x))
    np.testing.assert_array_equal(vnni.matvec(q, x[0]), port.matvec(p, x[0]))


@pytest.mark.parametrize("kind, kernels", kernel_sets(BLOCK_KINDS))
def test_pack_layout_and_padding(kind, kernels):
    f = fmt(kind).with_kernels(kernels)
    n, k = tiles.TILE + 5, 96
    raw = f.quantize(np.random.default_rng(10).standard_normal((n, k)).astype(np.float32))
    p = f.pack(raw)
    assert p.n == n and p.qs.shape[:2] == (2, 3) and p.qs.shape[-1] == tiles.TILE
    assert not p.d[-1, :, 5:].any()  # zero scales in the padding rows
    with pytest.raises(ValueError, match="length 128 do not match rows of 96"):
        f.matvec(p, np.zeros(k + 32, np.float32))
    with pytest.raises(ValueError, match="dimension"):
        f.matmul(p, np.zeros(k, np.float32))
    with pytest.raises(ValueError, match="not whole blocks"):
        f.pack(raw[:, :-1])


def test_real_matrices_through_qmatrix(smollm2_path, gemma3_path):
    rng = np.random.default_rng(11)
    cases = [(smollm2_path, "blk.0.ffn_down.weight"), (smollm2_path, "blk.3.attn_k.weight"),
             (gemma3_path, "blk.0.attn_q.weight"), (gemma3_path, "blk.0.attn_v.weight")]
    kinds = set()
    for path, name in cases:
        t = GGUFFile(path).tensor(name)
        m = QMatrix(t.qtype, t.raw, t.shape, name)
        raw = np.asarray(t.raw)
        W = quants.dequantize(raw, t.qtype).reshape(t.shape)
        x = rng.standard_normal((3, t.shape[1])).astype(np.float32)
        assert_within_q8_bound(t.qtype.name, m(x[0])[None], W, raw, x[:1])
        assert_within_q8_bound(t.qtype.name, m(x), W, raw, x)
        kinds.add(t.qtype.name)
    assert kinds == {"Q4_1", "Q5_0", "Q8_0"}


# --- float formats -----------------------------------------------------------------------------


def rounded(kind, x):
    """Activations as llama.cpp rounds them before an F16 / BF16 product."""
    return fmt(kind).round_activations(x) if kind != "F32" else x


@pytest.mark.parametrize("kind", FLOAT_KINDS)
@pytest.mark.parametrize("n, k, n_tok", [(1, 8, 1), (67, 300, 3), (130, 2048, 64)])
def test_float_kernels_match_float64(kind, n, k, n_tok, monkeypatch):
    from edgeseek.quantize import floats

    monkeypatch.setattr(floats, "CHUNK_VALUES", 64 * k)  # several row chunks in the F16/BF16 matmul
    rng = np.random.default_rng(n + k)
    raw = fmt(kind).quantize(rng.standard_normal((n, k)).astype(np.float32))
    W = quants.dequantize(raw, T[kind]).reshape(n, k).astype(np.float64)
    p = fmt(kind).pack(raw)
    x = rng.standard_normal((n_tok, k)).astype(np.float32)
    scale = np.abs(rounded(kind, x)) @ np.abs(W).T  # float32 sums: error ~ k * 2**-24 of |W| @ |x|
    y1 = fmt(kind).matvec(p, x[0])
    assert y1.shape == (n,) and y1.dtype == np.float32
    np.testing.assert_array_less(np.abs(y1 - W @ rounded(kind, x[0])), 1e-6 * np.sqrt(k) * scale[0] + 1e-30)
    y = fmt(kind).matmul(p, x)
    assert y.shape == (n_tok, n) and y.dtype == np.float32
    np.testing.assert_array_less(np.abs(y - rounded(kind, x) @ W.T), 1e-6 * np.sqrt(k) * scale + 1e-30)


def test_f16_pack_is_a_view_and_decodes_every_half():
    from numba import njit

    from edgeseek.quantize.floats import f16_to_f32

    raw = np.random.default_rng(12).integers(0, 256, (4, 64), dtype=np.uint8)
    assert np.shares_memory(fmt("F16").pack(raw), raw)  # no float32 copy of the matrix

    @njit
    def run(h, out):
        for i in range(h.shape[0]):
            out[i] = f16_to_f32(h[i])

    h = np.arange(65536, dtype=np.uint16)
    out = np.empty(65536, np.float32)
    run(h, out)
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)  # the hardware conversion quiets signaling nans, as llama.cpp's does
    np.testing.assert_array_equal(out[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(out[nan]).all()

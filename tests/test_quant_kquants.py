"""K-quant formats Q4_K, Q5_K, Q6_K and the Q8_K activations.

Oracles: gguf-py's dequantizers (bit-exact), llama.cpp's quantizers and dot products through its
ggml libraries (live when llama-cpp-python is installed, else a stored golden made by llama.cpp),
and float64 products of gguf-py's dequantized weights.

Bound for the kernels: they multiply with Q8_K activations x8 * dx (|dx| = max|x| / 127 per 256
values), so against the float product of the same weights W,
    |y - W @ x| <= sum over blocks b of |dx_b| / 2 * sum_{k in b} |W_k|,
and against the float product with the rounded activations, |y - W @ (x8 * dx)| only carries
float32 rounding: 1e-5 of |W| @ |x8 * dx|.

Every kernel test runs each kernel set of a format explicitly: the portable one and, where the
format has one, the set written on simd.dpbusd ("vnni": vpdpbusd on a VNNI CPU, its portable
expansion elsewhere), whichever of the two this CPU would choose.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants

from conftest import requires_llama_cpp
from edgeseek.gguf_file import GGUFFile
from edgeseek.quantize import QMatrix, get_format, q4_k, q5_k, q6_k, q8_k

FIXTURES = Path(__file__).parent / "fixtures" / "kquants"
sys.path.insert(0, str(FIXTURES))
import ggml_ref  # noqa: E402
import make_kquants_golden  # noqa: E402

KINDS = ["Q4_K", "Q5_K", "Q6_K"]
FP16_OFFSETS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # byte offsets of d (and dmin)


def fmt(kind):
    return get_format(T[kind])


def kernel_sets(kinds):
    """(kind, 'portable') for each format, and (kind, 'vnni') where the format has such kernels."""
    return [pytest.param(k, w, id=f"{k}-{w}") for k in kinds for w in ("portable", "vnni")
            if w == "portable" or fmt(k).vnni is not None]


def random_blocks(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, type_size) random bytes with finite fp16 scales of a plausible size."""
    blocks = rng.integers(0, 256, (n, fmt(kind).type_size), dtype=np.uint8)
    for off in FP16_OFFSETS[kind]:
        scale = (np.abs(rng.standard_normal(n)) * 0.01).astype(np.float16)
        blocks[:, off:off + 2] = scale.view(np.uint8).reshape(n, 2)
    return blocks


def q8k_dequantized(x: np.ndarray) -> np.ndarray:
    """x (T, K) -> the Q8_K activations as float64, x8 * dx."""
    qs, d, _ = q8_k.quantize(x)
    return (qs.reshape(x.shape[0], -1, 256) * d[..., None].astype(np.float64)).reshape(x.shape)


def assert_within_q8k_bound(y, W, x):
    """y (T, N) from the kernels, W (N, K) float weights, x (T, K) activations: the bounds of the
    module docstring."""
    W = W.astype(np.float64)
    xh = q8k_dequantized(x)
    exact = xh @ W.T
    np.testing.assert_array_less(np.abs(y - exact), 1e-5 * (np.abs(xh) @ np.abs(W).T) + 1e-30)
    _, d, _ = q8_k.quantize(x)  # (T, nb)
    absw = np.abs(W).reshape(W.shape[0], -1, 256).sum(-1)  # (N, nb)
    bound = (np.abs(d.astype(np.float64)) / 2) @ absw.T * (1 + 1e-4)  # (T, N)
    np.testing.assert_array_less(np.abs(y - x.astype(np.float64) @ W.T), bound + 1e-30)


# --- dequantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_random_blocks_bit_exact(kind):
    blocks = random_blocks(kind, 300, np.random.default_rng(1))
    ours = fmt(kind).dequantize(blocks)
    assert ours.dtype == np.float32 and ours.shape == (300 * 256,)
    np.testing.assert_array_equal(ours, quants.dequantize(blocks, T[kind]).reshape(-1))


def test_dequantize_gemma_tensors_bit_exact(gemma3_path):
    f = GGUFFile(gemma3_path)
    seen = set()
    for t in f.tensors.values():
        if t.qtype.name in KINDS:
            blocks = np.asarray(t.raw).reshape(-1, fmt(t.qtype.name).type_size)
            ours = fmt(t.qtype.name).dequantize(blocks)
            np.testing.assert_array_equal(ours, quants.dequantize(blocks, t.qtype).reshape(-1),
                                          err_msg=t.name)
            seen.add(t.qtype.name)
    assert seen == {"Q4_K", "Q6_K"}


# --- quantize ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_matches_llama_cpp_golden(kind):
    golden = np.load(FIXTURES / "kquants_golden.npz")
    np.testing.assert_array_equal(fmt(kind).quantize(golden["x"]), golden[kind])


def test_q8_k_matches_llama_cpp_golden():
    golden = np.load(FIXTURES / "kquants_golden.npz")
    x = golden["x"]
    qs, d, bsums = q8_k.quantize(x)
    ref = golden["Q8_K"].reshape(x.shape[0], -1, 292)
    np.testing.assert_array_equal(d, ref[..., :4].copy().view(np.float32)[..., 0])
    np.testing.assert_array_equal(qs, ref[..., 4:260].view(np.int8).reshape(x.shape))
    nonzero = d != 0  # llama.cpp leaves the sums of an all-zero block unwritten
    np.testing.assert_array_equal(bsums.reshape(*d.shape, 16)[nonzero],
                                  ref[..., 260:].copy().view(np.int16)[nonzero])


@requires_llama_cpp
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_bit_identical_to_llama_cpp(kind):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((40, 1024)) * rng.lognormal(0, 2, (40, 1))).astype(np.float32)
    x = np.concatenate([x, make_kquants_golden.edge_rows(rng).reshape(-1, 1024)])
    np.testing.assert_array_equal(fmt(kind).quantize(x), ggml_ref.quantize(x, kind))


@requires_llama_cpp
def test_q8_k_bit_identical_to_llama_cpp():
    x = (np.random.default_rng(8).standard_normal((7, 768)) * 3).astype(np.float32)
    qs, d, bsums = q8_k.quantize(x)
    for row in range(7):
        ref = ggml_ref.quantize_q8_k(x[row]).reshape(-1, 292)
        np.testing.assert_array_equal(d[row], ref[:, :4].copy().view(np.float32)[:, 0])
        np.testing.assert_array_equal(qs[row], ref[:, 4:260].view(np.int8).reshape(-1))
        np.testing.assert_array_equal(bsums[row], ref[:, 260:].copy().view(np.int16).reshape(-1))


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_shapes_and_errors(kind):
    x = np.random.default_rng(9).standard_normal((2, 3, 512)).astype(np.float32)
    q = fmt(kind).quantize(x)
    assert q.shape == (2, 3, 2 * fmt(kind).type_size) and q.dtype == np.uint8
    with pytest.raises(ValueError, match="multiple of 256"):
        fmt(kind).quantize(np.zeros((2, 320), np.float32))


# --- kernels -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kernels", kernel_sets(KINDS))
@pytest.mark.parametrize("n, k", [(1, 256), (3, 512), (131, 768), (257, 2048)])
def test_matvec_within_q8k_bound(kind, kernels, n, k):
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(n + k)
    raw = random_blocks(kind, n * k // 256, rng).reshape(n, -1)
    W = quants.dequantize(raw, T[kind]).reshape(n, k)
    x = rng.standard_normal(k).astype(np.float32)
    y = f.matvec(f.pack(raw), x)
    assert y.shape == (n,) and y.dtype == np.float32
    assert_within_q8k_bound(y[None], W, x[None])


@pytest.mark.parametrize("kind, kernels", kernel_sets(KINDS))
@pytest.mark.parametrize("n_tok", [1, 3, 64])
def test_matmul_within_q8k_bound(kind, kernels, n_tok):
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(n_tok)
    n, k = 131, 512
    raw = random_blocks(kind, n * k // 256, rng).reshape(n, -1)
    W = quants.dequantize(raw, T[kind]).reshape(n, k)
    x = (rng.standard_normal((n_tok, k)) * rng.lognormal(0, 1, (n_tok, 1))).astype(np.float32)
    p = f.pack(raw)
    y = f.matmul(p, x)
    assert y.shape == (n_tok, n) and y.dtype == np.float32
    assert_within_q8k_bound(y, W, x)
    np.testing.assert_array_equal(y[n_tok // 2], f.matvec(p, x[n_tok // 2]))


@pytest.mark.parametrize("kind", [k for k in KINDS if fmt(k).vnni is not None])
def test_vnni_kernels_equal_portable_kernels(kind):
    """Same int32 sums per sub-block and the same float32 order of scaling in both sets: the
    kernels on simd.dpbusd agree with the portable ones to the bit."""
    rng = np.random.default_rng(14)
    n, k = 131, 1024
    raw = random_blocks(kind, n * k // 256, rng).reshape(n, -1)
    x = rng.standard_normal((5, k)).astype(np.float32)
    port, vnni = fmt(kind).with_kernels("portable"), fmt(kind).with_kernels("vnni")
    p, q = port.pack(raw), vnni.pack(raw)
    np.testing.assert_array_equal(vnni.matmul(q, x), port.matmul(p, x))
    np.testing.assert_array_equal(vnni.matvec(q, x[0]), port.matvec(p, x[0]))


@pytest.mark.parametrize("kind, kernels", kernel_sets(KINDS))
def test_kernels_refuse_mismatched_activations(kind, kernels):
    f = fmt(kind).with_kernels(kernels)
    p = f.pack(random_blocks(kind, 6, np.random.default_rng(0)).reshape(3, -1))
    with pytest.raises(ValueError, match="length 256 do not match rows of 512"):
        f.matvec(p, np.zeros(256, np.float32))
    with pytest.raises(ValueError, match="dimension"):
        f.matvec(p, np.zeros((2, 512), np.float32))
    with pytest.raises(ValueError, match="dimension"):
        f.matmul(p, np.zeros(512, np.float32))


@requires_llama_cpp
@pytest.mark.parametrize("kind, kernels", kernel_sets(KINDS))
def test_matvec_matches_llama_cpp_vec_dot(kind, kernels):
    f = fmt(kind).with_kernels(kernels)
    rng = np.random.default_rng(11)
    n, k = 67, 1536
    raw = ggml_ref.quantize(rng.standard_normal((n, k)).astype(np.float32), kind)
    x = rng.standard_normal(k).astype(np.float32)
    y = f.matvec(f.pack(raw), x)
    q8 = ggml_ref.quantize_q8_k(x)
    ref = np.array([ggml_ref.vec_dot(kind, raw[i], q8, k) for i in range(n)])
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def _host_has_avx2() -> bool:
    import llvmlite.binding as llvm
    return llvm.get_host_cpu_features().get("avx2", False)


@pytest.mark.skipif(not _host_has_avx2(), reason="checks x86 SIMD code")
@pytest.mark.parametrize("kind", KINDS)
def test_block_dot_compiles_to_simd_integer_multiply_add(kind):
    """The portable decode kernels' inner loops must stay vectorized across the rows of a tile:
    LLVM's choice depends on the exact loop shapes (see q4_k._block_dot)."""
    import re

    import numba
    mod = {"Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}[kind]
    p = fmt(kind).with_kernels("portable").pack(random_blocks(kind, 2, np.random.default_rng(0)).reshape(1, -1))
    weights = {"Q4_K": ("qs", "sc"), "Q5_K": ("qs", "qh", "sc"), "Q6_K": ("q3", "sc")}[kind]
    args = [getattr(p, w)[0, 0] for w in weights]  # one super-block of the first tile
    fresh = numba.njit(mod._block_dot.py_func)  # uncached: inspect_asm needs a fresh compile
    fresh(*args, np.zeros(256, np.int8), np.zeros(mod.TILE, np.int32))
    asm = fresh.inspect_asm(fresh.signatures[0])
    # one vector multiply(-add) per product of the unrolled loop body over l; LLVM vectorizing
    # along l instead leaves a handful
    products = {"Q4_K": 64, "Q5_K": 16, "Q6_K": 32}[kind]
    assert len(re.findall(r"\bv(?:pdpwssd|pmaddwd|pmulld)\s+[^\n]*[yz]mm", asm)) >= products


def test_gemma_matrices_through_qmatrix(gemma3_path):
    f = GGUFFile(gemma3_path)
    rng = np.random.default_rng(12)
    for name in ("blk.2.ffn_down.weight", "blk.0.ffn_down.weight"):  # Q4_K, Q6_K
        t = f.tensor(name)
        m = QMatrix(t.qtype, t.raw, t.shape, name)
        W = quants.dequantize(np.asarray(t.raw), t.qtype).reshape(t.shape)
        x = rng.standard_normal((3, t.shape[1])).astype(np.float32)
        assert_within_q8k_bound(m(x[0])[None], W, x[:1])
        assert_within_q8k_bound(m(x), W, x)

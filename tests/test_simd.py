"""quantize/simd.py: the 16-lane vectors and vpdpbusd inside numba kernels.

The products are checked against numpy on random words, for the VNNI instruction and for the
portable expansion used on CPUs without it; the format kernels built on them must compile to
vpdpbusd on a VNNI host (their results are checked format by format in test_quant_*.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import numba
import numpy as np
import pytest

from edgeseek.quantize import simd
from edgeseek.quantize.simd import HAVE_VNNI, band, dpbusd, load_i, mul_f, splat_f, splat_i, srl, store_f, to_f, zero_i


def _kernel(w, x, out):
    acc = zero_i()
    for i in range(0, w.size, 16):
        v = load_i(w, i)
        acc = dpbusd(acc, band(v, splat_i(0x0F0F0F0F)), splat_i(x[i // 16]))
        acc = dpbusd(acc, srl(v, 4), splat_i(x[i // 16]))  # high nibbles carry bits 4-7 of each byte
    store_f(out, 0, mul_f(to_f(acc), splat_f(np.float32(0.5))))


def _reference(w, x):
    xb = x.view(np.int8).reshape(-1, 4).astype(np.int64)  # (chunks, bytes)
    lo = (w & np.uint32(0x0F0F0F0F)).view(np.uint8).reshape(-1, 16, 4).astype(np.int64)  # (chunks, lanes, bytes)
    # srl shifts the whole 32-bit lane: byte i becomes (byte i >> 4) | (byte i + 1 << 4)
    hi = (w >> np.uint32(4)).view(np.uint8).reshape(-1, 16, 4).astype(np.int64)
    return ((np.einsum("clb,cb->l", lo, xb) + np.einsum("clb,cb->l", hi, xb)) * 0.5).astype(np.float32)


@pytest.mark.parametrize("vnni", [True, False] if HAVE_VNNI else [False])
def test_dpbusd_matches_numpy(vnni, monkeypatch):
    monkeypatch.setattr(simd, "HAVE_VNNI", vnni)  # read when the kernel compiles
    kernel = numba.njit(_kernel)  # a fresh, uncached compile under this setting
    rng = np.random.default_rng(3)
    w = rng.integers(0, 2**32, 16 * 6, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(-128, 128, 6 * 4).astype(np.int8).view(np.int32)
    out = np.zeros(16, np.float32)
    kernel(w, x, out)
    np.testing.assert_array_equal(out, _reference(w, x))
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert bool(re.search(r"\bvpdpbusd\b", asm)) == vnni


@pytest.mark.skipif(not HAVE_VNNI, reason="needs AVX512-VNNI")
@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q4_K", "Q6_K"])
def test_format_kernels_compile_to_vpdpbusd(kind):
    from gguf import GGMLQuantizationType as T

    from edgeseek.quantize import QMatrix, get_format, q4_0, q4_k, q5_0, q6_k
    kernel = {"Q4_0": q4_0._matmul_vnni, "Q5_0": q5_0._matmul_q5_0_vnni, "Q4_K": q4_k._matmul_vnni,
              "Q6_K": q6_k._matmul_vnni}[kind]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 256)).astype(np.float32)
    m = QMatrix(T[kind], get_format(T[kind]).quantize(w).reshape(32, -1), (32, 256))
    m(rng.standard_normal(256).astype(np.float32))  # compiles (or loads) the kernel for these types
    fresh = numba.njit(parallel=True)(kernel.py_func)
    fresh.compile(kernel.signatures[0])
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert len(re.findall(r"\bvpdpbusd\b", asm)) >= 8


@pytest.mark.parametrize("kind, shape", [("Q4_0", (200, 256)), ("Q4_K", (40, 512)), ("Q5_0", (130, 96))])
def test_matmul_many_rows_equal_matvec(kind, shape):
    """A layer's experts in one kernel call give, row for row, what each matrix gives alone."""
    from gguf import GGMLQuantizationType as T

    from edgeseek.quantize import QMatrix, get_format
    fmt = get_format(T[kind])
    rng = np.random.default_rng(5)
    mats = [QMatrix(T[kind], fmt.quantize(rng.standard_normal(shape).astype(np.float32)).reshape(shape[0], -1), shape)
            for _ in range(3)]
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    rows = [1, 0, 1]
    got = fmt.matmul_many([m.packed for m in mats], x, rows)
    if not HAVE_VNNI:
        assert got is None
        return
    np.testing.assert_array_equal(got, np.stack([m(x[r]) for m, r in zip(mats, rows)]))


def test_experts_of_one_token_equal_expert_by_expert():
    from edgeseek.engine import load
    from edgeseek.models.common import ffn
    from edgeseek.models.moe import experts_one_token

    eng = load(Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_k_m.gguf", n_ctx=16)
    triples = eng.model.experts.experts(1, np.array([0, 3, 7, 9]))
    x = np.random.default_rng(2).standard_normal((1, eng.model.config.n_embd)).astype(np.float32)
    got = experts_one_token(x, triples)  # Q5_0 experts
    want = np.concatenate([ffn(x, *t) for t in triples])
    if not HAVE_VNNI:
        assert got is None
        return
    np.testing.assert_array_equal(got, want)

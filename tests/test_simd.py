"""quantize/simd.py: the 16-lane vectors and vpdpbusd inside numba kernels, and the choice between
the formats' VNNI and portable kernels.

The products are checked against numpy on random words, for the VNNI instruction and for the
portable expansion used on CPUs without it; the format kernels built on them must compile to
vpdpbusd on a VNNI host (their results are checked format by format in test_quant_*.py, against
the reference and against the portable kernels).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from edgeseek.quantize import FORMATS, get_format, simd
from edgeseek.quantize.simd import CPU_HAS_AVX2, CPU_HAS_VNNI, band, dpbusd, dpbusd_centered, dpbusd_small, load_i, mul_f, splat_f, splat_i, srl, store_f, to_f, zero_i

CODEGEN = [True, False] if CPU_HAS_VNNI else [False]  # vpdpbusd, and the portable expansion


def _nibble_kernel(w, x, out):
    acc = zero_i()
    for i in range(0, w.size, 16):
        v = load_i(w, i)
        acc = dpbusd(acc, band(v, splat_i(0x0F0F0F0F)), splat_i(x[i // 16]))
        acc = dpbusd(acc, srl(v, 4), splat_i(x[i // 16]))  # high nibbles carry bits 4-7 of each byte
    store_f(out, 0, mul_f(to_f(acc), splat_f(np.float32(0.5))))


def _nibble_reference(w, x):
    xb = x.view(np.int8).reshape(-1, 4).astype(np.int64)  # (chunks, bytes)
    lo = (w & np.uint32(0x0F0F0F0F)).view(np.uint8).reshape(-1, 16, 4).astype(np.int64)  # (chunks, lanes, bytes)
    # srl shifts the whole 32-bit lane: byte i becomes (byte i >> 4) | (byte i + 1 << 4)
    hi = (w >> np.uint32(4)).view(np.uint8).reshape(-1, 16, 4).astype(np.int64)
    return ((np.einsum("clb,cb->l", lo, xb) + np.einsum("clb,cb->l", hi, xb)) * 0.5).astype(np.float32)


def _words_kernel(op):
    """A fresh numba kernel: the 16 lanes of op(acc, w's chunk, x's word splat) over w's chunks."""
    def kernel(w, x, out):
        acc = zero_i()
        for i in range(0, w.size, 16):
            acc = op(acc, load_i(w, i), splat_i(x[i // 16]))
        store_f(out, 0, to_f(acc))
    return numba.njit(kernel)


def _lane_sums_equal_numpy(kernel, w, x, bias: int = 0) -> np.ndarray:
    """Run kernel on words w and x; its lanes must equal numpy's sums of (byte of w - bias) times
    (signed byte of x), four a lane."""
    out = np.zeros(16, np.float32)
    kernel(w, x, out)
    ua = w.view(np.uint8).reshape(-1, 16, 4).astype(np.int64) - bias  # (chunks, lanes, bytes)
    sb = x.view(np.int8).reshape(-1, 4).astype(np.int64)  # (chunks, bytes)
    np.testing.assert_array_equal(out, np.einsum("clb,cb->l", ua, sb).astype(np.float32))
    return out


def _random_words(rng, chunks):
    w = rng.integers(0, 2**32, 16 * chunks, dtype=np.uint64).astype(np.uint32)
    x = rng.integers(-128, 128, 4 * chunks).astype(np.int8).view(np.int32)
    return w, x


@pytest.mark.parametrize("vnni", CODEGEN)
def test_dpbusd_matches_numpy(vnni, monkeypatch):
    monkeypatch.setattr(simd, "HAVE_VNNI", vnni)  # read when the kernel compiles
    kernel = numba.njit(_nibble_kernel)  # a fresh, uncached compile under this setting
    w, x = _random_words(np.random.default_rng(3), 6)
    out = np.zeros(16, np.float32)
    kernel(w, x, out)
    np.testing.assert_array_equal(out, _nibble_reference(w, x))
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert bool(re.search(r"\bvpdpbusd\b", asm)) == vnni


@pytest.mark.parametrize("vnni", CODEGEN)
def test_dpbusd_unsigned_times_signed_bytes(vnni, monkeypatch):
    """Every byte of a as unsigned (0..255), every byte of b as signed (-128..127), the four
    products of a lane added to it: the extremes and random words, against numpy."""
    monkeypatch.setattr(simd, "HAVE_VNNI", vnni)
    w, x = _random_words(np.random.default_rng(4), 8)
    w[:16], x[0] = 0xFFFFFFFF, np.int32(np.array([-128] * 4, np.int8).view(np.int32)[0])  # 255 * -128
    w[16:32], x[1] = 0x80FF7F01, np.int32(np.array([127, -1, -128, 1], np.int8).view(np.int32)[0])
    out = _lane_sums_equal_numpy(_words_kernel(dpbusd), w, x)
    assert out.min() < -100_000  # the extremes made it in


def test_dpbusd_small_on_bytes_below_128():
    """dpbusd_small, bytes of a up to 127 against every signed byte of b, the extremes included:
    numpy's sums; on an AVX2 CPU without VNNI through vpmaddubsw, whose int16 pair sums those bytes
    cannot overflow."""
    kernel = _words_kernel(dpbusd_small)
    w, x = _random_words(np.random.default_rng(5), 8)
    w &= np.uint32(0x7F7F7F7F)
    w[:16], x[0] = 0x7F7F7F7F, np.int32(np.array([-128] * 4, np.int8).view(np.int32)[0])  # 127 * -128 (x4)
    w[16:32], x[1] = 0x7F007F01, np.int32(np.array([127, -1, -128, 127], np.int8).view(np.int32)[0])
    _lane_sums_equal_numpy(kernel, w, x)
    asm = kernel.inspect_asm(kernel.signatures[0])
    assert bool(re.search(r"\bvpmaddubsw\b", asm)) == (CPU_HAS_AVX2 and not simd.HAVE_VNNI)


def test_dpbusd16_partial_sums_of_nibble_products():
    """dpbusd16 into a partial sum then sum16 (the Q4_0 kernels' block: eight products of nibbles):
    numpy's sums with the extremes included (15 x -128 in every byte: the int16 pairs' bound); on
    an AVX2 CPU without VNNI one vpmaddwd for the eight vpmaddubsw."""
    def kernel(w, x, out):
        t = zero_i()
        for i in range(0, w.size, 16):
            t = simd.dpbusd16(t, load_i(w, i), splat_i(x[i // 16]))
        store_f(out, 0, to_f(simd.sum16(splat_i(np.int32(-7)), t)))
    kernel = numba.njit(kernel)
    rng = np.random.default_rng(6)
    for extreme in (False, True):
        w, x = _random_words(rng, simd.NIBBLE_PRODUCTS)
        w &= np.uint32(0x0F0F0F0F)
        if extreme:
            w[:], x[:] = 0x0F0F0F0F, np.int32(np.array([-128] * 4, np.int8).view(np.int32)[0])
        out = np.zeros(16, np.float32)
        kernel(w, x, out)
        ua = w.view(np.uint8).reshape(-1, 16, 4).astype(np.int64)
        want = np.einsum("clb,cb->l", ua, x.view(np.int8).reshape(-1, 4)) - 7
        np.testing.assert_array_equal(out, want.astype(np.float32))
    asm = kernel.inspect_asm(kernel.signatures[0])
    if CPU_HAS_AVX2 and not simd.HAVE_VNNI:
        assert len(re.findall(r"\bvpmaddwd\b", asm)) < len(re.findall(r"\bvpmaddubsw\b", asm))


@pytest.mark.parametrize("vnni,avx2", [(v, a) for v in CODEGEN for a in ([CPU_HAS_AVX2, False] if not v else [True])])
def test_dpwssd_of_paired_bytes_and_int16_halves(vnni, avx2, monkeypatch):
    """dpwssd on load_u8_pairs' halves (Q4_K's mins, two sub-blocks a lane) times int16 halves
    packed from int32 sums as the kernel packs them, the extremes included, then sra: numpy's
    sums; vpdpwssd on a VNNI CPU, vpmaddwd on AVX2, widened IR elsewhere."""
    monkeypatch.setattr(simd, "HAVE_VNNI", vnni)  # read when the kernel compiles
    monkeypatch.setattr(simd, "CPU_HAS_AVX2", avx2)

    def kernel(m, s, out):
        acc = simd.sra(splat_i(np.int32(-4096)), 4)  # -256, arithmetically
        for q in range(s.shape[0]):
            packed = (s[q, 0] & 0xFFFF) | (s[q, 1] << 16)
            acc = simd.dpwssd(acc, simd.load_u8_pairs(m, 32 * q), splat_i(packed))
        store_f(out, 0, to_f(acc))
    kernel = numba.njit(kernel)
    rng = np.random.default_rng(7)
    m = rng.integers(0, 256, 32 * 4).astype(np.uint8)
    s = rng.integers(-4064, 4065, (4, 2)).astype(np.int32)
    m[:32], s[0] = 255, (-32768, 32767)
    out = np.zeros(16, np.float32)
    kernel(m, s, out)
    pairs = m.reshape(4, 16, 2).astype(np.int64)  # (q, lane, half)
    np.testing.assert_array_equal(out, (np.einsum("qlh,qh->l", pairs, s) - 256).astype(np.float32))
    asm = kernel.inspect_asm(kernel.signatures[0])
    if vnni or not CPU_HAS_VNNI:  # (on a VNNI CPU LLVM may fuse the other paths' vpmaddwd and add into it)
        assert bool(re.search(r"\bvpdpwssd\b", asm)) == vnni


def test_dpbusd_centered_on_stored_q8_bytes():
    """dpbusd_centered, every byte of a (Q8_0's q + 128: 0..255) as a - 128 against activations in
    -127..127 (quantize_q8's), the extremes included: numpy's sums; on AVX2 through vpsignb and
    vpmaddubsw."""
    w, x = _random_words(np.random.default_rng(6), 8)
    x = np.maximum(x.view(np.int8), -127).view(np.int32)
    w[:16], x[0] = 0, np.int32(np.array([-127] * 4, np.int8).view(np.int32)[0])  # -128 * -127
    w[16:32], x[1] = 0xFF80007F, np.int32(np.array([127, -127, 127, -1], np.int8).view(np.int32)[0])
    out = _lane_sums_equal_numpy(_words_kernel(dpbusd_centered), w, x, bias=128)
    assert out.max() > 60_000  # 4 x 128 x 127 made it in


VNNI_KINDS = [q.name for q, f in FORMATS.items() if f.vnni is not None]


@pytest.mark.skipif(not (CPU_HAS_VNNI or CPU_HAS_AVX2), reason="needs AVX512-VNNI or AVX2")
@pytest.mark.parametrize("kind", VNNI_KINDS)
def test_format_kernels_compile_to_vpdpbusd(kind, monkeypatch):
    """The VNNI set's kernels: vpdpbusd on a VNNI CPU, vpmaddubsw on an AVX2 one."""
    fmt = get_format(T[kind]).with_kernels("vnni")
    rng = np.random.default_rng(0)
    raw = fmt.quantize(rng.standard_normal((32, 256)).astype(np.float32)).reshape(32, -1)
    fmt.matmul(fmt.pack(raw), rng.standard_normal((8, 256)).astype(np.float32))  # compiles (or loads) the kernel
    # (from Python: more rows than the row kernels take, which call it inside their own call)
    kernel = fmt.kernels.matmul_kernel
    monkeypatch.setattr(simd, "HAVE_VNNI", CPU_HAS_VNNI)  # whatever EDGESEEK_PORTABLE_KERNELS says
    fresh = numba.njit(parallel=True)(kernel.py_func)
    fresh.compile(kernel.signatures[0])
    asm = fresh.inspect_asm(fresh.signatures[0])
    assert len(re.findall(r"\bvpdpbusd\b" if CPU_HAS_VNNI else r"\bvpmaddubsw\b", asm)) >= 8


PREFETCHING = ["Q4_0", "Q4_1", "Q5_0", "Q4_K"]  # the formats whose kernels read their blocks ahead (tiles.ahead)


@pytest.mark.parametrize("kind", PREFETCHING)
def test_kernels_prefetch_their_next_blocks(kind):
    """A matvec asks for the weight lines a few blocks ahead (prefetcht0), reaching past the last
    block of the last tile without harm: the kernel over a matrix of one tile and two blocks gives
    the same values as the matrix dequantized."""
    fmt = get_format(T[kind]).with_kernels("vnni")
    rng = np.random.default_rng(1)
    k = 2 * fmt.block_size
    raw = fmt.quantize(rng.standard_normal((16, k)).astype(np.float32)).reshape(16, -1)
    x = rng.standard_normal((8, k)).astype(np.float32)  # more rows than the row kernels take
    y = fmt.matmul(fmt.pack(raw), x)
    w = fmt.dequantize(raw.reshape(-1, fmt.type_size)).reshape(16, k)
    np.testing.assert_allclose(y, x @ w.T, rtol=0.02, atol=0.02 * np.abs(x @ w.T).max())
    kernel = fmt.kernels.matmul_kernel
    fresh = numba.njit(parallel=True)(kernel.py_func)  # numba shows no machine code of a cached kernel
    fresh.compile(kernel.signatures[0])
    assert re.search(r"\bprefetcht0\b", fresh.inspect_asm(fresh.signatures[0]))


@pytest.mark.parametrize("kind, shape", [("Q4_0", (200, 256)), ("Q4_K", (40, 512)), ("Q5_0", (130, 96)), ("Q8_0", (70, 64)),
                                         ("Q4_1", (90, 128)), ("Q6_K", (130, 512))])
def test_matmul_many_rows_equal_matvec(kind, shape):
    """A layer's experts in one kernel call give, row for row, what each matrix gives alone, and
    what the portable kernels give."""
    fmt = get_format(T[kind])
    vnni, portable = fmt.with_kernels("vnni"), fmt.with_kernels("portable")
    rng = np.random.default_rng(5)
    raws = [fmt.quantize(rng.standard_normal(shape).astype(np.float32)).reshape(shape[0], -1) for _ in range(3)]
    x = rng.standard_normal((2, shape[1])).astype(np.float32)
    rows = [1, 0, 1]
    got = vnni.matmul_many([vnni.pack(r) for r in raws], x, rows)
    assert got.shape == (3, shape[0])
    np.testing.assert_array_equal(got, np.stack([vnni.matvec(vnni.pack(r), x[i]) for r, i in zip(raws, rows)]))
    np.testing.assert_array_equal(got, np.stack([portable.matvec(portable.pack(r), x[i]) for r, i in zip(raws, rows)]))
    packed = [vnni.pack(r) for r in raws]
    call = vnni.bind_many(packed, rows, x.shape)  # a layer's per-head products, bound once
    np.testing.assert_array_equal(call(x), got)
    np.testing.assert_array_equal(call(x[::-1].copy())[[0, 2]], vnni.matmul_many(packed[::2], x[::-1].copy(), [1, 1]))
    with pytest.raises(ValueError, match="rows"):
        vnni.bind_many(packed, [0, 2, 1], x.shape)
    with pytest.raises(ValueError, match="length"):
        vnni.bind_many(packed, rows, (2, shape[1] + 32))


def test_matmul_many_of_any_count_reuses_the_kernels_load_compiled():
    """Counts of 5 to 8 matrices (a layer's CPU experts beside a GPU, or as a RAM budget's store
    serves them) run the kernel compiled for 8 (registry.many_size): no compile at a first token."""
    fmt = get_format(T.Q4_0).with_kernels("vnni")
    rng = np.random.default_rng(8)
    raw = fmt.quantize(rng.standard_normal((64, 256)).astype(np.float32)).reshape(64, -1)
    packed, x = fmt.pack(raw), rng.standard_normal((1, 256)).astype(np.float32)
    fmt.matmul_many([packed] * 8, x, [0] * 8)
    compiled = len(fmt.kernels.many_kernel.signatures)
    want = fmt.matvec(packed, x[0])
    for n in (5, 6, 7):
        np.testing.assert_array_equal(fmt.matmul_many([packed] * n, x, [0] * n), np.stack([want] * n))
    assert len(fmt.kernels.many_kernel.signatures) == compiled


@pytest.mark.parametrize("kind", [q.name for q in FORMATS])
def test_one_vector_through_several_matrices_equals_each_alone(kind):
    """matvecs (a layer's q, k, v; gate and up) quantizes the activation once: every matrix's
    product bit for bit as its own matvec, matrices of different heights; matmuls does the same
    for a few rows (a verification's tokens) against each matrix's matmul."""
    fmt = get_format(T[kind])
    k = 256
    rng = np.random.default_rng(7)
    packs = [fmt.pack(fmt.quantize(rng.standard_normal((n, k)).astype(np.float32)).reshape(n, -1))
             for n in (48, 16, 80)]
    x = rng.standard_normal(k).astype(np.float32)
    got = fmt.matvecs(packs, x)
    for g, p in zip(got, packs):
        np.testing.assert_array_equal(g, fmt.matvec(p, x))
    rows = rng.standard_normal((3, k)).astype(np.float32)
    for g, p in zip(fmt.matmuls(packs, rows), packs):
        np.testing.assert_array_equal(g, fmt.matmul(p, rows))


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"])
@pytest.mark.parametrize("heights", [(48, 16, 80), (64, 64), (128, 64, 40)])
@pytest.mark.parametrize("tokens", [1, 3])
@pytest.mark.parametrize("which", ["vnni", "portable"])
def test_backend_linears_equal_each_product(kind, heights, tokens, which, monkeypatch):
    """backend.linears of one token or a verification's few (a layer's q, k and v; gate and up), and
    each matrix called alone, both through products bound once per matrix (QuantFormat.bind), bit
    for bit the format's own matvec / matmul, whatever the kernel set (VNNI sets run the matmul
    kernel on one row), with their norm made in the products' calls or not. Matrices of the tile
    layouts whose rows are whole tiles but the last's run as one fused matrix, each one's layout
    then a view of it (the weights held once); others one by one."""
    from edgeseek.backends.cpu import CPUBackend
    from edgeseek.quantize import QMatrix, tiles
    fmt = get_format(T[kind])
    monkeypatch.setattr(fmt, "kernels", getattr(fmt, which) or fmt.portable)
    k = 256
    rng = np.random.default_rng(8)
    ws = [QMatrix(T[kind], fmt.quantize(rng.standard_normal((n, k)).astype(np.float32)).reshape(n, -1), (n, k))
          for n in heights]

    def plain(w, x):  # the format's own products, unbound
        return fmt.matvec(w.packed, x[0])[None] if len(x) == 1 else fmt.matmul(w.packed, x)

    x = rng.standard_normal((tokens, k)).astype(np.float32)
    want = [plain(w, x) for w in ws]  # before any fusing
    for w, want_w in zip(ws, want):
        np.testing.assert_array_equal(w(x), want_w)
    b = CPUBackend()
    for g, w in zip(b.linears(ws, x), want):
        np.testing.assert_array_equal(g, w)
    norm = rng.uniform(0.5, 1.5, k).astype(np.float32)  # the rows' norm made in the products' own calls
    for g, w in zip(b.linears(ws, b.normed(x, norm, 1e-6)), ws):
        np.testing.assert_array_equal(g, plain(w, b.rms_norm(x, norm, 1e-6)))
    fusable = type(ws[0].packed) is tiles.Packed and all(n % tiles.TILE == 0 for n in heights[:-1])
    group = b._fused(ws)
    assert (group is not None) == fusable
    if fusable:
        assert all(np.shares_memory(w.packed.qs, group[0].qs) for w in ws)
        for g, w, want_w in zip(b.linears(ws, x[:1]), ws, want):  # one token after the fused verification
            np.testing.assert_array_equal(g, want_w[:1])
            np.testing.assert_array_equal(w(x), want_w)  # each matrix alone, on its view


def test_experts_of_one_token_equal_expert_by_expert(monkeypatch):
    """Decode's experts in one kernel call per projection (the VNNI kernels' matmul_many), against
    the portable kernels, which have no such call: moe then runs expert by expert."""
    from edgeseek.engine import load
    from edgeseek.backends import CPUBackend
    from edgeseek.models.common import ffn

    def run(which):
        with monkeypatch.context() as m:
            for f in FORMATS.values():
                m.setattr(f, "kernels", getattr(f, which) or f.portable)
            eng = load(Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_k_m.gguf", n_ctx=16)
            triples = eng.model.experts.experts(1, np.array([0, 3, 7, 9]))  # Q5_0 experts
            x = np.random.default_rng(2).standard_normal((1, eng.model.config.n_embd)).astype(np.float32)
            b = CPUBackend()  # (expert by expert as moe's fallback goes: the backend's silu)
            return b.experts_rows(x, triples, np.zeros(4, np.int64)), np.concatenate([ffn(x, *t, glu=b.swiglu) for t in triples])

    one_call, by_expert = run("vnni")
    none, by_expert_portable = run("portable")
    assert none is None
    np.testing.assert_array_equal(one_call, by_expert)
    np.testing.assert_array_equal(one_call, by_expert_portable)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0])
def test_matmul_groups_rows_equal_matmul(qtype):
    """Matrices each times its run of rows in one kernel call (several sequences' routed experts; gate
    and up of them together, written to two halves of the result) give, row for row, what each
    matrix's matmul gives, VNNI or portable; rows no run writes stay zero."""
    fmt = get_format(qtype)
    vnni, portable = fmt.with_kernels("vnni"), fmt.with_kernels("portable")
    rng = np.random.default_rng(6)
    shape = (200, 256)  # a last tile padded with zero rows
    raws = [fmt.quantize(rng.standard_normal(shape).astype(np.float32)).reshape(shape[0], -1) for _ in range(3)]
    x = rng.standard_normal((9, shape[1])).astype(np.float32)
    spans = [[0, 2, 0], [2, 2, 2], [2, 8, 2], [0, 2, 10], [2, 8, 12], [1, 8, 18], [8, 9, 25]]  # matrix 1 gets no
    # rows; rows 8, 9 of the result none
    packs = [vnni.pack(r) for r in raws]
    got = vnni.matmul_groups([packs[0], packs[1], packs[2], packs[1], packs[2], packs[0], packs[1]], x, spans)
    assert got.shape == (26, shape[0])
    for which in (vnni, portable):  # runs of 1, 2, 6 and 7 rows (blocks of four and two rows on AVX2, and one)
        ps = [which.pack(r) for r in raws]
        np.testing.assert_array_equal(got[0:2], which.matmul(ps[0], x[0:2]))
        np.testing.assert_array_equal(got[2:8], which.matmul(ps[2], x[2:8]))
        np.testing.assert_array_equal(got[10:12], which.matmul(ps[1], x[0:2]))
        np.testing.assert_array_equal(got[12:18], which.matmul(ps[2], x[2:8]))
        np.testing.assert_array_equal(got[18:25], which.matmul(ps[0], x[1:8]))
        np.testing.assert_array_equal(got[25:26], which.matmul(ps[1], x[8:9]))
    assert not got[8:10].any()
    assert portable.matmul_groups([portable.pack(raws[0])], x, [[0, 1, 0]]) is None
    with pytest.raises(ValueError, match="spans"):
        vnni.matmul_groups(packs[:2], x, [[0, 10, 0], [0, 1, 0]])


def test_experts_of_several_tokens_equal_expert_by_expert():
    """More tokens than a verification's (several sequences' step): moe runs every expert's run of
    rows in one call per projection (experts_runs), bit for bit what it gives expert by expert. (The
    portable kernels, on a CPU without VNNI, have no such call: moe goes expert by expert there.)"""
    from edgeseek.engine import load
    from edgeseek.backends import CPUBackend
    from edgeseek.models.moe import FEW_TOKENS, moe

    eng = load(Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q4_0.gguf", n_ctx=16)
    c = eng.model.config
    layer = c.n_dense_lead
    rng = np.random.default_rng(3)
    T = FEW_TOKENS + 7
    x = rng.standard_normal((T, c.n_embd)).astype(np.float32)
    ids = np.stack([rng.choice(c.n_expert, c.n_expert_used, replace=False) for _ in range(T)])  # (T, k)
    weights = rng.random(ids.shape).astype(np.float32)

    class ByExpert(CPUBackend):
        def experts_runs(self, x, triples, counts):
            return None

    runs, by_expert = CPUBackend(), ByExpert()
    triples = eng.model.experts.experts(layer, np.array([0, 1]))
    fmt = triples[0][0].fmt
    assert (runs.experts_runs(x[:3], triples, np.array([1, 2])) is not None) == (fmt.kernels is fmt.vnni)
    np.testing.assert_array_equal(moe(x, ids, weights, eng.model.experts, layer, runs),
                                  moe(x, ids, weights, eng.model.experts, layer, by_expert))


@pytest.mark.parametrize("switch", ["1", "0"])
def test_portable_kernels_switch(switch):
    """EDGESEEK_PORTABLE_KERNELS=1: every format computes with its portable kernels, VNNI (or AVX2)
    CPU or not; without it, the VNNI set wherever the CPU has VNNI or AVX2."""
    code = ("from edgeseek.quantize import FORMATS, simd; "
            "print(simd.VNNI_KERNELS, sorted(q.name for q, f in FORMATS.items() if f.kernels is not f.portable))")
    env = dict(os.environ, EDGESEEK_PORTABLE_KERNELS=switch)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    vnni = (CPU_HAS_VNNI or CPU_HAS_AVX2) and switch == "0"
    assert out.strip() == f"{vnni} {sorted(VNNI_KINDS) if vnni else []}"



def test_gqa_decode_from_the_float16_cache_equals_numpy():
    """The CPU's one-token attention read straight from the float16 caches (llama / qwen2 decode at
    long contexts) against the float32 copy through causal_attention."""
    from edgeseek.backends import CPUBackend
    from edgeseek.backends.cpu import KV_KERNEL_MIN
    b = CPUBackend()
    rng = np.random.default_rng(7)
    G, H, d, n_ctx, n = 3, 3, 64, KV_KERNEL_MIN + 100, KV_KERNEL_MIN + 77
    k = rng.standard_normal((G, n_ctx, d)).astype(np.float16)
    v = rng.standard_normal((G, n_ctx, d)).astype(np.float16)
    q = rng.standard_normal((G, H, d)).astype(np.float32)
    got = b.kv_decode(q, k[:, n - 1], v[:, n - 1], k, v, np.array([n - 1]), 0.125)  # stores what is there
    want = b.causal_attention(q[:, :, None], k[:, :n].astype(np.float32), v[:, :n].astype(np.float32), n - 1, 0.125)
    np.testing.assert_allclose(got, want[:, :, 0], rtol=1e-4, atol=1e-5)
    short = 40  # one core
    want = b.causal_attention(q[:, :, None], k[:, :short].astype(np.float32), v[:, :short].astype(np.float32),
                              short - 1, 0.125)
    got = b.kv_decode(q, k[:, short - 1], v[:, short - 1], k, v, np.array([short - 1]), 0.125)
    np.testing.assert_allclose(got, want[:, :, 0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("G, Hg, d, dim, kind", [(3, 3, 64, 64, "norm"), (2, 4, 128, 128, "neox"), (1, 2, 32, 16, "norm")])
def test_gqa_step_equals_rope_then_kv_decode(G, Hg, d, dim, kind):
    """A decode token's rope, cache store and attention in one call (kv_step: llama / qwen2 decode
    over a short context) give the bits of the steps one by one: the model's rope on q and k, then
    kv_decode; caches included (float16 rounding as numpy's), a partial rope (dim < d) too. From
    KV_KERNEL_MIN positions it declines, leaving the caches alone."""
    from edgeseek.backends import CPUBackend
    from edgeseek.backends.cpu import KV_KERNEL_MIN
    from edgeseek.models.common import Rope, rope_freqs
    b = CPUBackend()
    rope = Rope(dim, rope_freqs(dim, 10000.0), kind, backend=b)
    rng = np.random.default_rng(8)
    for p in (0, 5, 150):
        k_cache = rng.standard_normal((G, 300, d)).astype(np.float16)
        v_cache = rng.standard_normal((G, 300, d)).astype(np.float16)
        k_want, v_want = k_cache.copy(), v_cache.copy()
        q, k, v = (rng.standard_normal(n * d).astype(np.float32) * 3 for n in (G * Hg, G, G))
        pos = np.array([p])
        got = b.kv_step(q, k, v, rope, k_cache, v_cache, pos, 0.125)
        q_r, k_r = rope(q.reshape(1, G * Hg, d), pos), rope(k.reshape(1, G, d), pos)
        want = b.kv_decode(q_r.reshape(G, Hg, d), k_r[0], v.reshape(G, d), k_want, v_want, pos, 0.125)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(k_cache, k_want)
        np.testing.assert_array_equal(v_cache, v_want)
    long = np.zeros((G, KV_KERNEL_MIN + 1, d), np.float16)
    assert b.kv_step(q, k, v, rope, long, long.copy(), np.array([KV_KERNEL_MIN]), 0.125) is None and not long.any()


@pytest.mark.parametrize("H, n", [(4, 200), (16, 201), (16, 200), (3, 77)])
def test_latent_decode_on_one_core_equals_both_cores(monkeypatch, H, n):
    """MLA's one-token attention from the float16 latent cache: the one-core kernel for short
    contexts against the two-core one (two heads by two positions, an odd last position included;
    eight heads at a time on AVX-512 where H is a multiple of 8), bit for bit: the same arithmetic
    per head, so that a batch's rows and a verification's tokens (one core per row) give what
    decoding gives; both against float64."""
    import edgeseek.backends.cpu as cpu
    rng = np.random.default_rng(8)
    C, R, n_ctx = 128, 32, 300
    c = rng.standard_normal((n_ctx, C)).astype(np.float16)
    k = rng.standard_normal((n_ctx, R)).astype(np.float16)
    q_lat, q_pe = rng.standard_normal((H, C)).astype(np.float32), rng.standard_normal((H, R)).astype(np.float32)
    new_c, new_k = rng.standard_normal((1, C)).astype(np.float32), rng.standard_normal((1, R)).astype(np.float32)
    out = {}
    for limit in (0, 10**6):
        monkeypatch.setattr(cpu, "LATENT_SHORT", limit)
        out[limit] = cpu.CPUBackend().latent_decode(q_lat, q_pe, new_c, new_k, c.copy(), k.copy(), np.array([n - 1]), 0.1)
    np.testing.assert_array_equal(out[10**6], out[0])
    lat, kpe = c[:n].astype(np.float64), k[:n].astype(np.float64)
    lat[n - 1], kpe[n - 1] = new_c[0].astype(np.float16), new_k[0].astype(np.float16)
    s = (q_lat @ lat.T + q_pe @ kpe.T) * 0.1
    p = np.exp(s - s.max(1, keepdims=True))
    np.testing.assert_allclose(out[0][0], (p / p.sum(1, keepdims=True)) @ lat, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["norm", "neox"])
def test_rope_kernel_equals_the_numpy_math(kind):
    from edgeseek.backends import CPUBackend
    from edgeseek.models.common import Rope, rope_freqs
    x = np.random.default_rng(9).standard_normal((5, 3, 48)).astype(np.float32)
    pos = np.array([0, 1, 7, 300, 301])
    kernel = Rope(32, rope_freqs(32, 10000.0), kind, mscale=1.1, backend=CPUBackend())  # 16 values left as they are
    plain = Rope(32, rope_freqs(32, 10000.0), kind, mscale=1.1)
    np.testing.assert_allclose(kernel(x, pos), plain(x, pos), rtol=1e-6, atol=1e-6)


def test_rms_norm_kernel_is_the_float64_mean_of_squares():
    """The CPU's norm sums the squares in float64 as llama.cpp does; within float32 rounding of the
    numpy math (whose pairwise float32 sum it replaces)."""
    from edgeseek.backends import CPUBackend
    from edgeseek.models.common import rms_norm
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal((3, 576)).astype(np.float32) * 30, rng.standard_normal(576).astype(np.float32)
    got = CPUBackend().rms_norm(x, w, 1e-6)
    exact = x.astype(np.float64) / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(got, exact, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(got, rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", [(5, 0, 40), (5, 0, 600)])
def test_latent_decode_of_several_sequences_equals_one_by_one(positions):
    """A batch's decode step: every sequence's new token attends its own latent cache in one call,
    bit for bit what the one-token kernel gives sequence by sequence, the same entries stored; a
    long context too, where the one-token kernel runs on both cores (LATENT_SHORT) and the rows'
    kernel still one (sequence, four heads) per iteration."""
    from edgeseek.backends import CPUBackend
    from edgeseek.backends.cpu import LATENT_SHORT
    rng = np.random.default_rng(10)
    H, C, R, n_ctx = 6, 128, 32, 700  # (six heads: a group of four and one of two repeated)
    pos = np.array(positions)
    assert (pos.max() + 1) * H >= LATENT_SHORT or pos.max() < 50
    caches = [(rng.standard_normal((n_ctx, C)).astype(np.float16), rng.standard_normal((n_ctx, R)).astype(np.float16))
              for _ in pos]
    q_lat = rng.standard_normal((len(pos), H, C)).astype(np.float32)
    q_pe = rng.standard_normal((len(pos), H, R)).astype(np.float32)
    new_c = rng.standard_normal((len(pos), C)).astype(np.float32)
    new_k = rng.standard_normal((len(pos), R)).astype(np.float32)
    b = CPUBackend()
    mine = [(c.copy(), k.copy()) for c, k in caches]
    want = np.concatenate([b.latent_decode(q_lat[i], q_pe[i], new_c[i:i + 1], new_k[i:i + 1], *mine[i], pos[i:i + 1], 0.1)
                           for i in range(len(pos))])
    got = b.latent_decode_rows(q_lat, q_pe, new_c, new_k, [c for c, _ in caches], [k for _, k in caches], pos, 0.1)
    np.testing.assert_array_equal(got, want)
    for (c, k), (c1, k1) in zip(caches, mine):
        np.testing.assert_array_equal(c, c1)
        np.testing.assert_array_equal(k, k1)


@pytest.mark.parametrize("start", [40, 300])
def test_a_verifications_latent_steps_equal_latent_step_token_by_token(start):
    """A speculative verification's few tokens of one sequence: their rope, norm, cache entries and
    attention in one call (latent_steps), bit for bit what latent_step gives token after token (each
    row attends up to its own position), the caches left the same; a long context too, where the
    entries come first and the rows' kernel runs on both cores (LATENT_SHORT)."""
    from edgeseek.backends import CPUBackend
    from edgeseek.backends.cpu import LATENT_SHORT
    from edgeseek.models.common import Rope, yarn_freqs
    rng = np.random.default_rng(11)
    H, C, R, N, T, n_ctx = 6, 128, 32, 16, 3, 400
    assert ((start + 1) * T + T) * H >= LATENT_SHORT or start < 50
    rope = Rope(R, yarn_freqs(R, 10000.0, 4.0, 64, 32.0, 1.0), "norm")
    c0, k0 = rng.standard_normal((n_ctx, C)).astype(np.float16), rng.standard_normal((n_ctx, R)).astype(np.float16)
    q = rng.standard_normal((T, H, N + R)).astype(np.float32)
    kv = rng.standard_normal((T, C + R)).astype(np.float32) * 3
    q_lat = rng.standard_normal((T, H, C)).astype(np.float32)
    norm = rng.standard_normal(C).astype(np.float32)
    pos = np.arange(start, start + T)
    b = CPUBackend()
    c1, k1 = c0.copy(), k0.copy()
    want = np.concatenate([b.latent_step(q[t], kv[t], norm, 1e-6, rope, q_lat[t], c1, k1, pos[t:t + 1], 0.1)
                           for t in range(T)])
    c2, k2 = c0.copy(), k0.copy()
    got = b.latent_steps(q, kv, norm, 1e-6, rope, q_lat, c2, k2, pos, 0.1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(c2, c1)
    np.testing.assert_array_equal(k2, k1)


@numba.njit(fastmath=True)
def _exp_kernel(x, out):
    for i in range(0, x.shape[0], 16):
        simd.store_f(out, i, simd.exp_f(simd.load_f(x, i)))


def test_vector_exp_is_exp_within_float32_rounding():
    """simd.exp_f (the decode attention's softmax, 16 lanes at a time): within 3e-7 of e**x relative
    over the whole range a softmax's shifted scores take, 1 at 0, and 0 below -87.3."""
    x = -np.linspace(0, 100, 16 * 10000).astype(np.float32)
    out = np.empty_like(x)
    _exp_kernel(x, out)
    ref = np.exp(x.astype(np.float64))
    ok = x >= np.float32(-87.3)
    assert out[0] == 1.0
    assert np.max(np.abs(out[ok] - ref[ok]) / ref[ok]) < 3e-7
    assert (out[~ok] == 0).all()


def test_backend_router_picks_the_reference_experts():
    """The CPU backend's router (one numba call) against models.moe.route on random logits, ties
    included (scores rounded to halves): softmax and sigmoid gating, with and without V3's
    selection bias, expert groups, normalized and scaled weights, 8 to 256 experts. The same experts
    in the same order; the weights within float32 rounding (its exp and sums round their own way)."""
    from edgeseek.backends.cpu import route
    from edgeseek.models.moe import SIGMOID, SOFTMAX, RouterConfig
    from edgeseek.models.moe import route as reference
    rng = np.random.default_rng(7)
    for trial in range(600):
        E = int(rng.choice([8, 64, 256]))
        G = int(rng.choice([g for g in (1, 2, 8) if E // g >= 2]))
        cfg = RouterConfig(E, int(rng.integers(1, 9)), int(rng.choice([SOFTMAX, SIGMOID])), G, int(rng.integers(1, G + 1)),
                           bool(rng.integers(2)), float(rng.choice([1.0, 0.0, 2.5])))
        logits = rng.standard_normal((int(rng.integers(1, 5)), E)).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits * 2) / 2
        bias = rng.standard_normal(E).astype(np.float32) * 0.1 if trial % 2 else None
        ids, weights = route(logits, cfg, bias)
        want_ids, want_weights = reference(logits, cfg, bias)
        assert np.array_equal(ids, want_ids), (cfg, logits, bias)
        assert weights.dtype == np.float32
        np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=0)


def test_router_logits_of_a_row_do_not_depend_on_the_rows_beside_it():
    """The CPU backend's router product: a token's logits are the same bits alone and among 37 rows
    (a batch's or a verification's; BLAS's one-row and many-row products round differently, which
    made a token's routing depend on its batch), within float32 rounding of numpy's product."""
    from edgeseek.backends.cpu import router_logits
    rng = np.random.default_rng(8)
    w, x = rng.standard_normal((64, 2048)).astype(np.float32), rng.standard_normal((37, 2048)).astype(np.float32)
    many = router_logits(x, w)
    for t in (0, 5, 36):
        np.testing.assert_array_equal(router_logits(x[t:t + 1], w)[0], many[t])
    np.testing.assert_allclose(many, x.astype(np.float64) @ w.T.astype(np.float64), rtol=0, atol=2e-4)


@pytest.mark.parametrize("qtype", sorted(FORMATS, key=lambda q: q.name), ids=lambda q: q.name)
def test_a_heads_first_rows_are_a_view_that_computes_them(qtype):
    """CPUBackend.head_rows (the MTP block's drafts over the head's first rows): a matrix over a view
    of the head's kernel layout that gives, row for row, the whole matrix's first rows, one token or a
    few; None where the format has no tiled layout or the rows are no whole number of its tiles."""
    from edgeseek.backends.cpu import CPUBackend
    from edgeseek.quantize import QMatrix

    fmt = get_format(qtype)
    rng = np.random.default_rng(7)
    n, k = 448, 256
    raw = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32)).reshape(n, -1)
    w = QMatrix(qtype, raw, (n, k), "output.weight")
    view = CPUBackend.head_rows(w, 128)
    if view is None:
        pytest.skip(f"{qtype.name}: no tiled layout to view")
    assert view.shape == (128, k)
    for a in view.packed[:-1]:
        if isinstance(a, np.ndarray) and a.size:
            assert any(np.shares_memory(a, b) for b in w.packed[:-1] if isinstance(b, np.ndarray))
    for x in (rng.standard_normal((1, k)), rng.standard_normal((3, k)), rng.standard_normal((9, k))):
        x = x.astype(np.float32)
        np.testing.assert_array_equal(view(x), w(x)[:, :128])
    assert CPUBackend.head_rows(w, 100) is None and CPUBackend.head_rows(w, n) is None

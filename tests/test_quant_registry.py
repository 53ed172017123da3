"""quantize/registry.py: the table of formats and what their base class does for every format."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from edgeseek.convert.recipes import output_types, parse_overrides
from edgeseek.errors import UnsupportedError
from edgeseek.quantize import FORMATS, QuantFormat, get_format

SUPPORTED = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def test_every_format_registered_once_with_gguf_sizes():
    assert sorted(q.name for q in FORMATS) == sorted(SUPPORTED)
    for qtype, fmt in FORMATS.items():
        assert fmt.qtype == qtype and type(fmt).qtype == qtype
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]
        assert fmt.kernels in (fmt.portable, fmt.vnni)


def test_second_registration_of_a_type_is_refused():
    before = dict(FORMATS)
    with pytest.raises(ValueError, match="Q4_K is already registered by edgeseek.quantize.q4_k.Q4_K"):
        class Again(QuantFormat):
            qtype = T.Q4_K
    assert FORMATS == before


def test_shared_base_class_is_not_registered():
    before = dict(FORMATS)

    class Shared(QuantFormat):  # names no type: a base for formats that share code
        pass

    class Unsupported(Shared):
        qtype = T.Q2_K
        portable = FORMATS[T.Q4_K].portable  # never called

    try:
        assert [q for q in FORMATS if q not in before] == [T.Q2_K]
        assert (Unsupported.block_size, Unsupported.type_size) == GGML_QUANT_SIZES[T.Q2_K]
        assert not FORMATS[T.Q2_K].quantizes  # no quantizer: not a type the converter writes
        assert "q2_k" not in output_types()
    finally:
        del FORMATS[T.Q2_K]


def test_unsupported_type_names_the_supported_ones():
    with pytest.raises(UnsupportedError, match=r"quant type IQ2_XXS is not supported; supported: BF16, F16, F32"):
        get_format(T.IQ2_XXS)


def test_converter_types_are_the_registered_quantizers():
    assert output_types() == {q.name.lower(): q for q in FORMATS}
    assert parse_overrides(["exps=Q5_1"])[0][1] == T.Q5_1


def test_with_kernels_names_an_existing_set():
    q5_k = get_format(T.Q5_K)
    chosen = q5_k.kernels
    assert q5_k.with_kernels("portable").kernels is q5_k.portable
    assert q5_k.with_kernels("vnni").kernels is q5_k.vnni
    assert q5_k.kernels is chosen  # the registered instance keeps its own choice
    f16 = get_format(T.F16)  # a format with one set
    with pytest.raises(ValueError, match="F16 has no 'vnni' kernels"):
        f16.with_kernels("vnni")
    with pytest.raises(ValueError, match="no 'fast' kernels"):
        q5_k.with_kernels("fast")


@pytest.mark.parametrize("kind", SUPPORTED)
def test_blocks_view_and_checks(kind):
    fmt = get_format(T[kind])
    raw = np.zeros((3, 4 * fmt.type_size), np.uint8)
    raw.setflags(write=False)
    b = fmt.blocks(raw)
    assert b.shape == (3, 4, fmt.type_size) and np.shares_memory(b, raw) and not b.flags.writeable
    with pytest.raises(ValueError, match="not whole blocks"):
        fmt.blocks(np.zeros((3, 4 * fmt.type_size + 1), np.uint8))
    with pytest.raises(ValueError, match="not whole blocks"):
        fmt.blocks(np.zeros(4 * fmt.type_size, np.uint8))
    assert fmt.dequantize(raw).shape == (3 * 4 * fmt.block_size,)
    assert fmt.quantize(np.zeros((2, 5, 4 * fmt.block_size), np.float32)).shape == (2, 5, 4 * fmt.type_size)


@pytest.mark.parametrize("kind", ["Q4_0", "Q5_0", "Q4_K", "Q6_K"])
@pytest.mark.parametrize("kernels", ["vnni", "portable"])
def test_matmul_many_refuses_bad_arguments(kind, kernels):
    fmt = get_format(T[kind]).with_kernels(kernels)
    rng = np.random.default_rng(0)
    a = fmt.pack(fmt.quantize(rng.standard_normal((8, 512)).astype(np.float32)).reshape(8, -1))
    x = np.zeros((2, 512), np.float32)
    for rows in ([0, 2], [0, -1], [0]):
        with pytest.raises(ValueError, match="rows"):
            fmt.matmul_many([a, a], x, rows)
    with pytest.raises(ValueError, match="dimension"):
        fmt.matmul_many([a, a], x[0], [0, 0])
    if fmt.kernels.many_kernel is not None:
        b = fmt.pack(fmt.quantize(rng.standard_normal((300, 512)).astype(np.float32)).reshape(300, -1))
        with pytest.raises(ValueError, match="different shapes"):
            fmt.matmul_many([a, b], x, [0, 1])

"""GGML quant formats: block layouts, numba dequantizers, repacked layouts and kernels.

Importing this package registers every format (one module each) in `registry.FORMATS`.
"""
from .registry import FORMATS, QuantFormat, get_format  # noqa: F401
from .matrix import QMatrix  # noqa: F401
from . import floats, q4_0, q4_1, q5_0, q5_1, q8_0  # noqa: F401,E402
from . import q4_k, q5_k, q6_k  # noqa: F401,E402

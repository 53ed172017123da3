"""GGML quant formats: block layouts, numba dequantizers, repacked layouts and kernels.

Importing this package registers every format (one module each) in `registry.FORMATS`.
"""
from .registry import FORMATS, QuantFormat, get_format  # noqa: F401
from .matrix import QMatrix  # noqa: F401
from . import reference  # noqa: F401  (bootstrap formats; replaced format by format by the numba ones)

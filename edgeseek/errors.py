"""Errors that edgeseek raises for bad input: each names the file, tensor, key or line at fault."""


class EdgeseekError(Exception):
    """Base class: a problem with the user's input or environment, reported without a traceback."""


class GGUFError(EdgeseekError):
    """A GGUF file that cannot be used: truncated, corrupt, missing a key or tensor, misshaped."""


class UnsupportedError(EdgeseekError):
    """Something edgeseek does not run (yet): an architecture, a quant type, a tokenizer model."""


class BudgetError(EdgeseekError):
    """The RAM budget cannot hold what must stay resident: refused before loading."""

"""Expert stores: where a routed expert's weights come from. The MoE math only calls `experts()`.

`MmapExpertStore` serves every expert straight from the memory-mapped GGUF file (llama.cpp's way:
the page cache decides what stays in RAM). Each routed expert is one contiguous slice along axis 0
of the stacked ffn_{gate,up,down}_exps tensors; its QMatrix (and its repacked layout) is built on
first use and kept.
"""
from __future__ import annotations

import numpy as np

from edgeseek.quantize import QMatrix

from .errors import GGUFError


class ExpertStore:
    """The interface: (gate, up, down) QMatrix triples for the given experts of one layer."""

    def experts(self, layer: int, ids: np.ndarray) -> list[tuple[QMatrix, QMatrix, QMatrix]]:
        raise NotImplementedError


class MmapExpertStore(ExpertStore):
    def __init__(self, gguf, n_expert: int, n_embd: int, n_ff_exp: int):
        self.gguf = gguf
        self.n_expert = n_expert
        self.shapes = {  # numpy order (E, out, in)
            "ffn_gate_exps": (n_expert, n_ff_exp, n_embd),
            "ffn_up_exps": (n_expert, n_ff_exp, n_embd),
            "ffn_down_exps": (n_expert, n_embd, n_ff_exp),
        }
        self._cache: dict[tuple[int, int], tuple[QMatrix, QMatrix, QMatrix]] = {}

    def _tensors(self, layer: int):
        out = []
        for kind, shape in self.shapes.items():
            t = self.gguf.tensor(f"blk.{layer}.{kind}.weight", shape)
            out.append(t)
        return out

    def experts(self, layer: int, ids: np.ndarray):
        result = []
        tensors = None
        for e in ids.tolist():
            key = (layer, e)
            triple = self._cache.get(key)
            if triple is None:
                if not 0 <= e < self.n_expert:
                    raise GGUFError(f"layer {layer}: expert {e} out of range [0, {self.n_expert})")
                tensors = tensors or self._tensors(layer)
                triple = tuple(QMatrix(t.qtype, t.raw[e], t.shape[1:], f"{t.name}[{e}]") for t in tensors)
                self._cache[key] = triple
            result.append(triple)
        return result

"""LoRA adapters applied unmerged, as llama.cpp's build_lora_mm (src/llama-graph.cpp) does:
y = W x + s * B (A x) for every weight an adapter names, with s = scale * alpha / rank (alpha 0 or
absent: s = scale; llama_adapter_lora_weight::get_scale). The base weights stay shared and untouched.

A small layer over the Linear seam (backend.py), not a second forward pass: `attach` wraps the
model's Linear weights and its token embedding once; each forward pass tells `LoraRows` which
adapters each of its rows runs with (the sequence's cache carries them: `cache.lora`), and every
wrapped product adds the low-rank delta of each row group. The base product runs once for all rows
whatever their adapters. Routed experts get the delta of their own (A, B) pair from the stacked
(E, r, K) / (E, N, r) tensors, only for the (token, expert) pairs the router chose (`LoraRows.experts`,
which models/moe.py hands to the backend's expert products).

Stacked experts' pairs may be kept as float16 (an F16 adapter file's own values): the backend's
`lora_pairs` reads them in place for a decode step's few pairs; otherwise they are widened.

Shapes (numpy order, as the adapter GGUF stores them): A (r, K), B (N, r) for a weight (N, K);
A (E, r, K), B (E, N, r) for stacked experts (E, N, K); token_embd (V, D) has A (V, r) and B (D, r)
(llama.cpp's llm_build_inp_embd takes rows of A by token id).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .common import _is_linear

EXPERT_KINDS = ("gate", "up", "down")


@dataclass(frozen=True)
class LoraPair:
    a: np.ndarray  # (r, K) | (E, r, K) | token_embd (V, r); float32, the backend's memory
    b: np.ndarray  # (N, r) | (E, N, r) | token_embd (D, r)

    @property
    def rank(self) -> int:
        return self.b.shape[-1]


@dataclass(eq=False)
class Adapter:
    """One adapter file's tensors at one user scale; hashable by identity (row groups key on it)."""
    name: str  # what the user called it (its path, or a name given on the command line)
    alpha: float  # adapter.lora.alpha; 0 when the file has none
    scale: float  # the user's scale
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # base tensor name -> (A, B)

    def factor(self, pair: LoraPair) -> float:
        """s = scale * alpha / rank, or scale alone without alpha (llama.cpp's get_scale)."""
        return self.scale * self.alpha / pair.rank if self.alpha else self.scale

    def with_scale(self, scale: float) -> "Adapter":
        return Adapter(self.name, self.alpha, scale, self.pairs)


class LoraRows:
    """Which adapters each row of the current forward pass runs with: `groups` of (rows, adapters),
    rows None when one set of adapters covers every row (then any row count is accepted: the last
    row's logits, the MTP head), else an index array into the pass's n rows."""

    def __init__(self, kernel=None):
        self.groups: list[tuple[np.ndarray | None, tuple[Adapter, ...]]] = []
        self.n = 0
        # the backend's product for a few pairs of stacked experts (backend.lora_pairs), or None
        self.kernel = kernel

    def assign(self, sets: list[tuple[Adapter, ...]], counts: list[int]) -> None:
        """sets[r]: the adapters of sequence r, whose counts[r] rows follow those of r - 1."""
        self.n = int(sum(counts))
        rows: dict[tuple, list[np.ndarray]] = {}
        start = 0
        for s, c in zip(sets, counts):
            if s:
                rows.setdefault(tuple(s), []).append(np.arange(start, start + c))
            start += c
        if len(rows) == 1 and sum(len(r) for r in next(iter(rows.values()))) == self.n:
            self.groups = [(None, next(iter(rows)))]
        else:
            self.groups = [(np.concatenate(r), s) for s, r in rows.items()]

    def _rows(self, rows, x):
        if rows is not None and len(x) != self.n:
            raise ValueError(f"LoRA rows: {len(x)} rows in a pass of {self.n} with several adapter groups")
        return rows

    def _pairs(self, name: str, x):
        """(rows, adapter, pair) for each row group's adapters that adapt weight `name`."""
        for rows, adapters in self.groups:
            rows = self._rows(rows, x)
            for ad in adapters:
                p = ad.pairs.get(name)
                if p is not None:
                    yield rows, ad, p

    def add(self, name: str, x, y):
        """y (T, N) += each row group's deltas of weight `name` on x (T, K)."""
        for rows, ad, p in self._pairs(name, x):
            xs = x if rows is None else x[rows]
            d = self.kernel(p.a[None], p.b[None], np.zeros(len(xs), np.int64), xs, ad.factor(p)) \
                if self.kernel is not None else None
            if d is None:
                d = (xs @ p.a.T.astype(np.float32, copy=False)) @ p.b.T.astype(np.float32, copy=False)  # (T, N)
                d *= ad.factor(p)
            y = _added(y, rows, d)
        return y

    def add_embedding(self, name: str, ids, y):
        """y (T, D) += the deltas of the embedding rows of ids (T,): A[ids] (T, r) @ B.T."""
        for rows, ad, p in self._pairs(name, ids):
            sel = ids if rows is None else ids[rows]
            d = p.a[sel] @ p.b.T * ad.factor(p)
            y = _added(y, rows, d)
        return y

    def experts(self, layer: int, tok: np.ndarray, exp: np.ndarray):
        """The routed experts' deltas for (token tok[i], expert exp[i]) pairs: a function
        (kind, inputs (n, K)) -> (n, N) to add to that projection's outputs, kind gate, up or down;
        None where no adapter of these rows touches the layer's experts."""
        names = {k: f"blk.{layer}.ffn_{k}_exps.weight" for k in EXPERT_KINDS}
        uses = []  # (pair indices or None for all, adapter)
        for rows, adapters in self.groups:
            sel = None if rows is None else np.nonzero(np.isin(tok, rows))[0]
            if sel is not None and not len(sel):
                continue
            uses += [(sel, ad) for ad in adapters if any(n in ad.pairs for n in names.values())]
        if not uses:
            return None

        def delta(kind: str, x):
            out = None
            for sel, ad in uses:
                p = ad.pairs.get(names[kind])
                if p is None:
                    continue
                e = exp if sel is None else exp[sel]
                xs = x if sel is None else x[sel]
                one = len(e) > 1 and (e == e[0]).all()  # a prompt's expert: its tokens in one product
                d = self.kernel(p.a, p.b, e, xs, ad.factor(p)) if self.kernel is not None and not one else None
                if d is None:
                    d = expert_delta(p.a, p.b, e, xs, ad.factor(p))  # (n, N)
                if out is None:
                    out = np.zeros((len(x), d.shape[1]), np.float32)
                if sel is None:
                    out += d
                else:
                    out[sel] += d
            return out
        return delta


def _added(y, rows, d):
    """y with d added to its rows (all rows: None); a new array, the base product's left as it was."""
    if rows is None:
        return y + d
    y = y.copy()
    y[rows] += d
    return y


def expert_delta(a, b, e, x, s: float):
    """s * B[e_i] (A[e_i] x_i) for each pair i: a (E, r, K), b (E, N, r), e (n,), x (n, K) -> (n, N)."""
    if len(e) > 1 and (e == e[0]).all():  # one expert: two products of all the rows
        a1, b1 = a[e[0]].astype(np.float32), b[e[0]].astype(np.float32)  # (r, K), (N, r)
        return (x @ a1.T) @ b1.T * np.float32(s)
    t = np.matmul(a[e].astype(np.float32), x[:, :, None])  # (n, r, 1); float16 pairs widened
    return np.matmul(b[e].astype(np.float32), t)[:, :, 0] * np.float32(s)  # (n, N)


def plus_delta(m, kind: str, delta):
    """A Linear-like callable: m(x) + delta(kind, x) (delta's pairs are the rows of x)."""
    def call(x):
        y = m(x)
        d = delta(kind, x)
        return y if d is None else y + d
    return call


class LoraLinear:
    """A Linear (backend.py) whose products add the current rows' LoRA deltas; everything else
    (name, shape, packed layout, bytes) is the base weight's."""

    def __init__(self, base, rows: LoraRows):
        self.base, self.rows = base, rows

    def __getattr__(self, attr):
        return getattr(self.base, attr)

    def __call__(self, x):
        y = self.base(x)
        if not self.rows.groups:
            return y
        return self.rows.add(self.base.name, x, y)


class LoraEmbedding:
    """The token embedding with the adapters' rows added (llama.cpp's llm_build_inp_embd)."""

    def __init__(self, base, rows: LoraRows, name: str = "token_embd.weight"):
        self.base, self.rows, self.name = base, rows, name

    def __getattr__(self, attr):
        return getattr(self.base, attr)

    def __call__(self, ids):
        y = self.base(ids)
        if not self.rows.groups:
            return y
        return self.rows.add_embedding(self.name, np.asarray(ids), y)


def attach(model) -> LoraRows:
    """Wrap the model's Linear weights (every layer's, the MTP block's, the output head) and its
    token embedding once; returns the model's LoraRows (model.lora). The base weights are shared:
    a wrapper holds the same object. The output head tied to token_embd is left unwrapped (an
    adapter's token_embd pair has the embedding's layout, not a product's)."""
    if getattr(model, "lora", None) is not None:
        return model.lora
    rows = LoraRows(getattr(model.backend, "lora_pairs", None))
    layers = list(model.layers) + ([model.mtp] if getattr(model, "mtp", None) is not None else [])
    for L in layers:
        for attr, m in list(vars(L).items()):
            if _is_linear(m) and not isinstance(m, LoraLinear) and m.name != "token_embd.weight":
                setattr(L, attr, LoraLinear(m, rows))
    if model.output.name != "token_embd.weight":
        model.output = LoraLinear(model.output, rows)
    model.token_embd = LoraEmbedding(model.token_embd, rows)
    model.lora = rows
    return rows


def targets(model) -> set[str]:
    """The base tensor names an adapter may hold for this model: its Linear weights, its token
    embedding, the routed experts' stacked tensors and the routers (backend.moe adds their deltas)."""
    names = {"token_embd.weight"}
    layers = list(model.layers) + ([model.mtp] if getattr(model, "mtp", None) is not None else [])
    for L in layers:
        names |= {m.name for m in vars(L).values() if _is_linear(m)}
    if model.output.name != "token_embd.weight":
        names.add(model.output.name)
    if getattr(model, "experts", None) is not None:
        for i, L in enumerate(model.layers):
            if not getattr(L, "dense", True):
                names |= {f"blk.{i}.ffn_{k}_exps.weight" for k in EXPERT_KINDS} | {f"blk.{i}.ffn_gate_inp.weight"}
    return names

"""Mixture of experts: a pure routing function and the expert math over whatever store serves them.

Routing follows llama.cpp's build_moe_ffn (src/llama-graph.cpp), which is what DeepSeek's reference
code does for V2 (softmax, greedy or group-limited) and V3 (sigmoid + selection bias, groups).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .common import ffn, softmax
from .lora import plus_delta

SOFTMAX, SIGMOID = 1, 2  # GGUF expert_gating_func


@dataclass(frozen=True)
class RouterConfig:
    n_expert: int
    n_used: int  # experts per token (top-k)
    gating: int = SOFTMAX  # SOFTMAX or SIGMOID
    n_group: int = 1  # expert groups; groups ranked by the sum of their top-2 selection scores
    n_group_used: int = 1
    norm_weights: bool = False  # divide the chosen weights by their sum (norm_topk_prob)
    scale: float = 1.0  # routed_scaling_factor


def route(logits: np.ndarray, cfg: RouterConfig, bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Router logits (T, E) -> (expert ids (T, k) int64, weights (T, k) float32).

    The selection bias (V3's e_score_correction_bias) only ranks experts; the weights come from the
    unbiased scores.
    """
    T, E = logits.shape
    probs = softmax(logits) if cfg.gating == SOFTMAX else 1.0 / (1.0 + np.exp(-logits))  # (T, E)
    select = probs + bias if bias is not None else probs.copy()
    if cfg.n_group > 1:
        groups = select.reshape(T, cfg.n_group, E // cfg.n_group)  # (T, G, E/G)
        top2 = -np.partition(-groups, 1, axis=-1)[..., :2].sum(-1)  # (T, G) sum of top-2
        keep = np.argsort(-top2, axis=-1, kind="stable")[:, : cfg.n_group_used]  # (T, g)
        masked = np.full_like(groups, -np.inf)
        rows = np.arange(T)[:, None]
        masked[rows, keep] = groups[rows, keep]
        select = masked.reshape(T, E)
    ids = np.argsort(-select, axis=-1, kind="stable")[:, : cfg.n_used]  # (T, k)
    weights = probs[np.arange(T)[:, None], ids]  # (T, k): take_along_axis's values, at a third of its cost
    if cfg.norm_weights:
        weights = weights / np.maximum(weights.sum(-1, keepdims=True), 6.103515625e-5)
    if cfg.scale not in (0.0, 1.0):
        weights = weights * cfg.scale
    return ids, weights.astype(np.float32)


def moe(x: np.ndarray, ids: np.ndarray, weights: np.ndarray, store, layer: int, backend, lora=None,
        count: bool = True) -> np.ndarray:
    """sum_i w_i * expert_i(x) for each token; x (T, D), ids/weights (T, k) -> (T, D).

    Tokens are grouped by expert so that each expert's weights are read once per call, with all
    the tokens routed to it as one batch; experts come in the order the store has them ready. A few
    tokens (a speculative step's verification) with every expert at hand go as (token, choice)
    pairs, each projection of all of them in one product; more (several sequences, prompts) as
    runs of (token, choice) pairs sorted by expert, each projection of every expert in one call. With `lora` (models/lora.py's LoraRows),
    each (token, expert) pair adds its adapters' delta of that expert's gate, up and down. `count`
    False: the caller has counted the choices in the store's usage profile.
    """
    if count:
        store.count(layer, ids)  # every choice, before the experts are deduplicated
    if len(ids) == 1:  # one token's choices are distinct: unique's sort without its bookkeeping
        by_id = np.argsort(ids[0])  # expert j of `experts` is the router's slot by_id[j]
        experts = ids[0][by_id]
    elif len(ids) <= FEW_TOKENS:  # a verification's, a few sequences' step: np.unique's result in one call
        experts, inverse = backend.unique_experts(ids)
    else:
        experts, inverse = np.unique(ids, return_inverse=True)
        inverse = inverse.reshape(ids.shape)
    groups = store.fetch_groups(layer, experts)
    if len(ids) == 1 and len(x) == 1 and lora is None:  # a decode step
        groups = list(groups)
        if len(groups) == 1 and len(groups[0]) > 1:  # every expert at hand: no per-expert bookkeeping
            js = [j for j, _ in groups[0]]
            ys = backend.experts_rows(x, [triple for _, triple in groups[0]], np.zeros(len(js), np.int64))
            if ys is not None:  # (k, D), the store's order: expert experts[j] with its router slot's weight
                return backend.expert_sums(ys, weights[0, by_id[js]][None], experts[js][None]).astype(x.dtype, copy=False)
    if len(ids) == 1:
        inverse = np.empty((1, ids.shape[1]), np.int64)
        inverse[0, by_id] = np.arange(ids.shape[1])
    if 1 < len(x) <= FEW_TOKENS:
        groups = list(groups)
        if len(groups) == 1:
            triples = dict(groups[0])
            T, k = ids.shape
            tok = np.repeat(np.arange(T), k)
            delta = lora.experts(layer, tok, experts[inverse.reshape(-1)]) if lora is not None else None
            ys = backend.experts_rows(x, [triples[j] for j in inverse.reshape(-1)], tok, delta)
            if ys is not None:  # each token's experts summed in expert order, as a decode step sums them
                return backend.expert_sums(ys, weights, ids).astype(x.dtype, copy=False)
    if len(x) > 1 and lora is None:  # more tokens, or a few whose pairs the backend did not take
        groups = list(groups)
        if len(groups) == 1:
            triples = dict(groups[0])
            T, k = ids.shape
            pairs = np.argsort(inverse.reshape(-1), kind="stable")  # (T * k,) by expert, then token
            ys = backend.experts_runs(x[pairs // k], [triples[j] for j in range(len(experts))],
                                      np.bincount(inverse.reshape(-1), minlength=len(experts)))
            if ys is not None:  # (T * k, D) by expert: back in (token, slot) order, each token's summed in expert order
                by_slot = np.empty_like(ys)
                by_slot[pairs] = ys
                return backend.expert_sums(by_slot, weights, ids).astype(x.dtype, copy=False)
    parts = [None] * len(experts)
    for group in groups:
        one = len(x) == 1 and len(group) > 1  # a decode step: the group's experts in one product each
        zeros = np.zeros(len(group), np.int64)
        delta = lora.experts(layer, zeros, experts[[j for j, _ in group]]) if one and lora is not None else None
        ys = backend.experts_rows(x, [triple for _, triple in group], zeros, delta) if one else None
        for i, (j, (gate, up, down)) in enumerate(group):
            tok, slot = np.nonzero(inverse == j)
            d = lora.experts(layer, tok, np.full(len(tok), experts[j])) if ys is None and lora is not None else None
            if d is not None:
                gate, up, down = plus_delta(gate, "gate", d), plus_delta(up, "up", d), plus_delta(down, "down", d)
            y = ys[i:i + 1] if ys is not None else ffn(x[tok], gate, up, down, glu=backend.swiglu)
            parts[j] = (tok, y * weights[tok, slot][:, None])  # (n, D)
    out = np.zeros_like(x)
    for tok, y in parts:  # summed in expert order, whatever order the store served them in
        out[tok] += y
    return out


FEW_TOKENS = 4  # speculative decoding verifies up to 4 positions at once

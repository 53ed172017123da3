"""The expert-usage profile as a figure: layers x experts, coloured by each expert's share of its
layer's routed choices, with a title, labelled axes and a colour bar.

Drawn with matplotlib, the optional "plot" extra (`pip install 'edgeseek[plot]'`), imported only
when a figure is asked for; through `matplotlib.figure.Figure`, not pyplot, so no display or global
state is involved.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import EdgeseekError

INSTALL_HINT = "pip install 'edgeseek[plot]'"


def require_matplotlib() -> None:
    """Refuse early, with the command that fixes it, when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EdgeseekError(f"expert-usage figures need matplotlib: {INSTALL_HINT}") from None


def expert_use_figure(counts: np.ndarray, name: str, n_used: int):
    """counts (n_layer, n_expert), the profile's routed choices -> a matplotlib Figure.

    Layers without any routed choice (the dense leading layers) are left out; the others keep
    their real numbers on the y axis. The title's token count is choices / n_used of the busiest
    layer: exact for generated tokens; a prompt's tokens count once per distinct expert they
    route to, so a prompt-heavy profile shows fewer.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    layers = np.flatnonzero(counts.any(axis=1))  # (L,) the layers with routed experts
    if len(layers) == 0:
        raise EdgeseekError(f"{name}: the expert-usage profile is empty")
    rows = counts[layers].astype(np.float64)  # (L, E)
    n_layer, n_expert = rows.shape
    share = 100 * rows / rows.sum(axis=1, keepdims=True)  # (L, E) % of each layer's choices
    tokens = int(round(rows.sum(axis=1).max() / max(n_used, 1)))

    # About 0.15 in per cell up to 64 experts / 30 layers, then narrower cells in a capped figure.
    width = min(16.0, 3.0 + 0.14 * n_expert)
    height = min(10.0, 2.2 + 0.2 * n_layer)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="viridis", vmin=0, vmax=share.max(), aspect="auto", interpolation="nearest")

    step = 8 if n_expert <= 64 else 16 if n_expert <= 128 else 32
    ax.set_xticks(np.arange(0, n_expert, step))
    ax.set_xlabel(f"expert (0..{n_expert - 1})")
    every = -(-n_layer // 30)  # a label per row up to 30 rows
    ax.set_yticks(np.arange(0, n_layer, every), [str(i) for i in layers[::every]])
    ax.set_ylabel("layer")
    ax.tick_params(labelsize=8)

    skipped = sorted(set(range(len(counts))) - set(layers.tolist()))
    note = f"top-{n_used} of {n_expert} routed experts per token"
    if skipped:
        note += f"; dense layer{'s' if len(skipped) > 1 else ''} {_ranges(skipped)} not shown"
    fig.suptitle(f"{name} — routed-expert use, ≈{tokens:,} tokens", fontsize=12)
    ax.set_title(note, fontsize=9, color="0.35")

    bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    even = 100 / n_expert  # every expert chosen equally often
    bar.ax.axhline(even, color="white", linewidth=1.5)
    bar.set_label(f"share of the layer's routed choices (%); white line: even split, {even:.2g}%")
    bar.ax.tick_params(labelsize=8)
    return fig


def write_expert_use(counts: np.ndarray, path: str | os.PathLike, name: str, n_used: int) -> Path:
    """The figure of `expert_use_figure` as a PNG file."""
    out = Path(path)
    expert_use_figure(counts, name, n_used).savefig(out, format="png")
    return out


def _ranges(ids: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], ids[0]
    for a, b in zip(ids, ids[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)

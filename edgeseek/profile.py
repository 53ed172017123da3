"""The expert-usage profile: how often each routed expert of each layer was chosen, counted while
a model runs and kept per model file in the user's cache directory. It warms and pins the expert
cache on the next start and is drawn by `edgeseek experts` (a terminal heatmap; the figure:
plot.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .hub import cache_dir


def profile_path(gguf) -> Path:
    """Where the expert-usage profile of this model file is kept (the user's cache directory)."""
    size = gguf.path.stat().st_size
    return cache_dir() / "profiles" / f"{gguf.path.stem}-{size}.json"


def load_profile(path: Path, n_layer: int, n_expert: int) -> np.ndarray | None:
    """The saved usage counts (n_layer, n_expert), or None when there is none for this shape."""
    try:
        data = json.loads(path.read_text())
        counts = np.array(data["counts"], np.int64)
    except (OSError, ValueError, KeyError):
        return None
    return counts if counts.shape == (n_layer, n_expert) else None


def save_profile(path: Path, counts: np.ndarray, model: str = "") -> None:
    """Add `counts` (n_layer, n_expert) to the profile saved at `path`, atomically."""
    old = load_profile(path, *counts.shape)
    total = counts + (old if old is not None else 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"model": model, "choices": int(total.sum()), "counts": total.tolist()}))
    os.replace(tmp, path)


def heat_rgb(v: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> (..., 3) uint8 colours from dark blue through red to yellow."""
    v = np.clip(v, 0.0, 1.0)[..., None]
    stops = np.array([[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float64)
    x = v * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = x - i
    return (stops[i[..., 0]] * (1 - f) + stops[i[..., 0] + 1] * f).astype(np.uint8)

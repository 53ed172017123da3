"""`edgeseek experts --png`: a figure a reader understands without the source (title with the
model and tokens, labelled axes with the real layer numbers, a labelled colour bar)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeseek.app.cli import app

pytest.importorskip("matplotlib")
from edgeseek.plot import expert_use_figure  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "deepseek2" / "v3-q8_0.gguf"  # 3 layers (1 dense), 16 experts top-4


def _profile(n_layer, n_dense, n_expert, n_used, tokens, seed=0):
    """Counts as a store records them: each MoE layer sees every token and picks n_used experts."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_layer, n_expert), np.int64)
    for layer in range(n_dense, n_layer):
        counts[layer] = rng.multinomial(tokens * n_used, rng.dirichlet(np.ones(n_expert)))
    return counts


def _parts(fig):
    ax, bar = fig.axes  # the heatmap, the colour bar
    return ax, bar, ax.images[0].get_array()


def test_v2lite_shape_has_title_axes_layers_and_colour_bar():
    counts = _profile(27, 1, 64, 6, tokens=1000)
    fig = expert_use_figure(counts, "DeepSeek-V2-Lite-Chat.Q4_K_M.gguf", 6)
    ax, bar, shown = _parts(fig)
    assert fig.get_suptitle() == "DeepSeek-V2-Lite-Chat.Q4_K_M.gguf — routed-expert use, ≈1,000 tokens"
    assert "top-6 of 64" in ax.get_title() and "dense layer 0 not shown" in ax.get_title()
    assert ax.get_xlabel().startswith("expert") and ax.get_ylabel() == "layer"
    assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(1, 27)]
    assert shown.shape == (26, 64)
    np.testing.assert_allclose(shown.sum(axis=1), 100)  # each row: shares of that layer's choices, in %
    assert "share of the layer's routed choices (%)" in bar.get_ylabel()


def test_v3_shape_labels_the_real_layer_numbers():
    counts = _profile(61, 3, 256, 8, tokens=500)
    ax, _, shown = _parts(expert_use_figure(counts, "DeepSeek-V3.gguf", 8))
    assert shown.shape == (58, 256)
    labels = [int(t.get_text()) for t in ax.get_yticklabels()]
    assert labels == list(range(3, 61, 2))  # every other row of 58: still each label on its own layer
    assert [int(t) for t in ax.get_yticks()] == [layer - 3 for layer in labels]
    assert "dense layers 0-2 not shown" in ax.get_title()


def _write_profile(tmp_path, monkeypatch):
    from edgeseek.profile import profile_path
    from edgeseek.gguf_file import GGUFFile

    monkeypatch.setenv("EDGESEEK_CACHE", str(tmp_path / "cache"))
    path = profile_path(GGUFFile(FIXTURE))
    path.parent.mkdir(parents=True)
    counts = _profile(3, 1, 16, 4, tokens=50)
    path.write_text(json.dumps({"model": str(FIXTURE), "counts": counts.tolist()}))
    return counts


def test_experts_png_writes_the_figure(tmp_path, monkeypatch):
    counts = _write_profile(tmp_path, monkeypatch)
    png = tmp_path / "experts.png"
    r = CliRunner().invoke(app, ["experts", str(FIXTURE), "--png", str(png)])
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == f"wrote {png}"
    assert "≈50 tokens" in r.stdout
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") >= 500  # a figure, not 16x2 cells
    data = json.loads(CliRunner().invoke(app, ["experts", str(FIXTURE), "--json"]).stdout)
    assert data["tokens"] == 50 and data["choices"] == counts.sum() and data["experts_used_per_token"] == 4


def test_experts_png_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    _write_profile(tmp_path, monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    png = tmp_path / "experts.png"
    r = CliRunner().invoke(app, ["experts", str(FIXTURE), "--png", str(png)])
    assert r.exit_code == 1 and not png.exists() and r.stdout == ""
    assert r.stderr == "error: expert-usage figures need matplotlib: pip install 'edgeseek[plot]'\n"

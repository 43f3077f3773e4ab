"""initlab.lab.report.figures: every figure renders, with axis labels, a title and a caption that
says what to see; the report of a depth sweep embeds the accuracy-vs-depth figure."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from initlab.lab.report import figures as F

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def drawn(monkeypatch):
    """The matplotlib figures the module saves, in order."""
    got = []
    real = F._save

    def keep(fig, path):
        got.append(fig)
        return real(fig, path)

    monkeypatch.setattr(F, "_save", keep)
    return got


def _labelled(fig):
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert axes
    for ax in axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    return axes


def _png(path):
    data = path.read_bytes()
    assert data.startswith(PNG) and len(data) > 5000
    return data


def test_captions_say_what_to_see():
    for name, text in F.grid_captions().items():
        assert name.endswith(".png") and "What to see" in text


def test_metric_vs_depth(tmp_path, drawn):
    rng = np.random.default_rng(0)
    rows = [{"activation": a, "scheme": s, "depth": d, "seed": k, "value": 0.9 - 0.01 * d + 0.01 * rng.standard_normal()}
            for a in ("tanh", "relu") for s in ("xavier", "he") for d in (2, 5, 10) for k in range(3)]
    t = pd.DataFrame(rows)
    p = F.metric_vs_depth({"acc": t, "loss": t.assign(value=1 - t["value"])}, tmp_path / "d.png",
                          ylabels={"acc": "final test accuracy", "loss": "final test loss"})
    _png(p)
    axes = _labelled(drawn[-1])
    assert len(axes) == 4
    # seeds as bands: one band (PolyCollection) per scheme and panel
    assert all(len(ax.collections) >= 2 for ax in axes)


def test_grid_heatmap_with_theory_curve(tmp_path, drawn):
    rows = [{"sw2": s, "depth": d, "seed": k, "value": 0.9 if d < 10 * s else 0.1}
            for s in (1.0, 1.76, 3.0) for d in (10, 30, 100) for k in range(2)]
    p = F.grid_heatmap(pd.DataFrame(rows), tmp_path / "h.png", x="sw2", y="depth", xlabel="\u03c3_w\u00b2",
                       ylabel="depth", value_label="accuracy", title="t",
                       curve=(np.linspace(1, 3, 20), np.linspace(10, 100, 20), "6 xi_c"))
    _png(p)
    (ax,) = _labelled(drawn[-1])
    line = [ln for ln in ax.get_lines() if ln.get_label() == "6 xi_c"]
    assert line and np.isfinite(line[0].get_xydata()).all()
    assert len(ax.texts) == 9  # every cell labelled with mean and the seeds' range


def test_variance_vs_depth(tmp_path, drawn):
    rows = [{"activation": "relu", "scheme": s, "layer": k, "seed": j, "measured": g ** k * (1 + 0.01 * j),
             "predicted": g ** k} for s, g in (("xavier", 0.5), ("he", 1.0)) for k in range(1, 8) for j in range(2)]
    _png(F.variance_vs_depth(pd.DataFrame(rows), tmp_path / "v.png"))
    (ax,) = _labelled(drawn[-1])
    assert ax.get_yscale() == "log"
    assert any(ln.get_linestyle() == "--" for ln in ax.get_lines())  # the theory recursion


def test_layer_histograms(tmp_path, drawn):
    rng = np.random.default_rng(1)
    snaps = {s: {k: np.tanh(rng.standard_normal(500) * k) for k in (1, 2, 3)} for s in (0, 100)}
    _png(F.layer_histograms(snaps, tmp_path / "l.png", bounds=(-1, 1)))
    axes = drawn[-1].axes
    assert len(axes) == 6 and axes[-1].get_xlabel() and axes[0].get_ylabel() and all(ax.get_title() for ax in axes)
    with pytest.raises(ValueError):
        F.layer_histograms({}, tmp_path / "none.png")


def test_jacobian_spectra(tmp_path, drawn):
    rng = np.random.default_rng(2)
    spectra = {"orthogonal": [np.ones(20) + 0.01 * rng.standard_normal(20) for _ in range(3)],
               "gaussian": [np.exp(rng.standard_normal(20)) for _ in range(3)]}
    _png(F.jacobian_spectra(spectra, tmp_path / "j.png"))
    ax_h, ax_c = _labelled(drawn[-1])
    assert ax_c.get_ylim()[1] >= 1.0 and len(ax_c.collections) == 2  # a seed band per label

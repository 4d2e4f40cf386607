"""Each chart writes a PNG and an SVG from plain arrays, draws a weak fit grey with its reason, and rejects
malformed input."""
import re

import numpy as np
import pytest

from hrmloss.runs import plots
from hrmloss.runs.scaling import fit_scaling_law

PNG = b"\x89PNG\r\n\x1a\n"


def _written(paths, stem):
    """PNG and SVG of `stem`, both non-empty and of their format; returns the SVG's text."""
    assert [p.name for p in paths] == [f"{stem}.png", f"{stem}.svg"]
    png, svg = paths
    assert png.stat().st_size > 1000 and png.read_bytes().startswith(PNG)
    text = svg.read_text()
    assert text.lstrip().startswith("<?xml") and "<svg" in text
    return text


def _curve(n, a=2.0, b=3.0, c=0.5, seed=0, noise=0.01):
    x = np.arange(1, n + 1, dtype=np.float64)
    return x, a + b * x ** -c + np.random.default_rng(seed).normal(0, noise, n)


def test_plot_hrm_sweep_labels_its_axes_and_line_styles(tmp_path):
    step = np.arange(1, 51)
    # KL is 0 at step 1, as in a real run (the student starts as a copy of the reference).
    runs = {h: {"step": step, "kl": (step - 1) * np.exp(-step / 20) / (1 + h), "ce": 2 + h / 10 + np.exp(-step / 10)}
            for h in (0.001, 0.5, 10.0)}
    svg = _written(plots.plot_hrm_sweep(runs, tmp_path / "sweep.png", window=5), "sweep")
    # Text stays text in the SVG (svg.fonttype none): the labels and the legend can be read there.
    for text in ("KL to reference (log scale)", "Causal-LM loss (CE)", "hrm = 0.5", "KL: raw, per step",
                 "KL: rolling median (5 points)", "Iteration"):
        assert text in svg, text
    assert "Log KL" not in svg


def test_plot_position_loss_fits_each_step_and_greys_a_weak_fit(tmp_path):
    x, _ = _curve(128)
    good = [_curve(128, a=2 + 1 / s, seed=s)[1] for s in (10, 100)]
    flat = 3.0 + np.random.default_rng(0).normal(0, 0.05, 128)  # nothing to fit
    curves = np.array([flat, *good])
    curves[1, 5] = np.nan  # a position with no counted token is skipped
    svg = _written(plots.plot_position_loss({"run": {"step": [1, 10, 100], "loss": curves}}, tmp_path / "pos"), "pos")
    assert "step 1: no fit (low_signal" in svg and re.search(r"step 100: 2\.0 \+ 3\.0 \* T\^-0\.(49|50|51)<", svg)
    assert "Step" in svg and "Token index T" in svg  # the colour bar and the axis


def test_plot_test_loss_keeps_phases_on_separate_axes(tmp_path):
    runs = {"pre-training": {"reference": _curve(30, a=3)}, "fine-tuning": {f"hrm={h}": _curve(10, seed=h) for h in (1, 2)}}
    svg = _written(plots.plot_test_loss(runs, tmp_path / "test"), "test")
    assert "pre-training" in svg and "fine-tuning" in svg and "Step (log scale)" in svg


def test_plot_pred_vs_real_draws_band_or_grey_reason(tmp_path):
    x, y = _curve(200, c=0.4, noise=0.003)
    flat = 2 + np.random.default_rng(1).normal(0, 0.05, 200)
    runs = {"good": (x * 1024, y), "flat": (x * 1024, flat)}
    svg = _written(plots.plot_pred_vs_real(runs, tmp_path / "pred", fit_fraction=0.4), "pred")
    assert "Pred ~95 % band" in svg and "Real: rolling median" in svg and "Real: raw, per step" in svg
    assert "Pred not ok: low_r2" in svg and "no reliable fit" in svg
    assert "Tokens trained (thousands)" in svg


def test_plot_grid_rows_by_group_columns_by_n(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for g, k in (("T=64", 1.0), ("T=256", 0.97)):
        for n in (2e4, 8e4, 3e5):
            d = np.linspace(1e5, 2e7, 150)
            law = 1.2 + 30 * n ** -0.3 + 80 * d ** -0.3
            runs.append({"N": n, "tokens": d, "loss": k * law * np.exp(rng.normal(0, 0.01, d.size)), "group": g,
                         "name": f"{g} N={n:g}"})
    law = fit_scaling_law(runs, fit_fraction=0.5, group_factor=True, n_boot=8)
    svg = _written(plots.plot_grid(runs, law, tmp_path / "grid.png"), "grid")
    assert "N = 20k, T=64" in svg and "N = 300k, T=256" in svg and "Tokens trained (millions)" in svg
    assert "Pred" in svg and "fitted on 5% to 50% of each run" in svg
    weak = fit_scaling_law(runs[:2], fit_fraction=0.5, n_boot=4)  # 2 sizes: A, alpha, E not separable
    svg = _written(plots.plot_grid(runs[:2], weak, tmp_path / "weak"), "weak")
    assert "Pred not ok: few_sizes" in svg and "not ok: few_sizes" in svg


def test_formats_and_bad_input(tmp_path):
    paths = plots.plot_test_loss({"p": {"a": _curve(5)}}, tmp_path / "only", formats=["png"])
    assert [p.name for p in paths] == ["only.png"]
    with pytest.raises(ValueError, match="formats"):
        plots.plot_test_loss({"p": {"a": _curve(5)}}, tmp_path / "x", formats=["gif"])
    with pytest.raises(ValueError):  # mismatched shapes
        plots.plot_test_loss({"p": {"a": ([1, 2, 3], [1.0, 2.0])}}, tmp_path / "x")
    with pytest.raises(ValueError):  # non-finite
        plots.plot_test_loss({"p": {"a": ([1, 2, 3], [1.0, np.inf, 2.0])}}, tmp_path / "x")
    with pytest.raises(ValueError):  # curves not (k, T) for k steps
        plots.plot_position_loss({"r": {"step": [1, 2], "loss": [[1.0, 2.0, 3.0]]}}, tmp_path / "x")
    with pytest.raises(ValueError):  # no KL > 0 to draw on its log axis
        plots.plot_hrm_sweep({1.0: {"step": [1, 2], "kl": [0.0, 0.0], "ce": [1.0, 1.0]}}, tmp_path / "x")
    with pytest.raises(ValueError):  # too few points to fit before predicting
        plots.plot_pred_vs_real({"a": ([1, 2, 3], [3.0, 2.0, 1.0])}, tmp_path / "x")
    assert not list(tmp_path.glob("x.*"))

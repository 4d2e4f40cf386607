"""Each plot function writes a non-empty PNG from plain arrays, and rejects malformed input."""
import numpy as np
import pytest

from hrmloss import plots

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG)


def _curve(n, a=2.0, b=3.0, c=0.5, seed=0):
    x = np.arange(1, n + 1, dtype=np.float64)
    return x, a + b * x ** -c + np.random.default_rng(seed).normal(0, 0.01, n)


def test_plot_hrm_sweep_writes_png(tmp_path):
    step = np.arange(1, 51)
    # KL is 0 at step 1, as in a real run (the student starts as a copy of the reference).
    runs = {h: {"step": step, "kl": (step - 1) * np.exp(-step / 20) / (1 + h), "ce": 2 + h / 10 + np.exp(-step / 10)}
            for h in (0.001, 0.5, 10.0)}
    assert _is_png(plots.plot_hrm_sweep(runs, tmp_path / "sweep.png"))


def test_plot_position_loss_writes_png(tmp_path):
    x, _ = _curve(64)
    curves = [_curve(64, a=2 + 1 / s, seed=s)[1] for s in (10, 100, 1000)]
    curves[0][5] = np.nan  # a position with no counted token is skipped
    assert _is_png(plots.plot_position_loss([10, 100, 1000], curves, tmp_path / "pos.png"))


def test_plot_test_loss_writes_png(tmp_path):
    runs = {f"d={d}": _curve(30, a=3 - d / 100, seed=d) for d in (32, 64, 128)}
    assert _is_png(plots.plot_test_loss(runs, tmp_path / "test.png"))


def test_plot_pred_vs_real_writes_png(tmp_path):
    runs = {name: (x * 1024, y) for name, (x, y) in (("a", _curve(100)), ("b", _curve(100, c=0.8, seed=1)))}
    assert _is_png(plots.plot_pred_vs_real(runs, tmp_path / "pred.png", fit_fraction=0.4))


def test_plot_demo_draws_all_four_from_results(tmp_path):
    step = list(range(1, 41))
    train = {"step": step, "tokens": [s * 256 for s in step], "loss": list(_curve(40)[1]),
             "ce": list(_curve(40, seed=2)[1]), "kl": [0.1 + 1 / s for s in step]}
    ev = {"step": [1, 10, 40], "ce": [3.0, 2.5, 2.2], "position_ce": [list(_curve(16, a=a)[1]) for a in (3, 2.5, 2.2)]}
    results = {"config": {"fit_fraction": 0.4}, "reference": {"train": train, "eval": ev},
               "runs": {repr(h): {"train": train, "eval": ev} for h in (0.001, 0.5, 10.0)}}
    paths = plots.plot_demo(results, tmp_path)
    assert [p.name for p in paths] == ["hrm_sweep.png", "position_loss.png", "test_loss.png", "pred_vs_real.png"]
    assert all(_is_png(p) for p in paths)


def test_plots_reject_bad_input(tmp_path):
    with pytest.raises(ValueError):  # mismatched shapes
        plots.plot_test_loss({"a": ([1, 2, 3], [1.0, 2.0])}, tmp_path / "x.png")
    with pytest.raises(ValueError):  # non-finite
        plots.plot_test_loss({"a": ([1, 2, 3], [1.0, np.inf, 2.0])}, tmp_path / "x.png")
    with pytest.raises(ValueError):  # curves not (k, T) for k steps
        plots.plot_position_loss([1, 2], [[1.0, 2.0, 3.0]], tmp_path / "x.png")
    with pytest.raises(ValueError):  # no KL > 0 to draw on its log axis
        plots.plot_hrm_sweep({1.0: {"step": [1, 2], "kl": [0.0, 0.0], "ce": [1.0, 1.0]}}, tmp_path / "x.png")
    with pytest.raises(ValueError):  # too few points to fit before predicting
        plots.plot_pred_vs_real({"a": ([1, 2, 3], [3.0, 2.0, 1.0])}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()

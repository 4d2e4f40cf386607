"""Fits judged against the noise of their points: `noise_level` reads a curve's noise from its own scatter,
`fit_power_law(sigma=...)` passes the right form on noisy data (where R^2 says nothing) and flags a wrong
form (misfit) and a curve with no trend (low_signal); the per-position and per-token-index fits use them."""
import numpy as np
import pytest

from hrmloss.runs import plots
from hrmloss.runs.fits import FLAGS, MISFIT_P, fit_power_law, log_bins, noise_level

T = np.arange(1, 129, dtype=np.float64)


@pytest.mark.parametrize("sigma", [0.01, 0.05, 0.2])
def test_noise_level_reads_the_noise_of_a_curve_with_a_steep_start(sigma):
    rng = np.random.default_rng(1)
    est = [noise_level(1.8 + 0.8 * T ** -1.4 + rng.normal(0, sigma, T.size)) for _ in range(20)]
    assert abs(np.median(est) / sigma - 1) < 0.1, est
    assert np.isnan(noise_level([1.0, 2.0, 3.0]))


def test_the_right_form_passes_on_noise_that_dominates_r2():
    # Per-position noise 0.1 on a drop of 0.8: R^2 on the bins is often below 0.9, yet the form is
    # right; the chi-square against the known noise accepts it at about the rate 1 - MISFIT_P.
    rng = np.random.default_rng(2)
    flags, r2 = [], []
    for _ in range(20):
        y = 1.8 + 0.8 * T ** -1.4 + rng.normal(0, 0.1, T.size)
        bx, by, n = log_bins(T, y, 32, counts=True)
        f = fit_power_law(bx, by, sigma=0.1 / np.sqrt(n))
        flags.append(f.flags)
        r2.append(fit_power_law(bx, by).r2)
        assert 0 <= f.p_value <= 1
    assert sum("misfit" in fl for fl in flags) <= 1 and min(r2) < 0.9, (flags, r2)  # R^2 would reject some
    assert sum(not fl for fl in flags) >= 16, flags


def test_a_wrong_form_is_a_misfit_and_a_flat_curve_low_signal():
    rng = np.random.default_rng(3)
    y = 2 + np.exp(-T / 20) + rng.normal(0, 0.01, T.size)  # exponential, not a power law
    bx, by, n = log_bins(T, y, 32, counts=True)
    f = fit_power_law(bx, by, sigma=0.01 / np.sqrt(n))
    assert "misfit" in f.flags and f.p_value < MISFIT_P and not f.ok
    flat = 3 + rng.normal(0, 0.05, T.size)
    bx, by, n = log_bins(T, flat, 32, counts=True)
    g = fit_power_law(bx, by, sigma=0.05 / np.sqrt(n))
    assert "low_signal" in g.flags and "low_r2" not in g.flags
    assert {"misfit", "low_signal"} <= set(FLAGS)
    with pytest.raises(ValueError, match="sigma"):
        fit_power_law(bx, by, sigma=np.zeros_like(bx))


def test_position_and_token_index_fits_use_the_curves_noise():
    rng = np.random.default_rng(4)
    steps = np.geomspace(10, 1000, 10)
    # loss(step, T) = 1.5 + 0.6 T^-1.2 + 2 step^-0.5, per-position noise 0.02
    curves = np.array([1.5 + 0.6 * T ** -1.2 + 2 * s ** -0.5 + rng.normal(0, 0.02, T.size) for s in steps])
    curves[3] = np.nan  # a step evaluated for the mean only
    pos = plots.position_fits(steps, curves)
    assert pos[3] is None and all(f.ok for i, f in enumerate(pos) if i != 3), [f and f.flags for f in pos]
    lines = plots.token_index_fits(steps, curves)
    assert list(lines) == plots.token_indices(128).tolist() and lines[1][0].size == 9
    for t, (x, y, f) in lines.items():
        assert f.ok and abs(f.c - 0.5) < 0.2, (t, f.describe())
    flat = plots.token_index_fits(steps, 3 + rng.normal(0, 0.02, curves.shape))
    assert all("low_signal" in f.flags for *_, f in flat.values())


def test_chart_c_and_the_pareto_chart(tmp_path):
    rng = np.random.default_rng(5)
    steps = np.geomspace(10, 200, 10)
    curves = np.array([1.5 + 0.6 * T ** -1.2 + 2 * s ** -0.5 + rng.normal(0, 0.02, T.size) for s in steps])
    phases = {"fine-tuning": {"hrm=0.5": (steps, curves.mean(1))}}
    paths = plots.plot_test_loss(phases, tmp_path / "test_loss", token_panels={"hrm=0.5": {"step": steps,
                                                                                             "loss": curves}})
    svg = paths[1].read_text()
    assert "Token index T" in svg and "loss per token index" in svg and "fine-tuning" in svg
    assert f"{len(plots.token_indices(128))} of {len(plots.token_indices(128))} fits" in svg
    paths = plots.plot_pareto({0.001: (0.45, 1.69), 0.5: (0.19, 1.71), 10.0: (0.0096, 1.93)}, tmp_path / "pareto")
    svg = paths[1].read_text()
    assert "hrm = 0.001" in svg and "hrm = 10" in svg and "Final KL to the reference (log scale)" in svg
    with pytest.raises(ValueError, match="points"):
        plots.plot_pareto({}, tmp_path / "p")

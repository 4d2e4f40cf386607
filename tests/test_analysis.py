"""PositionLoss against a direct computation; power-law fit and curve predictor on synthetic data."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import hrmloss
from hrmloss.analysis import PositionLoss, fit_power_law, predict_curve


# PositionLoss -----------------------------------------------------------------------------------------

def _direct(batches):
    """Per-position means by a plain loop over tokens, in float64 (the oracle)."""
    t_max = max(ce.shape[1] for ce, _, _ in batches)
    sums, counts = np.zeros((2, t_max)), np.zeros(t_max)
    for ce, kl, mask in batches:
        for b in range(ce.shape[0]):
            for t in range(ce.shape[1]):
                if mask[b, t]:
                    sums[0, t] += float(ce[b, t])
                    sums[1, t] += float(kl[b, t])
                    counts[t] += 1
    with np.errstate(invalid="ignore"):
        return sums[0] / counts, sums[1] / counts, counts


def test_position_loss_matches_direct_computation_with_ignored_tokens_and_ragged_masks():
    gen = torch.Generator().manual_seed(0)
    batches = []
    acc = PositionLoss()
    for b, t in ((3, 7), (2, 9), (4, 5)):  # sequences of different lengths across updates
        logits, ref = torch.randn(2, b, t, 11, generator=gen)
        labels = torch.randint(0, 11, (b, t), generator=gen)
        lengths = torch.randint(1, t + 1, (b,), generator=gen)  # ragged: padding after each length
        labels[torch.arange(t)[None, :] >= lengths[:, None]] = -100
        labels[0, 0] = -100  # an ignored token inside a sequence
        out = hrmloss.hrm_loss(logits, ref, labels, hrm=0.7, reduction="none", return_components=True)
        mask = labels != -100
        batches.append((out.ce, out.kl, mask))
        acc.update(out.ce, out.kl, mask)
    ce, kl, count = _direct(batches)
    got = acc.compute(hrm=0.7)
    np.testing.assert_array_equal(got["count"], count)
    np.testing.assert_allclose(got["ce"], ce, rtol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got["kl"], kl, rtol=1e-6, atol=1e-9, equal_nan=True)
    np.testing.assert_allclose(got["loss"], ce + 0.7 * kl, rtol=1e-6, equal_nan=True)


def test_position_loss_ignores_non_finite_values_at_masked_tokens_and_gives_nan_for_empty_positions():
    ce = torch.tensor([[1.0, float("nan"), 2.0], [3.0, float("inf"), 4.0]])
    mask = torch.tensor([[True, False, True], [True, False, False]])
    got = PositionLoss().update(ce, torch.zeros_like(ce), mask).compute()
    np.testing.assert_allclose(got["ce"], [2.0, np.nan, 2.0], equal_nan=True)
    np.testing.assert_array_equal(got["count"], [2, 0, 1])


@pytest.mark.parametrize("case", ["shape", "ndim", "mask_dtype", "non_finite", "empty"])
def test_position_loss_rejects_bad_input(case):
    ce = torch.ones(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    acc = PositionLoss()
    with pytest.raises((ValueError, TypeError)):
        if case == "shape":
            acc.update(ce, torch.ones(2, 4), mask)
        elif case == "ndim":
            acc.update(torch.ones(6), torch.ones(6), torch.ones(6, dtype=torch.bool))
        elif case == "mask_dtype":
            acc.update(ce, ce, mask.long())
        elif case == "non_finite":
            acc.update(torch.tensor([[1.0, float("nan"), 1.0]]), torch.ones(1, 3), mask[:1])
        else:
            acc.compute()


# fit_power_law ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("a, b, c, noise", [(4.0, 3.2, 0.47, 0.02), (1.5, 20.0, 1.3, 0.05), (2.0, -1.0, 0.3, 0.01)])
def test_fit_power_law_recovers_known_parameters_from_noisy_data(seed, a, b, c, noise):
    rng = np.random.default_rng(seed)
    x = np.arange(1, 257, dtype=np.float64)
    y = a + b * x ** -c + rng.normal(0, noise, x.size)
    f = fit_power_law(x, y)
    # Tolerances: 5 % on a and b (absolute 0.05 floor for a), 0.05 absolute on c.
    assert abs(f.a - a) <= max(0.05, 0.05 * abs(a))
    assert abs(f.b - b) <= 0.05 * abs(b)
    assert abs(f.c - c) <= 0.05
    # The standard errors mean something: the truth is within 4 of them.
    assert np.all(np.abs(f.params - (a, b, c)) <= 4 * f.errors)
    assert f.r2 > 0.9


def test_fit_power_law_formula_is_the_legend_label():
    x = np.arange(1, 129, dtype=np.float64)
    f = fit_power_law(x, 4.0 + 3.2 * x ** -0.47)
    assert f.formula() == "4.0 + 3.2 * T^-0.47"
    assert f.formula("D") == "4.0 + 3.2 * D^-0.47"
    np.testing.assert_allclose(f(x), 4.0 + 3.2 * x ** -0.47, rtol=1e-6)


def test_fit_power_law_is_unit_free_in_x():
    x = np.geomspace(1e3, 1e9, 60)
    y = 1.7 + 400.0 * x ** -0.3 + np.random.default_rng(0).normal(0, 1e-3, x.size)
    f = fit_power_law(x, y)
    assert abs(f.a - 1.7) < 0.02 and abs(f.c - 0.3) < 0.01 and abs(f.b / 400.0 - 1) < 0.1


@pytest.mark.parametrize("x, y", [
    ([1, 2, 3], [1, 2]),                       # mismatched shapes
    ([1, 2], [1.0, 0.5]),                      # fewer points than parameters
    ([1, 2, 3, 4], [1.0, np.nan, 0.5, 0.4]),   # non-finite
    ([1, 2, 3, np.inf], [1.0, 0.7, 0.5, 0.4]),
    ([0, 1, 2, 3], [1.0, 0.7, 0.5, 0.4]),      # x must be > 0
    ([[1, 2], [3, 4]], [[1, 2], [3, 4]]),      # not 1-D
])
def test_fit_power_law_rejects_bad_input(x, y):
    with pytest.raises(ValueError):
        fit_power_law(x, y)


# predict_curve ----------------------------------------------------------------------------------------

def test_predict_curve_recovers_a_synthetic_scaling_curve():
    tokens = np.linspace(2e5, 2e8, 300)
    true = 1.8 + 400.0 * tokens ** -0.35
    losses = true + np.random.default_rng(1).normal(0, 0.005, tokens.size)
    p = predict_curve(tokens, losses, fit_fraction=0.3)
    assert abs(p.fit.a - 1.8) < 0.05 and abs(p.fit.c - 0.35) < 0.03
    assert p.fit_mask.sum() == (tokens <= 0.3 * tokens.max()).sum()
    # Extrapolated 3x beyond the fitted range: within 0.01 of the noiseless truth.
    assert np.abs(p.pred - true)[~p.fit_mask].max() < 0.01
    assert p.mae < 0.02 and abs(p.final_rel_err) < 0.01


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, 0.001, "half"])
def test_predict_curve_rejects_bad_fit_fraction(fraction):
    x = np.arange(1, 21, dtype=np.float64)
    with pytest.raises(ValueError):
        predict_curve(x, 2 + x ** -0.5, fit_fraction=fraction)


def test_predict_curve_rejects_non_finite_losses():
    x = np.arange(1, 21, dtype=np.float64)
    y = 2 + x ** -0.5
    y[3] = np.inf
    with pytest.raises(ValueError):
        predict_curve(x, y)


# Package surface --------------------------------------------------------------------------------------

def test_import_hrmloss_does_not_import_plotting_or_fitting_libraries():
    # torch itself may import tqdm (when installed), so compare with what `import torch` loaded.
    code = ("import sys, torch; heavy = ('matplotlib', 'scipy', 'tqdm'); before = {m for m in heavy if m in sys.modules}; "
            "import hrmloss; new = [m for m in heavy if m in sys.modules and m not in before]; assert not new, new; "
            "hrmloss.fit_power_law; assert 'scipy' not in before and 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_exports_are_the_module_objects():
    from hrmloss import analysis, plots

    assert hrmloss.fit_power_law is analysis.fit_power_law
    assert hrmloss.PositionLoss is analysis.PositionLoss
    assert hrmloss.plot_demo is plots.plot_demo
    with pytest.raises(AttributeError):
        hrmloss.not_a_name

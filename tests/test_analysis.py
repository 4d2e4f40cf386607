"""PositionLoss against a direct computation; power-law fit, curve predictor and scaling law on synthetic
data, with their quality flags."""
import subprocess
import sys

import numpy as np
import pytest
import torch

import hrmloss
from hrmloss.runs.fits import FLAGS, fit_power_law, log_bins, predict_curve, smooth
from hrmloss.runs.positions import PositionLoss
from hrmloss.runs.scaling import fit_scaling_law


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
    f = fit_power_law(x, y, nonnegative=b > 0)  # a rising curve (b < 0) needs free signs
    # Tolerances: 5 % on a and b (absolute 0.05 floor for a), 0.05 absolute on c.
    assert abs(f.a - a) <= max(0.05, 0.05 * abs(a))
    assert abs(f.b - b) <= 0.05 * abs(b)
    assert abs(f.c - c) <= 0.05
    # The standard errors mean something: the truth is within 4 of them.
    assert np.all(np.abs(f.params - (a, b, c)) <= 4 * f.errors)
    assert f.r2 > 0.9 and f.ok and f.flags == ()


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


def _codes_documented(flags):
    """Every flag is a documented code: a key of FLAGS, with <p> standing for a parameter name."""
    return all(f in FLAGS or f.split(":")[0] + ":<p>" in FLAGS for f in flags)


@pytest.mark.parametrize("case, expected", [
    ("flat", {"low_r2"}),                        # no trend: the fit explains nothing
    ("rising", {"at_bound:b"}),                  # a loss that rises with T needs b < 0: bounded at 0
    ("few", {"few_points"}),                     # 5 points for 3 parameters
    ("steep", {"at_bound:c"}),                   # a drop steeper than the exponent range allows
])
def test_fit_power_law_flags_fits_that_cannot_be_read(case, expected):
    rng = np.random.default_rng(0)
    x = np.arange(1, 129, dtype=np.float64)
    if case == "flat":
        y = 2.0 + rng.normal(0, 0.05, x.size)
    elif case == "rising":
        y = 2.0 - 1.0 * x ** -0.5 + rng.normal(0, 0.01, x.size)
    elif case == "few":
        x = x[:5]
        y = 4.0 + 3.2 * x ** -0.47 + rng.normal(0, 0.01, x.size)
    else:
        y = 2.0 + 5.0 * x ** -6.0 + rng.normal(0, 1e-4, x.size)
    f = fit_power_law(x, y)
    assert expected <= set(f.flags), f.flags
    assert not f.ok and _codes_documented(f.flags)
    d = f.to_dict()
    assert d["ok"] is False and set(expected) <= set(d["flags"])
    assert "not ok: " in f.describe()
    # Physically bounded whatever the data: a >= 0, b >= 0, c in the open-ended range [0, 3].
    assert f.a >= 0 and f.b >= 0 and 0 <= f.c <= 3


def test_fit_power_law_flags_an_undetermined_exponent():
    # Two clean points at T = 1, 2 and a flat tail: b and c trade off, c is not determined.
    rng = np.random.default_rng(3)
    x = np.arange(1, 65, dtype=np.float64)
    y = 2.0 + 0.02 * x ** -0.3 + rng.normal(0, 0.02, x.size)
    f = fit_power_law(x, y, min_r2=-1.0)  # R^2 is not the point here
    assert any(flag.startswith(("uncertain:", "at_bound:")) for flag in f.flags), f.flags


def test_log_bins_average_each_octave_and_keep_the_first_positions_apart():
    x = np.arange(1, 257, dtype=np.float64)
    bx, by = log_bins(x, 2 * x, n_bins=16)
    assert bx[0] == 1 and bx.size <= 16 and np.all(np.diff(bx) > 0)
    np.testing.assert_allclose(by[:2], [2, 4])  # positions 1 and 2 in bins of their own
    assert by.sum() < (2 * x).sum()             # later bins hold many positions each


def test_smooth_is_a_centred_rolling_median_that_ignores_spikes():
    y = np.linspace(3, 2, 101)
    np.testing.assert_allclose(smooth(y, 5)[2:-2], y[2:-2])  # centred: no lag on a trend
    spiky = np.full(101, 2.0)
    spiky[50] = 30.0
    np.testing.assert_array_equal(smooth(spiky, 5), 2.0)  # a one-step spike is gone
    assert smooth(y, 1) is not y and np.array_equal(smooth(y, 1), y)
    assert smooth(y[:2]).shape == (2,)


# predict_curve ----------------------------------------------------------------------------------------

def test_predict_curve_recovers_a_synthetic_scaling_curve():
    tokens = np.linspace(2e5, 2e8, 300)
    true = 1.8 + 400.0 * tokens ** -0.35
    losses = true + np.random.default_rng(1).normal(0, 0.005, tokens.size)
    p = predict_curve(tokens, losses, fit_fraction=0.3)
    assert abs(p.fit.a - 1.8) < 0.05 and abs(p.fit.c - 0.35) < 0.03
    # The first 5 % (SKIP_FRACTION) is left out: the transient no power law of D describes.
    assert p.fit_mask.sum() == ((tokens >= 0.05 * tokens.max()) & (tokens <= 0.3 * tokens.max())).sum()
    # Extrapolated 3x beyond the fitted range: within 0.01 of the noiseless truth.
    assert np.abs(p.pred - true)[tokens > 0.3 * tokens.max()].max() < 0.01
    assert p.mae < 0.02 and abs(p.final_rel_err) < 0.01


def test_predict_curve_band_covers_the_truth_and_the_fit_is_ok():
    tokens = np.linspace(2e5, 2e8, 300)
    true = 1.8 + 400.0 * tokens ** -0.35
    losses = true + np.random.default_rng(2).normal(0, 0.005, tokens.size)
    p = predict_curve(tokens, losses, fit_fraction=0.3)
    assert p.ok and p.flags == () and p.extrapolation == pytest.approx(tokens.max() / tokens[p.fit_mask].max())
    assert np.all(p.lo <= p.pred) and np.all(p.pred <= p.hi)
    inside = (p.lo <= true) & (true <= p.hi)
    assert inside.mean() > 0.9  # a ~95 % band


def test_predict_curve_flags_a_far_extrapolation_and_a_degenerate_fit():
    tokens = np.linspace(1e4, 1e7, 1000)
    clean = 1.8 + 40.0 * tokens ** -0.35
    p = predict_curve(tokens, clean, fit_fraction=0.05, skip_fraction=0.0)  # fitted on 1/20 of the range
    assert p.extrapolation > 10 and "extrapolated" in p.flags and not p.ok
    noisy = 2.0 + np.random.default_rng(0).normal(0, 0.05, tokens.size)  # nothing to fit
    q = predict_curve(tokens, noisy, fit_fraction=0.4)
    assert not q.ok and "low_r2" in q.flags
    assert q.fit.a >= 0 and q.fit.b >= 0  # E >= 0, B >= 0 however bad the data
    d = q.to_dict()
    assert d["ok"] is False and d["flags"] == list(q.flags) and len(d["lo"]) == tokens.size


@pytest.mark.parametrize("fraction, skip", [(0.0, 0.0), (1.0, 0.0), (-0.1, 0.0), (1.5, 0.0), (0.001, 0.0),
                                            ("half", 0.0), (0.3, 0.3), (0.3, -0.1)])
def test_predict_curve_rejects_bad_fit_fraction(fraction, skip):
    x = np.arange(1, 21, dtype=np.float64)
    with pytest.raises(ValueError, match="fraction"):
        predict_curve(x, 2 + x ** -0.5, fit_fraction=fraction, skip_fraction=skip)


def test_predict_curve_rejects_non_finite_losses():
    x = np.arange(1, 21, dtype=np.float64)
    y = 2 + x ** -0.5
    y[3] = np.inf
    with pytest.raises(ValueError):
        predict_curve(x, y)


# fit_scaling_law --------------------------------------------------------------------------------------

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3): the truth of the synthetic grids.
TRUE = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}
SIZES = (53e6, 134e6, 374e6, 778e6, 1.36e9)


def _grid(noise=0.005, groups=(("T_m=2", 1.0),), sizes=SIZES, n=200, seed=0):
    """Runs of every size and group: L = k * law(N, D) * exp(noise * N(0, 1)), D up to 20B tokens."""
    rng = np.random.default_rng(seed)
    runs = []
    for g, k in groups:
        for size in sizes:
            d = np.linspace(1e8, 2e10, n)
            law = TRUE["E"] + TRUE["A"] * size ** -TRUE["alpha"] + TRUE["B"] * d ** -TRUE["beta"]
            runs.append({"N": size, "tokens": d, "loss": k * law * np.exp(rng.normal(0, noise, n)), "group": g})
    return runs


def test_fit_scaling_law_recovers_chinchilla_from_a_noisy_grid():
    # 5 sizes x 200 points with 0.5 % log-normal noise, fitted on the first half of every run.
    # Closeness: exponents within 0.02, E within 2 %, A and B within 25 % (A and alpha trade off
    # along a ridge), the truth within 4 bootstrap standard errors, and the end of training of every
    # run (2x beyond the fitted tokens) predicted within 0.5 %.
    law = fit_scaling_law(_grid(), fit_fraction=0.5)
    p, e = law.params, law.errors
    assert abs(p["alpha"] - 0.34) < 0.02 and abs(p["beta"] - 0.28) < 0.02
    assert abs(p["E"] / 1.69 - 1) < 0.02
    assert abs(p["A"] / 406.4 - 1) < 0.25 and abs(p["B"] / 410.7 - 1) < 0.25
    for k, v in TRUE.items():
        assert 0 < e[k] and abs(p[k] - v) <= 4 * e[k], (k, p[k], e[k])
    assert law.ok and law.flags == () and law.r2 > 0.99
    assert len(law.runs) == 5 and all(abs(r["final_rel_err"]) < 0.005 for r in law.runs)
    assert all(r["extrapolation"] == pytest.approx(2.0, rel=0.02) for r in law.runs)
    np.testing.assert_allclose(law.predict(134e6, 1e10), 1.69 + 406.4 * 134e6 ** -0.34 + 410.7 * 1e10 ** -0.28,
                               rtol=0.005)
    lo, hi = law.band(134e6, np.array([1e9, 1e10]))
    assert np.all(lo < hi) and np.all(lo <= law.predict(134e6, [1e9, 1e10]) + 1e-12)
    d = law.to_dict()
    assert set(d["params"]) == set(d["errors"]) >= set(TRUE) and d["ok"] is True
    assert [r["final_rel_err"] for r in d["runs"]] == [r["final_rel_err"] for r in law.runs]


def test_fit_scaling_law_with_a_group_factor_and_held_out_runs():
    # Two groups, the second 4 % worse everywhere; fitted on every size but 778M, which is predicted.
    runs = _grid(groups=(("T_m=2", 1.0), ("T_m=4", 1.04)), sizes=SIZES[:4], n=120)
    names = [f"N={r['N']:.3g}, {r['group']}" for r in runs]
    held = [n for n in names if n.startswith("N=7.78e+08")]
    law = fit_scaling_law(runs, fit_fraction=0.5, group_factor=True,
                          fit_runs=[n for n in names if n not in held], n_boot=16)
    assert abs(law.params["k:T_m=4"] - 1.04) < 0.005 and "k:T_m=2" not in law.params
    by_name = {r["name"]: r for r in law.runs}
    for n in held:
        assert not by_name[n]["fitted"] and abs(by_name[n]["final_rel_err"]) < 0.01
        assert by_name[n]["extrapolation"] == pytest.approx(778e6 / 374e6)
    k = law.params["k:T_m=4"]
    assert law.predict(134e6, 1e10, "T_m=4") == pytest.approx(k * law.predict(134e6, 1e10, "T_m=2"))
    with pytest.raises(ValueError, match="group="):
        law.predict(134e6, 1e10, "T_m=8")


def test_fit_scaling_law_flags_too_few_sizes_and_a_far_extrapolation():
    law = fit_scaling_law(_grid(sizes=SIZES[:2], n=100), fit_fraction=0.05, skip_fraction=0.0, n_boot=8)
    assert {"few_sizes", "extrapolated"} <= set(law.flags) and not law.ok
    assert _codes_documented(law.flags)
    assert all(r["flags"] == ["extrapolated"] for r in law.runs)
    assert law.params["E"] > 0 and law.params["A"] > 0 and law.params["B"] > 0


@pytest.mark.parametrize("runs, kwargs, match", [
    ([], {}, "runs"),
    ([{"N": 1e6, "tokens": [1, 2, 3]}], {}, r"runs\[0\]"),
    ([{"N": -1, "tokens": [1, 2, 3], "loss": [3, 2, 1]}], {}, r"runs\[0\]\['N'\]"),
    ([{"N": 1e6, "tokens": [1, 3, 2], "loss": [3, 2, 1]}], {}, "increasing"),
    ([{"N": 1e6, "tokens": [1, 2, 3], "loss": [3, 0, 1]}], {}, "losses > 0"),
    ([{"N": 1e6, "tokens": [1, 2, 3], "loss": [3, 2, 1]}], {"fit_fraction": 0}, "fit_fraction"),
    ([{"N": 1e6, "tokens": [1, 2, 3], "loss": [3, 2, 1]}], {"fit_runs": [5]}, "fit_runs"),
    ([{"N": 1e6, "tokens": [1, 2, 3], "loss": [3, 2, 1]}], {}, "points to fit"),
])
def test_fit_scaling_law_rejects_bad_input(runs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_scaling_law(runs, **kwargs)


# Package surface --------------------------------------------------------------------------------------

def test_import_hrmloss_does_not_import_plotting_or_fitting_libraries():
    # torch itself may import tqdm (when installed), so compare with what `import torch` loaded.
    code = ("import sys, torch; heavy = ('matplotlib', 'scipy', 'tqdm'); before = {m for m in heavy if m in sys.modules}; "
            "import hrmloss; new = [m for m in heavy if m in sys.modules and m not in before]; assert not new, new; "
            "hrmloss.fit_power_law, hrmloss.read_runs, hrmloss.fit_scaling_law; "
            "assert 'scipy' not in before and 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_exports_are_the_module_objects():
    from hrmloss.runs import fits, logs, plots, positions, reports, scaling

    assert hrmloss.fit_power_law is fits.fit_power_law and hrmloss.EXPONENT_RANGE is fits.EXPONENT_RANGE
    assert hrmloss.fit_scaling_law is scaling.fit_scaling_law
    assert hrmloss.PositionLoss is positions.PositionLoss
    assert hrmloss.plot_grid is plots.plot_grid
    assert hrmloss.read_runs is logs.read_runs and hrmloss.report is reports.report
    with pytest.raises(AttributeError):
        hrmloss.not_a_name

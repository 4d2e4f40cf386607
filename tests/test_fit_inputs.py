"""Fits on bad or extreme inputs give hrmloss's own errors naming the argument (never numpy's or scipy's),
and per-position curves with never-counted positions are fitted and drawn on the positions with data."""
import json

import numpy as np
import pytest
import torch

from hrmloss.runs.fits import fit_power_law, predict_curve
from hrmloss.runs.logs import Run
from hrmloss.runs.plots import plot_position_loss, ranges
from hrmloss.runs.positions import PositionLoss
from hrmloss.runs.reports import report

X = np.arange(1.0, 41.0)
Y = 2.0 + 3.0 * X ** -0.5


@pytest.mark.parametrize("x, y, error, message", [
    (["1", "a", "3"], [1.0, 2.0, 3.0], TypeError, "x: expected numbers, got str 'a' at [1]"),
    ([1.0, 2.0, 3.0], [1.0, None, 3.0], ValueError, "y: expected finite values (found nan at [1])"),
    ([1.0, 2.0, {}], [1.0, 2.0, 3.0], TypeError, "x: expected numbers, got dict {} at [2]"),
    ([5.0] * 6, [3.0, 2.9, 2.8, 2.7, 2.6, 2.5], ValueError, "x: all values equal (5): expected at least two"),
])
def test_fit_power_law_names_the_argument(x, y, error, message):
    with pytest.raises(error) as e:
        fit_power_law(x, y)
    assert message in str(e.value)


@pytest.mark.parametrize("factor", [1e300, 1e-300])
def test_fit_power_law_is_the_same_fit_at_any_scale_of_y(factor):
    # y * 1e300 used to leave scipy's bounds ("Initial guess is outside of provided bounds"): the fit is
    # made on y / max|y|, so a and b scale with y and c, R^2 and the flags do not change.
    noise = np.random.default_rng(0).normal(0, 0.01, X.size)
    base, scaled = fit_power_law(X, Y + noise), fit_power_law(X, (Y + noise) * factor)
    assert scaled.ok and base.ok and scaled.flags == base.flags
    np.testing.assert_allclose([scaled.a / factor, scaled.b / factor, scaled.c], [base.a, base.b, base.c], rtol=1e-6)
    np.testing.assert_allclose([scaled.a_err / factor, scaled.b_err / factor, scaled.c_err],
                               [base.a_err, base.b_err, base.c_err], rtol=1e-4)
    assert scaled.r2 == pytest.approx(base.r2, abs=1e-9)
    assert np.isfinite([scaled.a_err, scaled.b_err, scaled.c_err]).all()


def test_predict_curve_checks_what_it_documents():
    with pytest.raises(ValueError, match=r"^steps_or_tokens: all values equal \(5\)"):
        predict_curve(np.full(20, 5.0), np.linspace(3, 2, 20))
    # Newest first: fitted as given, it read the last 60 % as the first (final error -0.0 % instead of the
    # real one); now refused, naming the first index out of order.
    with pytest.raises(ValueError, match=r"^steps_or_tokens: expected increasing values; \[1\] = 39 after \[0\] = 40"):
        predict_curve(X[::-1], Y[::-1])
    with pytest.raises(ValueError, match=r"^steps_or_tokens: expected increasing values; \[3\] = 3 after \[2\] = 3"):
        predict_curve([1, 2, 3, 3, 4, 5, 6, 7], Y[:8])
    with pytest.raises(TypeError, match=r"^losses: expected numbers, got str 'x' at \[0\]"):
        predict_curve(X, ["x"] * X.size)
    assert predict_curve(X, Y).ok


def _masked_batches(t, prompt, seed=0):
    """ce, kl, mask batches in which positions 1..prompt are never counted (a prompt mask)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(3):
        pos = torch.arange(1, t + 1, dtype=torch.float64)
        ce = 1.5 + 2.0 * pos ** -0.6 + 0.01 * torch.randn(4, t, generator=gen, dtype=torch.float64)
        kl = 0.1 + 0.01 * torch.rand(4, t, generator=gen, dtype=torch.float64)
        mask = torch.rand(4, t, generator=gen) > 0.2
        mask[:, :prompt] = False
        mask[0, prompt:] = True  # every later position counted at least once
        out.append((ce.float(), kl.float(), mask))
    return out


def test_position_curve_leaves_out_never_counted_positions():
    t, prompt = 48, 3
    batches = _masked_batches(t, prompt)
    acc = PositionLoss()
    for ce, kl, mask in batches:
        acc.update(ce, kl, mask)
    pos = acc.compute(hrm=0.5)
    assert np.isnan(pos["ce"][:prompt]).all() and np.isfinite(pos["ce"][prompt:]).all()
    with pytest.raises(ValueError, match=r"y: expected finite values \(found nan at \[0\]\)"):
        fit_power_law(range(1, t + 1), pos["ce"])  # what the docs' snippet used to do
    # Reference: float64 means over the counted tokens, from torch primitives.
    ce_all = torch.cat([b[0].double() for b in batches])
    kl_all = torch.cat([b[1].double() for b in batches])
    m = torch.cat([b[2] for b in batches]).double()
    counted = m.sum(0)
    ref_ce = ((ce_all * m).sum(0) / counted)[prompt:].numpy()
    ref_loss = (((ce_all + 0.5 * kl_all) * m).sum(0) / counted)[prompt:].numpy()
    positions, ce = acc.curve("ce")
    assert positions.tolist() == list(range(prompt + 1, t + 1))
    np.testing.assert_allclose(ce, ref_ce, rtol=1e-12)
    np.testing.assert_allclose(acc.curve("loss", hrm=0.5)[1], ref_loss, rtol=1e-12)
    fit = fit_power_law(positions, ce)
    assert fit.ok and abs(fit.c - 0.6) < 0.15
    with pytest.raises(ValueError, match="key='loss': expected hrm"):
        acc.curve("loss")
    with pytest.raises(ValueError, match="key='nll': expected 'ce', 'kl' or 'loss'"):
        acc.curve("nll")


def test_ranges():
    assert ranges([9, 1, 2, 3, 7, 10]) == "1-3, 7, 9-10" and ranges([4]) == "4" and ranges([]) == ""


def test_report_says_which_positions_have_no_data(tmp_path):
    t = np.arange(1, 65, dtype=np.float64)
    curves = np.array([1.8 + 2.5 * t ** -0.5 + 1 / s for s in (10, 20, 40)])
    curves[:, :4] = np.nan                 # a 4-token prompt, never counted
    curves[0, 6:] = np.nan                 # step 10: only positions 5, 6 logged
    run = Run("masked", "masked.jsonl", {}, {"step": np.array([10.0, 20.0, 40.0]), "loss": curves})
    _, text = report([run], tmp_path, formats=("svg",))
    assert ("(b) masked: no data at token index T = 1-4 (never counted, e.g. a prompt mask or labels starting "
            "with -100): left out of the fits and the chart") in text
    assert "(b) masked: no fit at step 10: fewer than 3 positions with data" in text
    fits = json.loads((tmp_path / "report.json").read_text())["position_fits"]["masked"]
    assert set(fits) == {"20", "40"} and all(f["ok"] and f["x_range"][0] == pytest.approx(5) for f in fits.values())
    assert "no data at T = 1-4: not drawn, not fitted" in (tmp_path / "position_loss.svg").read_text()


def test_position_chart_without_gaps_says_nothing_about_them(tmp_path):
    t = np.arange(1, 33, dtype=np.float64)
    written = plot_position_loss({"full": {"step": [5.0], "loss": [2 + t ** -0.5]}}, tmp_path / "p", formats=("svg",))
    assert "no data at T" not in written[0].read_text()

"""Fits that carry their quality: power laws, one loss curve predicted from its early part, and the flags.

The fits work on host arrays (numpy + scipy, imported when called), so `import hrmloss` stays light. Every
fit carries its quality: R^2, the parameters that ended on a bound, too few points, how far it
extrapolates, summed up in `ok` and `flags` (the codes are listed in `FLAGS`), so that a weak fit is
reported as such, never as a result. The checks and `quality_flags` below are shared with scaling.py.
"""
import math
from dataclasses import dataclass

import numpy as np

# Fit quality ------------------------------------------------------------------------------------------

EXPONENT_RANGE = (0.0, 3.0)
"""Exponents (c, beta, alpha) are fitted inside this range; one that ends on either end is flagged."""
MIN_R2 = 0.9
"""A fit that explains less than this share of the variance of the points it saw is flagged `low_r2`."""
MAX_EXTRAPOLATION = 10.0
"""A prediction further than this factor beyond the fitted range (in tokens, or in N) is `extrapolated`."""
POINTS_PER_PARAMETER = 3
"""Fewer fitted points than this many per parameter is `few_points`."""
MISFIT_P = 1e-3
"""With per-point standard errors s_i, a fit whose residuals r_i give a chi-square sum(r_i^2 / s_i^2) this
unlikely (p-value, n - 3 degrees of freedom) under noise alone is `misfit`: the form does not describe the data."""
MIN_SIGNAL_TO_NOISE = 5.0
"""With per-point standard errors, a fit whose curve drops by less than this many (median) standard errors
over its range is `low_signal`: the data hold no trend to read, whatever the fit."""
SKIP_FRACTION = 0.05
"""Loss-curve fits leave out each run's first 5 % of tokens by default: the fall from the initial loss
(log V) and the learning-rate warm-up, which no power law of D describes (as D -> 0 it diverges)."""

FLAGS = {
    "few_points": f"fewer than {POINTS_PER_PARAMETER} fitted points per parameter",
    "low_r2": "R^2 on the fitted points below min_r2 (default 0.9): the form does not describe the data "
              "(fits without standard errors)",
    "misfit": "fits with standard errors: the residuals are larger than the noise explains (chi-square "
              "p-value below MISFIT_P, 0.001)",
    "low_signal": "fits with standard errors: the fitted curve drops by less than MIN_SIGNAL_TO_NOISE (5) "
                  "standard errors over its range, so the points are mostly noise",
    "at_bound:<p>": "parameter p ended on a bound of its allowed range (E, A, B >= 0; exponents in "
                    "EXPONENT_RANGE): the data wanted a value the law does not allow",
    "uncertain:<p>": "standard error of p larger than |p| (or not computable): p is not determined",
    "not_converged": "the optimizer stopped before converging",
    "extrapolated": "predicted beyond max_extrapolation (default 10) times the fitted range",
    "few_sizes": "scaling law: fewer than 3 distinct model sizes N among the fitted runs (A, alpha and E "
                 "are not separable)",
}
"""Every code a fit's `flags` may hold (`<p>` is a parameter name). A fit is `ok` when it has none."""


def quality_flags(names, values, errors, at_bound, r2, n, min_r2):
    """Flags shared by every fit: few_points, low_r2, at_bound:<p>, uncertain:<p> (in that order)."""
    flags = ["few_points"] if n < POINTS_PER_PARAMETER * len(names) else []
    if not r2 >= min_r2:  # NaN R^2 too
        flags.append("low_r2")
    flags += [f"at_bound:{k}" for k, hit in zip(names, at_bound) if hit]
    flags += [f"uncertain:{k}" for k, v, e, hit in zip(names, values, errors, at_bound)
              if not hit and not e <= abs(v)]
    return flags


def check_min_r2(min_r2):
    if isinstance(min_r2, bool) or not isinstance(min_r2, (int, float)) or not min_r2 <= 1:
        raise ValueError(f"min_r2={min_r2!r}: expected a number <= 1")
    return float(min_r2)


def check_fraction(name, v, closed=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1 if closed else 0 < v < 1):
        raise ValueError(f"{name}={v!r}: expected a number in (0, 1{']' if closed else ')'}")
    return float(v)


def check_skip(skip_fraction, fit_fraction):
    if (isinstance(skip_fraction, bool) or not isinstance(skip_fraction, (int, float))
            or not 0 <= skip_fraction < fit_fraction):
        raise ValueError(f"skip_fraction={skip_fraction!r}: expected a number in [0, fit_fraction={fit_fraction})")
    return float(skip_fraction)


def check_exponent_range(name, bounds):
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={bounds!r}: expected (lo, hi)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"{name}={bounds!r}: expected finite 0 <= lo < hi")
    return lo, hi


def host_array(v, name):
    """`v` as a float64 numpy array, or TypeError naming `name` (strings, None, objects are not numbers)."""
    try:
        arr = np.asarray(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected numbers, got {_not_a_number(v)}") from None
    return arr


def _not_a_number(v):
    """The first element of `v` that float() refuses, as `type value` (or v's type when not a sequence)."""
    try:
        items = np.asarray(v, dtype=object).ravel()
    except (TypeError, ValueError):
        return type(v).__name__
    for i, item in enumerate(items):
        try:
            float(item)
        except (TypeError, ValueError):
            return f"{type(item).__name__} {item!r:.40} at [{i}]"
    return type(v).__name__


def host_curve(x, y, min_points, names=("x", "y")):
    """Validate a curve: numbers, 1-D, same length, finite, x > 0, at least `min_points` points.

    `names` are the arguments' names for the errors (e.g. ("steps_or_tokens", "losses")).
    """
    nx, ny = names
    x, y = host_array(x, nx), host_array(y, ny)
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"{nx}.shape={x.shape}, {ny}.shape={y.shape}: expected 1-D arrays")
    if x.shape != y.shape:
        raise ValueError(f"{nx}.shape={x.shape}, {ny}.shape={y.shape}: expected the same length")
    if x.size < min_points:
        raise ValueError(f"{x.size} points: expected at least {min_points} (one per fitted parameter)")
    for name, v in ((nx, x), (ny, y)):
        if not np.isfinite(v).all():
            i = int(np.argmin(np.isfinite(v)))
            raise ValueError(f"{name}: expected finite values (found {v[i]} at [{i}])")
    if (x <= 0).any():
        raise ValueError(f"{nx}: expected {nx} > 0 (min is {x.min()})")
    return x, y


def check_spread(x, name):
    """A power law of x needs at least two distinct x: with one, a and b are not separable."""
    if x.size and x.min() == x.max():
        raise ValueError(f"{name}: all values equal ({x[0]:g}): expected at least two distinct values")


def _num(v):
    """A parameter for a label: 4.0, 3.2, 0.47, 2.1e+03 (three significant digits at most)."""
    if v != 0 and not 0.01 <= abs(v) < 1000:
        return f"{v:.2g}"
    return f"{v:.2f}" if abs(v) < 1 else f"{v:.1f}"


def smooth_window(n, window=None):
    """The window `smooth` uses on n points: `window` (default n // 25), at most n, odd (rounded down)."""
    window = max(1, n // 25) if window is None else window
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window={window!r}: expected a positive int")
    window = min(int(window), n)
    return window - (1 - window % 2) if window > 0 else 0


def smooth(y, window=None):
    """Centred rolling median of a noisy curve (what the charts draw as "Real", bold).

    `window` points (an even one is made odd, one less; default n // 25), reflected at both ends
    (`scipy.ndimage.median_filter(mode="reflect")`): the last value is the median of the last
    window // 2 + 1 points. A median, unlike a mean, ignores loss spikes.
    """
    y = np.asarray(y, dtype=np.float64)
    window = smooth_window(y.size, window)
    if window <= 1:
        return y.copy()
    from .._extras import require
    return require("scipy.ndimage", "smooth").median_filter(y, size=window, mode="reflect")


def noise_level(y):
    """The standard deviation of a curve's point-to-point noise, read from the curve itself.

    For y_i = f(x_i) + e_i with independent e_i of one standard deviation s and a smooth f, the second
    differences d_i = y_i - 2 y_(i+1) + y_(i+2) are e's alone (f's curvature aside) with variance 6 s^2;
    s = 1.4826 * MAD(d) / sqrt(6), the median absolute deviation being robust to the few points where
    f bends (a per-position loss's first tokens). Noise correlated between neighbours makes it low
    (stricter fits). NaN for fewer than 5 points.
    """
    y = np.asarray(y, dtype=np.float64)
    if y.size < 5:
        return float("nan")
    d = np.diff(y, 2)
    return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(6))


def log_bins(x, y, n_bins=32, *, counts=False):
    """Means of y over log-spaced bins of x (> 0): (x_geometric_mean, y_mean) per non-empty bin
    (and the number of points in each with `counts`).

    A per-position loss curve has its signal in the first tokens and mostly noise over the many late
    ones; averaging in log-spaced bins gives every octave of T the same weight in a fit, and keeps
    positions 1, 2, 3, ... apart where the bins are narrower than one position.
    """
    x, y = host_curve(x, y, 1)
    edges = np.geomspace(x.min(), x.max() * (1 + 1e-12), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    keep = count > 0
    gx = np.exp(np.bincount(idx, np.log(x), minlength=n_bins)[keep] / count[keep])
    gy = np.bincount(idx, y, minlength=n_bins)[keep] / count[keep]
    return (gx, gy, count[keep]) if counts else (gx, gy)


# Power law --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerLawFit:
    """y = a + b * x**-c, with standard errors, covariance, R^2 and quality flags.

    n: points fitted; x_range: (min, max) of their x; cov: 3 x 3 covariance of (a, b, c);
    flags: codes from `FLAGS` (empty when the fit is fine); `ok` is `not flags`.
    With per-point standard errors (`fit_power_law(sigma=...)`): chi2 = sum(r_i^2 / s_i^2), p_value of
    it under noise alone, snr = the fitted drop over the x range / the median s_i; else NaN.
    """

    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    r2: float
    var: str = "T"
    n: int = 0
    x_range: tuple = (math.nan, math.nan)
    flags: tuple = ()
    cov: tuple = ()
    chi2: float = math.nan
    p_value: float = math.nan
    snr: float = math.nan

    def __call__(self, x):
        return self.a + self.b * np.asarray(x, dtype=np.float64) ** -self.c

    @property
    def ok(self):
        return not self.flags

    @property
    def params(self):
        return np.array([self.a, self.b, self.c])

    @property
    def errors(self):
        return np.array([self.a_err, self.b_err, self.c_err])

    def band(self, x, z=1.96):
        """(lo, hi) = y(x) -+ z * sd, sd from the covariance by the delta method (z = 1.96: ~95 %).

        sd(x)^2 = g^T cov g with g = (1, x^-c, -b x^-c ln x), the gradient of y in (a, b, c). It
        assumes independent residuals, so on autocorrelated training curves it is a lower bound.
        """
        x = np.asarray(x, dtype=np.float64)
        v = x ** -self.c
        g = np.stack([np.ones_like(x), v, -self.b * v * np.log(x)], axis=-1)
        sd = np.sqrt(np.abs(np.einsum("...i,ij,...j->...", g, np.asarray(self.cov), g)))
        y = self(x)
        return y - z * sd, y + z * sd

    def formula(self, var=None):
        """The fit as a legend label, e.g. `4.0 + 3.2 * T^-0.47`."""
        sign = "-" if self.b < 0 else "+"
        return f"{_num(self.a)} {sign} {_num(abs(self.b))} * {var or self.var}^-{_num(self.c)}"

    def describe(self, var=None):
        """The formula, its R^2, and `not ok: <flags>` when the fit fails its quality checks."""
        text = f"{self.formula(var)} (R^2 {self.r2:.2f})"
        return text if self.ok else f"{text} not ok: {', '.join(self.flags)}"

    def __str__(self):
        return self.formula()

    def to_dict(self):
        keys = ("a", "b", "c", "a_err", "b_err", "c_err", "r2", "var", "n", "chi2", "p_value", "snr")
        return {k: getattr(self, k) for k in keys} | {
            "x_range": list(self.x_range), "ok": self.ok, "flags": list(self.flags),
            "cov": [list(r) for r in self.cov], "formula": self.formula()}


def fit_power_law(x, y, *, var="T", c_bounds=EXPONENT_RANGE, nonnegative=True, min_r2=MIN_R2, sigma=None):
    """Fit `y = a + b * x**-c` by bounded nonlinear least squares, with its quality.

    Start: for each c on a log grid inside `c_bounds` the model is linear in (a, b), so (a, b) come
    from (bounded) linear least squares and the c with the smallest residual is the start. Then
    scipy's trust-region reflective solver refines (a, b, c) within the bounds. Standard errors:
    sqrt(diag(s^2 (J^T J)^-1)), s^2 = SSR / (n - 3) (NaN when n == 3). R^2 = 1 - SSR / sum((y - mean y)^2).

    Bounds: c in `c_bounds` (default `EXPONENT_RANGE`, (0, 3)); with `nonnegative` (the default, what a
    loss that falls with x obeys) a >= 0 and b >= 0. A parameter that ends on a bound is flagged
    `at_bound:<p>`, and the fit is not `ok` (see `FLAGS` for every code).

    Args:
        x: (n,) positive, finite, not all equal (token index, step, tokens...). y: (n,) finite. n >= 3.
        var: the variable name used by `PowerLawFit.formula`.
        c_bounds: (lo, hi) with 0 <= lo < hi, the allowed exponent range.
        nonnegative: bound a and b to >= 0 (False: free signs).
        min_r2: below this R^2 the fit is flagged `low_r2` (fits without `sigma`).
        sigma: None, or (n,) standard errors of the points (> 0). The fit is then weighted (residuals
            r_i / s_i) and judged against the noise instead of by R^2 (which says nothing on data whose
            noise dominates): `misfit` when chi2 = sum(r_i^2 / s_i^2) has a p-value below `MISFIT_P`
            (chi-square with n - 3 degrees of freedom), `low_signal` when the fitted curve drops by less
            than `MIN_SIGNAL_TO_NOISE` median standard errors over the x range. The standard errors of
            (a, b, c) are scaled by chi2 / (n - 3), as without sigma.

    Returns:
        PowerLawFit(a, b, c, a_err, b_err, c_err, r2, var, n, x_range, flags, cov, chi2, p_value, snr).
    """
    from .._extras import require

    opt = require("scipy.optimize", "fit_power_law")
    x, y = host_curve(x, y, 3)
    check_spread(x, "x")
    lo, hi = check_exponent_range("c_bounds", c_bounds)
    min_r2 = check_min_r2(min_r2)
    if sigma is None:
        w = np.ones_like(y)
    else:
        w = np.asarray(sigma, dtype=np.float64)
        if w.shape != y.shape or not (np.isfinite(w).all() and (w > 0).all()):
            raise ValueError(f"sigma: expected {y.size} finite standard errors > 0, got shape {w.shape}")
        w = 1.0 / w
    floor = 0.0 if nonnegative else -np.inf
    # Work on u = x / x_max so that u**-c stays O(1) whatever the units, and on v = y / max|y| so that
    # squared residuals cannot overflow (y ~ 1e300) or vanish (y ~ 1e-300); a, b are rescaled at the end.
    scale = x.max()
    u = x / scale
    y_scale = float(np.abs(y).max()) or 1.0
    y = y / y_scale
    if sigma is not None:  # 1 / sigma in the units of y / y_scale: the weighted residuals (chi2) unchanged
        w = w * y_scale

    def design(c):
        return np.stack([np.ones_like(u), u ** -c], axis=1)

    def linear(c):
        """(a, b) >= floor minimising the weighted squares at this c, and that sum (NNLS or plain lstsq)."""
        m, t = design(c) * w[:, None], y * w
        ab = opt.nnls(m, t)[0] if nonnegative else np.linalg.lstsq(m, t, rcond=None)[0]
        return ab, float(np.sum((m @ ab - t) ** 2))

    grid = np.geomspace(max(lo, 1e-3 * hi), hi, 48)
    c0 = min(grid, key=lambda c: linear(c)[1])
    a0, b0 = linear(c0)[0]

    def jac(p):
        v = u ** -p[2]
        return np.stack([np.ones_like(u), v, -p[1] * v * np.log(u)], axis=1) * w[:, None]

    sol = opt.least_squares(lambda p: (design(p[2]) @ p[:2] - y) * w, x0=[a0, b0, c0], jac=jac, method="trf",
                            bounds=([floor, floor, lo], [np.inf, np.inf, hi]), x_scale="jac")
    a, b_u, c = sol.x
    ssr = float(np.sum(sol.fun ** 2))  # chi2 with sigma, the plain sum of squares without
    dof = x.size - 3
    # u**-c = x**-c * scale**c, so in the units of x and y: a = a_v * y_scale, b = b_u * k * y_scale with
    # k = scale**c. The covariance follows by the delta method, cov = D G cov_u G^T D with G the Jacobian
    # of (a, b_u, c) -> (a / y_scale, b / y_scale, c) and D = diag(y_scale, y_scale, 1); the errors are
    # taken before D so that they stay finite where cov itself overflows (y ~ 1e300).
    k = scale ** c
    g = np.array([[1.0, 0.0, 0.0], [0.0, k, b_u * k * np.log(scale)], [0.0, 0.0, 1.0]])
    d = np.array([y_scale, y_scale, 1.0])
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        cov_v = g @ np.linalg.pinv(sol.jac.T @ sol.jac) @ g.T * (ssr / dof if dof > 0 else np.nan)
        cov = cov_v * np.outer(d, d)
    err = np.sqrt(np.abs(np.diag(cov_v))) * d
    values = (float(a * y_scale), float(b_u * k * y_scale), float(c))
    resid = design(c) @ np.array([a, b_u]) - y  # (unweighted, in units of y / y_scale, as sst)
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid ** 2)) / sst if sst > 0 else float("nan")
    chi2 = p_value = snr = math.nan
    if sigma is not None:  # judged against the noise: misfit / low_signal replace low_r2
        chi2 = ssr
        p_value = float(require("scipy.stats", "fit_power_law").chi2.sf(chi2, dof)) if dof > 0 else math.nan
        snr = float(abs(b_u) * abs(u.min() ** -c - 1.0) / np.median(1.0 / w))
    flags = quality_flags("abc", values, err, sol.active_mask != 0, r2, x.size, min_r2 if sigma is None else -math.inf)
    if sigma is not None:
        noise = ["misfit"] * (p_value < MISFIT_P) + ["low_signal"] * (not snr >= MIN_SIGNAL_TO_NOISE)
        flags[1 if flags[:1] == ["few_points"] else 0:0] = noise
    if sol.status <= 0:
        flags.append("not_converged")
    return PowerLawFit(*values, *map(float, err), float(r2), var, int(x.size), (float(x.min()), float(scale)),
                       tuple(flags), tuple(tuple(map(float, r)) for r in cov), chi2, p_value, snr)


# One curve predicted from its early part --------------------------------------------------------------

@dataclass(frozen=True)
class CurvePrediction:
    """A loss curve fitted on its early part and extrapolated to the rest.

    x, y: the whole curve; pred: the fit evaluated at every x, with its ~95 % band (lo, hi, from the
    fit's covariance); fit_mask: the points used for the fit. mae / max_abs_err: over the points after
    the fitted range; final_rel_err: median of (pred - y) / y over the last 5 % of points (at least one).
    extrapolation: max x / max fitted x. flags: the fit's flags, plus `extrapolated` when
    extrapolation > max_extrapolation; `ok` is `not flags`.
    """

    fit: PowerLawFit
    x: np.ndarray
    y: np.ndarray
    pred: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    fit_mask: np.ndarray
    mae: float
    max_abs_err: float
    final_rel_err: float
    extrapolation: float
    flags: tuple

    @property
    def ok(self):
        return not self.flags

    def describe(self):
        text = f"{self.fit.formula()} (R^2 {self.fit.r2:.2f})"
        return text if self.ok else f"{text} not ok: {', '.join(self.flags)}"

    def to_dict(self):
        return {"fit": self.fit.to_dict(), "ok": self.ok, "flags": list(self.flags), "x": self.x.tolist(),
                "y": self.y.tolist(), "pred": self.pred.tolist(), "lo": self.lo.tolist(), "hi": self.hi.tolist(),
                "fit_mask": self.fit_mask.tolist(), "mae": self.mae, "max_abs_err": self.max_abs_err,
                "final_rel_err": self.final_rel_err, "extrapolation": self.extrapolation}


def final_rel_err(pred, y):
    """Median of (pred - y) / y over the last 5 % of points (at least 1): robust to per-step noise."""
    tail = max(1, y.size // 20)
    return float(np.median((pred[-tail:] - y[-tail:]) / y[-tail:]))


def predict_curve(steps_or_tokens, losses, fit_fraction=0.3, *, skip_fraction=SKIP_FRACTION, beta_bounds=EXPONENT_RANGE,
                  min_r2=MIN_R2, max_extrapolation=MAX_EXTRAPOLATION):
    """Fit `L(D) = E + B * D**-beta` on the early part of a loss curve and predict the rest.

    The form is the data term of the Chinchilla scaling law (Hoffmann et al. 2022): E >= 0 is the
    irreducible loss, B >= 0 the part that more data (D = steps or tokens trained) removes, beta in
    `beta_bounds`. The fit uses the points with skip_fraction * max(D) <= D <= fit_fraction * max(D) (at
    least 3 of them) and `fit_power_law`; the prediction is compared with what happened after them.

    Args:
        steps_or_tokens: (n,) positive, finite, strictly increasing (else ValueError). losses: (n,) finite.
        fit_fraction: 0 < fit_fraction < 1, the share of the D range up to which the fit goes.
        skip_fraction: 0 <= skip_fraction < fit_fraction, the share left out at the start (`SKIP_FRACTION`).
        beta_bounds: the allowed exponent range. min_r2: see `fit_power_law`.
        max_extrapolation: predicting further than this factor beyond the fitted D is flagged.

    Returns:
        CurvePrediction; the fit's parameters are (a, b, c) = (E, B, beta).
    """
    x, y = host_curve(steps_or_tokens, losses, 4, names=("steps_or_tokens", "losses"))
    check_spread(x, "steps_or_tokens")
    if (np.diff(x) <= 0).any():
        i = int(np.argmax(np.diff(x) <= 0)) + 1
        raise ValueError(f"steps_or_tokens: expected increasing values; [{i}] = {x[i]:g} after [{i - 1}] = "
                         f"{x[i - 1]:g} (sort a log by step, see hrmloss.read_runs)")
    fit_fraction = check_fraction("fit_fraction", fit_fraction)
    skip_fraction = check_skip(skip_fraction, fit_fraction)
    after = x > fit_fraction * x.max()
    fit_mask = ~after & (x >= skip_fraction * x.max())
    if fit_mask.sum() < 3 or after.sum() < 1:
        raise ValueError(f"fit_fraction={fit_fraction}: keeps {int(fit_mask.sum())} of {x.size} points for the "
                         "fit; expected at least 3 for the fit and 1 to predict")
    fit = fit_power_law(x[fit_mask], y[fit_mask], c_bounds=beta_bounds, var="D", min_r2=min_r2)
    pred = fit(x)
    lo, hi = fit.band(x)
    held = np.abs(pred - y)[after]
    extrapolation = float(x.max() / x[fit_mask].max())
    flags = fit.flags + (("extrapolated",) if extrapolation > max_extrapolation else ())
    return CurvePrediction(fit, x, y, pred, lo, hi, fit_mask, float(held.mean()), float(held.max()),
                           final_rel_err(pred, y), extrapolation, flags)

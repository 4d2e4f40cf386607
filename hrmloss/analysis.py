"""Reading runs: per-position loss accumulation, power-law fits, loss-curve predictions, scaling laws.

`PositionLoss` lives on the tensors' device (torch). The fits work on host arrays (numpy + scipy,
imported when called), so `import hrmloss` stays light. Every fit carries its quality: R^2, the
parameters that ended on a bound, too few points, how far it extrapolates, summed up in `ok` and
`flags` (the codes are listed in `FLAGS`), so that a weak fit is reported as such, never as a result.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch


class PositionLoss:
    """Per-position (token index) means of per-token ce and kl, accumulated over batches and steps.

    Feed it the `reduction="none"` components of `hrm_loss` (shape (B, T)) and the mask of counted
    tokens (`labels != ignore_index`, shape (B, T), bool). It keeps, on the tensors' device, for every
    position t:

        ce_sum[t] = sum over counted (b, t) of ce[b, t],  kl_sum[t] likewise,  count[t] = number counted

    with no host synchronisation per `update` (only `compute` copies to the host). Sequences of
    different lengths T may be mixed: the buffers grow to the longest T seen.

    Args:
        dtype: accumulation dtype (default float64; use float32 on devices without float64).
    """

    def __init__(self, dtype=torch.float64):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype")
        self.dtype = dtype
        self.ce_sum = self.kl_sum = self.count = None

    def _grow(self, length, device):
        if self.count is None:
            self.ce_sum, self.kl_sum, self.count = (torch.zeros(length, dtype=self.dtype, device=device)
                                                    for _ in range(3))
            return
        if self.count.device != device:
            raise ValueError(f"device={device}: expected the device of earlier updates, {self.count.device}")
        extra = length - self.count.numel()
        if extra > 0:  # shape-driven, not data-driven: no sync
            pad = lambda x: torch.cat([x, x.new_zeros(extra)])  # noqa: E731
            self.ce_sum, self.kl_sum, self.count = pad(self.ce_sum), pad(self.kl_sum), pad(self.count)

    def update(self, ce, kl, mask):
        """Add a batch. ce, kl: (B, T) float tensors; mask: (B, T) bool, True where the token counts.

        Values at masked-out tokens are ignored (even if NaN/inf). On CPU tensors a non-finite value
        at a counted token raises ValueError; on other devices it is not checked (that would sync).
        """
        for name, x in (("ce", ce), ("kl", kl), ("mask", mask)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if ce.dim() != 2:
            raise ValueError(f"ce.shape={tuple(ce.shape)}: expected (B, T)")
        for name, x in (("kl", kl), ("mask", mask)):
            if x.shape != ce.shape:
                raise ValueError(f"{name}.shape={tuple(x.shape)}: expected the shape of ce, {tuple(ce.shape)}")
            if x.device != ce.device:
                raise ValueError(f"{name}.device={x.device}: expected the device of ce, {ce.device}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask.dtype={mask.dtype}: expected torch.bool (labels != ignore_index)")
        if not (ce.dtype.is_floating_point and kl.dtype.is_floating_point):
            raise TypeError(f"ce.dtype={ce.dtype}, kl.dtype={kl.dtype}: expected floating tensors")
        ce, kl = (torch.where(mask, x.to(self.dtype), 0.0) for x in (ce, kl))
        if ce.device.type == "cpu" and not bool(torch.isfinite(ce).all() & torch.isfinite(kl).all()):
            raise ValueError("ce/kl: non-finite value at a counted token")
        self._grow(ce.shape[1], ce.device)
        t = ce.shape[1]
        self.ce_sum[:t] += ce.sum(0)
        self.kl_sum[:t] += kl.sum(0)
        self.count[:t] += mask.sum(0).to(self.dtype)
        return self

    def compute(self, hrm=None):
        """Per-position means as float64 numpy arrays (one host copy).

        Returns a dict with "ce", "kl", "count" of shape (T,), and "loss" = ce + hrm * kl when `hrm`
        is given. A position with no counted token has mean NaN.
        """
        if self.count is None:
            raise ValueError("PositionLoss.compute: no update yet")
        ce, kl, count = (x.detach().to("cpu", torch.float64).numpy() for x in (self.ce_sum, self.kl_sum, self.count))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {"ce": np.where(count > 0, ce / count, np.nan), "kl": np.where(count > 0, kl / count, np.nan),
                   "count": count}
        if hrm is not None:
            out["loss"] = out["ce"] + float(hrm) * out["kl"]
        return out

    def reset(self):
        self.ce_sum = self.kl_sum = self.count = None


# Fit quality ------------------------------------------------------------------------------------------

EXPONENT_RANGE = (0.0, 3.0)
"""Exponents (c, beta, alpha) are fitted inside this range; one that ends on either end is flagged."""
MIN_R2 = 0.9
"""A fit that explains less than this share of the variance of the points it saw is flagged `low_r2`."""
MAX_EXTRAPOLATION = 10.0
"""A prediction further than this factor beyond the fitted range (in tokens, or in N) is `extrapolated`."""
POINTS_PER_PARAMETER = 3
"""Fewer fitted points than this many per parameter is `few_points`."""
SKIP_FRACTION = 0.05
"""Loss-curve fits leave out each run's first 5 % of tokens by default: the fall from the initial loss
(log V) and the learning-rate warm-up, which no power law of D describes (as D -> 0 it diverges)."""

FLAGS = {
    "few_points": f"fewer than {POINTS_PER_PARAMETER} fitted points per parameter",
    "low_r2": "R^2 on the fitted points below min_r2 (default 0.9): the form does not describe the data",
    "at_bound:<p>": "parameter p ended on a bound of its allowed range (E, A, B >= 0; exponents in "
                    "EXPONENT_RANGE): the data wanted a value the law does not allow",
    "uncertain:<p>": "standard error of p larger than |p| (or not computable): p is not determined",
    "not_converged": "the optimizer stopped before converging",
    "extrapolated": "predicted beyond max_extrapolation (default 10) times the fitted range",
    "few_sizes": "scaling law: fewer than 3 distinct model sizes N among the fitted runs (A, alpha and E "
                 "are not separable)",
}
"""Every code a fit's `flags` may hold (`<p>` is a parameter name). A fit is `ok` when it has none."""


def _quality(names, values, errors, at_bound, r2, n, min_r2):
    """Flags shared by every fit: few_points, low_r2, at_bound:<p>, uncertain:<p> (in that order)."""
    flags = ["few_points"] if n < POINTS_PER_PARAMETER * len(names) else []
    if not r2 >= min_r2:  # NaN R^2 too
        flags.append("low_r2")
    flags += [f"at_bound:{k}" for k, hit in zip(names, at_bound) if hit]
    flags += [f"uncertain:{k}" for k, v, e, hit in zip(names, values, errors, at_bound)
              if not hit and not e <= abs(v)]
    return flags


def _check_min_r2(min_r2):
    if isinstance(min_r2, bool) or not isinstance(min_r2, (int, float)) or not min_r2 <= 1:
        raise ValueError(f"min_r2={min_r2!r}: expected a number <= 1")
    return float(min_r2)


def _check_fraction(name, v, closed=False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v <= 1 if closed else 0 < v < 1):
        raise ValueError(f"{name}={v!r}: expected a number in (0, 1{']' if closed else ')'}")
    return float(v)


def _check_skip(skip_fraction, fit_fraction):
    if (isinstance(skip_fraction, bool) or not isinstance(skip_fraction, (int, float))
            or not 0 <= skip_fraction < fit_fraction):
        raise ValueError(f"skip_fraction={skip_fraction!r}: expected a number in [0, fit_fraction={fit_fraction})")
    return float(skip_fraction)


def _check_exponent_range(name, bounds):
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={bounds!r}: expected (lo, hi)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"{name}={bounds!r}: expected finite 0 <= lo < hi")
    return lo, hi


def _host_xy(x, y, min_points):
    """Validate a curve: 1-D, same length, finite, x > 0, at least `min_points` points."""
    x, y = (np.asarray(v, dtype=np.float64) for v in (x, y))
    if x.ndim != 1 or y.ndim != 1:
        raise ValueError(f"x.shape={x.shape}, y.shape={y.shape}: expected 1-D arrays")
    if x.shape != y.shape:
        raise ValueError(f"x.shape={x.shape}, y.shape={y.shape}: expected the same length")
    if x.size < min_points:
        raise ValueError(f"{x.size} points: expected at least {min_points} (one per fitted parameter)")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x, y: expected finite values (found NaN or inf)")
    if (x <= 0).any():
        raise ValueError(f"x: expected x > 0 (min is {x.min()})")
    return x, y


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
    from ._extras import require
    return require("scipy.ndimage", "smooth").median_filter(y, size=window, mode="reflect")


def log_bins(x, y, n_bins=32):
    """Means of y over log-spaced bins of x (> 0): (x_geometric_mean, y_mean) per non-empty bin.

    A per-position loss curve has its signal in the first tokens and mostly noise over the many late
    ones; averaging in log-spaced bins gives every octave of T the same weight in a fit, and keeps
    positions 1, 2, 3, ... apart where the bins are narrower than one position.
    """
    x, y = _host_xy(x, y, 1)
    edges = np.geomspace(x.min(), x.max() * (1 + 1e-12), n_bins + 1)
    idx = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    keep = count > 0
    gx = np.exp(np.bincount(idx, np.log(x), minlength=n_bins)[keep] / count[keep])
    return gx, np.bincount(idx, y, minlength=n_bins)[keep] / count[keep]


# Power law --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PowerLawFit:
    """y = a + b * x**-c, with standard errors, covariance, R^2 and quality flags.

    n: points fitted; x_range: (min, max) of their x; cov: 3 x 3 covariance of (a, b, c);
    flags: codes from `FLAGS` (empty when the fit is fine); `ok` is `not flags`.
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
        return {k: getattr(self, k) for k in ("a", "b", "c", "a_err", "b_err", "c_err", "r2", "var", "n")} | {
            "x_range": list(self.x_range), "ok": self.ok, "flags": list(self.flags),
            "cov": [list(r) for r in self.cov], "formula": self.formula()}


def fit_power_law(x, y, *, var="T", c_bounds=EXPONENT_RANGE, nonnegative=True, min_r2=MIN_R2):
    """Fit `y = a + b * x**-c` by bounded nonlinear least squares, with its quality.

    Start: for each c on a log grid inside `c_bounds` the model is linear in (a, b), so (a, b) come
    from (bounded) linear least squares and the c with the smallest residual is the start. Then
    scipy's trust-region reflective solver refines (a, b, c) within the bounds. Standard errors:
    sqrt(diag(s^2 (J^T J)^-1)), s^2 = SSR / (n - 3) (NaN when n == 3). R^2 = 1 - SSR / sum((y - mean y)^2).

    Bounds: c in `c_bounds` (default `EXPONENT_RANGE`, (0, 3)); with `nonnegative` (the default, what a
    loss that falls with x obeys) a >= 0 and b >= 0. A parameter that ends on a bound is flagged
    `at_bound:<p>`, and the fit is not `ok` (see `FLAGS` for every code).

    Args:
        x: (n,) positive, finite (token index, step, tokens...). y: (n,) finite. n >= 3.
        var: the variable name used by `PowerLawFit.formula`.
        c_bounds: (lo, hi) with 0 <= lo < hi, the allowed exponent range.
        nonnegative: bound a and b to >= 0 (False: free signs).
        min_r2: below this R^2 the fit is flagged `low_r2`.

    Returns:
        PowerLawFit(a, b, c, a_err, b_err, c_err, r2, var, n, x_range, flags, cov).
    """
    from ._extras import require

    opt = require("scipy.optimize", "fit_power_law")
    x, y = _host_xy(x, y, 3)
    lo, hi = _check_exponent_range("c_bounds", c_bounds)
    min_r2 = _check_min_r2(min_r2)
    floor = 0.0 if nonnegative else -np.inf
    # Work on u = x / x_max so that u**-c stays O(1) whatever the units; b is rescaled at the end.
    scale = x.max()
    u = x / scale

    def design(c):
        return np.stack([np.ones_like(u), u ** -c], axis=1)

    def linear(c):
        return opt.lsq_linear(design(c), y, bounds=([floor, floor], [np.inf, np.inf]))

    grid = np.geomspace(max(lo, 1e-3 * hi), hi, 48)
    c0 = min(grid, key=lambda c: linear(c).cost)
    a0, b0 = linear(c0).x

    def jac(p):
        v = u ** -p[2]
        return np.stack([np.ones_like(u), v, -p[1] * v * np.log(u)], axis=1)

    sol = opt.least_squares(lambda p: design(p[2]) @ p[:2] - y, x0=[a0, b0, c0], jac=jac, method="trf",
                            bounds=([floor, floor, lo], [np.inf, np.inf, hi]), x_scale="jac")
    a, b_u, c = sol.x
    ssr = float(np.sum(sol.fun ** 2))
    dof = x.size - 3
    # u**-c = x**-c * scale**c, so in the units of x: b = b_u * k with k = scale**c. The covariance
    # follows by the delta method, cov = G cov_u G^T with G the Jacobian of (a, b_u, c) -> (a, b, c).
    k = scale ** c
    g = np.array([[1.0, 0.0, 0.0], [0.0, k, b_u * k * np.log(scale)], [0.0, 0.0, 1.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        cov = g @ np.linalg.pinv(sol.jac.T @ sol.jac) @ g.T * (ssr / dof if dof > 0 else np.nan)
    err = np.sqrt(np.abs(np.diag(cov)))
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ssr / sst if sst > 0 else float("nan")
    values = (float(a), float(b_u * k), float(c))
    flags = _quality("abc", values, err, sol.active_mask != 0, r2, x.size, min_r2)
    if sol.status <= 0:
        flags.append("not_converged")
    return PowerLawFit(*values, *map(float, err), float(r2), var, int(x.size), (float(x.min()), float(scale)),
                       tuple(flags), tuple(tuple(map(float, r)) for r in cov))


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


def _final_rel_err(pred, y):
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
        steps_or_tokens: (n,) positive, finite, increasing. losses: (n,) finite.
        fit_fraction: 0 < fit_fraction < 1, the share of the D range up to which the fit goes.
        skip_fraction: 0 <= skip_fraction < fit_fraction, the share left out at the start (`SKIP_FRACTION`).
        beta_bounds: the allowed exponent range. min_r2: see `fit_power_law`.
        max_extrapolation: predicting further than this factor beyond the fitted D is flagged.

    Returns:
        CurvePrediction; the fit's parameters are (a, b, c) = (E, B, beta).
    """
    x, y = _host_xy(steps_or_tokens, losses, 4)
    fit_fraction = _check_fraction("fit_fraction", fit_fraction)
    skip_fraction = _check_skip(skip_fraction, fit_fraction)
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
                           _final_rel_err(pred, y), extrapolation, flags)


# Scaling law across runs ------------------------------------------------------------------------------

_LAW = ("E", "A", "alpha", "B", "beta")


def _check_runs(runs):
    """Validate `fit_scaling_law`'s runs; returns [(name, N, group, tokens, loss)] with numpy arrays."""
    if not isinstance(runs, (list, tuple)) or not runs:
        raise ValueError(f"runs={runs!r:.80}: expected a non-empty list of dicts")
    out = []
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not {"N", "tokens", "loss"} <= set(r):
            raise ValueError(f"runs[{i}]: expected a dict with 'N', 'tokens', 'loss' (and optional 'group', "
                             f"'name'), got {r!r:.80}")
        where = f"runs[{i}]" + (f" ({r['name']})" if r.get("name") else "")
        n = r["N"]
        if isinstance(n, bool) or not isinstance(n, (int, float, np.number)) or not (math.isfinite(n) and n > 0):
            raise ValueError(f"{where}['N']={n!r}: expected a positive number of parameters")
        try:
            d, loss = _host_xy(r["tokens"], r["loss"], 2)
        except ValueError as e:
            raise ValueError(f"{where} (tokens, loss): {e}") from None
        if (loss <= 0).any():
            raise ValueError(f"{where}['loss']: expected losses > 0 (the law is fitted on log L)")
        if (np.diff(d) <= 0).any():
            raise ValueError(f"{where}['tokens']: expected strictly increasing token counts")
        group = r.get("group")
        name = r.get("name") or f"N={float(n):.3g}" + (f", {group}" if group is not None else "")
        out.append((str(name), float(n), group, d, loss))
    names = [r[0] for r in out]
    if len(set(names)) != len(names):
        raise ValueError(f"runs: expected distinct names, got {names}")
    return out


@dataclass(frozen=True)
class ScalingLawFit:
    """L(N, D) = k_group * (E + A * N^-alpha + B * D^-beta), fitted across runs (see `fit_scaling_law`).

    params / errors: dicts over "E", "A", "alpha", "B", "beta" and, with a per-group factor, "k:<group>"
    for every group after the first (whose k is 1). errors are bootstrap standard errors.
    runs: one dict per run: name, N, group, fitted (in fit_runs), tokens_fit_min, tokens_fit_max, tokens_max,
    final_loss, final_pred, final_rel_err (median of (pred - real) / real over the run's last 5 % of
    points), extrapolation (max tokens / max fitted tokens; for a run not fitted, the factor between
    its N and the nearest fitted N), flags. flags (the law's): codes from `FLAGS`; `ok` is `not flags`.
    """

    params: dict
    errors: dict
    r2: float
    n_points: int
    fit_fraction: float
    skip_fraction: float
    groups: tuple
    group_factor: bool
    runs: tuple
    flags: tuple
    boot: np.ndarray  # (n_boot, len(params)) bootstrap replicates, in the order of params

    @property
    def ok(self):
        return not self.flags

    def _k(self, group, params):
        if not self.group_factor or group == self.groups[0]:
            return 1.0
        if group not in self.groups:
            raise ValueError(f"group={group!r}: expected one of the fitted groups {list(self.groups)}")
        return params[f"k:{group}"]

    def _eval(self, params, N, tokens, group):
        N, D = np.broadcast_arrays(np.asarray(N, np.float64), np.asarray(tokens, np.float64))
        p = params
        return self._k(group, p) * (p["E"] + p["A"] * N ** -p["alpha"] + p["B"] * D ** -p["beta"])

    def predict(self, N, tokens, group=None):
        """The law at model size N and tokens trained (numpy-broadcast); group: the run's group."""
        return self._eval(self.params, N, tokens, self.groups[0] if group is None else group)

    def band(self, N, tokens, group=None, level=0.95):
        """(lo, hi): the central `level` interval of the bootstrap replicates' predictions."""
        group = self.groups[0] if group is None else group
        preds = np.stack([self._eval(dict(zip(self.params, b)), N, tokens, group) for b in self.boot])
        q = (1 - level) / 2
        return np.quantile(preds, q, axis=0), np.quantile(preds, 1 - q, axis=0)

    def formula(self):
        """E + A * N^-alpha + B * D^-beta with three significant digits, e.g. `1.69 + 406 * N^-0.34 + ...`."""
        p = {k: f"{v:.3g}" for k, v in self.params.items()}
        return f"{p['E']} + {p['A']} * N^-{p['alpha']} + {p['B']} * D^-{p['beta']}"

    def describe(self):
        text = f"L(N, D) = {self.formula()} (R^2 {self.r2:.3f})"
        return text if self.ok else f"{text} not ok: {', '.join(self.flags)}"

    def to_dict(self):
        return {"params": dict(self.params), "errors": dict(self.errors), "formula": self.formula(),
                "r2": self.r2, "n_points": self.n_points, "fit_fraction": self.fit_fraction,
                "skip_fraction": self.skip_fraction,
                "groups": list(self.groups), "group_factor": self.group_factor, "ok": self.ok,
                "flags": list(self.flags), "runs": [dict(r) for r in self.runs]}


def _law_terms(theta, logn, logd, gidx):
    """log L = log k_g + logsumexp(e, a - alpha log N', b - beta log D') and the three terms."""
    from scipy.special import logsumexp

    e, a, alpha, b, beta = theta[:5]
    z = np.stack([np.full_like(logn, e), a - alpha * logn, b - beta * logd])
    return z, logsumexp(z, axis=0) + np.concatenate([[0.0], theta[5:]])[gidx]


def _law_residuals(theta, logn, logd, gidx, logl):
    """Log residuals log L_hat - log L of the law (see `_law_terms`)."""
    return _law_terms(theta, logn, logd, gidx)[1] - logl


def _law_jacobian(theta, logn, logd, gidx, logl):
    """d log L_hat / d theta: the softmax weights w of the three terms, times 1 or -log N' / -log D'."""
    from scipy.special import softmax

    w = softmax(_law_terms(theta, logn, logd, gidx)[0], axis=0)
    cols = [w[0], w[1], -w[1] * logn, w[2], -w[2] * logd]
    cols += [(gidx == k).astype(np.float64) for k in range(1, theta.size - 4)]
    return np.stack(cols, axis=1)


def fit_scaling_law(runs, *, fit_fraction=1.0, skip_fraction=SKIP_FRACTION, fit_runs=None, group_factor=False,
                    huber_delta=1e-3,
                    exponent_bounds=EXPONENT_RANGE, n_boot=64, max_points_per_run=400, min_r2=MIN_R2,
                    max_extrapolation=MAX_EXTRAPOLATION, seed=0):
    """Fit one law L(N, D) = E + A * N^-alpha + B * D^-beta across runs of several model sizes.

    The method of Hoffmann et al. 2022 (Chinchilla, approach 3): with N' = N / N_ref, D' = D / D_ref
    (geometric means of the fitted points, so the starts are unit-free), minimise over
    theta = (e, a, alpha, b, beta)

        sum_i Huber_delta(log k_g(i) + LSE(e, a - alpha log N'_i, b - beta log D'_i) - log L_i)

    (scipy's `least_squares`, loss="huber", f_scale=delta) from a grid of 72 starts, keeping the best;
    E = exp(e), A = exp(a) N_ref^alpha,
    B = exp(b) D_ref^beta (so E, A, B > 0), alpha and beta in `exponent_bounds`, e >= log(1e-4 min L).
    Every point of a run's curve is one (N, D, L) observation. With `group_factor`, each group after
    the first has a factor k_g = exp(log k_g) on the whole loss (e.g. a context length or data mix).
    Standard errors and the prediction band: `n_boot` bootstrap refits, resampling each run's fitted
    points with replacement (iid noise assumed: on autocorrelated training curves a lower bound).

    Args:
        runs: list of dicts {"N": parameters, "tokens": (n,) increasing > 0, "loss": (n,) > 0,
            "group": optional label, "name": optional label}.
        fit_fraction: in (0, 1]: fit on the points with tokens <= fit_fraction * the run's max tokens,
        skip_fraction: and >= skip_fraction * the run's max tokens (`SKIP_FRACTION`: the first 5 %).
        fit_runs: None (all) or the runs to fit on, as indices or names; the others are only predicted.
        group_factor: fit a per-group factor k_g (needs every group among the fitted runs).
        huber_delta: Huber threshold on log residuals (Hoffmann et al. use 1e-3).
        exponent_bounds: (lo, hi), the allowed range of alpha and beta.
        n_boot: bootstrap replicates for `errors` and `band` (>= 2).
        max_points_per_run: thin each run's fitted points to at most this many, evenly in index.
        min_r2, max_extrapolation: quality thresholds (see `FLAGS`). seed: the bootstrap's seed.

    Returns:
        ScalingLawFit.
    """
    from ._extras import require

    opt = require("scipy.optimize", "fit_scaling_law")
    rows = _check_runs(runs)
    fit_fraction = _check_fraction("fit_fraction", fit_fraction, closed=True)
    skip_fraction = _check_skip(skip_fraction, fit_fraction)
    lo_x, hi_x = _check_exponent_range("exponent_bounds", exponent_bounds)
    min_r2 = _check_min_r2(min_r2)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"n_boot={n_boot!r}: expected an int >= 2")
    if not (isinstance(huber_delta, (int, float)) and huber_delta > 0):
        raise ValueError(f"huber_delta={huber_delta!r}: expected a number > 0")
    names = [r[0] for r in rows]
    if fit_runs is None:
        fitted = set(range(len(rows)))
    else:
        fitted = set()
        for f in fit_runs:
            i = names.index(f) if isinstance(f, str) and f in names else f
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(rows):
                raise ValueError(f"fit_runs: {f!r} is neither an index below {len(rows)} nor a run name {names}")
            fitted.add(i)
        if not fitted:
            raise ValueError("fit_runs: expected at least one run")
    groups = tuple(dict.fromkeys(r[2] for r in rows))
    if group_factor and {rows[i][2] for i in fitted} != set(groups):
        raise ValueError(f"group_factor=True: every group {list(groups)} needs a fitted run (fit_runs={fit_runs!r})")
    n_k = len(groups) - 1 if group_factor else 0

    # The fitted points: (log N, log D, group, log L), run by run.
    pts, per_run = [], []
    for i, (name, n, g, d, loss) in enumerate(rows):
        window = (d >= skip_fraction * d.max()) & (d <= fit_fraction * d.max())
        keep = np.flatnonzero(window) if i in fitted else np.array([], int)
        if keep.size > max_points_per_run:
            keep = keep[np.linspace(0, keep.size - 1, max_points_per_run).round().astype(int)]
        per_run.append(keep)
        pts.append((np.full(keep.size, n), d[keep], np.full(keep.size, groups.index(g) if n_k else 0), loss[keep]))
    big_n, big_d, gidx, big_l = (np.concatenate(c) for c in zip(*pts))
    if big_l.size < 5 + n_k:
        raise ValueError(f"fit_fraction={fit_fraction}, fit_runs={fit_runs!r}: {big_l.size} points to fit; "
                         f"expected at least {5 + n_k}")
    n_ref, d_ref = np.exp(np.log(big_n).mean()), np.exp(np.log(big_d).mean())
    logn, logd, logl = np.log(big_n / n_ref), np.log(big_d / d_ref), np.log(big_l)
    m = float(big_l.min())
    lower = [math.log(1e-4 * m), -np.inf, lo_x, -np.inf, lo_x] + [-np.inf] * n_k
    upper = [np.inf, np.inf, hi_x, np.inf, hi_x] + [np.inf] * n_k

    def solve(x0, idx):
        # scipy's robust "huber" loss with f_scale = delta is Huber_delta of the residuals.
        return opt.least_squares(_law_residuals, np.clip(x0, lower, upper), jac=_law_jacobian, bounds=(lower, upper),
                                 loss="huber", f_scale=huber_delta, args=(logn[idx], logd[idx], gidx[idx], logl[idx]))

    everything = np.arange(big_l.size)
    starts = [np.array([e, a, al, b, be] + [0.0] * n_k) for al in (0.2, 0.5, 1.0) for be in (0.2, 0.5, 1.0)
              for e in np.log([0.5 * m, 0.9 * m]) for a in np.log([0.1 * m, m]) for b in np.log([0.1 * m, m])]
    best = min((solve(s, everything) for s in starts), key=lambda r: r.cost)

    def natural(theta):
        e, a, al, b, be = theta[:5]
        return np.concatenate([[math.exp(e), math.exp(a) * n_ref ** al, al, math.exp(b) * d_ref ** be, be],
                               np.exp(theta[5:])])

    keys = list(_LAW) + [f"k:{g}" for g in groups[1:n_k + 1]]
    rng = np.random.default_rng(seed)
    offsets = np.cumsum([0] + [k.size for k in per_run])
    boot = []
    for _ in range(n_boot):
        idx = np.concatenate([o + rng.integers(0, k.size, k.size) for o, k in zip(offsets, per_run) if k.size])
        boot.append(natural(solve(best.x, idx).x))
    boot = np.array(boot)
    values = natural(best.x)
    errors = boot.std(axis=0, ddof=1)

    _, pred_log = _law_terms(best.x, logn, logd, gidx)
    sst = float(np.sum((big_l - big_l.mean()) ** 2))
    r2 = 1 - float(np.sum((np.exp(pred_log) - big_l) ** 2)) / sst if sst > 0 else float("nan")
    flags = _quality(keys, values, errors, best.active_mask != 0, r2, big_l.size, min_r2)
    fitted_n = sorted({rows[i][1] for i in fitted})
    if len(fitted_n) < 3:
        flags.append("few_sizes")

    law = ScalingLawFit(dict(zip(keys, map(float, values))), dict(zip(keys, map(float, errors))), float(r2),
                        int(big_l.size), fit_fraction, skip_fraction, groups, bool(n_k), (), (), boot)
    run_rows = []
    for i, ((name, n, g, d, loss), keep) in enumerate(zip(rows, per_run)):
        pred = law.predict(n, d, g)
        tail = max(1, d.size // 20)
        if i in fitted:
            extrapolation = float(d.max() / d[keep].max())
        else:
            extrapolation = float(min(max(n / f, f / n) for f in fitted_n))
        run_rows.append({"name": name, "N": n, "group": g, "fitted": i in fitted,
                         "tokens_fit_min": float(d[keep].min()) if keep.size else None,
                         "tokens_fit_max": float(d[keep].max()) if keep.size else None,
                         "tokens_max": float(d.max()), "final_loss": float(np.median(loss[-tail:])),
                         "final_pred": float(np.median(pred[-tail:])), "final_rel_err": _final_rel_err(pred, loss),
                         "extrapolation": extrapolation,
                         "flags": ["extrapolated"] if extrapolation > max_extrapolation else []})
    if any(r["flags"] for r in run_rows):
        flags.append("extrapolated")
    return ScalingLawFit(law.params, law.errors, law.r2, law.n_points, fit_fraction, skip_fraction, groups, bool(n_k),
                         tuple(run_rows), tuple(flags), boot)

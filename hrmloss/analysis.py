"""Reading runs: per-position loss accumulation, power-law fits, and loss-curve extrapolation.

`PositionLoss` lives on the tensors' device (torch). `fit_power_law` and `predict_curve` work on host
arrays (numpy + scipy, imported when called), so `import hrmloss` stays light.
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


def _fmt(v):
    """Two significant decimals for small numbers, one for the rest: 4.0, 3.2, 0.47."""
    return f"{v:.2f}" if abs(v) < 1 else f"{v:.1f}"


@dataclass(frozen=True)
class PowerLawFit:
    """y = a + b * x**-c, with standard errors and the R^2 of the fit on the points it saw."""

    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    r2: float
    var: str = "T"

    def __call__(self, x):
        return self.a + self.b * np.asarray(x, dtype=np.float64) ** -self.c

    @property
    def params(self):
        return np.array([self.a, self.b, self.c])

    @property
    def errors(self):
        return np.array([self.a_err, self.b_err, self.c_err])

    def formula(self, var=None):
        """The fit as a legend label, e.g. `4.0 + 3.2 * T^-0.47`."""
        sign = "-" if self.b < 0 else "+"
        return f"{_fmt(self.a)} {sign} {_fmt(abs(self.b))} * {var or self.var}^-{_fmt(self.c)}"

    def __str__(self):
        return self.formula()

    def to_dict(self):
        return {k: getattr(self, k) for k in ("a", "b", "c", "a_err", "b_err", "c_err", "r2", "var")} | {
            "formula": self.formula()}


def _linear_ab(x, y, c):
    """For fixed c, y = a + b * x**-c is linear in (a, b): ordinary least squares, residual norm."""
    design = np.stack([np.ones_like(x), x ** -c], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
    return a, b, float(np.sum((design @ (a, b) - y) ** 2))


def fit_power_law(x, y, *, c_bounds=(1e-3, 5.0), var="T"):
    """Fit `y = a + b * x**-c` by bounded nonlinear least squares.

    Start: for each c on a log grid inside `c_bounds` the model is linear in (a, b), so (a, b) come
    from ordinary least squares and the c with the smallest residual is the start (robust on noisy
    curves, no hand-tuned guess). Then scipy's trust-region reflective solver refines (a, b, c) with
    c kept inside `c_bounds`. Standard errors: sqrt(diag(s^2 (J^T J)^-1)), s^2 = SSR / (n - 3)
    (NaN when n == 3). R^2 = 1 - SSR / sum((y - mean y)^2).

    Args:
        x: (n,) positive, finite (token index, step, tokens...). y: (n,) finite. n >= 3.
        c_bounds: (lo, hi) with 0 <= lo < hi, the allowed exponent range.
        var: the variable name used by `PowerLawFit.formula`.

    Returns:
        PowerLawFit(a, b, c, a_err, b_err, c_err, r2, var).
    """
    from scipy.optimize import least_squares

    x, y = _host_xy(x, y, 3)
    lo, hi = (float(v) for v in c_bounds)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"c_bounds={c_bounds!r}: expected finite 0 <= lo < hi")
    # Work on x / x_max so that x**-c stays O(1) whatever the units; b is rescaled at the end.
    scale = x.max()
    u = x / scale
    grid = np.geomspace(max(lo, 1e-4), hi, 64)
    c0 = min(grid, key=lambda c: _linear_ab(u, y, c)[2])
    a0, b0, _ = _linear_ab(u, y, c0)

    def residual(p):
        return p[0] + p[1] * u ** -p[2] - y

    def jac(p):
        v = u ** -p[2]
        return np.stack([np.ones_like(u), v, -p[1] * v * np.log(u)], axis=1)

    sol = least_squares(residual, x0=[a0, b0, c0], jac=jac, method="trf",
                        bounds=([-np.inf, -np.inf, lo], [np.inf, np.inf, hi]), x_scale="jac")
    a, b_u, c = sol.x
    ssr = float(np.sum(sol.fun ** 2))
    dof = x.size - 3
    # u**-c = x**-c * scale**c, so in the units of x: b = b_u * k with k = scale**c. The covariance
    # follows by the delta method, cov = G cov_u G^T with G the Jacobian of (a, b_u, c) -> (a, b, c).
    k = scale ** c
    g = np.array([[1.0, 0.0, 0.0], [0.0, k, b_u * k * np.log(scale)], [0.0, 0.0, 1.0]])
    with np.errstate(invalid="ignore", divide="ignore"):
        cov_u = np.linalg.pinv(sol.jac.T @ sol.jac) * (ssr / dof if dof > 0 else np.nan)
    err = np.sqrt(np.abs(np.diag(g @ cov_u @ g.T)))
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - ssr / sst if sst > 0 else float("nan")
    return PowerLawFit(float(a), float(b_u * k), float(c), *map(float, err), float(r2), var)


@dataclass(frozen=True)
class CurvePrediction:
    """A loss curve fitted on its early part and extrapolated to the rest.

    x, y: the whole curve; pred: the fit evaluated at every x; fit_mask: the points used for the fit.
    mae / max_abs_err: over the held-out points; final_rel_err: (pred - y) / y at the last point.
    """

    fit: PowerLawFit
    x: np.ndarray
    y: np.ndarray
    pred: np.ndarray
    fit_mask: np.ndarray
    mae: float
    max_abs_err: float
    final_rel_err: float

    def to_dict(self):
        return {"fit": self.fit.to_dict(), "x": self.x.tolist(), "y": self.y.tolist(),
                "pred": self.pred.tolist(), "fit_mask": self.fit_mask.tolist(), "mae": self.mae,
                "max_abs_err": self.max_abs_err, "final_rel_err": self.final_rel_err}


def predict_curve(steps_or_tokens, losses, fit_fraction=0.3, *, beta_bounds=(1e-3, 3.0)):
    """Fit `L(D) = E + B * D**-beta` on the early part of a loss curve and predict the rest.

    The form is the data term of the Chinchilla scaling law (Hoffmann et al. 2022): E is the
    irreducible loss, B * D**-beta the part that more data (D = steps or tokens trained) removes.
    The fit uses the points with D <= fit_fraction * max(D) (at least 3 of them) and
    `fit_power_law`; the prediction is compared with what happened on the other points.

    Args:
        steps_or_tokens: (n,) positive, finite. losses: (n,) finite.
        fit_fraction: 0 < fit_fraction < 1, the share of the D range used for the fit.
        beta_bounds: the allowed exponent range.

    Returns:
        CurvePrediction(fit, x, y, pred, fit_mask, mae, max_abs_err, final_rel_err); the fit's
        parameters are (a, b, c) = (E, B, beta).
    """
    x, y = _host_xy(steps_or_tokens, losses, 4)
    if isinstance(fit_fraction, bool) or not isinstance(fit_fraction, (int, float)) or not 0 < fit_fraction < 1:
        raise ValueError(f"fit_fraction={fit_fraction!r}: expected a number in (0, 1)")
    fit_mask = x <= fit_fraction * x.max()
    if fit_mask.sum() < 3 or (~fit_mask).sum() < 1:
        raise ValueError(f"fit_fraction={fit_fraction}: keeps {int(fit_mask.sum())} of {x.size} points for the "
                         "fit; expected at least 3 for the fit and 1 to predict")
    fit = fit_power_law(x[fit_mask], y[fit_mask], c_bounds=beta_bounds, var="D")
    pred = fit(x)
    held = np.abs(pred - y)[~fit_mask]
    last = int(np.argmax(x))
    return CurvePrediction(fit, x, y, pred, fit_mask, float(held.mean()), float(held.max()),
                           float((pred[last] - y[last]) / y[last]) if y[last] != 0 else float("nan"))

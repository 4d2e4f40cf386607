"""One scaling law across a grid of runs, L(N, D) = E + A N^-alpha + B D^-beta (optionally times a factor per
group), fitted on the early part of every run and judged on the rest (`fit_scaling_law`)."""
import math
from dataclasses import dataclass

import numpy as np

from .fits import (EXPONENT_RANGE, MAX_EXTRAPOLATION, MIN_R2, SKIP_FRACTION, check_exponent_range,
                   check_fraction, check_min_r2, check_skip, final_rel_err, host_curve, quality_flags)

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
            d, loss = host_curve(r["tokens"], r["loss"], 2)
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
    from .._extras import require

    opt = require("scipy.optimize", "fit_scaling_law")
    rows = _check_runs(runs)
    fit_fraction = check_fraction("fit_fraction", fit_fraction, closed=True)
    skip_fraction = check_skip(skip_fraction, fit_fraction)
    lo_x, hi_x = check_exponent_range("exponent_bounds", exponent_bounds)
    min_r2 = check_min_r2(min_r2)
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
    flags = quality_flags(keys, values, errors, best.active_mask != 0, r2, big_l.size, min_r2)
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
                         "final_pred": float(np.median(pred[-tail:])), "final_rel_err": final_rel_err(pred, loss),
                         "extrapolation": extrapolation,
                         "flags": ["extrapolated"] if extrapolation > max_extrapolation else []})
    if any(r["flags"] for r in run_rows):
        flags.append("extrapolated")
    return ScalingLawFit(law.params, law.errors, law.r2, law.n_points, fit_fraction, skip_fraction, groups, bool(n_k),
                         tuple(run_rows), tuple(flags), boot)

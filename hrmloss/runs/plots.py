"""The charts for reading runs, drawn with matplotlib (imported when a function is called) to PNG and SVG.

(a) `plot_hrm_sweep`: KL and CE against iterations per hrm; (b) `plot_position_loss`: per-token test
loss against token index with a power law per step; (c) `plot_test_loss`: per-token-index test loss
against step (one line per token index) beside the test loss per run; (d) `plot_grid`: Real and Pred
(one scaling law across the grid) per run, rows by group, columns by N; `plot_pred_vs_real`: one
curve prediction per run; `plot_pareto`: final CE against final KL across hrm values.

One style for all (`STYLE`, and the line styles below): raw per-step values are faint thin lines,
the rolling median (`fits.smooth`) over them is bold; fits and predictions are dashed; a fit that
fails its quality checks (`fits.FLAGS`) is grey and dashed with the reason in its legend entry.
Every function takes plain arrays (or mappings of them) and a path (its suffix is replaced by each of
`formats`) and returns the paths written. No pyplot, no global backend change.
"""
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .fits import (CurvePrediction, fit_power_law, host_curve, log_bins, noise_level, predict_curve, smooth,
                   smooth_window)

STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "legend.fontsize": 7, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
         "axes.spines.right": False, "legend.frameon": True, "legend.framealpha": 0.85,
         "legend.edgecolor": "0.85", "svg.fonttype": "none", "svg.hashsalt": "hrmloss"}
RAW = {"lw": 0.6, "alpha": 0.3}             # raw values per step: faint
BOLD = {"lw": 1.8}                          # rolling median over them: bold
FIT = {"lw": 1.5, "ls": "--"}               # a fit or prediction that passed its checks
WEAK = {"lw": 1.2, "ls": "--", "color": "0.6"}  # one that did not: grey
REAL, PRED = "C0", "C3"
FORMATS = ("png", "svg")


@contextmanager
def _chart(path, nrows, ncols, width, height, formats, written, **subplots):
    """A constrained-layout figure in `STYLE`; saved as path.<format> for each format on exit."""
    from .._extras import require

    mpl = require("matplotlib", "the charts")
    from matplotlib.figure import Figure

    formats = _check_formats(formats)
    with mpl.rc_context(STYLE):
        fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
        yield fig, fig.subplots(nrows, ncols, squeeze=False, **subplots)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for fmt in formats:
            written.append(path.with_suffix(f".{fmt}"))
            extra = {"png": {"pil_kwargs": {"optimize": True}}, "svg": {"metadata": {"Date": None}}}.get(fmt, {})
            fig.savefig(written[-1], dpi=100, **extra)


def _check_formats(formats):
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if not formats or any(f not in ("png", "svg", "pdf") for f in formats):
        raise ValueError(f"formats={formats!r}: expected some of 'png', 'svg', 'pdf'")
    return formats


def _si(n):
    """134000000 -> 134M, 1.36e9 -> 1.36B."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def ranges(values):
    """Sorted integers as runs for a label: [1, 2, 3, 7, 9, 10] -> "1-3, 7, 9-10"."""
    values = [int(v) for v in np.sort(np.asarray(values).ravel())]
    runs, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            runs.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(runs)


def _token_unit(max_tokens):
    """(divisor, axis label) for tokens trained: billions, millions or thousands, whichever reads."""
    for scale, word in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if max_tokens >= scale:
            return scale, f"Tokens trained ({word})"
    return 1.0, "Tokens trained"


def _log_x(ax):
    """A log x axis labelled 1, 2, 5, 10, 20, ... (plain numbers, no crowded minor labels)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _series(name, x, y, positive_y=False):
    """A validated (x, y) curve; for a log y axis, only its points with y > 0 (KL is 0 at step 1)."""
    x, y = host_curve(x, y, 1)
    if positive_y:
        if not (y > 0).any():
            raise ValueError(f"{name}: expected some y > 0 on a log axis")
        x, y = x[y > 0], y[y > 0]
    return x, y


def _raw_and_smooth(ax, x, y, color, window, label=None):
    """The raw values faint, their rolling median (`smooth`) bold; labelled "<label>: raw" / ": median"."""
    w = smooth_window(y.size, window)
    if w <= 1:  # few points (e.g. held-out evaluations): no median to draw, one bold line
        ax.plot(x, y, color=color, label=label, **BOLD)
        return
    ax.plot(x, y, color=color, label=label and f"{label}: raw, per step", **RAW)
    ax.plot(x, smooth(y, w), color=color, label=label and f"{label}: rolling median ({w} points)", **BOLD)


def plot_hrm_sweep(runs, path, *, window=None, formats=FORMATS):
    """(a) A 2 x len(runs) grid, one column per hrm: the KL term (log y) on top, causal-LM CE below.

    Args:
        runs: {hrm: {"step": (n,), "kl": (n,), "ce": (n,)}}; hrm a number, its string, or a run name.
        path: the file to write (its suffix is replaced by each format).
        window: rolling-median window (default n // 25).
    """
    if not runs:
        raise ValueError("runs: expected at least one hrm")
    written = []

    def key(kv):
        try:
            return 0, float(kv[0])
        except ValueError:
            return 1, str(kv[0])

    items = sorted(runs.items(), key=key)
    with _chart(path, 2, len(items), 3.4, 2.6, formats, written, sharex="col") as (fig, axes):
        for col, (hrm, r) in enumerate(items):
            for row, (k, label, log) in enumerate((("kl", "KL to reference (log scale)", True),
                                                   ("ce", "Causal-LM loss (CE)", False))):
                x, y = _series(f"runs[{hrm!r}][{k!r}]", r["step"], r[k], positive_y=log)
                ax = axes[row, col]
                w = window or max(1, y.size // 25)
                _raw_and_smooth(ax, x, y, f"C{row + 1}", w, label=k.upper() if col == 0 else None)
                if log:
                    ax.set_yscale("log")
                if row == 0:
                    try:
                        ax.set_title(f"hrm = {float(hrm):g}")
                    except ValueError:
                        ax.set_title(str(hrm))
                ax.set_xlabel("Iteration" if row == 1 else None)
                ax.set_ylabel(label if col == 0 else None)
        for ax in axes[:, 0]:
            ax.legend(loc="best")
        # One y range per row, so that the columns compare at a glance.
        for row in range(2):
            lo = min(ax.get_ylim()[0] for ax in axes[row])
            hi = max(ax.get_ylim()[1] for ax in axes[row])
            for ax in axes[row]:
                ax.set_ylim(lo, hi)
    return written


def _position_sigma(y):
    """The noise of one per-position curve (`fits.noise_level`), or None when it cannot be read."""
    s = noise_level(y[np.isfinite(y)])
    return s if np.isfinite(s) and s > 0 else None


def position_fits(steps, curves, positions=None, n_bins=32):
    """`fit_power_law` of each per-position curve, on its log-spaced bins (`fits.log_bins`).

    Judged against the curve's own noise: s = `fits.noise_level` of the curve (per position), a bin of
    k positions has standard error s / sqrt(k) (see `fit_power_law(sigma=...)`); with fewer than 5
    positions, by R^2. Returns a list (one per curve) of PowerLawFit, or None where fewer than 3
    positions are finite.
    """
    curves = np.asarray(curves, dtype=np.float64)
    positions = np.arange(1, curves.shape[1] + 1) if positions is None else np.asarray(positions, np.float64)
    fits = []
    for y in curves:
        ok = np.isfinite(y)
        if ok.sum() < 3:
            fits.append(None)
            continue
        bx, by, count = log_bins(positions[ok], y[ok], n_bins, counts=True)
        s = _position_sigma(y)
        fits.append(fit_power_law(bx, by, var="T", sigma=None if s is None else s / np.sqrt(count)))
    return fits


def token_indices(n_positions, n=10):
    """About n log-spaced token indices in 1..n_positions (distinct integers, both ends included)."""
    return np.unique(np.round(np.geomspace(1, n_positions, n)).astype(int))


def token_index_fits(steps, curves, indices=None):
    """Per token index t: its loss against step, `fit_power_law` L(step) = a + b * step^-c.

    Each point's standard error is the noise of the per-position curve it comes from (`fits.noise_level`
    of that step's curve), so the fit is judged against it (misfit / low_signal, see `fit_power_law`).
    Args: steps (k,), curves (k, T) per-position losses (NaN rows or entries skipped), indices (1-based;
    default `token_indices(T)`). Returns {t: (steps (m,), losses (m,), PowerLawFit or None)}.
    """
    steps = np.asarray(steps, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    indices = token_indices(curves.shape[1]) if indices is None else np.asarray(indices, int)
    sigma = np.array([_position_sigma(y) or np.nan for y in curves])
    out = {}
    for t in indices:
        y = curves[:, t - 1]
        ok = np.isfinite(y) & np.isfinite(steps) & (steps > 0)
        fit = None
        if ok.sum() >= 3:
            known = ok & np.isfinite(sigma)
            fit = fit_power_law(steps[ok], y[ok], var="step",
                                sigma=sigma[ok] if known.sum() == ok.sum() else None)
        out[int(t)] = (steps[ok], y[ok], fit)
    return out


def plot_position_loss(panels, path, *, formats=FORMATS):
    """(b) Per-token test loss against token index (log x), one curve per step, a power law each.

    Each curve is drawn thin and solid in its step's colour (colour bar); its fit `a + b * T^-c`
    (`position_fits`: on log-spaced bins of positions) dashed in the same colour with the formula as
    its label, or grey with the flags when the fit is not ok.

    Args:
        panels: {title: {"step": (k,) steps > 0, "loss": (k, T) per-position losses (NaN skipped),
            optional "positions": (T,) token indices (default 1..T), optional "fits": the curves'
            `position_fits` when already made}}, one panel each.
    """
    if not panels:
        raise ValueError("panels: expected at least one {title: {'step', 'loss'}}")
    checked = {}
    for title, p in panels.items():
        steps = np.asarray(p["step"], dtype=np.float64)
        curves = np.asarray(p["loss"], dtype=np.float64)
        if steps.ndim != 1 or curves.ndim != 2 or curves.shape[0] != steps.size:
            raise ValueError(f"panels[{title!r}]: step.shape={steps.shape}, loss.shape={curves.shape}: "
                             "expected (k,) and (k, T)")
        if steps.size == 0 or not np.isfinite(steps).all() or (steps <= 0).any():
            raise ValueError(f"panels[{title!r}]['step']: expected at least one finite step > 0")
        pos = np.arange(1, curves.shape[1] + 1) if p.get("positions") is None else np.asarray(p["positions"], float)
        if pos.shape != (curves.shape[1],):
            raise ValueError(f"panels[{title!r}]['positions'].shape={pos.shape}: expected ({curves.shape[1]},)")
        fits = p.get("fits")
        checked[title] = (steps, curves, pos, position_fits(steps, curves, pos) if fits is None else fits)
    ncols = min(2, len(checked))
    nrows = -(-len(checked) // ncols)
    written = []
    with _chart(path, nrows, ncols, 5.6, 3.9, formats, written) as (fig, axes):
        from matplotlib.cm import ScalarMappable  # after _chart's check that matplotlib is installed
        from matplotlib.colors import LogNorm

        for ax, (title, (steps, curves, pos, fits)) in zip(axes.flat, checked.items()):
            sm = ScalarMappable(norm=LogNorm(steps.min(), max(steps.max(), steps.min() * 1.01)), cmap="viridis")
            weak = {}  # flags -> the steps whose fit has them: one legend entry each
            for step, y, f in zip(steps, curves, fits):
                ok = np.isfinite(y)
                color = sm.to_rgba(step)
                ax.plot(pos[ok], y[ok], color=color, lw=0.9, alpha=0.75)
                if f is None:
                    continue
                if f.ok:
                    ax.plot(pos[ok], f(pos[ok]), color=color, label=f"step {step:g}: {f.formula()}", **FIT)
                else:
                    ax.plot(pos[ok], f(pos[ok]), **WEAK)
                    weak.setdefault(f.flags, []).append(f"{step:g}")
            for flags, at in weak.items():
                ax.plot([], [], label=f"step{'s' * (len(at) > 1)} {', '.join(at)}: no fit ({', '.join(flags)})", **WEAK)
            empty = np.flatnonzero(~np.isfinite(curves).any(axis=0))
            if empty.size:  # never counted (a prompt mask, labels starting with -100): nothing to draw there
                ax.plot([], [], ls="none", label=f"no data at T = {ranges(pos[empty])}: not drawn, not fitted")
            ax.set_xscale("log")
            ax.set_xlabel("Token index T")
            ax.set_ylabel("Test loss at position T")
            ax.set_title(title)
            _fit_legend(ax)
            fig.colorbar(sm, ax=ax, label="Step")
        for ax in list(axes.flat)[len(checked):]:
            ax.set_visible(False)
    return written


def _fit_legend(ax):
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles = [Line2D([], [], color="0.3", lw=0.9), Line2D([], [], color="0.3", **FIT)] + handles
    labels = ["measured (colour: step)", "fit a + b * T^-c (grey: not ok)"] + labels
    # Below the axes, so that it never hides a curve.
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=6.5)


def plot_test_loss(panels, path, *, token_panels=None, ylabel="Test loss", formats=FORMATS):
    """(c) Per-token-index test loss against step, one panel per run, beside the test loss of each run.

    token_panels: {run: {"step": (k,), "loss": (k, T) per-position losses, optional "fits": the run's
    `token_index_fits`}}: one line per token index (`token_indices`, colour bar: token index), loss
    against step (log x), and its fit a + b * step^-c dashed in the same colour (grey: not ok).
    panels: {phase title: {run name: (steps (n,) > 0, losses (n,))}}: test loss against step (log x),
    one panel per phase, one curve per run. Runs of different phases (a reference's pre-training and
    the fine-tuning runs from it) never share a step axis: their step 1 is not the same moment.
    """
    if not panels or not all(panels.values()):
        raise ValueError("panels: expected {phase: {run: (steps, losses)}} with at least one run each")
    tokens = {}
    for name, p in (token_panels or {}).items():
        steps, curves = np.asarray(p["step"], float), np.asarray(p["loss"], float)
        if steps.ndim != 1 or curves.ndim != 2 or curves.shape[0] != steps.size:
            raise ValueError(f"token_panels[{name!r}]: step.shape={steps.shape}, loss.shape={curves.shape}: "
                             "expected (k,) and (k, T)")
        tokens[name] = p.get("fits") or token_index_fits(steps, curves)
    n = len(tokens) + len(panels)
    ncols = min(3, n)
    written = []
    with _chart(path, -(-n // ncols), ncols, 4.4, 3.4, formats, written) as (fig, axes):
        from matplotlib.cm import ScalarMappable  # after _chart's check that matplotlib is installed
        from matplotlib.colors import LogNorm

        flat = list(axes.flat)
        for ax, (name, lines) in zip(flat, tokens.items()):
            sm = ScalarMappable(norm=LogNorm(1, max(2, max(lines))), cmap="plasma")
            n_ok = 0
            for t, (x, y, f) in lines.items():
                ax.plot(x, y, "o-", color=sm.to_rgba(t), ms=2.5, lw=1.0)
                if f is not None:
                    xs = np.geomspace(x.min(), x.max(), 64)
                    ax.plot(xs, f(xs), **(dict(FIT, color=sm.to_rgba(t), lw=1.0) if f.ok else dict(WEAK, lw=0.9)))
                    n_ok += f.ok
            _log_x(ax)
            ax.set_xlabel("Step (log scale)")
            ax.set_ylabel("Test loss at token index T")
            ax.set_title(f"{name}: loss per token index\n{n_ok} of {len(lines)} fits a + b * step^-c ok", fontsize=8)
            fig.colorbar(sm, ax=ax, label="Token index T")
        i = 0
        for ax, (phase, runs) in zip(flat[len(tokens):], panels.items()):
            for name, (x, y) in runs.items():
                x, y = _series(f"panels[{phase!r}][{name!r}]", x, y)
                ax.plot(x, y, "o-", color=f"C{i}", ms=3, lw=1.4, label=str(name))
                i += 1
            _log_x(ax)
            ax.set_xlabel("Step (log scale)")
            ax.set_ylabel(ylabel)
            ax.set_title(str(phase))
            ax.legend()
        for ax in flat[n:]:
            ax.set_visible(False)
    return written


def plot_pareto(points, path, *, formats=FORMATS):
    """The trade-off hrm controls: final test CE against final KL to the reference, one point per hrm.

    Args:
        points: {hrm (number): (kl, ce)}; the points are joined in the order of hrm and labelled with it.
    """
    items = sorted((float(h), float(kl), float(ce)) for h, (kl, ce) in points.items())
    if not items or not all(np.isfinite(v).all() for v in np.array(items)):
        raise ValueError(f"points={points!r}: expected at least one {{hrm: (kl, ce)}} of finite numbers")
    h, kl, ce = map(np.array, zip(*items))
    log_x = (kl > 0).all() and kl.max() > 10 * kl.min()
    written = []
    with _chart(path, 1, 1, 4.6, 3.4, formats, written) as (fig, axes):
        ax = axes[0, 0]
        ax.plot(kl, ce, "o-", color=REAL, ms=5, lw=1.2)
        for hi, x, y in zip(h, kl, ce):
            ax.annotate(f"hrm = {hi:g}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7.5)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel("Final KL to the reference" + (" (log scale)" if log_x else ""))
        ax.set_ylabel("Final test CE (causal-LM loss)")
        ax.set_title("What hrm trades: fitting the new data (CE) against staying close (KL)")
        ax.margins(x=0.25, y=0.15)
    return written


def _pred_panel(ax, x, y, pred, lo, hi, fit_range, ok, reason, window, unit):
    """Real (raw faint, median bold), Pred dashed with its band, the fitted range (or None) shaded."""
    xs = x / unit
    if fit_range is not None:
        ax.axvspan(fit_range[0] / unit, fit_range[1] / unit, color="0.92", zorder=0, label="fitted range")
    _raw_and_smooth(ax, xs, y, REAL, window, label="Real")
    if ok:
        ax.fill_between(xs, lo, hi, color=PRED, alpha=0.15, lw=0, label="Pred ~95 % band")
        ax.plot(xs, pred, color=PRED, label="Pred", **FIT)
    else:
        ax.plot(xs, pred, label=f"Pred not ok: {reason}", **WEAK)
    # The first steps (the loss falling from log V) would flatten everything else: start at 5 %.
    sy = smooth(y, window)
    lo_y = min(sy.min(), np.min(pred[len(pred) // 20:]))
    hi_y = max(sy[len(sy) // 20:].max(), np.max(pred[len(pred) // 20:]))
    pad = 0.08 * (hi_y - lo_y) + 1e-9
    ax.set_ylim(lo_y - pad, min(hi_y, sy.max()) + pad)


def plot_pred_vs_real(runs, path, *, fit_fraction=0.4, window=None, xlabel=None, ylabel="Total training loss",
                      formats=FORMATS):
    """"Real" total loss against tokens trained and "Pred", one curve prediction per run.

    Pred is `predict_curve` (L(D) = E + B * D^-beta on 5 % to fit_fraction of max D, shaded), drawn over
    the whole range with its band; a prediction that is not ok is grey with its flags in the legend.

    Args:
        runs: {name: (tokens (n,), losses (n,))}, tokens > 0; or {name: CurvePrediction} already made.
        xlabel: None (x is tokens trained, scaled to thousands, millions...), or the label of an x drawn
            as it is (e.g. "Step", for runs whose tokens are unknown).
        ylabel: the loss axis's label (e.g. "Held-out loss" for a Pred on the held-out loss).
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    preds = {name: v if isinstance(v, CurvePrediction) else predict_curve(*v, fit_fraction) for name, v in runs.items()}
    unit, xlabel = _token_unit(max(p.x.max() for p in preds.values())) if xlabel is None else (1.0, xlabel)
    written = []
    with _chart(path, 1, len(preds), 3.4, 3.0, formats, written) as (fig, axes):
        for ax, (name, p) in zip(axes[0], preds.items()):
            w = window or max(1, p.y.size // 25)
            fitted = p.x[p.fit_mask]
            _pred_panel(ax, p.x, p.y, p.pred, p.lo, p.hi, (fitted.min(), fitted.max()), p.ok, ", ".join(p.flags),
                        w, unit)
            ax.set_title(f"{name}\n{p.fit.formula() if p.ok else 'no reliable fit'}", fontsize=8)
            ax.set_xlabel(xlabel)
        axes[0, 0].set_ylabel(ylabel)
        axes[0, 0].legend(loc="upper right")
        for ax in axes[0, 1:]:
            _weak_legend(ax)
    return written


def _weak_legend(ax):
    """On panels after the first (which explains every style): only a grey fit's reason."""
    weak = [(h, lab) for h, lab in zip(*ax.get_legend_handles_labels()) if "not ok" in lab]
    if weak:
        ax.legend(*zip(*weak), loc="best")


def plot_grid(runs, law, path, *, window=None, formats=FORMATS):
    """(d) Total loss against tokens trained, one panel per run: rows by group, columns by N.

    "Real" solid (rolling median bold over the raw values), "Pred" dashed from one scaling law fitted
    across the whole grid (`fit_scaling_law`), with its bootstrap ~95 % band and the fitted range of
    each run shaded. A law that is not ok is drawn grey with its flags.

    Args:
        runs: the list given to `fit_scaling_law` (dicts with N, tokens, loss, group, name).
        law: its ScalingLawFit.
    """
    if len(runs) != len(law.runs):
        raise ValueError(f"runs: {len(runs)} runs for a law fitted on {len(law.runs)}: expected the same list")
    groups = list(dict.fromkeys(r.get("group") for r in runs))
    sizes = sorted({float(r["N"]) for r in runs})
    unit, xlabel = _token_unit(max(float(np.max(r["tokens"])) for r in runs))
    written = []
    with _chart(path, len(groups), len(sizes), 3.0, 2.5, formats, written) as (fig, axes):
        for ax in axes.flat:
            ax.set_visible(False)
        for r, info in zip(runs, law.runs):
            ax = axes[groups.index(r.get("group")), sizes.index(float(r["N"]))]
            ax.set_visible(True)
            x, y = np.asarray(r["tokens"], float), np.asarray(r["loss"], float)
            pred = law.predict(r["N"], x, r.get("group"))
            lo, hi = law.band(r["N"], x, r.get("group"))
            fit_range = (info["tokens_fit_min"], info["tokens_fit_max"]) if info["fitted"] else None
            _pred_panel(ax, x, y, pred, lo, hi, fit_range, law.ok and not info["flags"],
                        ", ".join(law.flags or info["flags"]), window or max(1, y.size // 25), unit)
            err = f"end: {info['final_rel_err']:+.1%}" + ("" if info["fitted"] else " (not fitted)")
            ax.set_title(f"N = {_si(r['N'])}" + (f", {r['group']}" if r.get("group") is not None else "")
                         + f"\n{err}", fontsize=8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("Total loss" if ax in list(axes[:, 0]) else None)
        shown = [ax for ax in axes.flat if ax.get_visible()]
        shown[0].legend(loc="best")
        for ax in shown[1:]:
            _weak_legend(ax)
        factors = "".join(f", x {v:.3g} at {k[2:]}" for k, v in law.params.items() if k.startswith("k:"))
        verdict = "" if law.ok else f"not ok: {', '.join(law.flags)}; "
        fig.suptitle(f"L(N, D) = {law.formula()}{factors} (R^2 {law.r2:.3f})\n{verdict}fitted on "
                     f"{law.skip_fraction:.0%} to {law.fit_fraction:.0%} of each run's tokens (shaded)", fontsize=9)
    return written

"""The four charts for reading runs, drawn to PNG with matplotlib (imported when a function is called).

Every function takes plain arrays (or mappings of them) and a path, writes one PNG and returns the path.
`plot_demo` draws all four from the results of `hrmloss demo` (the dict, or the path of demo.json).
Figures are built with `matplotlib.figure.Figure` directly: no pyplot, no global backend change.
"""
import json
from pathlib import Path

import numpy as np

from .analysis import _host_xy, fit_power_law, predict_curve


def _figure(nrows, ncols, width=4.2, height=3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _save(fig, path, dpi=100):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def _smooth(y, n):
    """Trailing moving average over up to n points (the first points average what exists)."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    i = np.arange(1, y.size + 1)
    lo = np.maximum(i - n, 0)
    return (c[i] - c[lo]) / (i - lo)


def _series(name, x, y, positive_y=False):
    """A validated (x, y) curve; for a log y axis, only its points with y > 0 (KL is 0 at step 1)."""
    x, y = _host_xy(x, y, 1)
    if positive_y:
        if not (y > 0).any():
            raise ValueError(f"{name}: expected some y > 0 on a log axis")
        x, y = x[y > 0], y[y > 0]
    return x, y


def plot_hrm_sweep(runs, path, *, smooth=None):
    """Chart 1: a 2 x len(runs) grid, one column per hrm: KL (log axis) on top, causal-LM CE below.

    Args:
        runs: {hrm: {"step": (n,), "kl": (n,), "ce": (n,)}}; hrm a number (or its string).
        path: the PNG to write.
        smooth: moving-average window drawn over the raw values (default n // 20, at least 1).
    """
    if not runs:
        raise ValueError("runs: expected at least one hrm")
    fig, axes = _figure(2, len(runs))
    for col, (hrm, r) in enumerate(sorted(runs.items(), key=lambda kv: float(kv[0]))):
        for row, (key, label, log) in enumerate((("kl", "Log KL loss", True), ("ce", "Causal LM loss", False))):
            x, y = _series(f"runs[{hrm}][{key!r}]", r["step"], r[key], positive_y=log)
            ax = axes[row, col]
            ax.plot(x, y, color=f"C{row}", alpha=0.3, lw=0.8)
            ax.plot(x, _smooth(y, smooth or max(1, y.size // 20)), color=f"C{row}", lw=1.8)
            if log:
                ax.set_yscale("log")
            ax.set_title(f"hrm = {float(hrm):g}" if row == 0 else None)
            ax.set_xlabel("Iterations" if row == 1 else None)
            ax.set_ylabel(label if col == 0 else None)
            ax.grid(alpha=0.3, which="both")
    # One y range per row, so that the columns compare at a glance.
    for row in range(2):
        lo = min(ax.get_ylim()[0] for ax in axes[row])
        hi = max(ax.get_ylim()[1] for ax in axes[row])
        for ax in axes[row]:
            ax.set_ylim(lo, hi)
    return _save(fig, path)


def plot_position_loss(steps, curves, path, *, positions=None, fit=True, min_r2=0.2, title="Per-token test loss"):
    """Chart 2: loss against token index (log x), one curve per step coloured by step, with power laws.

    Args:
        steps: (k,) the training step of each curve (> 0, for the log colour scale).
        curves: (k, T) per-position mean loss; NaN positions are skipped.
        positions: (T,) token indices (default 1..T).
        fit: fit `L(T) = a + b * T**-c` to each curve (`fit_power_law`) and label it with the formula.
        min_r2: a fit explaining less than this share of the variance (a flat, noisy curve early in
            training) is not drawn; its curve is labelled with its step only.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    steps = np.asarray(steps, dtype=np.float64)
    curves = np.asarray(curves, dtype=np.float64)
    if curves.ndim != 2 or curves.shape[0] != steps.size or steps.ndim != 1:
        raise ValueError(f"steps.shape={steps.shape}, curves.shape={curves.shape}: expected (k,) and (k, T)")
    if steps.size == 0 or not np.isfinite(steps).all() or (steps <= 0).any():
        raise ValueError("steps: expected at least one finite step > 0")
    positions = np.arange(1, curves.shape[1] + 1) if positions is None else np.asarray(positions, np.float64)
    if positions.shape != (curves.shape[1],):
        raise ValueError(f"positions.shape={positions.shape}: expected ({curves.shape[1]},)")
    norm = LogNorm(steps.min(), max(steps.max(), steps.min() * 1.01))
    cmap = "viridis"
    fig, axes = _figure(1, 1, width=6.4, height=4.4)
    ax = axes[0, 0]
    sm = ScalarMappable(norm=norm, cmap=cmap)
    for step, y in zip(steps, curves):
        ok = np.isfinite(y)
        color = sm.to_rgba(step)
        f = fit_power_law(positions[ok], y[ok], var="T") if fit and ok.sum() >= 3 else None
        shown = f is not None and f.r2 >= min_r2
        ax.plot(positions[ok], y[ok], color=color, lw=1.0, alpha=0.6, label=None if shown else f"step {step:g}")
        if shown:
            ax.plot(positions[ok], f(positions[ok]), color=color, lw=2.0, ls="--", label=f.formula())
    ax.set_xscale("log")
    ax.set_xlabel("Token index")
    ax.set_ylabel("Test loss")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(sm, ax=ax, label="Step")
    return _save(fig, path)


def plot_test_loss(runs, path, *, ylabel="Test loss", title="Test loss against step"):
    """Chart 3: test loss against step (log x), one curve per run or model size.

    Args:
        runs: {name: (steps (n,), losses (n,))}, steps > 0.
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    fig, axes = _figure(1, 1, width=6.0, height=4.2)
    ax = axes[0, 0]
    for i, (name, (x, y)) in enumerate(runs.items()):
        x, y = _series(f"runs[{name!r}]", x, y)
        ax.plot(x, y, "o-", color=f"C{i}", ms=3, label=str(name))
    ax.set_xscale("log")
    ax.set_xlabel("Step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pred_vs_real(runs, path, *, fit_fraction=0.4):
    """Chart 4: "Real" total loss against tokens trained and "Pred", fitted on the early part, per run.

    Pred is `predict_curve` (L(D) = E + B * D**-beta on D <= fit_fraction * max D), drawn over the
    whole range; the fitted range is shaded.

    Args:
        runs: {name: (tokens (n,), losses (n,))}, tokens > 0.
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    fig, axes = _figure(1, len(runs), width=3.6, height=3.2)
    for ax, (name, (x, y)) in zip(axes[0], runs.items()):
        p = predict_curve(x, y, fit_fraction)
        ax.plot(p.x, p.y, color="C0", lw=0.8, alpha=0.8, label="Real")
        ax.plot(p.x, p.pred, color="C3", lw=1.8, ls="--", label="Pred")
        ax.axvspan(p.x.min(), p.x[p.fit_mask].max(), color="0.85", zorder=0)
        ax.set_xscale("log")
        ax.set_title(f"{name}\n{p.fit.formula()}", fontsize=9)
        ax.set_xlabel("Tokens")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("Total loss")
    return _save(fig, path)


def plot_demo(results, out):
    """All four charts from `hrmloss demo` results (dict or path of demo.json) into the folder `out`.

    Returns the paths of hrm_sweep.png, position_loss.png, test_loss.png, pred_vs_real.png.
    """
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    out = Path(out)
    ref, runs = results["reference"], results["runs"]
    frac = results["config"]["fit_fraction"]
    ev = ref["eval"]
    tests = {"reference (CE on A)": (ev["step"], ev["ce"])}
    tests |= {f"hrm={float(h):g} (CE on B)": (r["eval"]["step"], r["eval"]["ce"]) for h, r in runs.items()}
    totals = {"reference": (ref["train"]["tokens"], ref["train"]["loss"])}
    totals |= {f"hrm={float(h):g}": (r["train"]["tokens"], r["train"]["loss"]) for h, r in runs.items()}
    return [
        plot_hrm_sweep({h: r["train"] for h, r in runs.items()}, out / "hrm_sweep.png"),
        plot_position_loss(ev["step"], ev["position_ce"], out / "position_loss.png",
                           title="Reference: per-token test loss on domain A"),
        plot_test_loss(tests, out / "test_loss.png"),
        plot_pred_vs_real(totals, out / "pred_vs_real.png", fit_fraction=frac),
    ]

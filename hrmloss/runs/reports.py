"""What `hrmloss report` and `hrmloss fit-grid` do, on runs read by `hrmloss.runs.logs`.

`report(runs, out)` draws (a) hrm_sweep, (b) position_loss, (c) test_loss and pred_vs_real for the
runs that hold what each chart needs, and says which charts it skipped and why; `fit_grid(runs, out)`
fits one scaling law across the runs and draws (d) grid. Both write the charts, a JSON of every fit
(with `ok` and `flags`) and a text summary into `out` (report.json / report.txt, scaling_law.json /
scaling_law.txt), and return the paths and the text.
"""
import json
from pathlib import Path

import numpy as np

from . import plots
from .fits import FLAGS, predict_curve
from .scaling import fit_scaling_law

_WEAK = "  (not ok: {}: too weak to read)"


def _flag_text(obj):
    return "" if obj.ok else _WEAK.format(", ".join(obj.flags))


def _write(out, name, doc):
    path = Path(out) / name
    path.write_text(json.dumps(doc, indent=1, allow_nan=True))
    return path


def report(runs, out, *, fit_fraction=0.4, formats=plots.FORMATS):
    """Charts (a), (b), (c) and pred_vs_real from `runs` (a list of `runlogs.Run`) into the folder `out`.

    (a) needs runs that log both "kl" (not all 0: a reference trained alone logs kl = 0) and "ce" (a
    column per run, titled by its hrm or name);
    (b) runs with per-position losses; (c) runs with "eval_loss" (a panel per phase); pred_vs_real
    runs with "loss" and known tokens (`predict_curve` on the first `fit_fraction` of the tokens).
    Writes report.json (every fit with ok / flags) and report.txt. Returns (paths, text).
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, lines, notes = [], [], []
    doc = {"runs": [r.name for r in runs], "position_fits": {}, "predictions": {}, "flags": FLAGS}

    sweep = {}
    for r in runs:
        if "kl" in r.series and "ce" in r.series and (r.series["kl"][1] > 0).any():
            ks, kv = r.series["kl"]
            cs, cv = r.series["ce"]
            if not np.array_equal(ks, cs):
                kv = np.interp(cs, ks, kv)
            sweep[r.meta.get("hrm", r.name)] = {"step": cs, "kl": kv, "ce": cv}
    if sweep:
        paths += plots.plot_hrm_sweep(sweep, out / "hrm_sweep", formats=formats)
    else:
        notes.append("(a) hrm_sweep skipped: no run logs both kl and ce")

    with_pos = [r for r in runs if r.positions is not None]
    if with_pos:
        panels = {r.name: r.positions | {"fits": plots.position_fits(r.positions["step"], r.positions["loss"])}
                  for r in with_pos}
        paths += plots.plot_position_loss(panels, out / "position_loss", formats=formats)
        lines.append("per-position test loss, L(T) = a + b * T^-c fitted on log-spaced bins of T:")
        for name, p in panels.items():
            doc["position_fits"][name] = {f"{s:g}": f.to_dict() for s, f in zip(p["step"], p["fits"]) if f}
            lines.append(f"  {name}:")
            lines += [f"    step {s:>6g}: {f.formula()}, R^2 {f.r2:.2f}{_flag_text(f)}"
                      for s, f in zip(p["step"], p["fits"]) if f]
    else:
        notes.append("(b) position_loss skipped: these logs hold no per-position losses (records with a "
                     "position_loss list, see hrmloss.runs.logs)")

    phases = {}
    for r in runs:
        if "eval_loss" in r.series:
            phases.setdefault(r.meta.get("phase", "training"), {})[r.name] = r.series["eval_loss"]
    if phases:
        paths += plots.plot_test_loss(phases, out / "test_loss", formats=formats)
    else:
        notes.append("(c) test_loss skipped: no run logs an eval / test loss")

    preds = {}
    for r in runs:
        if "loss" in r.series and r.series["loss"][0].size >= 10:
            try:
                preds[r.name] = predict_curve(r.tokens("loss"), r.series["loss"][1], fit_fraction)
            except ValueError as e:
                notes.append(f"pred_vs_real skips {r.name!r}: {e}")
    if preds:
        paths += plots.plot_pred_vs_real(preds, out / "pred_vs_real", formats=formats)
        lines.append(f"Pred vs Real: L(D) = E + B * D^-beta fitted on 5% to {fit_fraction:.0%} of the tokens:")
        for name, p in preds.items():
            d = p.to_dict()
            doc["predictions"][name] = {k: d[k] for k in ("fit", "ok", "flags", "mae", "final_rel_err", "extrapolation")}
            lines.append(f"  {name:>14}: {p.fit.formula()}, R^2 {p.fit.r2:.2f}, held-out mean abs error {p.mae:.3f}, "
                         f"final relative error {p.final_rel_err:+.1%}{_flag_text(p)}")
    else:
        notes.append("pred_vs_real skipped: no run logs a training loss with known tokens")

    weak = [f"{name} step {s}" for name, fits in doc["position_fits"].items() for s, f in fits.items() if not f["ok"]]
    weak += [f"{name} Pred" for name, p in doc["predictions"].items() if not p["ok"]]
    lines.append(f"fits too weak to read ({len(weak)}): {', '.join(weak)}" if weak else "every fit passed its checks")
    doc["notes"] = notes
    paths.append(_write(out, "report.json", doc))
    text = "\n".join(lines + notes) + "\n"
    (out / "report.txt").write_text(text)
    paths.append(out / "report.txt")
    return paths, text


def grid_runs(runs):
    """`runlogs.Run`s -> the dicts `fit_scaling_law` takes (N from the run's metadata; tokens known)."""
    out = []
    for r in runs:
        if "N" not in r.meta:
            raise ValueError(f"run {r.name!r} ({r.source}): model size N unknown; give PATH:N=134e6 with --run "
                             "or in a --manifest")
        if "loss" not in r.series:
            raise ValueError(f"run {r.name!r} ({r.source}): no training loss column")
        out.append({"N": r.meta["N"], "tokens": r.tokens("loss"), "loss": r.series["loss"][1],
                    "group": r.meta.get("group"), "name": r.name})
    return out


def fit_grid(runs, out, *, fit_fraction=0.5, fit_runs=None, group_factor=False, formats=plots.FORMATS):
    """One scaling law across `runs` (`runlogs.Run`s with N) and chart (d) into the folder `out`.

    Writes grid.<format>, scaling_law.json (`ScalingLawFit.to_dict()`) and scaling_law.txt.
    Returns (paths, text, law).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = grid_runs(runs)
    law = fit_scaling_law(data, fit_fraction=fit_fraction, fit_runs=fit_runs, group_factor=group_factor)
    paths = plots.plot_grid(data, law, out / "grid", formats=formats)
    paths.append(_write(out, "scaling_law.json", law.to_dict()))
    lines = [law.describe(), f"fitted on {law.skip_fraction:.0%} to {fit_fraction:.0%} of the tokens of "
             f"{sum(r['fitted'] for r in law.runs)} runs, {law.n_points} points; parameters +- bootstrap standard error:"]
    lines += [f"  {k:>8} = {v:.4g} +- {law.errors[k]:.2g}" for k, v in law.params.items()]
    lines.append(f"  {'run':>24} {'N':>8} {'end loss':>9} {'Pred':>7} {'error':>7}")
    for r in law.runs:
        lines.append(f"  {r['name']:>24} {plots._si(r['N']):>8} {r['final_loss']:>9.3f} {r['final_pred']:>7.3f} "
                     f"{r['final_rel_err']:>+7.1%}" + ("" if r["fitted"] else "  (not fitted)")
                     + (f"  ({', '.join(r['flags'])})" if r["flags"] else ""))
    if not law.ok:
        lines.append(f"the law is not ok ({', '.join(law.flags)}): too weak to read as a result")
    text = "\n".join(lines) + "\n"
    (out / "scaling_law.txt").write_text(text)
    paths.append(out / "scaling_law.txt")
    return paths, text, law

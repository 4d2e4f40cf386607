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
MIN_HELD_OUT_POINTS = 20
"""Pred is fitted on a run's held-out loss (eval_loss) when it has at least this many points, else on its
training loss: 20 log-spaced evaluations leave the fit window (5 % to 40 % of the run) about a dozen."""


def _flag_text(obj):
    return "" if obj.ok else _WEAK.format(", ".join(obj.flags))


def _write(out, name, doc):
    path = Path(out) / name
    path.write_text(json.dumps(doc, indent=1, allow_nan=True))
    return path


def _positions(r):
    """A run's per-position curves without the rows that hold no value (steps evaluated for the mean only)."""
    keep = np.isfinite(r.positions["loss"]).any(axis=1)
    return {k: (v[keep] if k in ("step", "loss") else v) for k, v in r.positions.items()}


def _finals(r):
    """(kl, ce) at the end of a run: medians of the training values over its last 5 % of steps."""
    return tuple(float(np.median(r.series[k][1][-max(1, r.series[k][1].size // 20):])) for k in ("kl", "ce"))


def report(runs, out, *, fit_fraction=0.4, finals=None, formats=plots.FORMATS):
    """Charts (a), (b), (c) and pred_vs_real from `runs` (a list of `runlogs.Run`) into the folder `out`.

    (a) needs runs that log both "kl" (not all 0: a reference trained alone logs kl = 0) and "ce" (a
    column per run, titled by its hrm or name);
    (b) runs with per-position losses; (c) those runs' per-token-index losses against step, beside the
    test loss of runs with "eval_loss" (a panel per phase); pred_vs_real: runs with known tokens and
    "eval_loss" at `MIN_HELD_OUT_POINTS` or more steps, else "loss" (`predict_curve` on 5 % to
    `fit_fraction` of the tokens); pareto: final CE against final KL of the runs with an hrm and kl, ce
    (`finals`: {run name: (kl, ce)} measured on held-out data, else the medians of the training values
    over each run's last 5 % of steps).
    Writes report.json (every fit with ok / flags; "per_token_index": for each run, token index ->
    steps, losses, fit of loss against step with ok and flags) and report.txt. Returns (paths, text).
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, lines, notes = [], [], []
    doc = {"runs": [r.name for r in runs], "position_fits": {}, "per_token_index": {}, "predictions": {},
           "pareto": {}, "flags": FLAGS}

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

    with_pos = {r.name: _positions(r) for r in runs if r.positions is not None}
    with_pos = {name: p for name, p in with_pos.items() if p["step"].size}
    tokens = {}
    if with_pos:
        panels = {name: p | {"fits": plots.position_fits(p["step"], p["loss"])} for name, p in with_pos.items()}
        paths += plots.plot_position_loss(panels, out / "position_loss", formats=formats)
        lines.append("per-position test loss, L(T) = a + b * T^-c fitted on log-spaced bins of T, judged against "
                     "the curve's noise (chi-square p, drop / standard error):")
        for r in runs:
            if r.name not in panels:
                continue
            p = panels[r.name]
            doc["position_fits"][r.name] = {f"{s:g}": f.to_dict() for s, f in zip(p["step"], p["fits"]) if f}
            lines.append(f"  {r.name}:")
            lines += [f"    step {s:>6g}: {f.formula()}, R^2 {f.r2:.2f}{_noise_text(f)}{_flag_text(f)}"
                      for s, f in zip(p["step"], p["fits"]) if f]
            lines.append("    " + _late_share(r, p))
            tokens[r.name] = {"step": p["step"], "loss": p["loss"], "fits": plots.token_index_fits(p["step"], p["loss"])}
            doc["per_token_index"][r.name] = {
                str(t): {"steps": x.tolist(), "losses": y.tolist(), "fit": f.to_dict() if f else None,
                         "ok": bool(f and f.ok), "flags": list(f.flags) if f else ["few_points"]}
                for t, (x, y, f) in tokens[r.name]["fits"].items()}
        lines.append("per-token-index test loss against step, L(step) = a + b * step^-c per token index T:")
        for name, lines_t in tokens.items():
            n_ok = sum(bool(f and f.ok) for *_, f in lines_t["fits"].values())
            bad = [f"T={t} ({', '.join(f.flags) if f else 'too few steps'})"
                   for t, (*_, f) in lines_t["fits"].items() if not (f and f.ok)]
            last_t, (*_, last) = list(lines_t["fits"].items())[-1]
            lines.append(f"  {name}: {n_ok} of {len(lines_t['fits'])} ok"
                         + (f"; T={last_t}: {last.formula('step')}" if last and last.ok else "")
                         + (f"; not ok: {'; '.join(bad)}" if bad else ""))
    else:
        notes.append("(b) position_loss skipped: these logs hold no per-position losses (records with a "
                     "position_loss list, see hrmloss.runs.logs)")

    phases = {}
    for r in runs:
        if "eval_loss" in r.series:
            phases.setdefault(r.meta.get("phase", "training"), {})[r.name] = r.series["eval_loss"]
    if phases:
        paths += plots.plot_test_loss(phases, out / "test_loss", token_panels=tokens, formats=formats)
    else:
        notes.append("(c) test_loss skipped: no run logs an eval / test loss")

    preds, used = {}, {}
    for r in runs:
        key = "eval_loss" if "eval_loss" in r.series and r.series["eval_loss"][0].size >= MIN_HELD_OUT_POINTS \
            else "loss"
        if key in r.series and r.series[key][0].size >= 10:
            try:
                preds[r.name] = predict_curve(r.tokens(key), r.series[key][1], fit_fraction)
                used[r.name] = key
            except ValueError as e:
                notes.append(f"pred_vs_real skips {r.name!r}: {e}")
    if preds:
        kinds = set(used.values())
        ylabel = {"eval_loss": "Test loss (held-out)", "loss": "Total training loss"}[kinds.pop()] \
            if len(kinds) == 1 else "Test or training loss (report.txt)"
        paths += plots.plot_pred_vs_real(preds, out / "pred_vs_real", ylabel=ylabel, formats=formats)
        lines.append(f"Pred vs Real: L(D) = E + B * D^-beta fitted on 5% to {fit_fraction:.0%} of the tokens:")
        for name, p in preds.items():
            d = p.to_dict()
            doc["predictions"][name] = {k: d[k] for k in ("fit", "ok", "flags", "mae", "final_rel_err", "extrapolation")}
            doc["predictions"][name] |= {"series": used[name], "points_fitted": int(p.fit_mask.sum())}
            what = "test loss" if used[name] == "eval_loss" else "training loss"
            lines.append(f"  {name:>14} ({what}, {int(p.fit_mask.sum())} points fitted): {p.fit.formula()}, "
                         f"R^2 {p.fit.r2:.2f}, mean abs error after the fit {p.mae:.3f}, "
                         f"final relative error {p.final_rel_err:+.1%}{_flag_text(p)}")
    else:
        notes.append("pred_vs_real skipped: no run logs a training loss with known tokens")

    points = {}
    for r in runs:
        if "hrm" in r.meta and ((finals or {}).get(r.name) or {"kl", "ce"} <= set(r.series)):
            points[r.name] = (r.meta["hrm"], *((finals or {}).get(r.name) or _finals(r)))
    if len(points) >= 2:
        paths += plots.plot_pareto({h: (kl, ce) for h, kl, ce in points.values()}, out / "pareto", formats=formats)
        source = "held-out" if finals else "training, median of the last 5 % of steps"
        lines.append(f"Pareto front (final CE against final KL, {source}):")
        lines.append(f"  {'hrm':>8} {'CE':>8} {'KL':>10}")
        for name, (h, kl, ce) in sorted(points.items(), key=lambda kv: kv[1][0]):
            doc["pareto"][name] = {"hrm": h, "kl": kl, "ce": ce, "source": source}
            lines.append(f"  {h:>8g} {ce:>8.3f} {kl:>10.4f}")
    else:
        notes.append("pareto skipped: fewer than 2 runs with an hrm and logged kl and ce")

    weak = [f"{name} step {s}" for name, fits in doc["position_fits"].items() for s, f in fits.items() if not f["ok"]]
    weak += [f"{name} Pred" for name, p in doc["predictions"].items() if not p["ok"]]
    n_fits = sum(map(len, doc["position_fits"].values())) + len(doc["predictions"])
    if weak:
        lines.append(f"fits too weak to read ({len(weak)} of {n_fits}): {', '.join(weak)}")
    else:
        lines.append(f"every fit passed its checks ({n_fits})" if n_fits else "nothing was fitted (see the notes)")
    doc["notes"] = notes
    paths.append(_write(out, "report.json", doc))
    text = "\n".join(lines + notes) + "\n"
    (out / "report.txt").write_text(text)
    paths.append(out / "report.txt")
    return paths, text


def _noise_text(f):
    return "" if np.isnan(f.p_value) else f", chi-square p {f.p_value:.2g}, drop {f.snr:.0f} s.e."


def _late_share(r, p):
    """How many of a run's per-position fits after its first 5 % of steps are ok, and whether its last is."""
    end = r.series["loss"][0].max() if "loss" in r.series else p["step"].max()
    late = [f for s, f in zip(p["step"], p["fits"]) if f is not None and s >= 0.05 * end]
    if not late:
        return "no per-position fit after the first 5 % of the run"
    return (f"after the first 5 % of the run: {sum(f.ok for f in late)} of {len(late)} fits ok, "
            f"the last {'ok' if late[-1].ok else 'not ok'}")


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

"""What `hrmloss report` and `hrmloss fit-grid` do, on runs read by `hrmloss.runs.logs`.

`report(runs, out)` draws (a) hrm_sweep, (b) position_loss, (c) test_loss and pred_vs_real for the
runs that hold what each chart needs, and says which charts it skipped and why; `fit_grid(runs, out)`
fits one scaling law across the runs and draws (d) grid. Both write the charts, a JSON of every fit
(with `ok` and `flags`) and a text summary into `out` (report.json / report.txt, scaling_law.json /
scaling_law.txt), and return the paths and the text.
"""
import json
from collections import Counter
from dataclasses import replace
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


MIN_PRED_POINTS = 10
"""A training-loss curve with fewer logged points gets no Pred (drawn as it is, `training_loss`)."""


def _count(n, what):
    return f"{n} {what}{'s' * (n != 1)}"


def _positive_steps(name, steps, values, notes):
    """The points at steps > 0, and a note when a step 0 (e.g. an eval before training) is left out: the
    charts' step axes are logarithmic or start at 1, and a power law of D has no value at D = 0."""
    keep = np.asarray(steps) > 0
    if not keep.all():
        notes.append(f"{name}: {int((~keep).sum())} point(s) at step 0 left out (charts and fits start at step 1)")
    return steps[keep], values[keep]


def _increasing(x, steps):
    """None when x strictly increases, else the first step where it does not ("step 15: 100 after 1500 at step 14")."""
    bad = np.flatnonzero(np.diff(x) <= 0)
    if not bad.size:
        return None
    i = bad[0] + 1
    return f"step {steps[i]:g}: {x[i]:g} after {x[i - 1]:g} at step {steps[i - 1]:g}"


def _run_tokens(r, notes, key="loss"):
    """Tokens trained at each logged point of `key` (step > 0), or None when unknown or not increasing with
    step (e.g. a counter reset on resume), said in `notes`."""
    if not r.has_tokens():
        return None
    steps = r.series[key][0]
    tokens = r.tokens(key)[steps > 0]
    where = _increasing(tokens, steps[steps > 0])
    if where is not None:
        notes.append(f"{r.name} ({r.source}): tokens do not increase with step ({where}): Pred against steps")
        return None
    return tokens


def _distinct_names(runs, notes):
    """Copies of runs that share a name (two checkpoint-100/trainer_state.json) renamed "<name> [<source>]",
    so that no chart or fit drops one; said in `notes`."""
    counts = Counter(r.name for r in runs)
    out = []
    for r in runs:
        if counts[r.name] > 1:
            notes.append(f"{r.source}: run name {r.name!r} is shared by {counts[r.name]} runs: "
                         f"named {r.name} [{r.source}] (give PATH:name=... to choose)")
            r = replace(r, name=f"{r.name} [{r.source}]")
        out.append(r)
    return out


def _position_notes(name, positions, fits):
    """What the per-position fits and chart leave out: positions never counted, steps with too few positions."""
    loss = np.asarray(positions["loss"], dtype=np.float64)
    empty = np.flatnonzero(~np.isfinite(loss).any(axis=0)) + 1
    notes = [f"(b) {name}: no data at token index T = {plots.ranges(empty)} (never counted, e.g. a prompt mask "
             "or labels starting with -100): left out of the fits and the chart"] if empty.size else []
    unfitted = [f"{s:g}" for s, f in zip(positions["step"], fits) if f is None]
    if unfitted:
        notes.append(f"(b) {name}: no fit at step {', '.join(unfitted)}: fewer than 3 positions with data")
    return notes


def _positions(r):
    """A run's per-position curves without the rows that hold no value (steps evaluated for the mean only)."""
    keep = np.isfinite(r.positions["loss"]).any(axis=1)
    return {k: (v[keep] if k in ("step", "loss") else v) for k, v in r.positions.items()}


def _finals(r):
    """(kl, ce) at the end of a run: medians of the training values over its last 5 % of steps."""
    return tuple(float(np.median(r.series[k][1][-max(1, r.series[k][1].size // 20):])) for k in ("kl", "ce"))


def report(runs, out, *, fit_fraction=0.4, finals=None, formats=plots.FORMATS):
    """Charts (a), (b), (c), pred_vs_real and pareto from `runs` (a list of `runlogs.Run`) into the folder `out`.

    (a) needs runs that log both "kl" (not all 0: a reference trained alone logs kl = 0) and "ce" (a
    column per run, titled by its hrm or name);
    (b) runs with per-position losses (positions without data left out, and said); (c) those runs'
    per-token-index losses against step, beside the test loss of runs with an eval loss, every eval set a
    curve (a panel per phase); pred_vs_real: runs with known tokens, fitted (`predict_curve` on 5 % to
    `fit_fraction`) on "eval_loss" where it has `MIN_HELD_OUT_POINTS` or more steps, else on "loss";
    pred_vs_real_steps the same against steps for runs whose tokens are unknown, and training_loss the
    training loss of the runs that get no Pred (too few points, or a fit that could not be made), with
    the reason; pareto: final CE against final KL of the runs with an hrm and kl, ce (`finals`: {run
    name: (kl, ce)} measured on held-out data, else the medians of the training values over each run's
    last 5 % of steps).
    Writes report.json (every fit with ok / flags; "per_token_index": for each run, token index ->
    steps, losses, fit of loss against step with ok and flags; what was drawn, the notes) and
    report.txt: the fits, which are too weak to read (or that every fit passed, or that nothing was
    fitted), the charts drawn, and the notes (what the readers did, what was skipped and why).
    Returns (paths, text).
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, lines, notes, drawn = [], [], [note for r in runs for note in r.notes], []
    runs = _distinct_names(runs, notes)
    doc = {"runs": [r.name for r in runs], "position_fits": {}, "per_token_index": {}, "predictions": {},
           "pareto": {}, "flags": FLAGS}

    def draw(chart, written, what):
        paths.extend(written)
        drawn.append(f"{chart} ({what})")

    sweep = {}
    for r in runs:
        if "kl" in r.series and "ce" in r.series and (r.series["kl"][1] > 0).any():
            ks, kv = r.series["kl"]
            cs, cv = _positive_steps(f"(a) {r.name} ce", *r.series["ce"], notes)
            if not np.array_equal(ks, cs):
                kv = np.interp(cs, ks, kv)
            sweep[r.meta.get("hrm", r.name)] = {"step": cs, "kl": kv, "ce": cv}
    if sweep:
        draw("(a) hrm_sweep", plots.plot_hrm_sweep(sweep, out / "hrm_sweep", formats=formats),
             _count(len(sweep), "run"))
    else:
        notes.append("(a) hrm_sweep skipped: no run logs both kl and ce")

    panels, by_name, tokens = {}, {r.name: r for r in runs}, {}
    for r in runs:
        if r.positions is not None:
            p = _positions(r)
            steps, curves = _positive_steps(f"(b) {r.name}", p["step"], p["loss"], notes)
            if steps.size:
                panels[r.name] = {"step": steps, "loss": curves, "fits": plots.position_fits(steps, curves)}
    if panels:
        draw("(b) position_loss", plots.plot_position_loss(panels, out / "position_loss", formats=formats),
             _count(len(panels), "run"))
        lines.append("per-position test loss, L(T) = a + b * T^-c fitted on log-spaced bins of T, judged against "
                     "the curve's noise (chi-square p, drop / standard error):")
        for name, p in panels.items():
            notes += _position_notes(name, p, p["fits"])
            doc["position_fits"][name] = {f"{s:g}": f.to_dict() for s, f in zip(p["step"], p["fits"]) if f}
            lines.append(f"  {name}:")
            lines += [f"    step {s:>6g}: {f.formula()}, R^2 {f.r2:.2f}{_noise_text(f)}{_flag_text(f)}"
                      for s, f in zip(p["step"], p["fits"]) if f]
            lines.append("    " + _late_share(by_name[name], p))
            tokens[name] = {"step": p["step"], "loss": p["loss"], "fits": plots.token_index_fits(p["step"], p["loss"])}
            doc["per_token_index"][name] = {
                str(t): {"steps": x.tolist(), "losses": y.tolist(), "fit": f.to_dict() if f else None,
                         "ok": bool(f and f.ok), "flags": list(f.flags) if f else ["few_points"]}
                for t, (x, y, f) in tokens[name]["fits"].items()}
        lines.append("per-token-index test loss against step, L(step) = a + b * step^-c per token index T:")
        for name, lines_t in tokens.items():
            if not lines_t["fits"]:
                lines.append(f"  {name}: no token index with data")
                continue
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
        for key in sorted(k for k in r.series if k.split(":")[0] == "eval_loss"):
            label = r.name if key == "eval_loss" else f"{r.name}: {key.partition(':')[2]}"
            steps, values = _positive_steps(f"(c) {label}", *r.series[key], notes)
            if steps.size:
                phases.setdefault(r.meta.get("phase", "training"), {})[label] = (steps, values)
    if phases:
        draw("(c) test_loss", plots.plot_test_loss(phases, out / "test_loss", token_panels=tokens, formats=formats),
             _count(sum(map(len, phases.values())), "curve"))
    elif any(k.split(":")[0] == "eval_loss" for r in runs for k in r.series):
        notes.append("(c) test_loss skipped: the eval losses are all at step 0")
    else:
        notes.append("(c) test_loss skipped: no run logs an eval / test loss (eval_loss, eval_<set>_loss, ...)")

    preds, by_step, unpredicted, used = {}, {}, {}, {}
    for r in runs:
        key = "eval_loss" if "eval_loss" in r.series and r.series["eval_loss"][0].size >= MIN_HELD_OUT_POINTS \
            else "loss"
        if key not in r.series:
            continue
        steps, losses = _positive_steps(f"{r.name} {'held-out' if key == 'eval_loss' else 'training'} loss",
                                        *r.series[key], notes)
        tokens_r = _run_tokens(r, notes, key)
        reason = None
        if steps.size < MIN_PRED_POINTS:
            reason = f"{steps.size} logged points, a Pred needs at least {MIN_PRED_POINTS}"
        else:
            try:
                (by_step if tokens_r is None else preds)[r.name] = predict_curve(
                    steps if tokens_r is None else tokens_r, losses, fit_fraction)
                used[r.name] = key
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            drawn_in = ": its training loss is drawn in training_loss" if steps.size and key == "loss" else ""
            notes.append(f"pred_vs_real: no Pred for {r.name!r} ({reason}){drawn_in}")
            if steps.size and key == "loss":
                unpredicted.setdefault(r.meta.get("phase", "training"), {})[r.name] = (steps, losses)
    kinds = set(used.values())
    ylabel = ({"eval_loss": "Test loss (held-out)", "loss": "Total training loss"}[next(iter(kinds))]
              if len(kinds) == 1 else "Test or training loss (report.txt)")
    steps_why = ", against steps: no usable token counts (give --tokens-per-step)"
    for chart, group, xlabel in (("pred_vs_real", preds, None), ("pred_vs_real_steps", by_step, "Step")):
        if group:
            draw(chart, plots.plot_pred_vs_real(group, out / chart, xlabel=xlabel, ylabel=ylabel, formats=formats),
                 _count(len(group), "run") + (steps_why if xlabel else ""))
    if unpredicted:
        draw("training_loss", plots.plot_test_loss(unpredicted, out / "training_loss", ylabel="Training loss",
                                                   formats=formats), _count(sum(map(len, unpredicted.values())), "run"))
    if preds or by_step:
        of = "the tokens" if not by_step else "the steps" if not preds else "the tokens (the steps where unknown)"
        lines.append(f"Pred vs Real: L(D) = E + B * D^-beta fitted on 5% to {fit_fraction:.0%} of {of}:")
        for name, p in (preds | by_step).items():
            d = p.to_dict()
            doc["predictions"][name] = {k: d[k] for k in ("fit", "ok", "flags", "mae", "final_rel_err", "extrapolation")}
            doc["predictions"][name] |= {"x": "tokens" if name in preds else "steps", "series": used[name],
                                         "points_fitted": int(p.fit_mask.sum())}
            what = "test loss" if used[name] == "eval_loss" else "training loss"
            lines.append(f"  {name:>14} ({what}, {int(p.fit_mask.sum())} points fitted): {p.fit.formula()}, "
                         f"R^2 {p.fit.r2:.2f}, mean abs error after the fit {p.mae:.3f}, "
                         f"final relative error {p.final_rel_err:+.1%}{_flag_text(p)}")
    elif not any("loss" in r.series for r in runs):
        notes.append("pred_vs_real skipped: no run logs a training loss (loss, train_loss, ...)")

    points = {}
    for r in runs:
        if "hrm" in r.meta and ((finals or {}).get(r.name) or {"kl", "ce"} <= set(r.series)):
            points[r.name] = (r.meta["hrm"], *((finals or {}).get(r.name) or _finals(r)))
    if len(points) >= 2:
        draw("pareto", plots.plot_pareto({h: (kl, ce) for h, kl, ce in points.values()}, out / "pareto",
                                         formats=formats), _count(len(points), "run"))
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
    fitted = sum(map(len, doc["position_fits"].values())) + len(doc["predictions"])
    if weak:
        lines.append(f"fits too weak to read ({len(weak)} of {fitted}): {', '.join(weak)}")
    elif fitted:
        lines.append(f"every fit passed its checks ({_count(fitted, 'fit')})")
    else:
        lines.append("nothing was fitted (see the notes below)")
    lines.append(f"drew: {'; '.join(drawn)}" if drawn else "drew nothing: no chart's data is in these logs")
    doc["drawn"], doc["notes"] = drawn, notes
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


def grid_runs(runs, notes=None):
    """`runlogs.Run`s -> the dicts `fit_scaling_law` takes (N from the run's metadata; tokens known).

    Points at step 0 are left out (a power law of D has no value at D = 0), said in `notes` (a list).
    """
    notes = [] if notes is None else notes
    out = []
    for r in runs:
        if "N" not in r.meta:
            raise ValueError(f"run {r.name!r} ({r.source}): model size N unknown; give PATH:N=134e6 with --run "
                             "or in a --manifest")
        if "loss" not in r.series:
            raise ValueError(f"run {r.name!r} ({r.source}): no training loss column")
        steps, loss = _positive_steps(r.name, *r.series["loss"], notes)
        tokens = r.tokens("loss")[r.series["loss"][0] > 0]
        where = _increasing(tokens, steps)
        if where is not None:
            raise ValueError(f"run {r.name!r} ({r.source}): tokens do not increase with step ({where}); a token "
                             "counter reset on resume? fix that column, or drop it and give --tokens-per-step")
        out.append({"N": r.meta["N"], "tokens": tokens, "loss": loss, "group": r.meta.get("group"), "name": r.name})
    return out


def fit_grid(runs, out, *, fit_fraction=0.5, fit_runs=None, group_factor=False, formats=plots.FORMATS):
    """One scaling law across `runs` (`runlogs.Run`s with N) and chart (d) into the folder `out`.

    Writes grid.<format>, scaling_law.json (`ScalingLawFit.to_dict()`) and scaling_law.txt (with the
    readers' notes: rows sorted, repeated steps, as in `report`).
    Returns (paths, text, law).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    notes = [note for r in runs for note in r.notes]
    data = grid_runs(_distinct_names(runs, notes), notes)
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
    text = "\n".join(lines + notes) + "\n"
    (out / "scaling_law.txt").write_text(text)
    paths.append(out / "scaling_law.txt")
    return paths, text, law

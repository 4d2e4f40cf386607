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


def _run_tokens(r, notes):
    """Tokens trained at each logged loss (step > 0), or None when unknown or not increasing with step
    (e.g. a counter reset on resume), said in `notes`."""
    if not r.has_tokens():
        return None
    steps = r.series["loss"][0]
    tokens = r.tokens("loss")[steps > 0]
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


def report(runs, out, *, fit_fraction=0.4, formats=plots.FORMATS):
    """Charts (a), (b), (c) and pred_vs_real from `runs` (a list of `runlogs.Run`) into the folder `out`.

    (a) needs runs that log both "kl" (not all 0: a reference trained alone logs kl = 0) and "ce" (a
    column per run, titled by its hrm or name);
    (b) runs with per-position losses (positions without data left out, and said); (c) runs with an
    eval loss, every eval set a curve (a panel per phase); pred_vs_real runs with "loss" and known
    tokens (`predict_curve` on the first `fit_fraction` of the tokens), pred_vs_real_steps the same
    against steps for runs whose tokens are unknown, and training_loss the training loss of the runs
    that get no Pred (too few points, or a fit that could not be made), with the reason.
    Writes report.json (every fit with ok / flags, what was drawn, the notes) and report.txt: the fits,
    which are too weak to read (or that every fit passed, or that nothing was fitted), the charts drawn,
    and the notes (what the readers did, what was skipped and why).
    Returns (paths, text).
    """
    if not runs:
        raise ValueError("runs: expected at least one run")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths, lines, notes, drawn = [], [], [note for r in runs for note in r.notes], []
    runs = _distinct_names(runs, notes)
    doc = {"runs": [r.name for r in runs], "position_fits": {}, "predictions": {}, "flags": FLAGS}

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

    panels = {}
    for r in runs:
        if r.positions is not None:
            steps, curves = _positive_steps(f"(b) {r.name}", r.positions["step"], r.positions["loss"], notes)
            if steps.size:
                panels[r.name] = {"step": steps, "loss": curves, "fits": plots.position_fits(steps, curves)}
    if panels:
        draw("(b) position_loss", plots.plot_position_loss(panels, out / "position_loss", formats=formats),
             _count(len(panels), "run"))
        lines.append("per-position test loss, L(T) = a + b * T^-c fitted on log-spaced bins of T:")
        for name, p in panels.items():
            notes += _position_notes(name, p, p["fits"])
            doc["position_fits"][name] = {f"{s:g}": f.to_dict() for s, f in zip(p["step"], p["fits"]) if f}
            lines.append(f"  {name}:")
            lines += [f"    step {s:>6g}: {f.formula()}, R^2 {f.r2:.2f}{_flag_text(f)}"
                      for s, f in zip(p["step"], p["fits"]) if f]
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
        draw("(c) test_loss", plots.plot_test_loss(phases, out / "test_loss", formats=formats),
             _count(sum(map(len, phases.values())), "curve"))
    elif any(k.split(":")[0] == "eval_loss" for r in runs for k in r.series):
        notes.append("(c) test_loss skipped: the eval losses are all at step 0")
    else:
        notes.append("(c) test_loss skipped: no run logs an eval / test loss (eval_loss, eval_<set>_loss, ...)")

    preds, by_step, unpredicted = {}, {}, {}
    for r in runs:
        if "loss" not in r.series:
            continue
        steps, losses = _positive_steps(f"{r.name} training loss", *r.series["loss"], notes)
        tokens = _run_tokens(r, notes)
        reason = None
        if steps.size < MIN_PRED_POINTS:
            reason = f"{steps.size} logged points, a Pred needs at least {MIN_PRED_POINTS}"
        else:
            try:
                (by_step if tokens is None else preds)[r.name] = predict_curve(
                    steps if tokens is None else tokens, losses, fit_fraction)
            except ValueError as e:
                reason = str(e)
        if reason is not None:
            drawn_in = ": its training loss is drawn in training_loss" if steps.size else ""
            notes.append(f"pred_vs_real: no Pred for {r.name!r} ({reason}){drawn_in}")
            if steps.size:
                unpredicted.setdefault(r.meta.get("phase", "training"), {})[r.name] = (steps, losses)
    steps_why = ", against steps: no usable token counts (give --tokens-per-step)"
    for chart, group, xlabel in (("pred_vs_real", preds, None), ("pred_vs_real_steps", by_step, "Step")):
        if group:
            draw(chart, plots.plot_pred_vs_real(group, out / chart, xlabel=xlabel, formats=formats),
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
            doc["predictions"][name]["x"] = "tokens" if name in preds else "steps"
            lines.append(f"  {name:>14}: {p.fit.formula()}, R^2 {p.fit.r2:.2f}, held-out mean abs error {p.mae:.3f}, "
                         f"final relative error {p.final_rel_err:+.1%}{_flag_text(p)}")
    elif not any("loss" in r.series for r in runs):
        notes.append("pred_vs_real skipped: no run logs a training loss (loss, train_loss, ...)")

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

"""Reading training logs into runs: Hugging Face, JSON lines, CSV, TensorBoard and the demo's own JSON.

`read_runs(path)` returns a list of `Run` (a demo JSON holds several). Every format is read into
records (one per logged step) and then into series by canonical name:

    step        step, global_step, iteration, iter, it
    loss        loss, train_loss, total_loss, training_loss            (total training loss)
    ce          ce, ce_loss, lm_loss, causal_lm_loss, cross_entropy     (causal-LM loss)
    kl          kl, kl_loss, kl_div, kl_divergence                      (the divergence to the reference)
    eval_loss   eval_loss, test_loss, val_loss, valid_loss, validation_loss, eval_ce, test_ce
    tokens      tokens, num_input_tokens_seen, tokens_seen, consumed_tokens   (cumulative)

Column names are matched case-insensitively after turning "/", "-", "." and spaces into "_" and
dropping a leading "train_" or "training_" (so `train/loss` is `loss`, `eval/loss` is `eval_loss`);
the first alias present wins. `columns={"loss": "my_metric"}` names a column outright. A named eval
set's loss, `eval_<set>_loss` (Hugging Face with several eval datasets; `EVAL_SET`), is the series
`eval_loss:<set>`. Without a step column, the record's position (1, 2, ...) is the step. A record may
also hold `position_loss`: a list of per-position mean test losses (e.g.
`PositionLoss.compute()["loss"].tolist()`) at its step.

Every series is sorted by step; a step logged more than once (a resumed run) keeps the last value in
the file; records without a step (when others have one) are skipped; `Run.notes` says each, naming the
file and records. A negative step is an error. Files are read as UTF-8 (a leading byte-order mark
dropped; CRLF or LF).

Formats, by path: a folder or `events.out.tfevents.*` is TensorBoard (needs `tensorboard`);
`.csv` / `.tsv` is CSV with a header row; `.jsonl` / `.ndjson` is JSON lines (one object per line);
`.json` is a Hugging Face `trainer_state.json` (its `log_history`), a demo's `demo.json` or
`grid.json`, or a list of records. A bad file (not text, invalid JSON or CSV, a value that is not a
number, a demo.json / grid.json without a key) raises ValueError naming the file and the line or key.
"""
import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ALIASES = {
    "step": ("step", "global_step", "iteration", "iter", "it"),
    "loss": ("loss", "train_loss", "total_loss", "training_loss"),
    "ce": ("ce", "ce_loss", "lm_loss", "causal_lm_loss", "cross_entropy"),
    "kl": ("kl", "kl_loss", "kl_div", "kl_divergence"),
    "eval_loss": ("eval_loss", "test_loss", "val_loss", "valid_loss", "validation_loss", "eval_ce", "test_ce"),
    "tokens": ("tokens", "num_input_tokens_seen", "tokens_seen", "consumed_tokens"),
}
META_KEYS = {"N": float, "group": str, "hrm": float, "tokens_per_step": float, "name": str, "phase": str}
"""What a log does not say, given per run (`--run PATH:N=134e6:group=T_m=4` or a manifest):
N (parameters), group (a label, e.g. T_m=4), hrm, tokens_per_step, name, phase (runs of different
phases, e.g. pre-training and fine-tuning, get separate step axes)."""


@dataclass
class Run:
    """One run: series {name: (steps (n,), values (n,))}, per-position test losses, and metadata.

    positions: None, or {"step": (k,), "loss": (k, T)} (NaN where a curve is shorter).
    meta: N, group, hrm, tokens_per_step, phase where known (see `META_KEYS`).
    notes: what the reader did that a reader of the charts should know (rows sorted, repeated steps,
    records without a step), each naming the file and the records.
    """

    name: str
    source: str
    series: dict
    positions: dict = None
    meta: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def has_tokens(self):
        """Whether `tokens` can say the tokens trained: a tokens series or tokens_per_step."""
        return "tokens" in self.series or self.meta.get("tokens_per_step") is not None

    def tokens(self, key="loss"):
        """Tokens trained at each logged point of `key`: the tokens series, or step * tokens_per_step."""
        steps, _ = self.series[key]
        if "tokens" in self.series:
            ts, tv = self.series["tokens"]
            return np.interp(steps, ts, tv)
        tps = self.meta.get("tokens_per_step")
        if tps is None:
            raise ValueError(f"run {self.name!r} ({self.source}): no tokens column and no tokens_per_step; "
                             "give --tokens-per-step or PATH:tokens_per_step=... (see hrmloss fit-grid --help)")
        return steps * float(tps)


def _norm(name):
    n = re.sub(r"[/\-. ]+", "_", str(name).strip().lower())
    return re.sub(r"^(train|training)_", "", n) if n not in ALIASES["loss"] else n


def guess_columns(names, columns=None):
    """{canonical: column} for the columns present, `columns` (given names) first, then `ALIASES`."""
    names = list(names)
    out = {}
    for key, col in (columns or {}).items():
        if key not in ALIASES:
            raise ValueError(f"columns: {key!r} is not one of {list(ALIASES)}")
        if col not in names:
            raise ValueError(f"columns[{key!r}]={col!r}: no such column; found {names}")
        out[key] = col
    by_norm = {}
    for n in names:
        by_norm.setdefault(_norm(n), n)
    for key, aliases in ALIASES.items():
        if key not in out:
            hit = next((by_norm[a] for a in aliases if a in by_norm), None)
            if hit is not None and hit not in out.values():
                out[key] = hit
    return out


def _number(v, where, col):
    if v is None or v == "":
        return None
    if isinstance(v, bool):
        raise ValueError(f"{where}: column {col!r} is {v!r}, expected a number")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: column {col!r} is {v!r}, expected a number") from None
    return x if math.isfinite(x) else None  # NaN / inf logged (a diverged step): skipped


EVAL_SET = re.compile(r"(?:eval|test|val|valid|validation)_(.+)_loss")
"""A named eval set's loss, after `_norm`: `eval_<name>_loss` (Hugging Face with several eval datasets),
`eval/<name>/loss`; read as the series `eval_loss:<name>`."""
_LOSSES = ("loss", "ce", "kl", "eval_loss")
_SHOWN = 3  # records named in a note before "..."


def _eval_sets(names, taken):
    """{"eval_loss:<set>": column} for the named eval-set losses among `names` not already `taken`."""
    out = {}
    for n in names:
        m = EVAL_SET.fullmatch(_norm(n))
        if m and n not in taken:
            out.setdefault(f"eval_loss:{m.group(1)}", n)
    return out


def _listed(items):
    return ", ".join(items[:_SHOWN]) + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _in_step_order(points, disorder, repeats):
    """[(step, value, where)] in file order -> (steps, values) sorted by step, a repeated step's last kept.

    A resumed run logs the steps after its checkpoint again: the later values are the run that went on.
    Out-of-order rows (newest first; a step seen before is a resume, not disorder) are recorded in
    `disorder`, repeated steps in `repeats` {step: [where, ...]}, for the run's notes.
    """
    last = {}
    for i, (step, value, where) in enumerate(points):
        if i and step < points[i - 1][0] and step not in last and not disorder:  # (a repeat is a resume)
            disorder.append(f"step {step:g} at {where} after step {points[i - 1][0]:g} at {points[i - 1][2]}")
        if step in last:
            seen = repeats.setdefault(step, [last[step][1]])
            if where not in seen:  # (several series of one record: named once)
                seen.append(where)
        last[step] = (value, where)
    steps = sorted(last)
    return np.array(steps, dtype=np.float64), [last[k][0] for k in steps]


def runs_from_records(records, source, name, columns=None, meta=None):
    """[(where, dict)] -> Run: series of every canonical column found, positions where logged.

    `where` names the record for error messages and notes (e.g. `run.jsonl:12`). Each series is sorted by
    step; a step logged more than once (a resumed run) keeps its last value; records without a step (when
    others have one) are skipped; all three are said in `Run.notes`. A negative step is an error.
    """
    names = list(dict.fromkeys(k for _, r in records for k in r))
    cols = guess_columns(names, columns)
    cols |= _eval_sets(names, set(cols.values()))
    metrics = [k for k in cols if k != "step"]
    if not any(k.split(":")[0] in _LOSSES for k in metrics) and not any("position_loss" in r for _, r in records):
        raise ValueError(f"{source}: found no loss column among {names[:20]}; expected one of "
                         f"{[a for k in _LOSSES for a in ALIASES[k]]}, eval_<set>_loss, or --columns")
    data = {k: [] for k in metrics + ["position_loss"]}
    no_step = []
    for i, (where, rec) in enumerate(records, start=1):
        step = _number(rec.get(cols["step"]), where, cols["step"]) if "step" in cols else float(i)
        if step is None:
            no_step.append(where)
            continue
        if step < 0:
            raise ValueError(f"{where}: column {cols['step']!r} is {step:g}: expected a step >= 0")
        for k in metrics:
            v = _number(rec.get(cols[k]), where, cols[k])
            if v is not None:
                data[k].append((step, v, where))
        if rec.get("position_loss") is not None:
            curve = rec["position_loss"]
            if not isinstance(curve, list):
                raise ValueError(f"{where}: position_loss is {type(curve).__name__}, expected a list of numbers")
            data["position_loss"].append(
                (step, [math.nan if v is None else _number(v, where, "position_loss") for v in curve], where))
    disorder, repeats, series = [], {}, {}
    for k, points in data.items():
        if points:
            series[k] = _in_step_order(points, disorder, repeats)
    notes = []
    if no_step:
        notes.append(f"{source}: {len(no_step)} record(s) without {cols['step']!r} skipped "
                     f"({_listed(no_step)})")
    if disorder:
        notes.append(f"{source}: rows not in step order ({disorder[0]}): sorted by step")
    if repeats:
        shown = [f"step {s:g} at {' and '.join(w)}" for s, w in sorted(repeats.items())]
        notes.append(f"{source}: {len(repeats)} step(s) logged more than once (a resumed run?), the last kept: "
                     f"{_listed(shown)}")
    positions = None
    if "position_loss" in series:
        pos_steps, pos_curves = series.pop("position_loss")
        width = max(len(c) for c in pos_curves)
        positions = {"step": pos_steps,
                     "loss": np.array([c + [math.nan] * (width - len(c)) for c in pos_curves], dtype=np.float64)}
    series = {k: (st, np.array(v, dtype=np.float64)) for k, (st, v) in series.items()}
    return Run(name, str(source), series, positions, dict(meta or {}), notes)


def _read_text(path):
    """The file's text (UTF-8; a leading byte-order mark, as Excel writes, dropped), or ValueError naming
    the file when it is not text."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text file (byte 0x{data[e.start]:02x} at offset {e.start}; "
                         "binary data?)") from None
    if "\0" in text:
        line = text.count("\n", 0, text.index("\0")) + 1
        raise ValueError(f"{path}:{line}: a NUL byte: not a text file (binary data?)")
    return text


def _jsonl_records(path):
    records = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected a JSON object per line, got {type(rec).__name__}")
        records.append((where, rec))
    if not records:
        raise ValueError(f"{path}: no records (an empty file?)")
    return records


def _csv_records(path):
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter=delimiter)
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    if not rows or not any(rows[0][1]):
        raise ValueError(f"{path}:1: expected a header row with column names")
    header = rows[0][1]
    records = []
    for lineno, row in rows[1:]:
        if not row:
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)} as in the header")
        records.append((f"{path}:{lineno}", dict(zip(header, row))))
    if not records:
        raise ValueError(f"{path}: a header and no rows")
    return records


def _tensorboard_records(path):
    from .._extras import require

    ea = require("tensorboard.backend.event_processing.event_accumulator", "reading TensorBoard logs")
    acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0})
    try:
        acc.Reload()
    except Exception as e:  # tensorboard raises its own errors on corrupt records
        raise ValueError(f"{path}: not a readable TensorBoard event file ({e})") from None
    tags = acc.Tags().get("scalars", [])
    if not tags:
        raise ValueError(f"{path}: no scalar summaries in the TensorBoard events")
    by_step = {}
    for tag in tags:
        for ev in acc.Scalars(tag):
            by_step.setdefault(ev.step, {"step": ev.step})[tag] = ev.value
    return [(f"{path}: step {s}", by_step[s]) for s in sorted(by_step)]


def _json_runs(path, columns, meta):
    text = _read_text(path)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    stem = Path(path).parent.name if Path(path).name == "trainer_state.json" else Path(path).stem
    if isinstance(doc, dict) and "log_history" in doc:
        hist = doc["log_history"]
        if not isinstance(hist, list) or not all(isinstance(r, dict) for r in hist):
            raise ValueError(f"{path}: log_history is not a list of objects")
        if not hist:
            raise ValueError(f"{path}: log_history is empty (nothing logged yet?)")
        records = [(f"{path}: log_history[{i}]", r) for i, r in enumerate(hist)]
        return [runs_from_records(records, path, meta.get("name") or stem, columns, meta)]
    if isinstance(doc, dict) and {"config", "reference", "runs"} <= set(doc):
        return _demo_runs(doc, path, meta)
    if isinstance(doc, dict) and "grid" in doc:
        return _grid_runs(doc, path, meta)
    if isinstance(doc, list) and doc and all(isinstance(r, dict) for r in doc):
        return [runs_from_records([(f"{path}: [{i}]", r) for i, r in enumerate(doc)], path,
                                  meta.get("name") or stem, columns, meta)]
    raise ValueError(f"{path}: expected a trainer_state.json (log_history), a demo.json, a grid.json or a "
                     "non-empty list of records")


def _key(doc, key, where):
    """doc[key], or ValueError naming where and the key (a demo.json or grid.json edited or cut short)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: expected an object with {key!r}, got {type(doc).__name__}")
    if key not in doc:
        raise ValueError(f"{where}: missing key {key!r}")
    return doc[key]


def _numbers(doc, key, where, ndim=1, length=None):
    """doc[key] as a float64 array of `ndim` dimensions (and `length` rows), or ValueError naming the key."""
    value = _key(doc, key, where)
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != ndim or (length is not None and arr.shape[0] != length):
        rows = "" if length is None else f" of {length} rows"
        raise ValueError(f"{where}: {key!r} is not a {'list' if ndim == 1 else 'table'} of numbers{rows}")
    return arr


def _demo_runs(doc, path, meta):
    """The reference (pre-training on A) and each hrm run (fine-tuning on B) of a demo.json."""
    runs = _key(doc, "runs", str(path))
    if not isinstance(runs, dict):
        raise ValueError(f"{path}: 'runs' is not an object {{hrm: run}}")
    items = [("reference", doc["reference"], f"{path}: reference", {"phase": "pre-training (domain A)"})]
    for h, r in runs.items():
        try:
            hrm = float(h)
        except ValueError:
            raise ValueError(f"{path}: runs[{h!r}]: expected a run per hrm (a number)") from None
        items.append((f"hrm={hrm:g}", r, f"{path}: runs[{h!r}]", {"phase": "fine-tuning (domain B)", "hrm": hrm}))
    out = []
    for name, r, where, m in items:
        tr, ev = _key(r, "train", where), _key(r, "eval", where)
        step = _numbers(tr, "step", f"{where}.train")
        series = {k: (step, _numbers(tr, k, f"{where}.train", length=step.size))
                  for k in ("loss", "ce", "kl", "tokens")}
        ev_step = _numbers(ev, "step", f"{where}.eval")
        series["eval_loss"] = (ev_step, _numbers(ev, "ce", f"{where}.eval", length=ev_step.size))
        positions = {"step": ev_step, "loss": _numbers(ev, "position_ce", f"{where}.eval", 2, ev_step.size)}
        out.append(Run(name, str(path), series, positions, m | meta))
    return out


def _grid_runs(doc, path, meta):
    """Each (context, width) run of a grid.json, with its N and group."""
    grid = doc["grid"]
    if not isinstance(grid, list) or not grid:
        raise ValueError(f"{path}: 'grid' is not a non-empty list of runs")
    out = []
    for i, r in enumerate(grid):
        where = f"{path}: grid[{i}]"
        step = _numbers(r, "step", where)
        series = {k: (step, _numbers(r, k, where, length=step.size)) for k in ("loss", "tokens")}
        run_meta = {"N": parse_meta_value("N", _key(r, "N", where), where), "group": str(_key(r, "group", where))}
        out.append(Run(str(_key(r, "name", where)), str(path), series, None, run_meta | meta))
    return out


def read_runs(path, *, columns=None, meta=None, format=None):
    """Read a log file (or TensorBoard folder) into a list of `Run`.

    Args:
        path: the file or folder. columns: {canonical: column name} for names the guess misses.
        meta: what the log does not hold (`META_KEYS`), e.g. {"N": 134e6, "group": "T_m=4"}.
        format: "hf", "jsonl", "csv", "tensorboard", "json" or None (from the path, see the module doc).
    """
    path = Path(path)
    meta = dict(meta or {})
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder")
    fmt = format or ("tensorboard" if path.is_dir() or path.name.startswith("events.out.tfevents") else
                     {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}.get(
                         path.suffix.lower()))
    name = meta.get("name") or (path.name if path.is_dir() else path.stem)
    if fmt in ("json", "hf"):
        return _json_runs(path, columns, meta)
    readers = {"jsonl": _jsonl_records, "csv": _csv_records, "tensorboard": _tensorboard_records}
    if fmt not in readers:
        raise ValueError(f"{path}: unknown log format (suffix {path.suffix!r}); expected .json, .jsonl, .csv, "
                         "a TensorBoard folder or events file, or format= one of hf, json, jsonl, csv, tensorboard")
    return [runs_from_records(readers[fmt](path), path, name, columns, meta)]


def parse_run_spec(spec):
    """`PATH:key=value:key=value` -> (path, meta). Keys: `META_KEYS`; N and tokens_per_step accept
    suffixes k, M, B (or G), T (134M = 134e6). A value may hold "=" (group=T_m=4); PATH may not hold ":".
    """
    path, *pairs = spec.split(":")
    if not path:
        raise ValueError(f"--run {spec!r}: expected PATH:key=value:...")
    meta = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq or key not in META_KEYS or not value:
            raise ValueError(f"--run {spec!r}: {pair!r} is not key=value with a key in {list(META_KEYS)}")
        meta[key] = parse_meta_value(key, value, f"--run {spec!r}")
    return path, meta


def parse_meta_value(key, value, where):
    if META_KEYS[key] is str:
        return str(value)
    if isinstance(value, str):
        scale = {"k": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(value[-1:], 1.0)
        text = value[:-1] if scale != 1.0 else value
    else:
        scale, text = 1.0, value
    try:
        v = float(text) * scale
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {key}={value!r} is not a number") from None
    if not math.isfinite(v) or v < 0 or (key != "hrm" and v == 0):
        raise ValueError(f"{where}: {key}={value!r}: expected a finite number > 0 (hrm: >= 0)")
    return v


def read_manifest(path):
    """A JSON manifest -> [(path, meta)]: a list of objects, or {"runs": [...], <defaults>}.

    Each object has "path" (relative to the manifest's folder) and any of `META_KEYS`, e.g.
    `{"runs": [{"path": "n134m/trainer_state.json", "N": 134e6, "group": "T_m=4"}], "tokens_per_step": 524288}`;
    a top-level key other than "runs" is a default for every run.
    """
    path = Path(path)
    try:
        doc = json.loads(_read_text(path))
    except FileNotFoundError:
        raise ValueError(f"--manifest {path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    defaults = {}
    if isinstance(doc, dict):
        doc = dict(doc)
        entries = doc.pop("runs", None)
        defaults = doc
    else:
        entries = doc
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list of runs, or an object with a 'runs' list")
    out = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ValueError(f"{path}: runs[{i}]: expected an object with 'path'")
        meta = {}
        for key, value in (defaults | entry).items():
            if key == "path":
                continue
            if key not in META_KEYS:
                raise ValueError(f"{path}: runs[{i}]: unknown key {key!r}; expected 'path' and {list(META_KEYS)}")
            meta[key] = parse_meta_value(key, value, f"{path}: runs[{i}]")
        out.append((str(path.parent / entry["path"]), meta))
    return out

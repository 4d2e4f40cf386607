"""`hrmloss demo`: an HRM sweep on text every Python install ships, read with the four charts.

1. Corpus: the standard library's own `.py` files, split into two domains. Domain A is the prose of
   their docstrings; domain B is their code with the docstrings removed. Bytes are the tokens (V = 256).
2. Reference: a small GPT-style causal LM trained from scratch on domain A (plain PyTorch).
3. Sweep: for each hrm, a copy of the reference is fine-tuned on domain B with
   `hrm_loss(student_logits, reference_logits, labels, hrm=hrm)` against the frozen reference, on the
   same batches in the same order for every hrm (so the runs differ only by hrm).
4. Evaluation: per-position test ce and kl on held-out windows at log-spaced steps (`PositionLoss`).
5. Output in `--out`: `demo.json` (every logged number), then what `hrmloss report demo.json` draws
   from it (`reports.report`: hrm_sweep, position_loss, test_loss, pred_vs_real as PNG and SVG,
   report.json) and `summary.txt` (the run, the fits, and which of them are too weak to read).

`--grid` (`run_grid`): models of 5 sizes x 3 context lengths trained from scratch on domain B, one
scaling law with a factor per context length fitted across them on 5 % to 50 % of each run's tokens (`reports.fit_grid`, the same as
`hrmloss fit-grid grid.json --group-factor`): `grid.json`, chart (d) `grid.png/svg`,
`scaling_law.json` and `summary.txt`.

The defaults are sized for a 2-core CPU; on CUDA `for_device()` switches to a context of 512, a
larger model and more steps (`CUDA_DEMO`, `CUDA_GRID`), chosen to finish in minutes on one GPU
but not measured on one (this project's machines have none).
"""
import ast
import hashlib
import json
import math
import os
import platform
import sysconfig
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .positions import PositionLoss
from ..loss import hrm_loss

DEFAULT_HRMS = (0.001, 0.5, 10.0)


@dataclass
class DemoConfig:
    """Sizes and schedule. The defaults finish in under 2 minutes on a 2-core CPU; `quick()` in seconds;
    `for_device()` gives the CUDA sizes (`CUDA_DEMO`) when the device is a GPU."""

    ref_steps: int = 1500       # reference training steps on domain A
    steps: int = 200            # fine-tuning steps on domain B, per hrm
    hrms: tuple = DEFAULT_HRMS
    seed: int = 0
    device: str = "auto"
    context: int = 128          # T, tokens per window
    batch: int = 16             # windows per step
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    ref_lr: float = 1e-2
    lr: float = 3e-3
    n_evals: int = 24           # held-out mean loss at this many log-spaced steps (Pred's curve)
    n_position_evals: int = 10  # per-position test loss at this many log-spaced steps (charts b, c)
    eval_start: float = 0.05    # both schedules start at this share of the steps (where learning starts)
    eval_windows: int = 1024    # held-out windows of domain A, for the per-position curves
    eval_windows_b: int = 1024  # held-out windows of domain B, for the fine-tuning runs' per-position curves
    mean_windows: int = 96      # the first this many of them give the mean held-out loss at every eval step
    corpus_bytes: int = 1 << 20  # at most this many bytes per domain
    fit_fraction: float = 0.4   # share of the tokens range used to fit the "Pred" curves
    threads: int = 0            # CPU threads (torch.set_num_threads); 0: `pick_threads()`
    progress: bool = True

    def quick(self):
        """A tiny run for tests and smoke checks."""
        return replace(self, ref_steps=60, steps=40, context=32, batch=8, d_model=48, n_layer=1, n_head=2,
                       n_evals=12, n_position_evals=4, eval_windows=64, eval_windows_b=64, mean_windows=32,
                       corpus_bytes=1 << 17)

    def for_device(self):
        """The CUDA sizes (`CUDA_DEMO`) when `device` resolves to a GPU, else self."""
        return replace(self, **CUDA_DEMO) if _resolve_device(self.device).type == "cuda" else self

    def validate(self):
        for name in ("ref_steps", "steps", "context", "batch", "d_model", "n_layer", "n_head", "n_evals",
                     "n_position_evals", "eval_windows", "eval_windows_b", "mean_windows", "corpus_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        if self.steps < 8 or self.ref_steps < 8:
            raise ValueError(f"steps={self.steps}, ref_steps={self.ref_steps}: expected at least 8 each "
                             "(the curves need points to fit)")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model}: expected a multiple of n_head={self.n_head}")
        if not self.hrms:
            raise ValueError("hrms: expected at least one value")
        for h in self.hrms:
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not (math.isfinite(h) and h >= 0):
                raise ValueError(f"hrm={h!r}: expected a finite number >= 0")
        if not 0 < self.fit_fraction < 1:
            raise ValueError(f"fit_fraction={self.fit_fraction!r}: expected a number in (0, 1)")
        if not 0 < self.eval_start < self.fit_fraction:
            raise ValueError(f"eval_start={self.eval_start!r}: expected a number in (0, fit_fraction={self.fit_fraction})")
        if self.mean_windows > min(self.eval_windows, self.eval_windows_b):
            raise ValueError(f"mean_windows={self.mean_windows}: expected at most eval_windows={self.eval_windows} "
                             f"and eval_windows_b={self.eval_windows_b} (it is their first windows)")
        check_threads(self.threads)
        _resolve_device(self.device)
        return self


# On one GPU: a context the model uses (the per-position curves have 512 positions to fall over), a
# model (1.8M parameters) and a schedule (6M tokens for the reference) meant for late per-position fits
# with R^2 >= 0.9 in a few minutes; not run on a GPU (this project's machines have none). The corpus
# grows to the whole standard library (about 2.3 MB of docstrings, 8 MiB of code), so that the
# reference sees its prose under 3 times.
CUDA_DEMO = dict(ref_steps=1500, steps=300, context=512, batch=8, d_model=192, n_layer=4, n_head=6, ref_lr=3e-3,
                 lr=1e-3, n_evals=24, n_position_evals=10, eval_windows=512, eval_windows_b=512,
                 corpus_bytes=8 << 20)


# 1. Corpus -------------------------------------------------------------------------------------------

def _docstring_nodes(tree):
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                yield node, node.body[0]


def _stdlib_files(root):
    """The top-level `.py` files, then those of its packages (not site-/dist-packages), sorted."""
    yield from sorted(root.glob("*.py"))
    skip = {"site-packages", "dist-packages"}
    yield from (p for p in sorted(root.glob("*/**/*.py")) if not skip & set(p.relative_to(root).parts))


def stdlib_domains(max_bytes=1 << 20):
    """(prose, code) bytes from the standard library's `.py` files (top level first), in sorted file order.

    prose: every docstring (`ast.get_docstring`, cleaned), one paragraph each.
    code: the source lines of the same files minus the lines of those docstrings.
    Each is cut at `max_bytes`. Deterministic for a given Python install.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    prose, code, n_prose, n_code = [], [], 0, 0
    for path in _stdlib_files(root):
        if n_prose >= max_bytes and n_code >= max_bytes:
            break
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines, drop = src.splitlines(keepends=True), set()
        for node, expr in _docstring_nodes(tree):
            text = ast.get_docstring(node)
            if text:
                prose.append(text + "\n\n")
                n_prose += len(prose[-1])
            drop.update(range(expr.lineno - 1, expr.end_lineno))
        kept = "".join(line for i, line in enumerate(lines) if i not in drop)
        code.append(kept)
        n_code += len(kept)
    a, b = ("".join(parts).encode("utf-8")[:max_bytes] for parts in (prose, code))
    if min(len(a), len(b)) < 1 << 14:
        raise ValueError(f"stdlib at {root}: found {len(a)} bytes of docstrings and {len(b)} of code; expected "
                         "at least 16 KiB of each (does this install ship its .py sources?)")
    return a, b


def split_tokens(data, context, eval_windows, seed=0):
    """Bytes -> (train, test) int64 token tensors.

    The last max(10 %, eval_windows * (T + 1)) tokens are held out; `eval_windows` test windows of T+1
    tokens start at random (seeded) offsets in them, so that a position of the window is not tied to
    one place of the text (contiguous windows give the per-position curve a fixed zig-zag).
    """
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n_test = max(tokens.numel() // 10, eval_windows * (context + 1))
    if tokens.numel() < 4 * n_test:
        raise ValueError(f"corpus of {tokens.numel()} tokens: expected at least {4 * n_test} for context={context}, "
                         f"eval_windows={eval_windows}")
    held = tokens[-n_test:]
    start = torch.randint(0, n_test - context, (eval_windows,), generator=torch.Generator().manual_seed(seed))
    return tokens[:-n_test], held[start[:, None] + torch.arange(context + 1)]


def batches(train, context, batch, steps, seed):
    """`steps` batches of random windows (B, T+1), the same sequence for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1)
    for _ in range(steps):
        start = torch.randint(0, train.numel() - context - 1, (batch,), generator=gen)
        yield train[start[:, None] + offsets]


# 2. Model --------------------------------------------------------------------------------------------

class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); causal attention."""

    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_head, d // self.n_head).transpose(1, 3).unbind(2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Byte-level causal LM: (B, T) int64 tokens -> (B, T, 256) fp32 logits of the next token."""

    def __init__(self, context, d_model, n_layer, n_head, vocab=256):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d_model), nn.Embedding(context, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, n_head) for _ in range(n_layer)))
        self.ln, self.head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


# 3-4. Training and evaluation ------------------------------------------------------------------------

def check_threads(threads):
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"threads={threads!r}: expected an int >= 1, or 0 for `pick_threads()`")
    return threads


def pick_threads():
    """CPU threads for the demo: the cores this process may use, less those other processes keep busy.

    busy = the 1-minute load average, rounded; at least 1 thread. On a 2-core machine with one core
    taken, two OpenMP threads would wait on each other at every parallel region (3.3x slower than one
    thread under that load); one thread is what is left. The choice is recorded in demo.json: the CPU
    reductions, so the numbers, depend on the thread count (give `--threads` to reproduce a run).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, cores - busy)


@contextmanager
def torch_threads(threads):
    """torch.set_num_threads(threads or pick_threads()) inside the block (restored after); yields the count."""
    n = check_threads(threads) or pick_threads()
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


def eval_steps(steps, n, start=0.05):
    """n log-spaced steps from start * steps (at least 1) to `steps` (rounded, distinct, `steps` included).

    Starting where learning starts, rather than at step 1, puts the points where the fits look: the
    curve fits leave out the first 5 % of a run (`fits.SKIP_FRACTION`).
    """
    return sorted({int(round(s)) for s in np.geomspace(max(1.0, start * steps), steps, n)} | {steps})


@torch.no_grad()
def logits_of(model, windows):
    """The model's logits on windows (W, T+1) -> (W, T, V), in chunks of 16 windows."""
    model.eval()
    return torch.cat([model(chunk[:, :-1]) for chunk in windows.split(16)])


@torch.no_grad()
def evaluate(model, windows, *, mean_windows, ref_logits=None, hrm=0.0, positions=True):
    """Held-out ce / kl means over the first `mean_windows` windows; per-position ce over all of them.

    ref_logits: the reference's logits on those first windows (`logits_of`), or None (kl = 0).
    positions: also evaluate the other windows, for "position_ce" (numpy (T,) as a list).
    Returns {"ce", "kl", "loss" = ce + hrm * kl} (means over tokens) [+ "position_ce"].
    """
    model.eval()
    acc = PositionLoss()
    sums = torch.zeros(3, dtype=torch.float64, device=windows.device)  # ce, kl, tokens of the mean windows
    parts = [(windows[:mean_windows], ref_logits)] + [(windows[mean_windows:], None)] * bool(positions)
    for k, (part, ref) in enumerate(parts):
        for i, chunk in enumerate(part.split(16)):
            x, y = chunk[:, :-1], chunk[:, 1:]
            logits = model(x)
            r = logits if ref is None else ref[16 * i:16 * i + len(chunk)]
            out = hrm_loss(logits, r, y, hrm=hrm, reduction="none", return_components=True)
            acc.update(out.ce, out.kl, torch.ones_like(y, dtype=torch.bool))
            if k == 0:
                sums += torch.stack([out.ce.sum(), out.kl.sum(), torch.tensor(float(y.numel()))]).to(sums)
    model.train()
    ce, kl, n = sums.tolist()
    res = {"ce": ce / n, "kl": kl / n, "loss": (ce + hrm * kl) / n}
    if positions:
        res["position_ce"] = acc.compute()["ce"].tolist()
    return res


def _progress(cfg, total, desc):
    from .._extras import require

    tqdm = require("tqdm.auto", "the demo's progress bars").tqdm
    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


def train(cfg, model, train_tokens, test_windows, *, ref=None, hrm=0.0, lr, steps, seed, desc):
    """Train `model` for `steps` AdamW steps; with `ref`, on `hrm_loss` against it, else on CE alone.

    Logs per step: loss = mean over tokens of ce + hrm * kl, ce, kl, and tokens trained. Two held-out
    schedules (`eval_steps`, both from cfg.eval_start of the run): the mean ce / kl / loss over the first
    cfg.mean_windows test windows at cfg.n_evals steps, and the per-position ce over all test windows at
    cfg.n_position_evals of them ("position_ce": a NaN row at the other steps; "position_step" lists them).
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    pos_at = set(eval_steps(steps, cfg.n_position_evals, cfg.eval_start))
    at = set(eval_steps(steps, cfg.n_evals, cfg.eval_start)) | pos_at
    mean_windows = min(cfg.mean_windows, len(test_windows))
    ref_logits = logits_of(ref, test_windows[:mean_windows]) if ref is not None else None
    nan_row = [math.nan] * cfg.context
    log = {"step": [], "tokens": [], "loss": [], "ce": [], "kl": []}
    evals = {"step": [], "tokens": [], "position_step": sorted(pos_at), "mean_windows": mean_windows,
             "position_windows": len(test_windows)}
    rows = []
    bar = _progress(cfg, steps, desc)
    for step, chunk in enumerate(batches(train_tokens, cfg.context, cfg.batch, steps, seed), start=1):
        chunk = chunk.to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x)
        with torch.no_grad():
            ref_batch = ref(x) if ref is not None else logits.detach()
        out = hrm_loss(logits, ref_batch, y, hrm=hrm, reduction="mean", return_components=True)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        rows.append(torch.stack([out.loss.detach(), out.ce, out.kl]))  # stays on device: no sync per step
        if step in at:
            for k, v in zip(("loss", "ce", "kl"), torch.stack(rows).cpu().T.tolist()):
                log[k] += v
            rows = []
            evals["step"].append(step)
            evals["tokens"].append(step * cfg.batch * cfg.context)
            res = evaluate(model, test_windows, mean_windows=mean_windows, ref_logits=ref_logits, hrm=hrm,
                           positions=step in pos_at)
            res.setdefault("position_ce", nan_row)
            for k, v in res.items():
                evals.setdefault(k, []).append(v)
            bar.set_postfix(ce=f"{evals['ce'][-1]:.3f}", kl=f"{evals['kl'][-1]:.4f}")
        bar.update(1)
    bar.close()
    if rows:
        for k, v in zip(("loss", "ce", "kl"), torch.stack(rows).cpu().T.tolist()):
            log[k] += v
    log["step"] = list(range(1, steps + 1))
    log["tokens"] = [s * cfg.batch * cfg.context for s in log["step"]]
    return {"train": log, "eval": evals}


def _resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device={name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def environment(threads, **corpora):
    """What a run's numbers depend on besides the config: versions, the thread count, the corpora's sha256."""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "threads": threads, "platform": platform.platform(),
            "corpus_sha256": {k: hashlib.sha256(v).hexdigest() for k, v in corpora.items()}}


def run(cfg):
    """Run the whole demo (corpus, reference, sweep, evaluations); returns the JSON-able results.

    On `cfg.threads` CPU threads (0: `pick_threads()`); deterministic for a seed and a thread count.
    """
    cfg.validate()
    with torch_threads(cfg.threads) as threads:
        return _run(cfg, threads)


def _run(cfg, threads):
    device = _resolve_device(cfg.device)
    t0 = time.perf_counter()
    prose, code = stdlib_domains(cfg.corpus_bytes)
    a_train, a_test = split_tokens(prose, cfg.context, cfg.eval_windows)
    b_train, b_test = split_tokens(code, cfg.context, cfg.eval_windows_b)
    a_test, b_test = a_test.to(device), b_test.to(device)

    torch.manual_seed(cfg.seed)
    ref = TinyGPT(cfg.context, cfg.d_model, cfg.n_layer, cfg.n_head).to(device)
    reference = train(cfg, ref, a_train, a_test, lr=cfg.ref_lr, steps=cfg.ref_steps, seed=cfg.seed,
                      desc="reference on A")
    ref.eval().requires_grad_(False)
    reference["on_b"] = evaluate(ref, b_test, mean_windows=min(cfg.mean_windows, len(b_test)))

    runs = {}
    for hrm in cfg.hrms:
        torch.manual_seed(cfg.seed + 1)
        student = TinyGPT(cfg.context, cfg.d_model, cfg.n_layer, cfg.n_head).to(device)
        student.load_state_dict(ref.state_dict())
        student.requires_grad_(True).train()
        runs[repr(float(hrm))] = train(cfg, student, b_train, b_test, ref=ref, hrm=float(hrm), lr=cfg.lr,
                                       steps=cfg.steps, seed=cfg.seed + 1, desc=f"hrm={hrm:g} on B")

    return {"config": asdict(cfg) | {"hrms": [float(h) for h in cfg.hrms], "device": str(device)},
            "environment": environment(threads, domain_a=prose, domain_b=code),
            "corpus": {"domain_a": "stdlib docstrings (prose)", "domain_b": "stdlib code without docstrings",
                       "bytes_a": len(prose), "bytes_b": len(code), "tokenizer": "bytes (V=256)"},
            "reference": reference, "runs": runs, "seconds": time.perf_counter() - t0}


def summary(results):
    """The run in a few lines: sizes, time, final test values per hrm (the fits follow from `report`)."""
    cfg, ref, env = results["config"], results["reference"], results["environment"]
    lines = [f"hrmloss demo: byte-level GPT (d={cfg['d_model']}, layers={cfg['n_layer']}, T={cfg['context']}, "
             f"batch {cfg['batch']}), device {cfg['device']}, {env['threads']} CPU threads, "
             f"{results['seconds']:.0f} s of training and evaluation (torch {env['torch']}, numpy {env['numpy']})",
             f"reference: {cfg['ref_steps']} steps on domain A (stdlib docstrings); test CE on A "
             f"{ref['eval']['ce'][-1]:.3f}, on B {ref['on_b']['ce']:.3f} nats/byte",
             f"fine-tuning on domain B (stdlib code), {cfg['steps']} steps per hrm, final test values:",
             f"  {'hrm':>8} {'CE (B)':>8} {'KL to ref':>10} {'CE + hrm*KL':>12}"]
    for h, r in results["runs"].items():
        e = r["eval"]
        lines.append(f"  {float(h):>8g} {e['ce'][-1]:>8.3f} {e['kl'][-1]:>10.4f} {e['loss'][-1]:>12.3f}")
    return "\n".join(lines) + "\n"


def main(out="hrmloss-demo", cfg=None, *, formats=("png", "svg")):
    """Run the demo; write demo.json, the charts of `hrmloss report demo.json` and summary.txt into `out`.

    Returns (paths written, summary text).
    """
    cfg = (cfg or DemoConfig().for_device()).validate()
    results = run(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    paths, text = report_demo(out / "demo.json", out, formats=formats)
    return [out / "demo.json", *paths], text


def report_demo(path, out, *, formats=("png", "svg")):
    """The charts, report.json / report.txt and summary.txt of a demo.json (what `main` writes after the run).

    As `hrmloss report demo.json`, with the Pareto chart's points from the held-out evaluations.
    """
    from . import reports
    from .logs import read_runs

    results = json.loads(Path(path).read_text())
    finals = {f"hrm={float(h):g}": (r["eval"]["kl"][-1], r["eval"]["ce"][-1]) for h, r in results["runs"].items()}
    paths, text = reports.report(read_runs(path), out, fit_fraction=results["config"]["fit_fraction"], finals=finals,
                                 formats=formats)
    text = summary(results) + text
    (Path(out) / "summary.txt").write_text(text)
    return [*paths, Path(out) / "summary.txt"], text


from .grid import CUDA_GRID, GridConfig, grid, non_embedding_params, run_grid  # noqa: E402  (--grid, re-exported)

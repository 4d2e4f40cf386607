"""`hrmloss demo`: an HRM sweep on text every Python install ships, read with the four charts.

1. Corpus: the standard library's own `.py` files, split into two domains. Domain A is the prose of
   their docstrings; domain B is their code with the docstrings removed. Bytes are the tokens (V = 256).
2. Reference: a small GPT-style causal LM trained from scratch on domain A (plain PyTorch).
3. Sweep: for each hrm, a copy of the reference is fine-tuned on domain B with
   `hrm_loss(student_logits, reference_logits, labels, hrm=hrm)` against the frozen reference, on the
   same batches in the same order for every hrm (so the runs differ only by hrm).
4. Evaluation: per-position test ce and kl on held-out windows at log-spaced steps (`PositionLoss`).
5. Output in `--out`: `hrm_sweep.png`, `position_loss.png`, `test_loss.png`, `pred_vs_real.png`,
   `demo.json` (every logged number) and `summary.txt`.
"""
import ast
import json
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .analysis import PositionLoss, fit_power_law, predict_curve
from .loss import hrm_loss

DEFAULT_HRMS = (0.001, 0.5, 10.0)


@dataclass
class DemoConfig:
    """Sizes and schedule. The defaults finish in a few minutes on a 2-core CPU; `quick()` in seconds."""

    ref_steps: int = 500        # reference training steps on domain A
    steps: int = 150            # fine-tuning steps on domain B, per hrm
    hrms: tuple = DEFAULT_HRMS
    seed: int = 0
    device: str = "auto"
    context: int = 64           # T, tokens per window
    batch: int = 16             # windows per step
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    ref_lr: float = 1e-2
    lr: float = 3e-3
    n_evals: int = 7            # log-spaced evaluation steps per run (the last included)
    eval_windows: int = 512     # held-out windows of domain A (the per-position chart needs many)
    eval_windows_b: int = 128   # held-out windows of domain B, for the fine-tuning runs
    corpus_bytes: int = 1 << 20  # at most this many bytes per domain
    fit_fraction: float = 0.4   # share of the tokens range used to fit the "Pred" curves
    progress: bool = True

    def quick(self):
        """A tiny run for tests and smoke checks."""
        return replace(self, ref_steps=60, steps=40, context=32, batch=8, d_model=48, n_layer=1, n_head=2,
                       n_evals=4, eval_windows=64, eval_windows_b=32, corpus_bytes=1 << 17)

    def validate(self):
        for name in ("ref_steps", "steps", "context", "batch", "d_model", "n_layer", "n_head", "n_evals",
                     "eval_windows", "eval_windows_b", "corpus_bytes"):
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
        return self


# 1. Corpus -------------------------------------------------------------------------------------------

def _docstring_nodes(tree):
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for node in ast.walk(tree):
        if isinstance(node, kinds) and node.body and isinstance(node.body[0], ast.Expr):
            value = node.body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                yield node, node.body[0]


def stdlib_domains(max_bytes=1 << 20):
    """(prose, code) bytes from the standard library's top-level `.py` files, in sorted file order.

    prose: every docstring (`ast.get_docstring`, cleaned), one paragraph each.
    code: the source lines of the same files minus the lines of those docstrings.
    Each is cut at `max_bytes`. Deterministic for a given Python install.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    prose, code, n_prose, n_code = [], [], 0, 0
    for path in sorted(root.glob("*.py")):
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


def split_tokens(data, context, eval_windows):
    """Bytes -> (train, test) int64 token tensors: the last `eval_windows` windows of T+1 tokens are test."""
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    n_test = eval_windows * (context + 1)
    if tokens.numel() < 4 * n_test:
        raise ValueError(f"corpus of {tokens.numel()} tokens: expected at least {4 * n_test} for context={context}, "
                         f"eval_windows={eval_windows}")
    return tokens[:-n_test], tokens[-n_test:].view(eval_windows, context + 1)


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

def eval_steps(steps, n):
    """Log-spaced evaluation steps in [1, steps], always including `steps`."""
    return sorted({int(round(s)) for s in np.geomspace(1, steps, n)} | {steps})


@torch.no_grad()
def evaluate(model, ref, windows, hrm):
    """Per-position test ce / kl (numpy (T,)) and their means over tokens; kl = 0 without a reference."""
    model.eval()
    acc = PositionLoss()
    for chunk in windows.split(16):
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x)
        ref_logits = ref(x) if ref is not None else logits
        out = hrm_loss(logits, ref_logits, y, hrm=hrm, reduction="none", return_components=True)
        acc.update(out.ce, out.kl, torch.ones_like(y, dtype=torch.bool))
    model.train()
    pos = acc.compute(hrm)
    w = pos["count"] / pos["count"].sum()
    return {"position_ce": pos["ce"].tolist(), "position_kl": pos["kl"].tolist(),
            "ce": float(w @ pos["ce"]), "kl": float(w @ pos["kl"]), "loss": float(w @ pos["loss"])}


def _progress(cfg, total, desc):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not cfg.progress, leave=False, dynamic_ncols=True)


def train(cfg, model, train_tokens, test_windows, *, ref=None, hrm=0.0, lr, steps, seed, desc):
    """Train `model` for `steps` AdamW steps; with `ref`, on `hrm_loss` against it, else on CE alone.

    Logs per step: loss = mean over tokens of ce + hrm * kl, ce, kl, and tokens trained;
    per evaluation step: `evaluate` on `test_windows`.
    """
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    at = set(eval_steps(steps, cfg.n_evals))
    log = {"step": [], "tokens": [], "loss": [], "ce": [], "kl": []}
    evals = {"step": [], "tokens": []}
    rows = []
    bar = _progress(cfg, steps, desc)
    for step, chunk in enumerate(batches(train_tokens, cfg.context, cfg.batch, steps, seed), start=1):
        chunk = chunk.to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x)
        with torch.no_grad():
            ref_logits = ref(x) if ref is not None else logits.detach()
        out = hrm_loss(logits, ref_logits, y, hrm=hrm, reduction="mean", return_components=True)
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
            for k, v in evaluate(model, ref, test_windows, hrm).items():
                evals.setdefault(k, []).append(v)
            bar.set_postfix(ce=f"{evals['ce'][-1]:.3f}", kl=f"{evals['kl'][-1]:.4f}")
        bar.update(1)
    bar.close()
    log["step"] = list(range(1, steps + 1))
    log["tokens"] = [s * cfg.batch * cfg.context for s in log["step"]]
    return {"train": log, "eval": evals}


def _resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg):
    """Run the whole demo (corpus, reference, sweep, evaluations, fits); returns the JSON-able results."""
    cfg.validate()
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
    reference["on_b"] = evaluate(ref, None, b_test, 0.0)

    runs = {}
    for hrm in cfg.hrms:
        torch.manual_seed(cfg.seed + 1)
        student = TinyGPT(cfg.context, cfg.d_model, cfg.n_layer, cfg.n_head).to(device)
        student.load_state_dict(ref.state_dict())
        student.requires_grad_(True).train()
        runs[repr(float(hrm))] = train(cfg, student, b_train, b_test, ref=ref, hrm=float(hrm), lr=cfg.lr,
                                       steps=cfg.steps, seed=cfg.seed + 1, desc=f"hrm={hrm:g} on B")

    results = {"config": asdict(cfg) | {"hrms": [float(h) for h in cfg.hrms], "device": str(device)},
               "corpus": {"domain_a": "stdlib docstrings (prose)", "domain_b": "stdlib code without docstrings",
                          "bytes_a": len(prose), "bytes_b": len(code), "tokenizer": "bytes (V=256)"},
               "reference": reference, "runs": runs}
    results["fits"] = _fits(results, cfg)
    results["seconds"] = time.perf_counter() - t0
    return results


def _fits(results, cfg):
    """Power laws of per-position test loss per evaluation step, and Pred-vs-Real of every run."""
    ev = results["reference"]["eval"]
    positions = np.arange(1, cfg.context + 1)
    fits = {"position": {}, "prediction": {}}
    for step, curve in zip(ev["step"], ev["position_ce"]):
        fits["position"][str(step)] = fit_power_law(positions, curve, var="T").to_dict()
    curves = {"reference": results["reference"]} | {f"hrm={h}": r for h, r in results["runs"].items()}
    for name, run_ in curves.items():
        tr = run_["train"]
        fits["prediction"][name] = predict_curve(tr["tokens"], tr["loss"], cfg.fit_fraction).to_dict()
    return fits


def summary(results):
    """A short human-readable text of the sweep, the fits and the predictions."""
    cfg, ref = results["config"], results["reference"]
    lines = [f"hrmloss demo: byte-level GPT (d={cfg['d_model']}, layers={cfg['n_layer']}, T={cfg['context']}), "
             f"device {cfg['device']}, {results['seconds']:.0f} s",
             f"reference: {cfg['ref_steps']} steps on domain A (stdlib docstrings); test CE on A "
             f"{ref['eval']['ce'][-1]:.3f}, on B {ref['on_b']['ce']:.3f} nats/byte",
             f"fine-tuning on domain B (stdlib code), {cfg['steps']} steps per hrm, final test values:",
             f"  {'hrm':>8} {'CE (B)':>8} {'KL to ref':>10} {'CE + hrm*KL':>12}"]
    for h, r in results["runs"].items():
        e = r["eval"]
        lines.append(f"  {float(h):>8g} {e['ce'][-1]:>8.3f} {e['kl'][-1]:>10.4f} {e['loss'][-1]:>12.3f}")
    lines.append("per-position test loss of the reference, L(T) = a + b * T^-c:")
    for step, f in results["fits"]["position"].items():
        lines.append(f"  step {step:>5}: {f['formula']}  (c = {f['c']:.2f} +- {f['c_err']:.2f}, R^2 {f['r2']:.3f})")
    lines.append(f"Pred vs Real: L(D) = E + B * D^-beta fitted on the first {cfg['fit_fraction']:.0%} of tokens:")
    for name, p in results["fits"]["prediction"].items():
        lines.append(f"  {name:>12}: {p['fit']['formula']}, held-out mean abs error {p['mae']:.3f}, "
                     f"final relative error {p['final_rel_err']:+.1%}")
    return "\n".join(lines) + "\n"


def main(out="hrmloss-demo", cfg=None):
    """Run the demo and write the four PNGs, demo.json and summary.txt into `out`; returns the results."""
    from . import plots

    cfg = cfg or DemoConfig()
    results = run(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    plots.plot_demo(results, out)
    text = summary(results)
    (out / "summary.txt").write_text(text)
    return results, text

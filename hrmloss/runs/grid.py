"""`hrmloss demo --grid`: models of 5 sizes x 3 context lengths trained from scratch on domain B (stdlib
code), one scaling law with a factor per context length fitted across all 15 (`reports.fit_grid`, as
`hrmloss fit-grid grid.json --group-factor`) on 5 % to 50 % of each run's tokens, so that Pred extrapolates
2x: `grid.json`, chart (d) `grid.png/svg`, `scaling_law.json` and `summary.txt`.
"""
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .demo import DemoConfig, TinyGPT, _resolve_device, check_threads, environment, split_tokens, stdlib_domains
from .demo import torch_threads, train


# --grid: a scaling law across model sizes and context lengths ------------------------------------------

@dataclass
class GridConfig:
    """Models of `widths` (d_model) x `contexts`, trained from scratch on domain B (stdlib code).

    Every run sees `tokens_per_step` tokens per step (batch = tokens_per_step // context) for `steps`
    steps, so runs differ only in size and context. The defaults finish in a few minutes on a 2-core CPU.
    """

    widths: tuple = (24, 32, 48, 72, 112)  # 5 sizes, N from 15k to 0.3M non-embedding parameters (21x)
    contexts: tuple = (32, 64, 128)        # 3 groups: the context length T, a factor on the loss each
    n_layer: int = 2
    n_head: int = 4
    tokens_per_step: int = 2048
    steps: int = 400
    lr: float = 3e-3
    fit_fraction: float = 0.5
    corpus_bytes: int = 2 << 20
    seed: int = 0
    device: str = "auto"
    threads: int = 0            # CPU threads; 0: `pick_threads()`
    progress: bool = True

    def quick(self):
        """A tiny grid for tests (seconds)."""
        return replace(self, widths=(16, 24, 32), contexts=(16, 32), n_layer=1, n_head=2, tokens_per_step=256,
                       steps=40, corpus_bytes=1 << 17)

    def for_device(self):
        """The CUDA sizes (`CUDA_GRID`) when `device` resolves to a GPU, else self."""
        return replace(self, **CUDA_GRID) if _resolve_device(self.device).type == "cuda" else self

    def validate(self):
        for name in ("n_layer", "n_head", "tokens_per_step", "steps", "corpus_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        if self.steps < 20:
            raise ValueError(f"steps={self.steps}: expected at least 20 (the law needs points to fit)")
        if len(set(self.widths)) < 3:
            raise ValueError(f"widths={self.widths!r}: expected at least 3 model sizes (the law has E, A, alpha)")
        for w in self.widths:
            if w % self.n_head:
                raise ValueError(f"widths: {w} is not a multiple of n_head={self.n_head}")
        for t in self.contexts:
            if not 1 <= t <= self.tokens_per_step:
                raise ValueError(f"contexts: {t} is not in [1, tokens_per_step={self.tokens_per_step}]")
        check_threads(self.threads)
        _resolve_device(self.device)
        return self


CUDA_GRID = dict(widths=(96, 128, 192, 288, 448), contexts=(256, 512, 1024), n_layer=4, n_head=8, tokens_per_step=16384,
                 steps=1500, lr=1e-3, corpus_bytes=8 << 20)


def non_embedding_params(model):
    """N of a scaling law: parameters outside the token/position embeddings and the output head."""
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith(("tok.", "pos.", "head.")))


def grid(cfg):
    """Train every (context, width) of the grid; returns the JSON-able results (grid.json)."""
    cfg.validate()
    with torch_threads(cfg.threads) as threads:
        return _grid(cfg, threads)


def _grid(cfg, threads):
    device = _resolve_device(cfg.device)
    t0 = time.perf_counter()
    _, code = stdlib_domains(cfg.corpus_bytes)
    rows = []
    for context in cfg.contexts:
        run_cfg = DemoConfig(context=context, batch=cfg.tokens_per_step // context, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_evals=2, n_position_evals=1, eval_windows_b=16, mean_windows=16,
                             device=cfg.device, progress=cfg.progress)
        b_train, b_test = split_tokens(code, context, run_cfg.eval_windows_b)
        for width in cfg.widths:
            torch.manual_seed(cfg.seed)
            model = TinyGPT(context, width, cfg.n_layer, cfg.n_head).to(device)
            log = train(replace(run_cfg, d_model=width), model, b_train, b_test.to(device), lr=cfg.lr,
                        steps=cfg.steps, seed=cfg.seed, desc=f"T={context} d={width}")["train"]
            rows.append({"name": f"T={context}, d={width}", "N": non_embedding_params(model), "group": f"T={context}",
                         "context": context, "d_model": width, "step": log["step"], "tokens": log["tokens"],
                         "loss": log["loss"]})
    return {"config": asdict(cfg) | {"device": str(device)}, "environment": environment(threads, domain_b=code),
            "grid": rows, "seconds": time.perf_counter() - t0}


def run_grid(out="hrmloss-grid", cfg=None, *, formats=("png", "svg")):
    """Run the grid; write grid.json, then what `hrmloss fit-grid grid.json` writes, and summary.txt."""
    from . import reports
    from .logs import read_runs

    cfg = (cfg or GridConfig().for_device()).validate()
    results = grid(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.json").write_text(json.dumps(results, indent=1))
    paths, text, _ = reports.fit_grid(read_runs(out / "grid.json"), out, fit_fraction=cfg.fit_fraction,
                                      group_factor=True, formats=formats)
    head = (f"hrmloss demo --grid: {len(cfg.widths)} widths {cfg.widths} x contexts {cfg.contexts}, {cfg.n_layer} "
            f"layers, {cfg.steps} steps of {cfg.tokens_per_step} tokens on domain B, device {results['config']['device']}, "
            f"{results['seconds']:.0f} s of training\n")
    (out / "summary.txt").write_text(head + text)
    return [out / "grid.json", *paths, out / "summary.txt"], head + text

"""Command line: `hrmloss demo | report | fit-grid` (also `python -m hrmloss ...`), `hrmloss --version`.

Every bad value or unreadable log ends with one line, `hrmloss <command>: error: ...`, and exit
status 2 (argparse's convention); a missing optional package with one line naming the extra to
install, and exit status 1.
"""
import argparse
import math
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, with its error on one line (no usage block above it)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _typed(convert, check, expected):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
        return value
    return parse


_POS_INT = _typed(int, lambda v: v > 0, "a positive int")
_HRM = _typed(float, lambda v: math.isfinite(v) and v >= 0, "a finite hrm >= 0")
_THREADS = _typed(int, lambda v: v >= 0, "an int >= 0 (0: picked from the free cores)")
_FRACTION = _typed(float, lambda v: 0 < v < 1, "a number in (0, 1)")
_FRACTION_CLOSED = _typed(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _tokens_per_step(text):
    from .logs import parse_meta_value

    try:
        return parse_meta_value("tokens_per_step", text, "--tokens-per-step")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _columns(text):
    pairs = [p.partition("=") for p in text.split(",")]
    if not all(eq and k and v for k, eq, v in pairs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected name=column[,name=column...], e.g. loss=train/loss")
    return {k: v for k, _, v in pairs}


def _logs_arguments(p, out, what):
    p.add_argument("logs", nargs="*", metavar="LOG",
                   help="log files or TensorBoard folders: trainer_state.json, *.jsonl, *.csv, events.out.tfevents.*, "
                        "a demo's demo.json / grid.json")
    p.add_argument("--run", action="append", default=[], metavar="PATH:key=value:...",
                   help="a log with what it does not say: N (parameters, 134e6 or 134M), group, hrm, "
                        "tokens_per_step, name, phase; e.g. runs/a.jsonl:N=134M:group=T_m=4 (repeatable)")
    p.add_argument("--manifest", metavar="FILE",
                   help='a JSON list of {"path": ..., "N": ..., "group": ..., ...} (paths relative to FILE), or '
                        '{"runs": [...], <defaults for every run>}')
    p.add_argument("--tokens-per-step", type=_tokens_per_step, metavar="N",
                   help="tokens per optimizer step, for logs without a tokens column (e.g. 524288 or 0.5M)")
    p.add_argument("--columns", type=_columns, metavar="name=column,...",
                   help="column names the guess misses; names: step, loss, ce, kl, eval_loss, tokens")
    p.add_argument("--format", choices=("hf", "json", "jsonl", "csv", "tensorboard"),
                   help="the logs' format (default: from each path)")
    p.add_argument("--out", default=out, help=f"output folder for {what} (default: %(default)s)")
    _formats_argument(p)


def _formats_argument(p):
    p.add_argument("--formats", nargs="+", choices=("png", "svg", "pdf"), default=["png", "svg"],
                   help="chart file formats (default: png svg)")


def _parser():
    from .. import __version__
    from .demo import DEFAULT_HRMS, DemoConfig

    d = DemoConfig()
    p = _Parser(prog="hrmloss", description="hrmloss tools: the demo, and charts and fits from training logs")
    p.add_argument("--version", action="version", version=f"hrmloss {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,report,fit-grid}")
    demo = sub.add_parser("demo", help="train a small byte-level GPT on stdlib text, sweep hrm, draw the charts",
                          description="Reference LM on stdlib docstrings, fine-tuned on stdlib code with hrm_loss "
                                      "for each hrm; writes the charts (PNG + SVG), demo.json and summary.txt. "
                                      "--grid instead trains a grid of model sizes x context lengths and fits one "
                                      "scaling law across it (chart d).")
    demo.add_argument("--out", default="hrmloss-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    demo.add_argument("--steps", type=_POS_INT, default=None,
                      help=f"fine-tuning steps per hrm (default {d.steps} on CPU; the reference trains "
                           f"{d.ref_steps / d.steps:g} times as many); with --grid, steps per run")
    demo.add_argument("--hrm", type=_HRM, nargs="+", default=list(DEFAULT_HRMS), help="default: %(default)s")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny model and few steps (seconds)")
    demo.add_argument("--grid", action="store_true", help="the scaling-law grid instead of the hrm sweep")
    demo.add_argument("--threads", type=_THREADS, default=0,
                      help="CPU threads (default 0: the cores that the load average says are free, at least 1; "
                           "results are deterministic for a seed and a thread count)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _formats_argument(demo)
    demo.set_defaults(parser=demo)

    rep = sub.add_parser("report", help="charts (a) KL/CE per hrm, (b) per-token loss, (c) test loss, Pred vs Real",
                         description="Reads the logs and draws what they hold: (a) hrm_sweep (runs logging kl and "
                                     "ce), (b) position_loss (per-position losses), (c) test_loss (every eval loss "
                                     "and eval_<set>_loss, a panel per phase), pred_vs_real (pred_vs_real_steps "
                                     "when tokens are unknown; training_loss for runs without a Pred); "
                                     "report.json and report.txt, which say what was not drawn and why.")
    _logs_arguments(rep, "hrmloss-report", "the charts, report.json and report.txt")
    rep.add_argument("--fit-fraction", type=_FRACTION, default=0.4,
                     help="share of each run's tokens the Pred curves are fitted on (default: %(default)s)")
    rep.set_defaults(parser=rep)

    grid = sub.add_parser("fit-grid", help="one scaling law across runs of several sizes; chart (d)",
                          description="Fits L(N, D) = E + A N^-alpha + B D^-beta across the runs (each needs N) and "
                                      "draws Real against Pred per run: rows by group, columns by N.")
    _logs_arguments(grid, "hrmloss-grid", "grid.png/svg, scaling_law.json and scaling_law.txt")
    grid.add_argument("--fit-fraction", type=_FRACTION_CLOSED, default=0.5,
                      help="share of each run's tokens the law is fitted on (default: %(default)s)")
    grid.add_argument("--fit-runs", nargs="+", metavar="NAME", help="fit on these runs only (names), predict all")
    grid.add_argument("--group-factor", action="store_true", help="a factor on the loss per group")
    grid.set_defaults(parser=grid)
    return p


def _read(args):
    from .logs import parse_run_spec, read_manifest, read_runs

    common = {} if args.tokens_per_step is None else {"tokens_per_step": args.tokens_per_step}
    specs = [(path, {}) for path in args.logs] + [parse_run_spec(s) for s in args.run]
    if args.manifest:
        specs += read_manifest(args.manifest)
    if not specs:
        raise ValueError("no logs: give LOG paths, --run PATH:... or --manifest FILE")
    runs = []
    for path, meta in specs:
        runs += read_runs(path, columns=args.columns, meta=common | meta, format=args.format)
    return runs


def _demo(args, parser):
    from dataclasses import replace

    from .demo import DemoConfig, GridConfig, main as run_demo, run_grid

    try:
        if args.grid:
            cfg = GridConfig(device=args.device, seed=args.seed, threads=args.threads, progress=not args.no_progress)
        else:
            cfg = DemoConfig(device=args.device, hrms=tuple(args.hrm), seed=args.seed, threads=args.threads,
                             progress=not args.no_progress)
        cfg = cfg.quick() if args.quick else cfg.for_device()
        if args.steps is not None:  # the demo's reference keeps its share of the steps
            ref = {} if args.grid else {"ref_steps": round(args.steps * cfg.ref_steps / cfg.steps)}
            cfg = replace(cfg, steps=args.steps, **ref)
        cfg.validate()
    except ValueError as e:
        parser.error(str(e))
    return (run_grid if args.grid else run_demo)(args.out, cfg, formats=args.formats)


def main(argv=None):
    args = _parser().parse_args(argv)
    sub = args.parser  # the subcommand's parser, for its one-line errors
    try:
        if args.command == "demo":
            paths, text = _demo(args, sub)
        else:
            from . import reports

            try:
                runs = _read(args)
                if args.command == "report":
                    paths, text = reports.report(runs, args.out, fit_fraction=args.fit_fraction, formats=args.formats)
                else:
                    paths, text, _ = reports.fit_grid(runs, args.out, fit_fraction=args.fit_fraction,
                                                      fit_runs=args.fit_runs, group_factor=args.group_factor,
                                                      formats=args.formats)
            except (ValueError, OSError) as e:
                sub.error(str(e))
    except ModuleNotFoundError as e:
        sys.exit(f"hrmloss {args.command}: error: {e}")
    print(text, end="")
    print(f"wrote {args.out}/: {' '.join(sorted(p.name for p in paths))}")
    return 0


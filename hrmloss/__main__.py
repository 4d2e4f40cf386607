"""Command line: `hrmloss demo [options]` (also `python -m hrmloss demo`)."""
import argparse
import sys


def _parser():
    from .demo import DEFAULT_HRMS, DemoConfig

    d = DemoConfig()
    p = argparse.ArgumentParser(prog="hrmloss", description="hrmloss tools")
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small byte-level GPT on stdlib text, sweep hrm, draw the charts",
                          description="Reference LM on stdlib docstrings, fine-tuned on stdlib code with "
                                      "hrm_loss for each hrm; writes 4 PNGs, demo.json and summary.txt.")
    demo.add_argument("--out", default="hrmloss-demo", help="output folder (default: %(default)s)")
    demo.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    demo.add_argument("--steps", type=int, default=None,
                      help=f"fine-tuning steps per hrm (default {d.steps}; the reference trains "
                           f"{d.ref_steps / d.steps:g} times as many)")
    demo.add_argument("--hrm", type=float, nargs="+", default=list(DEFAULT_HRMS), help="default: %(default)s")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a tiny model and few steps (seconds)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv=None):
    from dataclasses import replace

    from .demo import DemoConfig, main as run_demo

    args = _parser().parse_args(argv)
    cfg = DemoConfig(device=args.device, hrms=tuple(args.hrm), seed=args.seed, progress=not args.no_progress)
    if args.quick:
        cfg = cfg.quick()
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps, ref_steps=round(args.steps * cfg.ref_steps / cfg.steps))
    try:
        cfg.validate()
    except ValueError as e:
        sys.exit(f"hrmloss demo: {e}")
    _, text = run_demo(args.out, cfg)
    print(text, end="")
    print(f"wrote {args.out}/: hrm_sweep.png position_loss.png test_loss.png pred_vs_real.png demo.json summary.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())

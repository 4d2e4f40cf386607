"""The linear providers timed in interleaved rounds, for a machine that others share.

pytest-benchmark times one provider's rounds back to back, so a load that comes and goes on a shared
machine lands on some providers and not others. Here every round runs each provider once, in turn, in
one process: a load change hits all of them alike and the ratios hold. Prints a markdown table (median of
the rounds, forward + backward, and each time over hrmloss's):

    python -m benchmarks.linear_interleaved --dtype bfloat16 --n 2048 --vocab 32000 --hidden 1024
"""
import argparse
import os
import time

import torch

from .common import linear_inputs
from .providers import LINEAR_PROVIDERS, Unavailable, linear_provider


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    h0, w0, ht, wt, y = linear_inputs(args.n, args.vocab, args.hidden, getattr(torch, args.dtype), device)
    fns = {}
    for name in LINEAR_PROVIDERS:
        try:
            fns[name] = linear_provider(name, device)
        except Unavailable:
            continue

    def step(fn):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        sync()
        t0 = time.perf_counter()
        fn(h, w, ht, wt, y).backward()
        sync()
        return time.perf_counter() - t0
    for fn in fns.values():  # first calls (compilation) outside the rounds
        step(fn)
    times = {name: [] for name in fns}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            times[name].append(step(fn))
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    ours = median.get("hrmloss-linear")
    print(f"N = {args.n}, H = {args.hidden}, V = {args.vocab}, {args.dtype}, {device.type}, forward + backward, "
          f"median of {args.rounds} interleaved rounds; 1-minute load {os.getloadavg()[0]:.1f} at the end\n")
    print("| provider | time | x hrmloss-linear |\n| --- | --- | --- |")
    for name, t in median.items():
        print(f"| {name} | {t:.2f} s | {t / ours:.2f} |" if ours else f"| {name} | {t:.2f} s | - |")


if __name__ == "__main__":
    main()

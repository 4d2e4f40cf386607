"""The GPU benchmark: one command, a few minutes on one GPU, CUDA-event timing; writes the GPU section of
docs/performance.md (between its markers, leaving the rest of the file alone).

    python -m benchmarks.gpu --out docs/performance.md --json benchmarks/results/gpu.json   # a CUDA machine
    python -m benchmarks.gpu --device cpu --tiny --out /tmp/gpu.md    # dry run of the code paths on a CPU
    python -m benchmarks.gpu --session --out DIR     # one short GPU session, stage by stage (session.py)
    python -m benchmarks.gpu --merge DIR             # that session's numbers into docs/performance.md

In one process, on one device:
- copy bandwidth: `y.copy_(x)` of COPY_BYTES, bytes read + written over the time: the baseline of the run;
- the loss on logits, CE + 0.5 forward KL, T = 1, every 10th token ignored (benchmarks/providers.py), at
  SHAPES (the few-rows shape exercises the vocabulary split), forward and forward + backward, for: hrmloss
  (and with inplace_backward=True), naive eager, torch.compile(naive) (at COMPILED_SHAPES unless
  --all-compiled: its compile time counts in the budget), Liger's CE + KL-div when installed, flash-attn's
  Triton CE when installed (CE only, so a lower bound on what the full loss costs it);
- hrmloss's passes alone: the stats pass (reads s, t: 2 NVs) and the gradient pass (3 NVs).

Time: the median of >= REPS repetitions, each between two CUDA events, the L2 cache flushed and the
logits refreshed before each (outside the events), as triton.testing.do_bench times; spread: the 20th
and 80th percentiles. The backward is `torch.autograd.grad(loss, logits)` of fresh non-leaf logits (what
an lm head's backward consumes; no accumulation into a leaf). GB/s: the bytes a fused loss must move
(forward: read s and t, 2 NVs; forward + backward: also write ds, 3 NVs; NV = bytes of one logits
tensor) over the median time, the same floor for every provider; "% copy": of the copy bandwidth of the
same run. Peak: torch.cuda.max_memory_allocated above the inputs, in NVs. Each provider's loss is
checked against a float64 reference before it is timed; a wrong loss is reported, not timed.
"""
import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from .common import labels, peak_bytes
from .providers import HRM, IGNORE, Unavailable, loss_provider
from . import session
from .report import replace_section

SHAPES = [(8192, 32000, "float32"), (16384, 128256, "bfloat16"), (8192, 151936, "bfloat16"),
          (4096, 262144, "bfloat16"), (256, 128256, "bfloat16")]
TINY_SHAPES = [(64, 512, "float32"), (8, 4096, "bfloat16")]
COMPILED_SHAPES = {(8192, 32000), (16384, 128256)}
PROVIDERS = ("hrmloss", "hrmloss-inplace", "naive", "compile", "liger", "flash-attn-ce",
             "stats-pass", "grad-pass")
CE_ONLY = {"flash-attn-ce"}
PASSES = {"stats-pass": "forward", "grad-pass": "backward"}   # kernels alone: what they time
FLOOR_NVS = {"forward": 2, "forward+backward": 3, "backward": 3}
REPS, WARMUP = 25, 3
COPY_BYTES = 2 << 30
FLUSH_BYTES = 256 << 20
BEGIN = "<!-- gpu: written by python -m benchmarks.gpu; do not edit -->"
END = "<!-- /gpu -->"


def make_inputs(n, v, dtype, device):
    """Logits ~ N(0, 2^2) drawn on the device itself (billions of elements: a CPU generator would take
    minutes), labels as the other benchmarks draw them."""
    g = torch.Generator(device=device).manual_seed(0)
    s = torch.randn(n, v, generator=g, device=device, dtype=dtype).mul_(2)
    t = torch.randn(n, v, generator=g, device=device, dtype=dtype).mul_(2)
    return s, t, labels(n, v, device)


def reference(s, t, y, ce_only=False, rows=256):
    """The benchmarked loss (or its CE term) in float64, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float64, device=s.device)
    for i in range(0, s.shape[0], rows):
        sc, tc, yc = s[i:i + rows].double(), t[i:i + rows].double(), y[i:i + rows]
        total += F.cross_entropy(sc, yc, ignore_index=IGNORE, reduction="sum")
        if not ce_only:
            kl = F.kl_div(F.log_softmax(sc, -1), F.log_softmax(tc, -1), log_target=True, reduction="none")
            total += HRM * torch.where(yc != IGNORE, kl.sum(-1), 0.0).sum()
    return (total / (y != IGNORE).sum().clamp(min=1)).item()


def _flash_ce():
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss
    except ImportError as e:
        raise Unavailable(f"flash-attn not installed ({e})") from e

    def run(s, t, y):
        losses, _ = cross_entropy_loss(s, y, ignore_index=IGNORE, inplace_backward=True)
        return losses.sum() / (y != IGNORE).sum().clamp(min=1)
    return run


def _hrmloss_pass(name, device):
    """One pass of hrmloss alone, through its custom ops, on the backend hrm_loss picks for `device`."""
    from hrmloss.engine import frontend, ops
    from hrmloss.engine.stats import finalize

    def prepare(s, t, y):
        call = frontend.make_call(dict(hrm=HRM, ignore_index=IGNORE), s.device, (s.dtype, t.dtype))
        structure = [int(x) for x in call.st]
        args = (y, call.params, structure, call.backend, 0, s.shape[-1])
        if name == "stats-pass":
            return lambda: ops.row_stats(s, t, *args)
        partial = ops.row_stats(s, t, *args)
        final = finalize(partial, None, y, call.params, call.st, s.shape[-1])[-1]
        g = torch.full((s.shape[0],), 1.0 / s.shape[0], device=s.device)
        return lambda: ops.grad(s, t, y, final, g, call.params, structure, call.backend, 0, s.shape[-1], False)
    return prepare


def provider(name, device):
    """fn(s, t, y) -> loss, or for a pass alone prepare(s, t, y) -> thunk."""
    if name in PASSES:
        return _hrmloss_pass(name, device)
    if name == "hrmloss-inplace":
        import hrmloss
        return lambda s, t, y: hrmloss.hrm_loss(s, t, y, HRM, ignore_index=IGNORE, inplace_backward=True)
    if name == "flash-attn-ce":
        if device.type != "cuda":
            raise Unavailable("flash-attn's Triton CE runs on CUDA only")
        return _flash_ce()
    return loss_provider(name, device)


class Timer:
    """Milliseconds of fn() per repetition: CUDA events around each call with the L2 flushed before it
    (CUDA), or the wall clock (CPU dry run). setup() runs before each repetition, outside the timing."""

    def __init__(self, device):
        self.device = device
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn, setup=lambda: None, reps=REPS, warmup=WARMUP):
        for _ in range(warmup):
            setup()
            fn()
        times = []
        for _ in range(reps):
            setup()
            if self.flush is None:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times


def _quantile(xs, q):
    xs = sorted(xs)
    i = q * (len(xs) - 1)
    lo, hi = math.floor(i), math.ceil(i)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def copy_bandwidth(timer, device, nbytes):
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    times = timer(lambda: y.copy_(x))
    return 2 * nbytes / (_quantile(times, 0.5) / 1e3)


def measure_case(timer, device, n, v, dtype_name, names, copy_bw, log):
    dtype = getattr(torch, dtype_name)
    s0, t, y = make_inputs(n, v, dtype, device)
    nv = s0.numel() * s0.element_size()
    refs = {False: reference(s0, t, y), True: reference(s0, t, y, ce_only=True)}
    leaf = s0.detach().clone().requires_grad_(True)
    state = {}

    def fresh():
        # new non-leaf logits from the pristine values (in-place providers overwrite theirs)
        with torch.enable_grad():
            state["logits"] = leaf * 1

    rows = []
    for name in names:
        try:
            fn = provider(name, device)
        except Unavailable as e:
            log(f"  {name}: skipped ({e})")
            continue
        modes = [PASSES[name]] if name in PASSES else ["forward", "forward+backward"]
        for mode in modes:
            row = dict(provider=name, n=n, v=v, dtype=dtype_name, mode=mode, nv_bytes=nv, ce_only=name in CE_ONLY)
            t0 = time.perf_counter()
            if name in PASSES:
                thunk = fn(s0, t, y)
                call, setup = thunk, (lambda: None)
                first = call()
                del first
            else:
                def call(fn=fn, mode=mode):
                    loss = fn(state["logits"], t, y)
                    if mode == "forward+backward":
                        torch.autograd.grad(loss, state["logits"])
                    return loss
                setup = fresh
                setup()
                value = float(call().detach())   # compiles, for the compiled provider
                ref = refs[name in CE_ONLY]
                row.update(loss=value, reference=ref)
                tol = 1e-4 if dtype == torch.float32 else 2e-2
                if not math.isclose(value, ref, rel_tol=tol, abs_tol=tol):
                    row["error"] = f"loss {value!r} != float64 reference {ref!r}"
                    log(f"  {name} {mode}: WRONG ({row['error']})")
                    rows.append(row)
                    continue
            row["first_call_s"] = time.perf_counter() - t0
            setup()
            row["peak_nvs"] = peak_bytes(call, device) / nv
            times = timer(call, setup)
            med = _quantile(times, 0.5)
            row.update(reps=len(times), median_ms=med, p20_ms=_quantile(times, 0.2), p80_ms=_quantile(times, 0.8))
            row["gbs"] = FLOOR_NVS[mode] * nv / (med / 1e3) / 1e9
            row["of_copy"] = row["gbs"] * 1e9 / copy_bw
            log(f"  {name} {mode}: {med:.3f} ms ({row['p20_ms']:.3f}-{row['p80_ms']:.3f}), "
                f"{row['gbs']:.0f} GB/s = {row['of_copy']:.0%} of copy, peak {row['peak_nvs']:.2f} NVs")
            rows.append(row)
        state.clear()
    return rows


def machine(device):
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=torch.cuda.get_device_name(device), sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2 ** 30, 1))
    else:
        info["name"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores): dry run, wall-clock timing"
    return info


def markdown(result):
    m = result["machine"]
    clock = ("CUDA-event repetitions (20th-80th percentile), L2 flushed before each" if m["device"] == "cuda"
             else "wall-clock repetitions (20th-80th percentile): a dry run, not a measurement")
    out = [f"## GPU: {m['name']}\n",
           f"Measured by `{result['command']}` in {result['elapsed_s']:.0f} s: torch {m['torch']}, "
           f"triton {m['triton']}" + (f", {m['sms']} SMs" if "sms" in m else "") + ". "
           f"Copy bandwidth of this run (`y.copy_(x)`, {result['copy_bytes'] / 2 ** 20:.0f} MiB, read + "
           f"write): **{result['copy_gbs']:.0f} GB/s**. Loss: CE + 0.5 forward KL, T = 1, every 10th token "
           f"ignored. Times: median of {clock}; "
           "GB/s: the floor bytes of a fused loss (forward 2 NVs: read s, t; forward + backward 3 NVs: "
           "also write ds; a pass alone: its own) over the median; peak: above the inputs, in NVs. "
           "`flash-attn-ce` computes CE only (no KL): a lower bound for the full loss.\n"]
    header = ["N x V dtype", "provider", "pass", "median ms (p20-p80)", "GB/s", "% copy", "peak NVs"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in result["rows"]:
        case = f"{r['n']} x {r['v']} {r['dtype']}"
        name = r["provider"] + (" (CE only)" if r["ce_only"] else "")
        if "error" in r:
            lines.append(f"| {case} | {name} | {r['mode']} | wrong loss: {r['error']} | - | - | - |")
            continue
        lines.append(f"| {case} | {name} | {r['mode']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}-"
                     f"{r['p80_ms']:.3f}) | {r['gbs']:.0f} | {r['of_copy']:.0%} | {r['peak_nvs']:.2f} |")
    out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (a dry run of the code paths)")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help="comma-separated subset of " + ", ".join(PROVIDERS))
    ap.add_argument("--all-compiled", action="store_true", help="torch.compile at every shape, not only "
                    + ", ".join(f"{n} x {v}" for n, v in sorted(COMPILED_SHAPES)))
    ap.add_argument("--out", help="markdown file whose GPU section (between its markers) to replace")
    ap.add_argument("--json", help="write the rows as JSON here")
    session.add_arguments(ap)
    args = ap.parse_args(argv)
    if args.merge:
        return print(f"merged {args.merge} into {session.merge(args.merge)}")
    if args.stage or args.session:
        if not args.out:
            sys.exit("--session: give --out DIR")
        if args.device == "cuda" and not torch.cuda.is_available():
            sys.exit("no CUDA device: use --device cpu --tiny for a dry run")
        return session.run_stage(args) if args.stage else session.session(args)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu --tiny for a dry run")
    names = [p for p in args.providers.split(",") if p]
    unknown = set(names) - set(PROVIDERS)
    if unknown:
        sys.exit(f"--providers: unknown {sorted(unknown)}; expected some of {PROVIDERS}")
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    start = time.perf_counter()
    timer = Timer(device)
    copy_bytes = (16 << 20) if args.tiny else COPY_BYTES
    copy_bw = copy_bandwidth(timer, device, copy_bytes)
    log(f"copy bandwidth: {copy_bw / 1e9:.0f} GB/s")
    rows = []
    for n, v, dtype_name in TINY_SHAPES if args.tiny else SHAPES:
        log(f"{n} x {v} {dtype_name}")
        here = [p for p in names if p != "compile" or args.all_compiled or args.tiny or (n, v) in COMPILED_SHAPES]
        rows += measure_case(timer, device, n, v, dtype_name, here, copy_bw, log)
        torch.cuda.empty_cache() if device.type == "cuda" else None
    result = dict(command="python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
                  machine=machine(device), copy_bytes=copy_bytes, copy_gbs=copy_bw / 1e9, rows=rows,
                  elapsed_s=time.perf_counter() - start)
    log(f"done in {result['elapsed_s']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.out:
        replace_section(args.out, BEGIN, END, markdown(result))
        log(f"replaced the GPU section of {args.out}")
    return result


if __name__ == "__main__":
    main()

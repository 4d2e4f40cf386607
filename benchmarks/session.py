"""One GPU session in at most 5 minutes (`python -m benchmarks.gpu --session --out DIR`): the checks and
measurements that matter most, in order, each under its own time budget, every number written into DIR.

    python -m benchmarks.gpu --session --out DIR                 # on the GPU machine (only DIR comes back)
    python -m benchmarks.gpu --session --out DIR --device cpu --tiny   # dry run of every stage (CI)
    python -m benchmarks.gpu --merge DIR                          # on the developer's machine: DIR's
                                                                  # markdown into docs/performance.md

Stages (STAGES, budgets in seconds, sum <= 300), each a child process killed at its budget, which then
reads "over budget" in DIR and the session moves on:
  correctness  the CUDA cases most likely to break first (tests/test_cuda.py: bf16 long rows and the split
               vocabulary, N x V > 2^31, in-place, CUDA-graph capture; tests/test_cuda_session.py: top-k,
               JSD's subnormal mixture, the soft cap's fast reciprocal)
  loss         copy bandwidth, then the loss at 16384 x 128256 bf16 (hrmloss, in place, torch.compile,
               Liger, flash-attn's CE where installed; the stats and gradient passes alone), % of copy
  linear       the fused projection + loss against the GEMM floor (its four GEMMs) in the same run
  ncu          Nsight Compute on the three passes (duration, DRAM throughput, issue), if `ncu` is there
  demo         the CUDA demo (hrmloss.runs.demo), timed
Resumable: a stage whose DIR/<stage>.json says "done" or "unavailable" is skipped by the next call, so a
second call after a cut-off session only runs what is left. DIR/session.json and DIR/session.md collect
the device's name and every number.

Offline (a machine with no network): copy the repository and the peers' wheels over, then
    pip install --no-deps --no-build-isolation -e .          # hrmloss over the machine's torch / triton
    pip install --no-deps wheels/liger_kernel-*.whl wheels/flash_attn-*.whl   # peers, if wanted
A peer that is not installed is a note in the table, not a failure.
"""
import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

STAGES = {"correctness": 75, "loss": 75, "linear": 40, "ncu": 40, "demo": 70}
assert sum(STAGES.values()) <= 300
# tests/test_cuda.py's long rows (bf16, split over the multiprocessors at 8 x 262144), > 2^31 logits,
# CUDA graphs, in-place; tests/test_cuda_session.py's top-k teacher, JSD subnormal mixture, soft cap
CORRECTNESS_FILES = ("tests/test_cuda.py", "tests/test_cuda_session.py")
CORRECTNESS_K = "larger_shapes or more_than_2_31 or cuda_graph or inplace_backward_on_the_gpu or session"
LOSS_SHAPE, TINY_LOSS_SHAPE = (16384, 128256, "bfloat16"), (64, 512, "float32")
# cheapest first: torch.compile compiles for tens of seconds, so it comes last
LOSS_PROVIDERS = ("hrmloss", "stats-pass", "grad-pass", "hrmloss-inplace", "liger", "flash-attn-ce", "compile")
LINEAR_SHAPE, TINY_LINEAR_SHAPE = (8192, 128256, 4096, "bfloat16"), (64, 512, 64, "float32")
NCU_SHAPE, TINY_NCU_SHAPE = (4096, 128256), (16, 512)
BEGIN = "<!-- gpu-session: written by python -m benchmarks.gpu --merge DIR; do not edit -->"
END = "<!-- /gpu-session -->"
ROOT = pathlib.Path(__file__).resolve().parent.parent


def _device(args):
    import torch
    return torch.device(args.device)


def stage_correctness(args, budget, save):
    # the dry run (no CUDA) only collects: that the selection still names tests is what it can check
    env = dict(os.environ, TRITON_INTERPRET="0" if args.device == "cuda" else "1")
    cmd = [sys.executable, "-m", "pytest", *CORRECTNESS_FILES, "-q", "-p", "no:cacheprovider", "-k", CORRECTNESS_K]
    cmd += [] if args.device == "cuda" else ["--collect-only"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return dict(command=" ".join(cmd[2:]), returncode=proc.returncode, summary=summary,
                failures=[l for l in proc.stdout.splitlines() if l.startswith("FAILED")][:20],
                ok=proc.returncode == 0)


class _TinyTimer:
    """The dry run's timer: the device timer with 3 repetitions (the code path, not a measurement)."""

    def __init__(self, timer):
        self.timer = timer

    def __call__(self, fn, setup=lambda: None, reps=None, warmup=None):
        return self.timer(fn, setup, reps=3, warmup=1)


def stage_loss(args, budget, save):
    from . import gpu
    device = _device(args)
    timer = gpu.Timer(device)
    timer = _TinyTimer(timer) if args.tiny else timer
    copy_bytes = (16 << 20) if args.tiny else gpu.COPY_BYTES
    copy_bw = gpu.copy_bandwidth(timer, device, copy_bytes)
    n, v, dtype = TINY_LOSS_SHAPE if args.tiny else LOSS_SHAPE
    result = dict(copy_gbs=copy_bw / 1e9, rows=[], skipped=[])
    def log(msg):
        print(msg, flush=True)
        if "skipped" in msg:
            result["skipped"].append(msg.strip())
    for name in LOSS_PROVIDERS:   # one provider at a time, saved after each: a cut-off keeps the rest
        result["rows"] += gpu.measure_case(timer, device, n, v, dtype, [name], copy_bw, log)
        save(result)
    return result


def stage_linear(args, budget, save):
    """hrmloss's fused projection + loss (forward + backward to the hidden states and weights), its value
    checked against the float64 reference first, and the GEMM floor (its four GEMMs alone) in the same run."""
    import math

    import torch
    from .common import linear_inputs, reference_linear_loss
    from .gpu import Timer
    from .providers import NO_LOSS, Unavailable, linear_provider
    device = _device(args)
    n, v, hidden, dtype = TINY_LINEAR_SHAPE if args.tiny else LINEAR_SHAPE
    h0, w0, ht, wt, y = linear_inputs(n, v, hidden, getattr(torch, dtype), device)
    timer, state, rows = Timer(device), {}, []
    reference = None
    for name in ("hrmloss-linear", "gemm-floor"):
        try:
            fn = linear_provider(name, device)
        except Unavailable as e:
            rows.append(dict(provider=name, note=str(e)))
            continue

        def setup():   # fresh leaves, outside the timing
            state["h"], state["w"] = h0.detach().clone().requires_grad_(), w0.detach().clone().requires_grad_()

        def call(fn=fn):
            loss = fn(state["h"], state["w"], ht, wt, y)
            if loss.requires_grad:
                torch.autograd.grad(loss, (state["h"], state["w"]))
            return loss
        row = dict(provider=name, n=n, v=v, hidden=hidden, dtype=dtype, mode="forward+backward")
        if name not in NO_LOSS:
            setup()
            reference = reference if reference is not None else reference_linear_loss(h0, w0, ht, wt, y)
            row.update(loss=float(call().detach()), reference=float(reference))
            if not math.isclose(row["loss"], row["reference"], rel_tol=1e-4 if dtype == "float32" else 3e-2):
                rows.append(dict(row, error=f"loss {row['loss']!r} != float64 reference {row['reference']!r}"))
                continue
        times = sorted(timer(call, setup, reps=3 if args.tiny else 10, warmup=1))
        med = times[len(times) // 2]
        rows.append(dict(row, median_ms=med, tflops=4 * 2 * n * hidden * v / (med / 1e3) / 1e12))
        save(dict(rows=rows))
    floor = next((r["median_ms"] for r in rows if r["provider"] == "gemm-floor" and "median_ms" in r), None)
    for r in rows:
        if floor and "median_ms" in r:
            r["of_floor"] = r["median_ms"] / floor
    return dict(rows=rows)


NCU_SCRIPT = """
import sys, torch, hrmloss
n, v = int(sys.argv[1]), int(sys.argv[2])
g = torch.Generator(device="cuda").manual_seed(0)
s = torch.randn(n, v, generator=g, device="cuda", dtype=torch.bfloat16).mul_(2).requires_grad_()
t = torch.randn(n, v, generator=g, device="cuda", dtype=torch.bfloat16).mul_(2)
y = torch.randint(0, v, (n,), device="cuda")
loss = hrmloss.hrm_loss(s, t, y, 0.5, kl="jsd")   # all three passes: stats, jsd, grad
torch.autograd.grad(loss, s)
torch.cuda.synchronize()
"""


def stage_ncu(args, budget, save):
    ncu = shutil.which("ncu")
    if ncu is None or args.device != "cuda":
        return dict(unavailable="ncu not found" if ncu is None else "ncu profiles CUDA only")
    n, v = TINY_NCU_SHAPE if args.tiny else NCU_SHAPE
    metrics = "gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed," \
              "sm__inst_issued.avg.pct_of_peak_sustained_active,launch__registers_per_thread"
    cmd = [ncu, "--csv", "--kernel-name", "regex:_hrm_", "--metrics", metrics, sys.executable, "-c", NCU_SCRIPT,
           str(n), str(v)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('"')]
    return dict(shape=[n, v], returncode=proc.returncode, csv=lines[:40], stderr=proc.stderr[-1000:])


def stage_demo(args, budget, save):
    from hrmloss.runs import demo
    cfg = demo.DemoConfig(device=args.device, progress=False)
    # the dry run: fewer steps than quick() (the code path; the CPU demo has its own tests)
    cfg = dataclasses.replace(cfg.quick(), ref_steps=8, steps=8, n_evals=2, hrms=(0.5,)) if args.tiny \
        else cfg.for_device()
    t0 = time.perf_counter()
    _paths, text = demo.main(out=str(pathlib.Path(args.out) / "demo"), cfg=cfg, formats=("png",))
    return dict(seconds=time.perf_counter() - t0, summary=text[:3000])


def _stage_path(out, name):
    return pathlib.Path(out) / f"{name}.json"


def _machine(args):
    from . import gpu
    return gpu.machine(_device(args))


def run_stage(args):
    """In the child process: one stage, its result written to DIR/<stage>.json (and after each step of a
    stage that saves partial results, with status "partial", so that a cut-off keeps them)."""
    path, t0 = _stage_path(args.out, args.stage), time.perf_counter()
    machine = _machine(args)

    def write(result, status):
        path.write_text(json.dumps(dict(result, stage=args.stage, status=status, machine=machine,
                                        seconds=time.perf_counter() - t0), indent=1, default=str))
    result = globals()[f"stage_{args.stage}"](args, STAGES[args.stage], lambda r: write(r, "partial"))
    status = "unavailable" if "unavailable" in result else "done"
    write(result, "failed" if result.get("ok") is False else status)


def session(args):
    """Every stage in order, each in a child process under its budget; skip those done in DIR."""
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, budget in STAGES.items():
        path = _stage_path(out, name)
        if path.exists() and json.loads(path.read_text()).get("status") in ("done", "unavailable"):
            print(f"{name}: already done in {out}, skipped", flush=True)
            continue
        path.unlink(missing_ok=True)
        if name == "ncu" and (shutil.which("ncu") is None or args.device != "cuda"):   # no child to start
            path.write_text(json.dumps(dict(stage=name, status="unavailable", seconds=0.0,
                                            unavailable="ncu not found" if args.device == "cuda" else
                                            "ncu profiles CUDA only")))
            print(f"{name}: unavailable", flush=True)
            continue
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--stage", name, "--out", str(out), "--device", args.device]
        cmd += ["--tiny"] if args.tiny else []
        t0 = time.perf_counter()
        print(f"{name}: budget {budget} s", flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=budget, capture_output=True, text=True)
            if proc.returncode != 0 or not path.exists():
                path.write_text(json.dumps(dict(stage=name, status="error", returncode=proc.returncode,
                                                stderr=proc.stderr[-3000:], seconds=time.perf_counter() - t0)))
        except subprocess.TimeoutExpired:
            kept = json.loads(path.read_text()) if path.exists() else {}
            path.write_text(json.dumps(dict(kept, stage=name, status="over budget", seconds=budget,
                                            note=f"cut off at its budget of {budget} s"), default=str))
        print(f"{name}: {json.loads(path.read_text())['status']} in {time.perf_counter() - t0:.0f} s", flush=True)
    result = collect(out)
    (out / "session.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "session.md").write_text(markdown(result))
    return result


def collect(out):
    stages = {}
    for name in STAGES:
        path = _stage_path(out, name)
        stages[name] = json.loads(path.read_text()) if path.exists() else dict(status="not run")
    machine = next((s["machine"] for s in stages.values() if "machine" in s), {})
    return dict(machine=machine, stages=stages, budgets=STAGES)


def markdown(result):
    m, st = result["machine"], result["stages"]
    out = [f"## GPU session: {m.get('name', 'unknown device')}\n",
           f"`python -m benchmarks.gpu --session`: torch {m.get('torch')}, triton {m.get('triton')}"
           + (f", {m['sms']} SMs" if "sms" in m else "") + ". Stages (budget s): "
           + ", ".join(f"{k} ({v}): {st[k].get('status')}" for k, v in result["budgets"].items()) + ".\n"]
    c = st["correctness"]
    if "summary" in c:
        failures = "".join(f"\n- {f}" for f in c["failures"])
        out.append(f"Correctness (`{c['command']}`): {c['summary']}{failures}\n")
    loss = st["loss"]
    if "rows" in loss:
        copy = f"{loss['copy_gbs']:.0f} GB/s" if "copy_gbs" in loss else "not measured"
        out.append(f"Loss ({loss['status']}), copy bandwidth {copy}:\n")
        out += ["| N x V dtype | provider | pass | median ms | GB/s | % copy |", "|" + " --- |" * 6]
        for r in loss["rows"]:
            cell = (f"{r['median_ms']:.3f} | {r['gbs']:.0f} | {r['of_copy']:.0%}" if "median_ms" in r
                    else f"{r.get('error', '-')} | - | -")
            out.append(f"| {r.get('n')} x {r.get('v')} {r.get('dtype')} | {r['provider']} | {r.get('mode')} | {cell} |")
        out += [""] + [f"- {note}" for note in loss.get("skipped", [])] + [""]
    lin = st["linear"]
    if "rows" in lin:
        out.append("Fused linear + loss, forward + backward, against the GEMM floor of the same run:\n")
        out += ["| provider | N x V x H dtype | median ms | TFLOP/s (4 GEMMs) | x floor |", "|" + " --- |" * 5]
        for r in lin["rows"]:
            if "error" in r:
                out.append(f"| {r['provider']} | wrong loss: {r['error']} | - | - | - |")
            elif "median_ms" in r:
                out.append(f"| {r['provider']} | {r['n']} x {r['v']} x {r['hidden']} {r['dtype']} | "
                           f"{r['median_ms']:.2f} | {r['tflops']:.0f} | {r.get('of_floor', float('nan')):.2f} |")
            else:
                out.append(f"| {r['provider']} | {r['note']} | - | - | - |")
        out.append("")
    ncu = st["ncu"]
    csv = "\n```\n" + "\n".join(ncu.get("csv", [])) + "\n```"
    out.append("ncu: " + (ncu.get("unavailable") or ncu.get("note") or csv) + "\n")
    d = st["demo"]
    out.append(f"Demo: {d['seconds']:.0f} s." if "seconds" in d else f"Demo: {d.get('note') or d.get('status')}.")
    return "\n".join(out) + "\n"


def merge(directory, doc=ROOT / "docs" / "performance.md"):
    """DIR/session.md into the GPU-session section of docs/performance.md."""
    from .report import replace_section
    replace_section(str(doc), BEGIN, END, (pathlib.Path(directory) / "session.md").read_text())
    return doc


def add_arguments(ap):
    ap.add_argument("--session", action="store_true", help="the GPU session: stages under budgets into --out DIR")
    ap.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    ap.add_argument("--merge", metavar="DIR", help="merge DIR/session.md into docs/performance.md")

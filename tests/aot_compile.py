"""The static cost table of the Triton kernels, without a GPU: compile every kernel variant ahead of time
for real GPUs (TARGETS: sm_80, sm_90, sm_100, sm_120; gfx90a, gfx942, gfx950, gfx1100) and read
registers, spills and the instructions per element of its innermost loop (SASS on NVIDIA, tests/sass.py;
VALU from the AMDGCN text on AMD, tests/amdgcn.py), with the MUFU (transcendental) operations per element.
Run in a process where TRITON_INTERPRET is unset:

    python -m tests.aot_compile --json             # one JSON line per variant: the full table
    python -m tests.aot_compile --json --subset    # V = 128256 only (what tests/test_aot_compile.py runs)
    python -m tests.aot_compile --markdown --subset --targets sm_90,gfx942 --jobs 2   # while iterating
    python -m tests.aot_compile --update docs/performance.md   # replace that file's static-cost section

Each variant uses the configuration that the launcher (hrmloss/kernels/launch.py) picks for its V, dtype
and target (warp size; PTX or not), and is compiled as the JIT compiles it for aligned tensors: pointers
and the integer arguments in `divisible` 16-divisible, TRITON_DEFAULT_FP_FUSION=1 (set here unless given).
The fields `signature`, `constexprs`, `divisible`, `num_warps` and `options` of a row recompile the same
binary from `module`.`kernel` (`cubin_sha256`, of the hsaco on AMD). Compiles with identical inputs
(every V here gets the same configuration) run once, over --jobs processes (triton's on-disk cache makes
a second run fast). A variant that does not build is a row with `error`; the command then exits 1.

Budgets (issues 12 and 22, docs/performance.md), held on sm_80, sm_90 and gfx942: instructions per
element of the loop <= 30 (stats, T = 1), 36 (stats, T != 1 or a truncated reference), 36 (jsd), 45
(grad), for every variant users run except the reference gradient's; gfx942's reading passes <= 30 VALU;
at most 64 registers a thread (or an occupancy >= 50 %); no spills.
"""
import argparse
import concurrent.futures
import importlib
import itertools
import json
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hrmloss.kernels.launch import launch_config, read_config  # noqa: E402
from hrmloss.kernels import grad, jsd, stats  # noqa: E402

from benchmarks.report import replace_section  # noqa: E402

from . import amdgcn, sass  # noqa: E402

# target name -> (backend, arch); the warp size follows (32 on NVIDIA and RDNA, 64 on CDNA)
TARGETS = {"sm_80": ("cuda", 80), "sm_90": ("cuda", 90), "sm_100": ("cuda", 100), "sm_120": ("cuda", 120),
           "gfx90a": ("hip", "gfx90a"), "gfx942": ("hip", "gfx942"), "gfx950": ("hip", "gfx950"),
           "gfx1100": ("hip", "gfx1100")}
BUDGET_TARGETS = ("sm_80", "sm_90", "gfx942")   # where the budgets below are held (the others: reported)
VS = (32000, 128256, 151936, 262144)
SUBSET_VS = (128256,)
DTYPES = ("bf16", "fp32")
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OWN_DTYPE_PTRS = {"s_ptr", "t_ptr", "ds_ptr", "dt_ptr"}  # pointers in the logits' dtype
# integer arguments that are multiples of 16 for aligned (B, T, V) logits with V % 16 == 0 and an
# unsharded vocabulary (vocab_start = 0); ignore_index (-100) is not
DIVISIBLE_INTS = ("s_stride_b", "s_stride_t", "t_stride_b", "t_stride_t", "ds_stride_b", "ds_stride_t",
                  "dt_stride_b", "dt_stride_t", "T_rows", "V", "vocab_start", "vocab_size", "split_cols")

# the reference's form: a dense reference of V columns; a sparse teacher of K = 64 ids whose rest mass is
# summed (REST); a dense reference of fewer columns (CUT, ref_vocab="truncate")
DENSE = dict(HAS_REF=True, REST=False, CUT=False, K_PAD=1)
TOPK = dict(HAS_REF=False, REST=True, CUT=False, K_PAD=64)
# no reference read at all: the CE family alone (ref_logits=None), and a sparse teacher whose rest mass is
# not needed (renorm forward, renorm_both): the student's row only
NO_REF = dict(HAS_REF=False, REST=False, CUT=False, K_PAD=1)
CUT = dict(DENSE, CUT=True)
# role -> (kernel, [constexpr variants]); BLOCK_V (and ELEMS), and PTX, come from the launcher's rules
ROLES = {
    "stats": (stats._hrm_stats_kernel, [dict(SCALED=sc, SOFTCAP=cap, **DENSE) for cap in (False, True)
                                    for sc in (False, True)]
              + [dict(SCALED=False, SOFTCAP=False, **TOPK), dict(SCALED=False, SOFTCAP=False, **CUT),
                 dict(SCALED=False, SOFTCAP=False, **NO_REF)]),
    "jsd": (jsd._hrm_jsd_kernel, [dict(SCALED=sc, SOFTCAP=cap, CUT=False) for cap in (False, True)
                                for sc in (False, True)]
            + [dict(SCALED=False, SOFTCAP=False, CUT=True)]),
    "grad": (grad._hrm_grad_kernel,
             [dict(KIND=0, SCALED=sc, SOFTCAP=cap, READ_REF=True, REF_GRAD=rg, **DENSE)
              for rg in (False, True) for cap in (False, True) for sc in (False, True)]
             + [dict(KIND=k, SCALED=False, SOFTCAP=False, READ_REF=True, REF_GRAD=False, **DENSE) for k in (1, 2)]
             + [dict(KIND=0, SCALED=False, SOFTCAP=False, READ_REF=False, REF_GRAD=False, **DENSE)]
             + [dict(KIND=0, SCALED=False, SOFTCAP=False, READ_REF=False, REF_GRAD=False, **TOPK),
                dict(KIND=2, SCALED=False, SOFTCAP=False, READ_REF=True, REF_GRAD=False, **CUT),
                dict(KIND=0, SCALED=False, SOFTCAP=False, READ_REF=False, REF_GRAD=False, **NO_REF)]),
}
# instructions per element of the innermost loop: SASS on NVIDIA, VALU on AMD (tests/amdgcn.py derives
# gfx942's: ~30 for a bf16 pass reading two tensors, like sm_90's); fp32 reads twice the bytes
LOOP_TARGETS = {("stats", False): 30, ("stats", True): 36, ("jsd", False): 36, ("jsd", True): 36,
                ("grad", False): 45, ("grad", True): 45}
AMD_READ_BUDGET = 30   # gfx942: 64 lanes a clock x 4 bytes an element / 8.3 bytes a clock (tests/amdgcn.py)
MAX_REGS, MIN_OCCUPANCY = 64, 0.5
# the special-function unit: 16 MUFU operations a clock per SM (exp2, lg2, rcp); an SM's share of DRAM
# bandwidth at the ~1.755 GHz these parts hold under load: H100 SXM 3.35 TB/s / 132 SMs, H200 4.8 TB/s
MUFU_PER_CLOCK = 16
SM_BYTES_PER_CLOCK = {"H100": 3.35e12 / (132 * 1.755e9), "H200": 4.8e12 / (132 * 1.755e9)}


def signature(fn, dtype):
    """The ASTSource signature of a kernel for logits of `dtype` and int64 labels."""
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in OWN_DTYPE_PTRS else \
                ("*i64" if name in ("y_ptr", "ids_ptr") else "*fp32")
        elif "stride" in name:
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def warp_size(target):
    backend, arch = TARGETS[target]
    return amdgcn.WARP_SIZE[arch] if backend == "hip" else 32


def config(role, V, dtype, target="sm_90"):
    """(constexprs from the launcher, num_warps, per_iteration) for a role at vocabulary V on a target."""
    w = warp_size(target)
    ptx = {"PTX": TARGETS[target][0] == "cuda"} if role != "stats" else {}
    if role == "grad":
        block, warps = launch_config(V, w)
        return dict(BLOCK_V=block, **ptx), warps, block
    block, elems, warps = read_config(V, ELEM_BYTES[dtype], w)
    return dict(BLOCK_V=block, ELEMS=elems, **ptx), warps, block


def bytes_per_element(role, cx, dtype):
    """DRAM bytes a pass moves per vocabulary element: the tensors it reads and writes (a truncated
    reference counted whole: an upper bound)."""
    if role == "grad":
        tensors = 1 + 1 + bool(cx["READ_REF"]) + bool(cx["REF_GRAD"])   # s, ds, t, dt
    else:
        tensors = 1 + bool(cx.get("HAS_REF", True))                    # s, t
    return tensors * ELEM_BYTES[dtype]


def mufu_bound(nbytes, part):
    """MUFU operations per element that keep a pass moving `nbytes` per element DRAM-bound on `part`."""
    return MUFU_PER_CLOCK * nbytes / SM_BYTES_PER_CLOCK[part]


def target_of(role, cx, target):
    """The loop budget of a variant on a budget target, or None: the dense budgets hold for every variant
    users run (soft cap, sparse teacher: the same as dense; a truncated reference: T != 1's, for its
    second logsumexp); reference-gradient variants (a fourth tensor) are reported only. On gfx942 the
    reading passes get the derived ~30 whatever T (tests/amdgcn.py), the gradient pass 45."""
    if cx.get("REF_GRAD"):
        return None
    scaled = cx["SCALED"] or cx.get("CUT", False)
    goal = LOOP_TARGETS[(role, scaled)]
    if TARGETS[target][0] == "hip" and role != "grad":
        goal = min(goal, AMD_READ_BUDGET)
    return goal


def _compile(job):
    """One compile (in a worker process): (key, report)."""
    key, module, name, sig, constexprs, warps, per_iteration, target, divisible = job
    fn = getattr(importlib.import_module(module), name)
    backend, arch = TARGETS[target]
    if backend == "hip":
        r = amdgcn.loop_report(fn, sig, constexprs, warps, per_iteration, arch=arch, divisible=divisible)
        r["occupancy"] = amdgcn.occupancy(r["regs"], warps, arch)
    else:
        r = sass.loop_report(fn, sig, constexprs, warps, per_iteration, cc=arch, divisible=divisible)
        r["occupancy"] = sass.occupancy(r["regs"], warps)
    r.pop("loops", None)
    return key, r


def jobs_and_rows(vs, targets, dtypes):
    """The distinct compiles, and per table row its fields and the key of its compile."""
    jobs, rows = {}, []
    for (role, (fn, variants)), target, dtype, V in itertools.product(ROLES.items(), targets, dtypes, vs):
        name = fn.fn.__name__
        sig = signature(fn, dtype)
        divisible = [n for n in DIVISIBLE_INTS if n in sig and (n not in ("V", "vocab_size") or V % 16 == 0)]
        launch, warps, per_iteration = config(role, V, dtype, target)
        for cx in variants:
            constexprs = dict(cx, **launch)
            key = json.dumps([name, target, sig, constexprs, warps, divisible])
            jobs.setdefault(key, (key, fn.fn.__module__, name, sig, constexprs, warps, per_iteration, target,
                                  divisible))
            backend, arch = TARGETS[target]
            rows.append((key, dict(
                module=fn.fn.__module__, kernel=name, role=role, scaled=cx["SCALED"], softcap=cx["SOFTCAP"],
                ref_grad=cx.get("REF_GRAD", False), target=target, backend=backend,
                cc=arch if backend == "cuda" else None, dtype=dtype, V=V, num_warps=warps,
                warp_size=warp_size(target), constexprs=constexprs, signature=sig, divisible=divisible,
                options={}, per_iteration=per_iteration, bytes_per_element=bytes_per_element(role, cx, dtype))))
    return list(jobs.values()), rows


def rows(vs=VS, targets=tuple(TARGETS), dtypes=DTYPES, workers=1):
    """Yield one dict per variant, target, dtype and V; each distinct compile runs once, over `workers`
    processes. A variant that does not build is a row with `error` (and no counts)."""
    jobs, table = jobs_and_rows(vs, targets, dtypes)
    reports = {}
    if workers > 1:
        with concurrent.futures.ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(_compile, job): job[0] for job in jobs}
            for f in concurrent.futures.as_completed(futures):
                reports[futures[f]] = _result(f.result, futures[f])
    else:
        for job in jobs:
            reports[job[0]] = _result(lambda job=job: _compile(job), job[0])
    for key, row in table:
        r = reports[key]
        if "error" in r:
            yield dict(row, error=r["error"], met=False)
            continue
        held = row["target"] in BUDGET_TARGETS
        goal = target_of(row["role"], row["constexprs"], row["target"]) if held else None
        nb = row["bytes_per_element"]
        yield dict(row, regs=r["regs"], spill_bytes=r["spill_bytes"], loop_per_element=r["per_element"],
                   occupancy=r["occupancy"], loop_target=goal,
                   met=None if goal is None else bool(
                       r["per_element"] <= goal and r["spill_bytes"] == 0
                       and (r["regs"] <= MAX_REGS or r["occupancy"] >= MIN_OCCUPANCY)),
                   mufu_per_element=r["mufu_per_element"],
                   mufu_bound={part: round(mufu_bound(nb, part), 1) for part in SM_BYTES_PER_CLOCK},
                   sgprs=r.get("sgprs"), all_per_element=r.get("all_per_element"),
                   mix=r["mix"], cubin_sha256=r["cubin_sha256"])


def _result(call, key):
    try:
        return call()[1]
    except Exception as e:  # a variant that does not build: reported, and the test fails on it
        return dict(error=f"{type(e).__name__}: {str(e)[-2000:]}")


def _variant(r):
    cx = r["constexprs"]
    parts = ["T != 1" if r["scaled"] else "T = 1"]
    if r["role"] == "grad":
        parts.insert(0, ("forward", "reverse", "jsd")[cx["KIND"]] + ("" if cx["READ_REF"] else ", hrm = 0"))
    if r["softcap"]:
        parts.append("softcap")
    if r["ref_grad"]:
        parts.append("ref grad")
    if not cx.get("HAS_REF", True):
        parts.append("top-k teacher, rest mass" if cx.get("REST") else "top-k teacher")
    if cx.get("CUT"):
        parts.append("truncated reference")
    return ", ".join(parts)


def markdown(all_rows):
    """The table, one per target: a line per variant and dtype; the Vs that share its numbers in one cell."""
    out = []
    for target in dict.fromkeys(r["target"] for r in all_rows):
        amd = TARGETS[target][0] == "hip"
        groups = {}
        for r in (r for r in all_rows if r["target"] == target):
            key = (r["role"], _variant(r), r["dtype"], r["num_warps"], json.dumps(r["constexprs"]),
                   r.get("error"), r.get("loop_per_element"), r.get("regs"), r.get("spill_bytes"), r["met"])
            groups.setdefault(key, []).append(r)
        count = "VALU / element" if amd else "instr / element"
        mufu = "transc. / element" if amd else "MUFU / element (H100, H200 bound)"
        regs = "VGPRs / SGPRs" if amd else "regs"
        out += [f"### {target}" + (f" (wavefronts of {next(iter(groups.values()))[0]['warp_size']})" if amd else ""),
                "", f"| pass | variant | dtype | V | BLOCK_V x warps | {count} | target | {mufu} | {regs} | "
                "occupancy | spills | met |", "|" + " --- |" * 12]
        for rs in groups.values():
            r = rs[0]
            vs = ", ".join(str(x["V"]) for x in rs)
            launch = f"{r['constexprs']['BLOCK_V']} x {r['num_warps']}"
            if "ELEMS" in r["constexprs"]:
                launch += f" ({r['constexprs']['ELEMS']} / thread)"
            head = f"| {r['role']} | {_variant(r)} | {r['dtype']} | {vs} | {launch} |"
            if "error" in r:
                out.append(head + f" does not build: {r['error'].splitlines()[0][:120]} |" + " - |" * 6 + " **no** |")
                continue
            met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
            bound = "" if amd else " ({H100}, {H200})".format(**r["mufu_bound"])
            reg = f"{r['regs']} / {r['sgprs']}" if amd else f"{r['regs']}"
            out.append(head + f" {r['loop_per_element']} | {r['loop_target'] or '-'} | {r['mufu_per_element']}{bound}"
                       f" | {reg} | {r['occupancy']:.0%} | {r['spill_bytes']} | {met} |")
        out.append("")
    return "\n".join(out)


# the predictions: one shape, the two parts; an SM issues 4 x 32 thread-instructions a clock
PREDICT_SHAPE = (16384, 128256)
PART_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}
SMS, CLOCK, ISSUE_PER_CLOCK = 132, 1.755e9, 4 * 32
COPY_FRACTION = 0.9   # the copy bandwidth measured on an H100 (3.02 TB/s) over its peak (3.35 TB/s)


def predict(r, part, shape=PREDICT_SHAPE):
    """Predicted milliseconds of one pass (a sm_90 row) on `part` at `shape`: the largest of its DRAM time
    (its bytes at COPY_FRACTION of the peak bandwidth), its issue time (instructions per element over
    132 SMs x 128 lanes x 1.755 GHz) and its MUFU time (16 a clock per SM): (ms, the bound)."""
    elements = shape[0] * shape[1]
    times = {"DRAM": elements * r["bytes_per_element"] / (COPY_FRACTION * PART_BANDWIDTH[part]),
             "issue": elements * r["loop_per_element"] / (SMS * ISSUE_PER_CLOCK * CLOCK),
             "MUFU": elements * r["mufu_per_element"] / (SMS * MUFU_PER_CLOCK * CLOCK)}
    bound = max(times, key=times.get)
    return times[bound] * 1e3, bound


def predictions(all_rows):
    """The markdown table of predicted pass times, bf16 at PREDICT_SHAPE, from the sm_90 rows."""
    n, v = PREDICT_SHAPE
    out = [f"| pass | variant | bytes / element | instr / element | MUFU / element | H100 ms (bound) | "
           f"H200 ms (bound) |", "|" + " --- |" * 7]
    seen = set()
    for r in all_rows:
        if r["target"] != "sm_90" or r["dtype"] != "bf16" or "error" in r or (r["role"], _variant(r)) in seen:
            continue
        seen.add((r["role"], _variant(r)))
        cells = []
        for part in PART_BANDWIDTH:
            ms, bound = predict(r, part)
            cells.append(f"{ms:.2f} ({bound})")
        out.append(f"| {r['role']} | {_variant(r)} | {r['bytes_per_element']} | {r['loop_per_element']} | "
                   f"{r['mufu_per_element']} | {' | '.join(cells)} |")
    return "\n".join(out) + "\n"


BEGIN = "<!-- static-cost: written by python -m tests.aot_compile --update; do not edit -->"
END = "<!-- /static-cost -->"


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per compiled variant")
    ap.add_argument("--subset", action="store_true", help=f"V in {SUBSET_VS} only")
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compiling processes")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table")
    ap.add_argument("--update", metavar="PATH", help="replace the static-cost section of this markdown file")
    args = ap.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        sys.exit(f"--targets: unknown {sorted(unknown)}; expected some of {list(TARGETS)}")
    collected = []
    for r in rows(SUBSET_VS if args.subset else VS, targets, workers=args.jobs):
        collected.append(r)
        if args.json or not (args.markdown or args.update):
            print(json.dumps(r), flush=True)
    if args.markdown:
        print(predictions(collected) + "\n" + markdown(collected))
    if args.update:
        replace_section(args.update, BEGIN, END, SECTION_HEAD + PREDICT_HEAD + predictions(collected) + "\n"
                        + TABLE_HEAD + markdown(collected))
        print(f"replaced the static-cost section of {args.update}", file=sys.stderr)
    failed = [r for r in collected if "error" in r]
    for r in failed:
        print(f"does not build: {r['kernel']} {r['target']} {r['dtype']} {r['constexprs']}: {r['error']}",
              file=sys.stderr)
    return 1 if failed else 0


PREDICT_HEAD = f"""\
### Predicted pass times on an H100 and an H200 (predictions, not measurements)

Each pass at {PREDICT_SHAPE[0]} x {PREDICT_SHAPE[1]} bf16, from the sm_90 counts below: the largest of
its DRAM time (the bytes it moves at {COPY_FRACTION:.0%} of the peak: 3.35 TB/s H100, 4.8 TB/s H200; an
H100's copy reached 3.02 TB/s), its issue time (instructions per element over 132 SMs x 128 lanes x
1.755 GHz) and its MUFU time (16 a clock per SM). The first GPU session (benchmarks/session.py) confirms
or refutes them. The only measurement so far (H100, the kernels before the per-thread rewrite, section
above): stats 7.34 ms, grad 4.34 ms; the same shape's stats pass is predicted here at the DRAM bound.

"""
TABLE_HEAD = """\
### The table per target

"""

SECTION_HEAD = """\
## Static cost of the Triton kernels on every target (no GPU needed)

Regenerated by `python -m tests.aot_compile --update docs/performance.md` (triton's own ptxas and
cuobjdump for NVIDIA, its own LLVM and lld for AMD: no GPU, no CUDA or ROCm install). Every pass is
compiled for sm_80, sm_90, sm_100, sm_120, gfx90a (MI250), gfx942 (MI300), gfx950 (MI350) and gfx1100
(RDNA3) as the launcher configures it for V: 256 threads a program (8 warps of 32; 4 wavefronts of 64 on
CDNA), aligned tensors, `TRITON_DEFAULT_FP_FUSION=1`. tests/test_aot_compile.py compiles all of them at
V = 128256 in CI and fails on any variant that does not build.

**Portable kernels.** The only inline assembly, the fast log2 of the JSD passes (`lg2.approx.ftz`, one
MUFU.LG2), is chosen at compile time by the constexpr `PTX` that the launcher sets from the device's target
(`hrmloss.kernels.launch.device_target`: NVIDIA true; AMD, other backends and the interpreter, detected at
launch, false). Elsewhere `tl.log2` (on AMD v_log_f32 with its denormal scaling). Both meet the contract
the kernels rely on: absolute error < 2^-22 for a normal argument, a subnormal one flushed to -inf or
exact; the only caller (the JSD mixture's log) passes arguments >= the smallest normal fp32.

**Soft cap.** s = c tanh(s_raw / c) = c - 2c r with r = 1 / (2^(2 log2(e) s_raw / c) + 1): one FMUL, one
exp2, one FADD, one fast reciprocal (`tl.math.fdiv(..., approx=True)`: MUFU.RCP on NVIDIA, v_rcp_f32 on
AMD) and one FFMA an element, with 2 log2(e) / c computed once a program and d s / d s_raw = 4 r (1 - r).
Before: two IEEE divisions an element (39.5 / 46.1 instructions per element in stats / grad at sm_90
bf16). Accuracy against float64 (tests/test_softcap_accuracy.py, IEEE exp2 and reciprocal):
|s - c tanh| <= 2.2e-7 c, |d s / d s_raw - (1 - tanh^2)| <= 3.4e-7 for c in 5 ... 50 and |s_raw| <= 60 c;
on a GPU, ex2.approx (2 ulp) and rcp.approx (1 ulp) add at most ~2^-21 c.

**Budgets.** NVIDIA (tests/sass.py, issue 12): an H100 issues 132 SMs x 128 lanes x 1.755 GHz = 2.96e13
thread-instructions a second against ~3.0 TB/s, so a pass moving B bytes an element stays DRAM-bound
under ~8.7 B instructions per element at realistic efficiencies: stats <= 30 at T = 1 and <= 36 at T != 1
or with a truncated reference (a second logsumexp), jsd <= 36, grad <= 45, held for the soft-cap and
sparse-teacher variants too; reference-gradient variants are reported. gfx942 (tests/amdgcn.py): a CU
retires one wave64 VALU instruction a clock (64 fp32 lanes) and reads 5.3 TB/s / (304 CUs x 2.1 GHz) =
8.3 bytes a clock, 2.1 elements of a bf16 pass reading two tensors: <= 64 / 2.1 ~ 30 VALU instructions per
element for the reading passes whatever T, 45 for grad (6 bytes an element: ~46). Held on sm_80, sm_90
and gfx942, with <= 64 registers a thread (VGPRs on AMD) or an occupancy >= 50 %, and no spills.

**Where a budget is missed, and why** (the "met" column). The soft-capped stats pass at T = 1: 30.2
(sm_90 bf16) against 30, after 39.5; the cap's floor is 6 instructions an element (FMUL, MUFU.EX2, FADD,
MUFU.RCP, FFMA, and the FSEL that puts -inf at masked lanes), which only a mask-free loop over whole
blocks (the masked tail peeled off) would remove; at T != 1 it meets 36. fp32 rows are held to the bf16
budgets although they move twice the bytes (a DRAM-bound fp32 pass has ~70): the fp32 soft-capped (31.5)
and truncated-reference (36.5) stats passes miss those, not their own bytes' budget. gfx942: the top-k
teacher's passes (46 / 53 VALU, 79 / 110 VGPRs) pay for `tl.histogram` (the ids' lanes in a block), which
triton lowers on AMD to per-bin ballots over 64-wide wavefronts (139 v_and + 64 v_bcnt per 8 elements);
a per-row bitmask of the ids, or a loop over a sorted row's ids falling in the block, would avoid it.
gfx942's soft-capped stats at T != 1 (32-33) and truncated reference (30.2-32) sit just over the derived
30, which has no margin (it is the full-issue bound).

**MUFU.** The special-function unit does 16 exp2 / lg2 / rcp a clock per SM. An H100 SM's share of
3.35 TB/s at 1.755 GHz is 14.5 bytes a clock, so a pass moving B bytes an element stays DRAM-bound under
16 B / 14.5 MUFU operations per element (bf16 stats, 4 bytes: 4.4; grad, 6 bytes: 6.6); an H200 (4.8 TB/s,
20.7 bytes a clock): 3.1 and 4.6. The table gives the count and both bounds. Where a variant is over
(soft cap at T != 1 in stats: 5.4 per element, 2 more than without the cap; the soft-capped JSD pass:
5.0), the exp2 of the tanh would have to move to the FMA pipes (a degree-5 polynomial on the fraction
plus an exponent shift, ~8 instructions for 1 MUFU), which the instruction budget of those variants
does not leave room for: on an H100 the soft-capped stats pass at T != 1 is predicted MUFU-bound.

"""


if __name__ == "__main__":
    sys.exit(main())

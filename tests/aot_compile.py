"""The static cost table of the Triton kernels, without a GPU: compile every kernel variant ahead of time
for real GPUs (sm_80, sm_90) and read registers, spills and the SASS instructions per element of its
innermost loop (tests/sass.py). Run in a process where TRITON_INTERPRET is unset:

    python -m tests.aot_compile --json             # one JSON line per variant: the full table
    python -m tests.aot_compile --json --subset    # V = 128256 only (what tests/test_aot_compile.py runs)
    python -m tests.aot_compile --markdown         # the table as markdown
    python -m tests.aot_compile --update docs/performance.md   # replace that file's static-cost section

Each variant uses the configuration that the launcher (hrmloss/kernels/launch.py) picks for its V and dtype, and
is compiled as the JIT compiles it for aligned tensors: pointers and the integer arguments in `divisible`
16-divisible, TRITON_DEFAULT_FP_FUSION=1 (set here unless given). The fields `signature`, `constexprs`,
`divisible`, `num_warps` and `options` of a row recompile the same cubin from `module`.`kernel`
(`cubin_sha256`). Compiles with identical inputs (every V here gets the same configuration) run once.

The targets (issue 12, docs/performance.md) apply to the variants without soft cap and without the
reference's gradient: instructions per element of the loop <= 30 (stats, T = 1), 36 (stats, T != 1), 36
(jsd), 45 (grad); at most 64 registers a thread at 8 warps (or an occupancy >= 50 %); no spills.
"""
import argparse
import itertools
import json
import os
import sys

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

from hrmloss.kernels.launch import launch_config, read_config  # noqa: E402
from hrmloss.kernels import grad, jsd, stats  # noqa: E402

from benchmarks.report import replace_section  # noqa: E402

from .sass import loop_report, occupancy  # noqa: E402

CCS = (80, 90)
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
# role -> (kernel, [constexpr variants]); BLOCK_V (and ELEMS) come from the launcher
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
LOOP_TARGETS = {("stats", False): 30, ("stats", True): 36, ("jsd", False): 36, ("jsd", True): 36,
                ("grad", False): 45, ("grad", True): 45}
MAX_REGS, MIN_OCCUPANCY = 64, 0.5


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


def config(role, V, dtype):
    """(constexprs from the launcher, num_warps, per_iteration) for a role at vocabulary V."""
    if role == "grad":
        block, warps = launch_config(V)
        return dict(BLOCK_V=block), warps, block
    block, elems, warps = read_config(V, ELEM_BYTES[dtype])
    return dict(BLOCK_V=block, ELEMS=elems), warps, block


def target(role, cx):
    """The loop target of a variant, or None (soft cap, reference-gradient, sparse-teacher and cut variants
    are reported only)."""
    if cx.get("SOFTCAP") or cx.get("REF_GRAD") or not cx.get("HAS_REF", True) or cx.get("CUT"):
        return None
    return LOOP_TARGETS[(role, cx["SCALED"])]


def rows(vs=VS, ccs=CCS, dtypes=DTYPES):
    """Yield one dict per compiled variant."""
    cache = {}
    for (role, (fn, variants)), cc, dtype, V in itertools.product(ROLES.items(), ccs, dtypes, vs):
        name = fn.fn.__name__
        sig = signature(fn, dtype)
        divisible = [n for n in DIVISIBLE_INTS if n in sig and (n not in ("V", "vocab_size") or V % 16 == 0)]
        launch, warps, per_iteration = config(role, V, dtype)
        for cx in variants:
            constexprs = dict(cx, **launch)
            key = (name, cc, json.dumps(sig), json.dumps(constexprs), warps, tuple(divisible))
            if key not in cache:
                cache[key] = loop_report(fn, sig, constexprs, warps, per_iteration, cc=cc, divisible=divisible)
            r = cache[key]
            occ = occupancy(r["regs"], warps)
            goal = target(role, cx)
            yield dict(module=fn.fn.__module__, kernel=name, role=role, scaled=cx["SCALED"], softcap=cx["SOFTCAP"],
                       ref_grad=cx.get("REF_GRAD", False), cc=cc, dtype=dtype, V=V, num_warps=warps,
                       constexprs=constexprs, signature=sig, divisible=divisible, options={},
                       per_iteration=per_iteration, regs=r["regs"], spill_bytes=r["spill_bytes"],
                       loop_per_element=r["per_element"], occupancy=occ, loop_target=goal,
                       met=None if goal is None else bool(
                           r["per_element"] <= goal and r["spill_bytes"] == 0
                           and (r["regs"] <= MAX_REGS or occ >= MIN_OCCUPANCY)),
                       mix=r["mix"], cubin_sha256=r["cubin_sha256"])


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
    """The table: one line per variant, dtype and target; the Vs that share its numbers in one cell."""
    groups = {}
    for r in all_rows:
        key = (r["role"], _variant(r), r["dtype"], r["cc"], r["num_warps"], json.dumps(r["constexprs"]),
               r["loop_per_element"], r["regs"], r["spill_bytes"], r["met"], r["loop_target"])
        groups.setdefault(key, []).append(r)
    out = ["| pass | variant | dtype | sm | V | BLOCK_V x warps | instr / element | target | regs | "
           "occupancy | spills | met |", "|" + " --- |" * 12]
    for key, rs in groups.items():
        r = rs[0]
        launch = f"{r['constexprs']['BLOCK_V']} x {r['num_warps']}"
        if "ELEMS" in r["constexprs"]:
            launch += f" ({r['constexprs']['ELEMS']} / thread)"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
        out.append(f"| {r['role']} | {_variant(r)} | {r['dtype']} | {r['cc']} | "
                   f"{', '.join(str(x['V']) for x in rs)} | {launch} | {r['loop_per_element']} | "
                   f"{r['loop_target'] or '-'} | {r['regs']} | {r['occupancy']:.0%} | {r['spill_bytes']} | {met} |")
    return "\n".join(out) + "\n"


BEGIN = "<!-- static-cost: written by python -m tests.aot_compile --update; do not edit -->"
END = "<!-- /static-cost -->"


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per compiled variant")
    ap.add_argument("--subset", action="store_true", help=f"V in {SUBSET_VS} only")
    ap.add_argument("--markdown", action="store_true", help="print the markdown table")
    ap.add_argument("--update", metavar="PATH", help="replace the static-cost section of this markdown file")
    args = ap.parse_args(argv)
    collected = []
    for r in rows(SUBSET_VS if args.subset else VS):
        collected.append(r)
        if args.json or not (args.markdown or args.update):
            print(json.dumps(r), flush=True)
    if args.markdown:
        print(markdown(collected))
    if args.update:
        replace_section(args.update, BEGIN, END, SECTION_HEAD + markdown(collected))
        print(f"replaced the static-cost section of {args.update}", file=sys.stderr)


SECTION_HEAD = """\
## Static cost of the Triton kernels (no GPU needed)

Regenerated by `python -m tests.aot_compile --update docs/performance.md` (triton's own ptxas and
cuobjdump, no GPU). Each pass is compiled for sm_80 and sm_90 as the launcher configures it for V, with
aligned tensors and `TRITON_DEFAULT_FP_FUSION=1`; "instr / element" is the count of SASS instructions of
the innermost loop divided by the vocabulary elements one thread handles per iteration (tests/sass.py).
Targets (issue 12): a bf16 stats pass keeps DRAM busy on an H100 only under ~35 instructions per element
(4 bytes read per element; fp32 has twice the budget); at most 64 registers a thread at 8 warps or an
occupancy of at least 50 %, no spills. Soft-cap and reference-gradient variants are reported, without a
target. The occupancy column counts registers only.

"""


if __name__ == "__main__":
    main()

"""Every kernel variant builds for every target (sm_80, sm_90, sm_100, sm_120, gfx90a, gfx942, gfx950,
gfx1100) with the launcher's configuration, without spills, and the passes meet their static instruction
budgets (issues 12 and 22; docs/performance.md).

One subprocess compiles the subset of the table at V = 128256 for all eight targets (~0.7 s of CPU a
compile, over two processes: ~3 minutes on an idle 2-core machine; `python -m tests.aot_compile --update
docs/performance.md` writes the full table, which adds no compile: the launcher configures every V of the
table alike).
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


@pytest.fixture(scope="module")
def table():
    # the JSON lines come back whatever the exit status: a variant that does not build is a row with
    # `error`, which the first test names
    proc = subprocess.run([sys.executable, "-m", "tests.aot_compile", "--json", "--subset", "--jobs", "2"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert rows, proc.stderr[-4000:]
    return rows


def test_every_variant_builds_for_every_target_without_spills(table):
    from .aot_compile import DTYPES, ROLES, SUBSET_VS, TARGETS
    assert len(table) == sum(len(v) for _, v in ROLES.values()) * len(TARGETS) * len(DTYPES) * len(SUBSET_VS)
    assert {(r["role"], r["target"], r["dtype"]) for r in table} == {
        (role, t, d) for role in ROLES for t in TARGETS for d in DTYPES}
    failed = [(r["kernel"], r["target"], r["dtype"], r["constexprs"], r["error"][:300]) for r in table if "error" in r]
    assert not failed
    keys = {"module", "kernel", "role", "scaled", "target", "cc", "dtype", "V", "num_warps", "constexprs",
            "signature", "divisible", "per_iteration", "regs", "spill_bytes", "loop_per_element", "softcap",
            "ref_grad", "options", "mufu_per_element"}
    for r in table:
        assert keys <= set(r), r
        assert r["dtype"] in ("bf16", "fp16", "fp32")
        assert r["spill_bytes"] == 0, r
        assert 0 < r["regs"] <= 512, r
        assert r["loop_per_element"] > 0, r   # every pass streams the vocabulary in a loop
        assert r["mufu_per_element"] >= 1, r  # at least one exponential an element


def _issue12(r):
    # the variants targeted since issue 12: no soft cap, no reference gradient, a dense full reference
    cx = r["constexprs"]
    return not (r["softcap"] or r["ref_grad"] or not cx.get("HAS_REF", True) or cx.get("CUT"))


def test_targets_met(table):
    # stats <= 30 (T = 1) / 36 (T != 1), jsd <= 36, grad <= 45 instructions per element on NVIDIA
    # (VALU on gfx942: <= 30 for the reading passes); <= 64 registers a thread or >= 50 % occupancy; no
    # spills: for every variant of issue 12 on sm_80, sm_90 and gfx942. The soft-cap, sparse-teacher and
    # truncated-reference variants carry the same budgets in the table, which says where they are missed
    targeted = [r for r in table if r["loop_target"] is not None]
    assert {r["target"] for r in targeted} == {"sm_80", "sm_90", "gfx942"}
    assert {r["role"] for r in targeted} == {"stats", "jsd", "grad"}
    missed = [(r["role"], r["target"], r["constexprs"], r["dtype"], r["loop_per_element"], r["regs"])
              for r in targeted if _issue12(r) and not r["met"]]
    assert not missed


def test_soft_cap_within_the_dense_budgets_where_the_table_says_so(table):
    # issue 22: the soft cap costs one exp2 and one fast reciprocal an element (no IEEE division): the
    # jsd and grad passes meet the dense budgets with it on sm_90, the stats pass at T != 1 too
    capped = [r for r in table if r["target"] == "sm_90" and r["softcap"] and not r["ref_grad"]]
    assert capped
    missed = [(r["role"], r["scaled"], r["dtype"], r["loop_per_element"]) for r in capped
              if not r["met"] and (r["role"] != "stats" or r["scaled"])]
    assert not missed
    assert all(r["mufu_per_element"] <= r["mufu_bound"]["H100"] for r in capped if r["role"] == "grad")


def test_a_row_recompiles_the_same_cubin(table):
    # the row's signature / constexprs / divisible / num_warps / options are what was compiled
    script = (
        "import json, sys, importlib\n"
        "from tests.sass import compile_kernel\n"
        "import hashlib\n"
        "r = json.loads(sys.stdin.read())\n"
        "fn = getattr(importlib.import_module(r['module']), r['kernel'])\n"
        "k = compile_kernel(fn, r['signature'], r['constexprs'], r['num_warps'], r['cc'], r['divisible'],"
        " r['options'])\n"
        "print(hashlib.sha256(k.asm['cubin']).hexdigest())\n")
    row = next(r for r in table if r["role"] == "stats" and r["target"] == "sm_90" and r["dtype"] == "bf16")
    proc = subprocess.run([sys.executable, "-c", script], input=json.dumps(row), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == row["cubin_sha256"]

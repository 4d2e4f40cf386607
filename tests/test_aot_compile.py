"""Every kernel builds for real GPUs (sm_80, sm_90) with the launcher's block sizes, with no spills."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_compile_ahead_of_time_without_spills():
    from .aot_compile import CCS, DTYPES, VARIANTS, VS
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiler, not the interpreter
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = pathlib.Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "tests.aot_compile"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    expected = sum(map(len, VARIANTS.values())) * len(CCS) * len(VS) * len(DTYPES)
    assert len(rows) == expected
    assert {(r["kernel"], r["cc"]) for r in rows} == {(k, cc) for k in VARIANTS for cc in CCS}
    for r in rows:
        assert r["LOCAL"] == 0 and r["STACK"] == 0, r   # spilled bytes
        assert 0 < r["REG"] <= 255, r

"""`hrmloss demo --quick`: runs, writes every file, and its numbers show the trade-off hrm controls."""
import json
import subprocess
import sys

import numpy as np
import pytest

from hrmloss.__main__ import main
from hrmloss.demo import DemoConfig, eval_steps

FILES = ("hrm_sweep.png", "position_loss.png", "test_loss.png", "pred_vs_real.png", "demo.json", "summary.txt")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--no-progress", "--seed", "0", "--device", "cpu", "--out", str(out)]) == 0
    return out, json.loads((out / "demo.json").read_text())


def test_quick_demo_writes_every_file(quick_run):
    out, _ = quick_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    assert all((out / n).read_bytes().startswith(b"\x89PNG") for n in FILES[:4])
    assert "CE (B)" in (out / "summary.txt").read_text()


def test_quick_demo_shows_the_trade_off(quick_run):
    # Final test values on held-out domain-B windows: as hrm grows over {0.001, 0.5, 10}, the student
    # stays closer to the reference (KL strictly decreasing) and fits domain B less (CE increasing).
    _, res = quick_run
    hrms = sorted(res["runs"], key=float)
    assert [float(h) for h in hrms] == [0.001, 0.5, 10.0]
    kl = [res["runs"][h]["eval"]["kl"][-1] for h in hrms]
    ce = [res["runs"][h]["eval"]["ce"][-1] for h in hrms]
    assert kl[0] > kl[1] > kl[2] >= 0, kl
    assert ce[0] < ce[1] < ce[2], ce


def test_quick_demo_logs_every_number(quick_run):
    _, res = quick_run
    cfg = res["config"]
    ref = res["reference"]
    assert len(ref["train"]["loss"]) == cfg["ref_steps"]
    assert ref["eval"]["step"] == eval_steps(cfg["ref_steps"], cfg["n_evals"])
    assert np.array(ref["eval"]["position_ce"]).shape == (len(ref["eval"]["step"]), cfg["context"])
    for run in res["runs"].values():
        tr = run["train"]
        assert len(tr["step"]) == len(tr["loss"]) == len(tr["ce"]) == len(tr["kl"]) == cfg["steps"]
        np.testing.assert_allclose(tr["tokens"], np.array(tr["step"]) * cfg["batch"] * cfg["context"])
        assert np.isfinite(tr["loss"]).all()
    assert set(res["fits"]["prediction"]) == {"reference", "hrm=0.001", "hrm=0.5", "hrm=10.0"}


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError):
        DemoConfig(steps=2).validate()
    with pytest.raises(ValueError):
        DemoConfig(d_model=30, n_head=4).validate()
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "x"])


def test_python_dash_m_hrmloss_has_the_demo_command():
    out = subprocess.run([sys.executable, "-m", "hrmloss", "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--quick" in out.stdout and "--hrm" in out.stdout

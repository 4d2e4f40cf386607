"""`hrmloss demo --quick` and `--grid --quick`: they run, write every file, their numbers show the trade-off
hrm controls, and no fit they print or draw has a bound-hitting or negative parameter without its flag."""
import json
import subprocess
import sys

import numpy as np
import pytest

from hrmloss.runs.cli import main
from hrmloss.runs.fits import EXPONENT_RANGE
from hrmloss.runs.demo import CUDA_DEMO, DemoConfig, GridConfig, eval_steps, pick_threads, run, split_tokens

CHARTS = ("hrm_sweep", "position_loss", "test_loss", "pred_vs_real", "pareto")
FILES = ("demo.json", "report.json", "report.txt", "summary.txt")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--no-progress", "--seed", "0", "--device", "cpu", "--threads", "1",
                 "--out", str(out)]) == 0
    return out, json.loads((out / "demo.json").read_text())


def test_quick_demo_writes_every_file(quick_run):
    out, _ = quick_run
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    for stem in CHARTS:
        assert (out / f"{stem}.png").read_bytes().startswith(b"\x89PNG")
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()[:1000]
    text = (out / "summary.txt").read_text()
    assert "CE (B)" in text and "per-position test loss" in text
    assert "fits too weak to read" in text or "every fit passed its checks" in text


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
    dense = eval_steps(cfg["ref_steps"], cfg["n_evals"], cfg["eval_start"])
    pos = eval_steps(cfg["ref_steps"], cfg["n_position_evals"], cfg["eval_start"])
    assert ref["eval"]["step"] == sorted(set(dense) | set(pos)) and ref["eval"]["position_step"] == pos
    assert min(dense) >= cfg["eval_start"] * cfg["ref_steps"] - 0.5 and max(dense) == cfg["ref_steps"]
    rows = np.array(ref["eval"]["position_ce"])
    assert rows.shape == (len(ref["eval"]["step"]), cfg["context"])
    # Per-position rows at the position steps only (NaN at the others), the mean at every step.
    assert [s for s, r in zip(ref["eval"]["step"], rows) if np.isfinite(r).all()] == pos
    assert np.isnan(rows[[s not in pos for s in ref["eval"]["step"]]]).all()
    assert len(ref["eval"]["ce"]) == len(ref["eval"]["step"]) and np.isfinite(ref["eval"]["ce"]).all()
    env = res["environment"]
    assert env["threads"] == 1 and env["torch"] and env["numpy"] == np.__version__
    assert {len(h) for h in env["corpus_sha256"].values()} == {64}
    for run in res["runs"].values():
        tr = run["train"]
        assert len(tr["step"]) == len(tr["loss"]) == len(tr["ce"]) == len(tr["kl"]) == cfg["steps"]
        np.testing.assert_allclose(tr["tokens"], np.array(tr["step"]) * cfg["batch"] * cfg["context"])
        assert np.isfinite(tr["loss"]).all()


def _unflagged_bad_parameters(fit):
    """Names of the parameters of a power-law fit dict that are negative or on a bound but not flagged."""
    lo, hi = EXPONENT_RANGE
    bad = [k for k in ("a", "b") if fit[k] < 0 or fit[k] <= 1e-9 * max(1.0, abs(fit["a"]))]
    bad += ["c"] if not lo + 1e-6 < fit["c"] < hi - 1e-6 else []
    return [k for k in bad if fit["ok"] or not fit["flags"]]


def test_no_fit_has_a_bad_parameter_without_its_flag(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "report.json").read_text())
    fits = [f for run in doc["position_fits"].values() for f in run.values()]
    fits += [p["fit"] for p in doc["predictions"].values()]
    assert set(doc["predictions"]) == {"reference", "hrm=0.001", "hrm=0.5", "hrm=10"}
    assert len(fits) > 10
    for f in fits:
        assert not _unflagged_bad_parameters(f), f
        assert f["ok"] == (not f["flags"])
    # The summary prints a weak fit with its flags, never bare, and a good one without.
    ok_of = {}
    for f in fits:
        ok_of.setdefault(f["formula"], set()).add(f["ok"])
    printed = [line for line in (out / "summary.txt").read_text().splitlines() if ", R^2 " in line]
    assert len(printed) == len(fits)
    for line in printed:
        formula = line.split(": ", 1)[1].split(", R^2")[0]
        if ok_of[formula] == {False}:
            assert "not ok: " in line, line
        elif ok_of[formula] == {True}:
            assert "not ok" not in line, line


def test_report_has_per_token_index_and_pareto_sections(quick_run):
    out, res = quick_run
    doc = json.loads((out / "report.json").read_text())
    assert set(doc["per_token_index"]) == {"reference", "hrm=0.001", "hrm=0.5", "hrm=10"}
    steps = res["runs"]["0.5"]["eval"]["position_step"]
    for t, line in doc["per_token_index"]["hrm=0.5"].items():
        assert line["steps"] == steps and len(line["losses"]) == len(steps)
        ce = np.array(res["runs"]["0.5"]["eval"]["position_ce"])[[s in steps for s in res["runs"]["0.5"]["eval"]["step"]]]
        np.testing.assert_allclose(line["losses"], ce[:, int(t) - 1])
        assert line["ok"] == (not line["flags"]) and line["fit"]["flags"] == line["flags"]
    pareto = doc["pareto"]
    assert set(pareto) == {"hrm=0.001", "hrm=0.5", "hrm=10"}
    for name, p in pareto.items():
        e = res["runs"][repr(p["hrm"])]["eval"]
        assert (p["kl"], p["ce"]) == (e["kl"][-1], e["ce"][-1])
    text = (out / "summary.txt").read_text()
    assert "Pareto front" in text and "per-token-index test loss" in text and "after the first 5 % of the run" in text


def test_the_demo_is_deterministic_for_a_seed_and_a_thread_count():
    cfg = DemoConfig(device="cpu", progress=False, threads=1).quick()
    from dataclasses import replace

    cfg = replace(cfg, ref_steps=8, steps=8, hrms=(0.5,), n_evals=3, n_position_evals=2)
    a, b = run(cfg), run(cfg)
    for r in (a, b):
        r.pop("seconds")
    assert json.dumps(a) == json.dumps(b)
    assert 1 <= pick_threads()


def test_quick_grid_fits_one_law_across_the_grid(tmp_path):
    out = tmp_path / "grid"
    assert main(["demo", "--grid", "--quick", "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    grid = json.loads((out / "grid.json").read_text())["grid"]
    assert len(grid) == 6 and len({r["N"] for r in grid}) == 3 and len({r["group"] for r in grid}) == 2
    law = json.loads((out / "scaling_law.json").read_text())
    p = law["params"]
    assert p["E"] > 0 and p["A"] > 0 and p["B"] > 0
    lo, hi = EXPONENT_RANGE
    for k in ("alpha", "beta"):
        assert lo < p[k] < hi or f"at_bound:{k}" in law["flags"]
    assert law["ok"] == (not law["flags"]) and len(law["runs"]) == 6
    assert (out / "grid.png").read_bytes().startswith(b"\x89PNG") and (out / "grid.svg").stat().st_size > 1000
    text = (out / "summary.txt").read_text()
    assert "L(N, D) =" in text and ("not ok" in text) == (not law["ok"])


def test_configs_validate_and_the_cuda_sizes_are_sensible():
    with pytest.raises(ValueError):
        DemoConfig(steps=2).validate()
    with pytest.raises(ValueError):
        DemoConfig(d_model=30, n_head=4).validate()
    with pytest.raises(ValueError, match="hrm"):
        DemoConfig(hrms=(-1.0,)).validate()
    with pytest.raises(ValueError, match="widths"):
        GridConfig(widths=(32, 32, 64)).validate()
    cuda = DemoConfig(**CUDA_DEMO)
    cuda.validate()
    assert cuda.context >= 512 and cuda.d_model % cuda.n_head == 0
    assert DemoConfig(device="cpu").for_device() == DemoConfig(device="cpu")
    # The grid: 3 groups x 5 sizes spanning at least 20x in N, on the CPU and the CUDA sizes.
    from hrmloss.runs.demo import CUDA_GRID, TinyGPT, non_embedding_params

    for g in (GridConfig(), GridConfig(**CUDA_GRID)):
        g.validate()
        n = [non_embedding_params(TinyGPT(16, w, g.n_layer, g.n_head)) for w in g.widths]
        assert len(g.contexts) == 3 and len(n) == 5 and max(n) >= 20 * min(n), n
    with pytest.raises(ValueError, match="threads"):
        DemoConfig(threads=-1).validate()


def test_test_windows_start_at_random_offsets():
    data = bytes(range(256)) * 64
    train, test = split_tokens(data, 16, 32)
    assert test.shape == (32, 17) and train.numel() + 16384 // 10 == 16384
    starts = test[:, 0].tolist()
    assert len(set(starts)) > 16  # not one tiling of the held-out tail
    np.testing.assert_array_equal(np.diff(test.numpy(), axis=1) % 256, 1)  # windows are contiguous text


def test_python_dash_m_hrmloss_has_the_commands():
    out = subprocess.run([sys.executable, "-m", "hrmloss", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in out.stdout and "report" in out.stdout and "fit-grid" in out.stdout

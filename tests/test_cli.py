"""The command line: --version, one-line errors with exit status 2, the extras named when missing, and
`report` / `fit-grid` end to end on small synthetic logs."""
import json
import subprocess
import sys

import numpy as np
import pytest

import hrmloss
from hrmloss.runs.cli import main


def _fails(argv, capsys):
    """Run main(argv): it must exit 2 with one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"hrmloss {hrmloss.__version__}"


def test_bad_hrm_is_one_line_and_exit_2_in_a_real_process():
    out = subprocess.run([sys.executable, "-m", "hrmloss", "demo", "--hrm", "-1"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("hrmloss demo: error: argument --hrm: '-1': expected a finite hrm >= 0")


@pytest.mark.parametrize("argv, message", [
    (["demo", "--hrm", "nan"], "expected a finite hrm >= 0"),
    (["demo", "--steps", "0"], "expected a positive int"),
    (["demo", "--steps", "x"], "expected a positive int"),
    (["demo", "--steps", "3"], "expected at least 8"),
    (["demo", "--device", "tpu"], "device='tpu'"),
    (["demo", "--formats", "gif"], "invalid choice"),
    (["demo", "--grid", "--steps", "5"], "expected at least 20"),
    (["report"], "no logs"),
    (["report", "x.jsonl", "--fit-fraction", "2"], "expected a number in (0, 1)"),
    (["report", "x.jsonl", "--columns", "loss"], "expected name=column"),
    (["report", "--run", "x.jsonl:size=3"], "not key=value"),
    (["fit-grid", "--tokens-per-step", "-4"], "expected a finite number > 0"),
    (["fit-grid", "missing.jsonl"], "missing.jsonl: no such file"),
    (["nonsense"], "invalid choice"),
])
def test_bad_values_are_one_line_errors(argv, message, capsys):
    assert message in _fails(argv, capsys)


def test_a_bad_log_names_its_file_and_line(tmp_path, capsys):
    bad = tmp_path / "run.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5\n')
    assert f"{bad}:2: not valid JSON" in _fails(["report", str(bad), "--out", str(tmp_path)], capsys)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"step": s, "loss": 3 / s}) + "\n" for s in range(1, 30)))
    assert "model size N unknown" in _fails(["fit-grid", str(good), "--out", str(tmp_path)], capsys)


@pytest.mark.parametrize("module, call, extra", [
    ("scipy.optimize", lambda: hrmloss.fit_power_law([1, 2, 3, 4], [4.0, 3.0, 2.5, 2.2]), "plot"),
    ("matplotlib", lambda: hrmloss.plot_test_loss({"p": {"a": ([1, 2], [2.0, 1.0])}}, "x.png"), "plot"),
    ("tqdm.auto", lambda: __import__("hrmloss.runs.demo").runs.demo._progress(hrmloss.runs.demo.DemoConfig(), 1, ""), "demo"),
])
def test_a_missing_extra_says_which_to_install(monkeypatch, module, call, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import of it now fails as if not installed
    with pytest.raises(ModuleNotFoundError, match=rf'pip install "hrmloss\[{extra}\]"'):
        call()


def test_tensorboard_reader_names_its_extra(monkeypatch, tmp_path):
    from hrmloss.runs.logs import read_runs

    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    with pytest.raises(ModuleNotFoundError, match=r'pip install "hrmloss\[tensorboard\]"'):
        read_runs(tmp_path)  # a folder is read as TensorBoard events


def _write_run(path, n, hrm, seed, positions=True):
    """A JSON-lines log of a KL-regularised run, with eval loss and per-position losses every 20 steps."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for s in range(1, n + 1):
            kl = 0.3 / (1 + hrm) * (1 - np.exp(-s / 20))
            ce = 2.0 + 3.0 * s ** -0.4 + rng.normal(0, 0.01)
            f.write(json.dumps({"step": s, "train/loss": ce + hrm * kl, "train/ce": ce, "train/kl": kl}) + "\n")
            if positions and s % 20 == 0:
                t = np.arange(1, 65)
                curve = 1.8 + 2.5 * t ** -0.5 + 1 / s + rng.normal(0, 0.01, t.size)
                f.write(json.dumps({"step": s, "eval_loss": 2.2 + 1 / s, "position_loss": curve.tolist()}) + "\n")


def test_report_end_to_end(tmp_path, capsys):
    for h in (0.1, 1.0):
        _write_run(tmp_path / f"h{h}.jsonl", 100, h, seed=int(h * 10))
    out = tmp_path / "out"
    assert main(["report", "--run", f"{tmp_path}/h0.1.jsonl:hrm=0.1", "--run", f"{tmp_path}/h1.0.jsonl:hrm=1",
                 "--tokens-per-step", "4k", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for stem in ("hrm_sweep", "position_loss", "test_loss", "pred_vs_real"):
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.svg").stat().st_size > 1000
    doc = json.loads((out / "report.json").read_text())
    fits = doc["position_fits"]["h0.1"]
    assert set(fits) == {"20", "40", "60", "80", "100"} and all(f["ok"] and f["r2"] > 0.9 for f in fits.values())
    assert "per-position test loss" in printed and "wrote" in printed
    svg = (out / "hrm_sweep.svg").read_text()
    assert "hrm = 0.1" in svg and "hrm = 1" in svg


def test_report_says_what_it_could_not_draw(tmp_path, capsys):
    path = tmp_path / "plain.csv"
    path.write_text("step,loss\n" + "".join(f"{s},{2 + 1 / s}\n" for s in range(1, 40)))
    assert main(["report", str(path), "--out", str(tmp_path / "out"), "--formats", "png"]) == 0
    text = (tmp_path / "out" / "report.txt").read_text()
    assert "(b) position_loss skipped: these logs hold no per-position losses" in text
    assert "(a) hrm_sweep skipped" in text
    # Tokens unknown (no tokens column, no --tokens-per-step): Pred against steps, and said so (issue 23 item 6).
    assert "pred_vs_real_steps (1 run, against steps: no usable token counts (give --tokens-per-step))" in text
    assert (tmp_path / "out" / "pred_vs_real_steps.png").stat().st_size > 1000
    assert not (tmp_path / "out" / "position_loss.png").exists()


def test_fit_grid_end_to_end_with_a_manifest(tmp_path, capsys):
    rng = np.random.default_rng(0)
    entries = []
    for g, k in (("T_m=2", 1.0), ("T_m=4", 0.97)):
        for n in (2e4, 8e4, 3e5):
            name = f"{g}-{n:g}"
            steps = np.arange(1, 201)
            loss = k * (1.2 + 30 * n ** -0.3 + 80 * (steps * 1e5) ** -0.3) * np.exp(rng.normal(0, 0.01, steps.size))
            (tmp_path / f"{name}.csv").write_text("iter,total_loss\n" + "".join(f"{s},{v}\n" for s, v in zip(steps, loss)))
            entries.append({"path": f"{name}.csv", "N": n, "group": g, "name": name})
    (tmp_path / "manifest.json").write_text(json.dumps({"tokens_per_step": 1e5, "runs": entries}))
    out = tmp_path / "grid"
    assert main(["fit-grid", "--manifest", str(tmp_path / "manifest.json"), "--group-factor", "--out", str(out)]) == 0
    law = json.loads((out / "scaling_law.json").read_text())
    assert law["ok"] and abs(law["params"]["alpha"] - 0.3) < 0.05 and abs(law["params"]["k:T_m=4"] - 0.97) < 0.01
    assert len(law["runs"]) == 6 and all(abs(r["final_rel_err"]) < 0.02 for r in law["runs"])
    assert (out / "grid.png").stat().st_size > 1000 and (out / "grid.svg").stat().st_size > 1000
    assert "L(N, D) =" in (out / "scaling_law.txt").read_text()

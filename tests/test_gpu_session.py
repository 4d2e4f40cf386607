"""The GPU session command's dry run (`python -m benchmarks.gpu --session --device cpu --tiny`): every stage's
code path runs on the CPU, writes its JSON into DIR, the markdown collects them, a second call skips the
stages done, a stage cut off at its budget is marked so and keeps its partial results, and --merge puts
the markdown into a copy of docs/performance.md. The budgets add up to at most 5 minutes."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _gpu(*args, timeout=240):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_budgets_fit_five_minutes():
    from benchmarks.session import STAGES
    assert list(STAGES) == ["correctness", "loss", "linear", "ncu", "demo"]
    assert sum(STAGES.values()) <= 300 and min(STAGES.values()) > 0


def test_dry_run_every_stage_then_resume_and_merge(tmp_path):
    out = tmp_path / "session"
    proc = _gpu("--session", "--out", str(out), "--device", "cpu", "--tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "session.json").read_text())
    status = {k: v["status"] for k, v in result["stages"].items()}
    assert status == dict(correctness="done", loss="done", linear="done", ncu="unavailable", demo="done"), \
        {k: v.get("stderr", "")[-1500:] for k, v in result["stages"].items()}
    assert result["machine"]["name"].startswith("CPU")
    st = result["stages"]
    assert "collected" in st["correctness"]["summary"] and " 0/" not in st["correctness"]["summary"]
    loss = {(r["provider"], r["mode"]) for r in st["loss"]["rows"] if "median_ms" in r}
    assert {("hrmloss", "forward+backward"), ("stats-pass", "forward"), ("grad-pass", "backward")} <= loss
    assert all("error" not in r for r in st["loss"]["rows"])   # every loss agreed with float64 before timing
    assert {r["provider"] for r in st["linear"]["rows"]} == {"hrmloss-linear", "gemm-floor"}
    assert st["demo"]["seconds"] > 0 and (out / "demo" / "demo.json").exists()
    md = (out / "session.md").read_text()
    assert "## GPU session: CPU" in md and "| hrmloss | forward+backward |" in md

    # resumable: a second call runs no stage, and rewrites the same collection
    again = _gpu("--session", "--out", str(out), "--device", "cpu", "--tiny", timeout=60)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("already done") == 5

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nkept\n")
    from benchmarks.session import merge
    merge(out, doc)
    text = doc.read_text()
    assert "kept" in text and "## GPU session: CPU" in text


def test_a_stage_over_its_budget_is_marked_and_keeps_its_partial_rows(tmp_path, monkeypatch):
    from benchmarks import session
    out = tmp_path / "s"
    out.mkdir()
    for name in session.STAGES:   # every stage done but the loss
        if name != "loss":
            (out / f"{name}.json").write_text(json.dumps(dict(stage=name, status="done")))
    calls = []

    def cut_off(cmd, **kw):
        # the loss stage's child saves one provider's row, then runs past its budget
        calls.append(cmd[cmd.index("--stage") + 1])
        (out / "loss.json").write_text(json.dumps(dict(status="partial", rows=[dict(provider="hrmloss")])))
        raise subprocess.TimeoutExpired(cmd, kw["timeout"])
    monkeypatch.setattr(session.subprocess, "run", cut_off)
    args = type("Args", (), dict(out=str(out), device="cpu", tiny=True))
    result = session.session(args)
    assert calls == ["loss"]   # the stages done were skipped
    loss = result["stages"]["loss"]
    assert loss["status"] == "over budget" and "budget of 75 s" in loss["note"]
    assert loss["rows"] == [dict(provider="hrmloss")]
    assert "loss (75): over budget" in (out / "session.md").read_text()

"""Every benchmark in benchmarks/ runs once at a tiny size, and the report is generated from its JSON,
so neither can rot. (The benchmarks themselves are never part of `python -m pytest tests`.)"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("pytest_benchmark")
pytest.importorskip("matplotlib")


def test_every_benchmark_runs_at_tiny_size_and_reports(tmp_path):
    out = tmp_path / "tiny.json"
    env = dict(os.environ, HRMLOSS_BENCH_SIZE="tiny", HRMLOSS_BENCH_DEVICE="cpu", TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-W", "ignore",
         f"--benchmark-json={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    data = json.loads(out.read_text())
    ran = {(b["extra_info"]["kind"], b["extra_info"]["provider"]) for b in data["benchmarks"]}
    for kind, provider in [("loss", "naive"), ("loss", "compile"), ("loss", "hrmloss"),
                           ("loss", "hrmloss-eager"), ("linear", "naive-linear"), ("linear", "compile-linear"),
                           ("linear", "hrmloss-linear"), ("linear", "gemm-floor"),
                           ("traffic", "hrmloss-triton"), ("topk", "dense"), ("topk", "topk-renorm"),
                           ("topk", "topk-tail"), ("topk", "naive-topk")]:
        assert (kind, provider) in ran, (kind, provider, sorted(ran))
    for b in data["benchmarks"]:  # every measured loss matched the float64 reference (else it failed)
        e = b["extra_info"]
        if e["kind"] != "traffic":
            assert e["peak_bytes"] > 0 and abs(e["loss"] - e["reference"]) <= 2e-4 * max(1, abs(e["reference"]))

    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import report
    finally:
        sys.path.remove(str(ROOT))
    md, images = tmp_path / "performance.md", tmp_path / "images"
    report.main([str(out), "--out", str(md), "--images", str(images)])
    text = md.read_text()
    assert "| 64 x 512 float32 |" in text and "## Memory traffic of the Triton kernels" in text
    assert "Intel" in text or "Machine:" in text
    assert (images / "perf_loss_forward_backward_time.png").stat().st_size > 0
    assert (images / "perf_traffic.png").stat().st_size > 0
    # the sections other commands write into the same file survive a new report
    report.replace_section(str(md), "<!-- gpu: written by a test; do not edit -->", "<!-- /gpu -->", "GPU TABLE")
    report.main([str(out), "--out", str(md), "--images", str(images)])
    assert md.read_text().count("GPU TABLE") == 1


def test_gpu_benchmark_dry_run_on_the_cpu(tmp_path):
    # python -m benchmarks.gpu is meant for a GPU; --device cpu --tiny runs its code paths here: inputs,
    # value checks, timing, peak memory, the passes alone, the JSON and the section it writes
    md, js = tmp_path / "performance.md", tmp_path / "gpu.json"
    md.write_text("# Performance\n\nkept\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--tiny", "--out", str(md), "--json", str(js),
         "--providers", "hrmloss,hrmloss-inplace,naive,stats-pass,grad-pass,flash-attn-ce"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    result = json.loads(js.read_text())
    measured = {(r["provider"], r["mode"]) for r in result["rows"] if "error" not in r}
    assert {("hrmloss", "forward+backward"), ("hrmloss-inplace", "forward+backward"), ("naive", "forward"),
            ("stats-pass", "forward"), ("grad-pass", "backward")} <= measured
    assert all(r["reps"] >= 20 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] for r in result["rows"])
    text = md.read_text()
    assert text.startswith("# Performance\n\nkept\n") and "<!-- /gpu -->" in text
    assert "| 64 x 512 float32 | hrmloss-inplace | forward+backward |" in text

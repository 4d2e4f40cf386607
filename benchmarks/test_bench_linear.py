"""The fused-linear variant (logits formed chunk by chunk from hidden states) against its peers.

Gradients flow to the student's hidden states and output weights; the reference model is frozen and
given as hidden states + weight. NVs here are the bytes the (N, V) student logits take in the input dtype.
Peers: naive eager, torch.compile of it, Liger's chunked distillation loss, and two CE-only fused linear
cross-entropies (Liger's, Apple's Cut Cross-Entropy: lines marked CE-only, checked against the CE value);
`gemm-floor` runs the four GEMMs of the fused loss alone (4 x 2 N H V FLOPs), measured in the same run.

On CUDA each round is timed by CUDA events (`CudaClock`, the timer of pytest-benchmark for these tests):
GPU time from the start to the end of the call, after the inputs are ready. The CUDA size is the shape of
issue 13 alone, forward + backward (N = 8192, H = 4096, V = 128256, bf16), and finishes in a few minutes:

    HRMLOSS_BENCH_SIZE=cuda python -m pytest benchmarks/test_bench_linear.py -q \\
        --benchmark-json=benchmarks/results/cuda-linear.json
"""
import pytest
import torch

from ._runner import build, measure
from .common import bench_size, linear_inputs, reference_linear_loss, too_large
from .providers import CE_ONLY, LINEAR_PROVIDERS, NO_LOSS, linear_provider

# (N, V, H, dtype) and the passes timed, per HRMLOSS_BENCH_SIZE
CASES = {
    "tiny": ([(64, 512, 64, "float32")], ["forward+backward"]),
    "target": ([(2048, 32000, 1024, "float32")], ["forward", "forward+backward"]),
    "cpu": ([(2048, 32000, 1024, "bfloat16"), (2048, 32000, 1024, "float32")], ["forward+backward"]),
    "cuda": ([(8192, 128256, 4096, "bfloat16")], ["forward+backward"]),
}
_REF = {}


class CudaClock:
    """Seconds of GPU time since the clock was made: each read records a CUDA event on the current stream
    and waits for it, so two reads around a call time the call on the GPU (pytest-benchmark's timer)."""

    def __init__(self):
        self.start = torch.cuda.Event(enable_timing=True)
        self.start.record()

    def __call__(self):
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return self.start.elapsed_time(end) / 1e3


def _cases():
    return CASES[bench_size()[0]][0]


def _modes():
    return CASES[bench_size()[0]][1]


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}-{c[3]}")
def test_linear(benchmark, device, size, case, provider, mode):
    n, v, hidden, dtype_name = case
    if too_large(n, v):
        pytest.skip(f"{n}x{v} above HRMLOSS_BENCH_MAX_ELEMS")
    benchmark.group = f"linear {n}x{v}x{hidden} {dtype_name} {mode}"
    if device.type == "cuda":
        benchmark._timer = CudaClock()  # pytest-benchmark's timer (what --benchmark-timer sets)
    fn = build(linear_provider, provider, device)
    h0, w0, ht, wt, y = linear_inputs(n, v, hidden, getattr(torch, dtype_name), device)
    hrm = 0.0 if provider in CE_ONLY else None
    key = (case, hrm)
    if provider in NO_LOSS:
        reference = 0.0  # the floor returns 0: checked as such
    else:
        if key not in _REF:
            _REF[key] = reference_linear_loss(h0, w0, ht, wt, y, **({} if hrm is None else {"hrm": hrm}))
        reference = _REF[key]
    info = dict(kind="linear", provider=provider, n=n, v=v, hidden=hidden, dtype=dtype_name,
                nvs_bytes=n * v * h0.element_size(), flops=(4 if mode == "forward+backward" else 2) * 2 * n * hidden * v)
    rtol = 1e-4 if dtype_name == "float32" else 3e-2

    def setup():
        return h0.clone().requires_grad_(), w0.clone().requires_grad_(), ht, wt, y
    measure(benchmark, fn, setup, mode, device, reference, rtol, info, size)

"""The fused-linear variant (logits formed chunk by chunk from hidden states) against its peers.

Gradients flow to the student's hidden states and output weights; the reference model is frozen.
NVs here are the bytes the (N, V) student logits would take in the input dtype.
"""
import pytest
import torch

from ._runner import build, measure
from .common import cases, modes, linear_inputs, reference_linear_loss, too_large
from .providers import LINEAR_PROVIDERS, linear_provider

_REF = {}


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize("provider", LINEAR_PROVIDERS)
@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_linear(benchmark, device, size, case, provider, mode):
    n, v, dtype_name = case
    hidden = size["hidden"]
    if too_large(n, v):
        pytest.skip(f"{n}x{v} above HRMLOSS_BENCH_MAX_ELEMS")
    benchmark.group = f"linear {n}x{v}x{hidden} {dtype_name} {mode}"
    fn = build(linear_provider, provider, device)
    h0, w0, ht, wt, y = linear_inputs(n, v, hidden, getattr(torch, dtype_name), device)
    key = (case, hidden)
    if key not in _REF:
        _REF[key] = reference_linear_loss(h0, w0, ht, wt, y)
    info = dict(kind="linear", provider=provider, n=n, v=v, hidden=hidden, dtype=dtype_name,
                nvs_bytes=n * v * h0.element_size())
    rtol = 1e-4 if dtype_name == "float32" else 3e-2

    def setup():
        return h0.clone().requires_grad_(), w0.clone().requires_grad_(), ht, wt, y
    measure(benchmark, fn, setup, mode, device, _REF[key], rtol, info, size)

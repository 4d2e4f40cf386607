"""Time and peak memory of the loss on logits, hrmloss against the other providers, per shape and dtype."""
import pytest
import torch

from ._runner import build, measure
from .common import cases, modes, loss_inputs, reference_loss, too_large
from .providers import LOSS_PROVIDERS, loss_provider

_REF = {}  # float64 reference value per case, computed once


@pytest.mark.parametrize("mode", modes())
@pytest.mark.parametrize("provider", LOSS_PROVIDERS)
@pytest.mark.parametrize("case", cases(), ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}")
def test_loss(benchmark, device, size, case, provider, mode):
    n, v, dtype_name = case
    if too_large(n, v):
        pytest.skip(f"{n}x{v} above HRMLOSS_BENCH_MAX_ELEMS")
    benchmark.group = f"loss {n}x{v} {dtype_name} {mode}"
    fn = build(loss_provider, provider, device)
    s0, t, y = loss_inputs(n, v, getattr(torch, dtype_name), device)
    if case not in _REF:
        _REF[case] = reference_loss(s0, t, y)
    info = dict(kind="loss", provider=provider, n=n, v=v, dtype=dtype_name,
                nvs_bytes=s0.numel() * s0.element_size())
    rtol = 1e-4 if dtype_name == "float32" else 2e-2
    measure(benchmark, fn, lambda: (s0.clone().requires_grad_(), t, y), mode, device, _REF[case], rtol,
            info, size)

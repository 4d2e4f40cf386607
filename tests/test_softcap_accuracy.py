"""The soft cap's tanh in the kernels (hrmloss/kernels/common.py `_load_student`: one exp2 and one fast
reciprocal, no IEEE division), against float64: c tanh(x / c) and its derivative 1 - tanh^2, over the
whole fp32 range that matters (|x| / c up to 60, and the exact limits at +-inf).

Under the interpreter the exp2 and the reciprocal are IEEE fp32 operations, so this measures the error of
the formula itself: |s - c tanh(x / c)| <= 2.5e-7 c and |dcap - (1 - tanh^2)| <= 4e-7. On a GPU,
ex2.approx (2 ulp) and rcp.approx (1 ulp) each add at most ~2^-22 relative to r = 1 / (2^(2 log2 e x / c) + 1),
i.e. <= 2 c 2^-21 ~ 1e-6 c more in s (docs/performance.md states both).
"""
import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from hrmloss.kernels.common import LOG2E, _load_student  # noqa: E402

BLOCK = 1024


@triton.jit
def _softcap_kernel(x_ptr, s_ptr, d_ptr, n, softcap, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    cap_scale = 2.0 * LOG2E / softcap
    s, dcap = _load_student(x_ptr + offs, mask, cap_scale, softcap, True)
    tl.store(s_ptr + offs, s, mask=mask)
    tl.store(d_ptr + offs, dcap, mask=mask)


def _run(x, c):
    s, d = torch.empty_like(x), torch.empty_like(x)
    _softcap_kernel[(triton.cdiv(x.numel(), BLOCK),)](x, s, d, x.numel(), c, BLOCK=BLOCK)
    return s, d


@pytest.mark.parametrize("c", [5.0, 30.0, 50.0])
def test_softcap_against_float64(c):
    u = torch.cat([torch.linspace(-60, 60, 6001), torch.linspace(-1e-3, 1e-3, 201),
                   torch.logspace(-30, 1.7, 400), -torch.logspace(-30, 1.7, 400)])
    x = (u * c).float()
    s, d = _run(x, c)
    th = torch.tanh(x.double() / c)
    err_s = ((s.double() - c * th).abs() / c).max().item()
    err_d = (d.double() - (1 - th * th)).abs().max().item()
    assert err_s <= 2.5e-7, err_s
    assert err_d <= 4e-7, err_d


def test_softcap_limits():
    c = 30.0
    x = torch.tensor([float("-inf"), float("inf"), 0.0, -1e4, 1e4])
    s, d = _run(x, c)
    assert s.tolist() == [-c, c, 0.0, -c, c]
    assert d.tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]

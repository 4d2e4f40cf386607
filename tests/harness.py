"""Run hrm_loss and the float64 reference on the same inputs and compare values and gradients."""
import torch

import hrmloss
from .reference import reference_loss

BACKENDS = ["torch", "triton"]
NAMES = ("loss", "ce", "kl", "z", "grad", "ref_grad")


def make(shape, dtype=torch.float32, ref_dtype=torch.float32, scale=3.0, seed=0, ignore=None):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(ref_dtype)
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    if ignore is not None:
        y.view(-1)[::3] = ignore
    return s, t, y


def run(s, t, y, backend, grad_out=None, ref_grad=False, **kw):
    """(loss, ce, kl, z, grad of logits, grad of ref_logits or None) from hrmloss.

    backend "name@device" (e.g. "triton@cuda", tests/test_cuda.py) runs on copies of the inputs on that
    device and returns the results on the CPU."""
    backend, _, device = backend.partition("@")
    if device:
        s, y = s.to(device), y.to(device)
        t = None if t is None else t.to(device)
        grad_out = grad_out.to(device) if grad_out is not None else None
    s = s.detach().requires_grad_(True)  # keeps the strides of a view
    t = None if t is None else t.detach().requires_grad_(ref_grad)  # None: no reference
    out = hrmloss.hrm_loss(s, t, y, backend=backend, return_components=True, **kw)
    out.loss.backward(grad_out if grad_out is not None else torch.ones_like(out.loss))
    got = out.loss.detach(), out.ce, out.kl, out.z, s.grad, None if t is None else t.grad
    return tuple(x.cpu() if x is not None else None for x in got) if device else got


def truth(s, t, y, grad_out=None, ref_grad=False, **kw):
    """The same tuple from the float64 reference on the same (rounded) inputs."""
    s64 = s.detach().double().requires_grad_(True)
    t64 = None if t is None else t.detach().double().requires_grad_(ref_grad)
    loss, ce, kl, z = reference_loss(s64, t64, y, **kw)
    loss.backward(grad_out.double() if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), ce, kl, z, s64.grad, None if t64 is None else t64.grad


def close(a, b, atol=2e-5, rtol=2e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


def check(s, t, y, backend, atol=2e-5, grad_out=None, ref_grad=False, **kw):
    """Every output of hrmloss against the reference; returns hrmloss's outputs."""
    got = run(s, t, y, backend, grad_out=grad_out, ref_grad=ref_grad, **kw)
    ref = truth(s, t, y, grad_out=grad_out, ref_grad=ref_grad, **kw)
    for name, a, b in zip(NAMES, got, ref):
        if name == "ref_grad" and not ref_grad:
            assert a is None and b is None
            continue
        dtype = s.dtype if name == "grad" else t.dtype if name == "ref_grad" else torch.float32
        assert a.dtype == dtype, name
        assert a.shape == b.shape, name
        # fp32 cancellation error grows with the size of the terms: hrm / T times the log-ratios
        cond = 1.0 + kw.get("hrm", 1.0) / kw.get("temperature", 1.0) if "grad" in name else 1.0
        close(a, b, atol=atol * cond * max(1.0, b.abs().max().item()))
    return got

"""linear_hrm_loss with a sparse teacher, a reference of another vocabulary size and token weights, against
the float64 oracle (matmul + tests/reference.py), on both backends and across chunk boundaries."""
import pytest
import torch

import hrmloss
from .harness import BACKENDS
from .reference import reference_loss
from .test_topk import make_topk


def make(B=2, T=7, H=12, V=40, V_ref=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g) * scale  # noqa: E731
    return dict(hidden=rand(B, T, H), weight=rand(V, H, scale=H ** -0.5 * 3), bias=rand(V),
                ref_hidden=rand(B, T, 10), ref_weight=rand(V_ref, 10, scale=10 ** -0.5 * 3),
                labels=torch.randint(0, V, (B, T), generator=g), weights=torch.rand(B, T, generator=g) * 2)


def oracle(c, grad_out, ref, **opts):
    h, w, b = (c[k].double().requires_grad_() for k in ("hidden", "weight", "bias"))
    s = h @ w.T + b
    t = None if ref is None else ref.double()
    out = reference_loss(s, t, c["labels"], **opts)
    (out[0] * grad_out.double()).sum().backward()
    return out, (h.grad, w.grad, b.grad)


def run(c, grad_out, backend, chunk_size, **kw):
    h, w, b = (c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias"))
    out = hrmloss.linear_hrm_loss(h, w, c["labels"], bias=b, backend=backend, chunk_size=chunk_size,
                                  return_components=True, **kw)
    (out.loss * grad_out).sum().backward()
    return out, (h.grad, w.grad, b.grad)


def compare(got, want, atol=2e-5):
    for a, b in zip((*got[0], *got[1]), (*want[0], *want[1])):
        torch.testing.assert_close(a.double(), b.detach(), atol=atol * max(1.0, b.abs().max().item()), rtol=1e-4)


def grad_out(c, reduction):
    return torch.rand(c["labels"].shape) if reduction == "none" else torch.tensor(1.3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kl,reduction", [("renorm", "forward", "mean"), ("tail", "reverse", "none"),
                                               ("tail", "jsd", "sum")])
def test_sparse_teacher(backend, mode, kl, reduction):
    c = make()
    ids, lps = make_topk((2, 7, 40), 5, seed=1)[3:]
    go = grad_out(c, reduction)
    opts = dict(hrm=0.5, kl=kl, topk_mode=mode, reduction=reduction, token_weights=c["weights"])
    want = oracle(c, go, None, ref_topk=(ids, lps), **opts)
    got = run(c, go, backend, 3, ref_topk=(ids, lps), **opts)
    compare(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V_ref", [33, 47])
@pytest.mark.parametrize("form", ["logits", "hidden"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_truncate(backend, V_ref, form, reduction):
    c = make(V_ref=V_ref)
    t = c["ref_hidden"] @ c["ref_weight"].T
    refs = dict(ref_logits=t) if form == "logits" else dict(ref_hidden=c["ref_hidden"], ref_weight=c["ref_weight"])
    go = grad_out(c, reduction)
    opts = dict(hrm=0.7, kl="jsd", temperature=2.0, reduction=reduction, ref_vocab="truncate")
    want = oracle(c, go, t, **opts)
    got = run(c, go, backend, 4, **refs, **opts)
    compare(got, want)
    with pytest.raises(ValueError, match="ref_vocab='truncate'"):
        hrmloss.linear_hrm_loss(c["hidden"], c["weight"], c["labels"], **refs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weights(backend, reduction):
    c = make()
    t = c["ref_hidden"] @ c["ref_weight"].T
    go = grad_out(c, reduction)
    opts = dict(hrm=0.5, reduction=reduction, token_weights=c["weights"])
    compare(run(c, go, backend, 5, ref_logits=t, **opts), oracle(c, go, t, **opts))

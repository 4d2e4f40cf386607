"""inplace_backward=True: the backward writes the gradient of the logits into their own storage."""
import pytest
import torch

import hrmloss
from hrmloss.engine import torch_passes
from .harness import BACKENDS, make
from .memtrack import peak_bytes


def _grads(s, t, y, backend, inplace, view=False, **kw):
    """(grad of the leaf behind the logits, grad of the reference, the logits after backward)."""
    base = s.clone().requires_grad_(True)
    ref = t.clone().requires_grad_(True)
    logits = base * 1.0                     # an intermediate result, like an lm head's output
    if view:
        logits = logits[:, :-1]             # a view of an intermediate: the causal-LM shift
        ref, y = ref[:, :-1], y[:, 1:]
    out = hrmloss.hrm_loss(logits, ref, y, 0.5, backend=backend, inplace_backward=inplace, **kw)
    out.backward()
    return base.grad, ref.grad if not view else None, logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl,temperature", [("forward", 1.0), ("reverse", 2.0), ("jsd", 0.5)])
@pytest.mark.parametrize("view", [False, True])
def test_inplace_gradient_is_the_out_of_place_one(backend, kl, temperature, view):
    s, t, y = make((2, 6, 300), ignore=-100)
    kw = dict(kl=kl, temperature=temperature, label_smoothing=0.1, softcap=5.0)
    want = _grads(s, t, y, backend, False, view, **kw)
    got = _grads(s, t, y, backend, True, view, **kw)
    assert torch.equal(got[0], want[0])
    if not view:
        assert torch.equal(got[1], want[1])
    # the logits' storage now holds their gradient
    assert torch.equal(got[2].detach(), want[0][:, :-1] if view else want[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_node_that_saved_the_logits_raises(backend):
    # logits * w saves the logits for w's gradient; it runs its backward after hrm_loss's, which
    # has overwritten them: autograd's version counter refuses instead of giving a wrong gradient
    s, t, y = make((4, 50))
    base = s.clone().requires_grad_(True)
    w = torch.ones(50, requires_grad=True)
    logits = base * 1.0
    other = (logits * w).sum()
    loss = hrmloss.hrm_loss(logits, t, y, backend=backend, inplace_backward=True) + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_refuses_a_leaf_or_a_view_of_a_leaf():
    # the caller still holds those and may read them after the backward
    s, t, y = make((4, 50))
    leaf = s.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="inplace_backward=True: logits is a leaf tensor"):
        hrmloss.hrm_loss(leaf, t, y, backend="torch", inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward=True: logits is a view of a leaf tensor"):
        hrmloss.hrm_loss(leaf[:, 1:], t[:, 1:], y, backend="torch", inplace_backward=True)


def test_no_gradient_no_refusal():
    # a tensor that needs no gradient is never overwritten: accepted (e.g. evaluation under no_grad)
    s, t, y = make((4, 50))
    a = hrmloss.hrm_loss(s, t, y, backend="torch", inplace_backward=True)
    with torch.no_grad():
        b = hrmloss.hrm_loss(s.clone().requires_grad_(True), t, y, backend="torch", inplace_backward=True)
    assert torch.equal(a, b)


def test_inplace_backward_type_checked():
    s, t, y = make((4, 50))
    with pytest.raises(TypeError, match="inplace_backward=1: expected a bool"):
        hrmloss.hrm_loss(s, t, y, inplace_backward=1)
    with pytest.raises(TypeError, match="inplace_backward"):
        hrmloss.HRMLoss(inplace_backward="yes")


def test_inplace_backward_allocates_no_gradient_buffer(monkeypatch):
    # peak bytes of the backward above what was live, for logits = h @ W^T with a narrow H: the default
    # backward holds a (N, V) gradient (1 NV); in place, only dW, dh and one chunk's temporaries
    monkeypatch.setattr(torch_passes, "CHUNK_ELEMS", 1 << 12)
    monkeypatch.setenv("HRMLOSS_COMPILE", "0")
    N, V, H = 64, 4096, 4
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    t, y = torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)
    nv = N * V * 4
    peaks = {}
    for inplace in (False, True):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss = hrmloss.hrm_loss(h @ w.T, t, y, backend="torch", inplace_backward=inplace)
        peaks[inplace] = peak_bytes(loss.backward) / nv
    assert peaks[False] >= 1.0
    assert peaks[True] < 0.2, peaks


def test_inplace_under_torch_compile():
    s, t, y = make((4, 6, 40))
    w0 = torch.randn(40, 40, generator=torch.Generator().manual_seed(3))

    def f(x, w, inplace):
        return hrmloss.hrm_loss(x @ w, t, y, 0.5, backend="torch", inplace_backward=inplace)

    grads = []
    for fn, inplace in ((f, False), (torch.compile(f, fullgraph=True), True)):
        x, w = s.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        fn(x, w, inplace).backward()
        grads.append((x.grad, w.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-5, atol=1e-6)

"""hrm_loss on both backends (Triton under the interpreter, torch) against the float64 reference."""
import math

import pytest
import torch

import hrmloss
from .harness import BACKENDS, check, close, make, run, truth

SHAPES = [(1, 1), (3, 5), (37, 1271), (2, 17, 503), (4, 131072), (2, 262144)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_shapes(backend, shape, kl):
    s, t, y = make(shape)
    check(s, t, y, backend, hrm=0.5, kl=kl, temperature=2.0 if kl == "reverse" else 1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_shifted_view_no_copy(backend, kl):
    # the usual causal-LM shift: logits[:, :-1] predicts labels[:, 1:]
    s, t, y = make((2, 9, 1000))
    sv, tv, yv = s[:, :-1], t[:, :-1], y[:, 1:]
    assert not sv.is_contiguous()
    check(sv, tv, yv, backend, hrm=0.5, kl=kl)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl,beta", [("forward", 0.5), ("reverse", 0.5), ("jsd", 0.1), ("jsd", 0.5),
                                     ("jsd", 0.9)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("hrm", [0.0, 0.001, 0.5, 10.0])
def test_options_grid(backend, kl, beta, temperature, hrm):
    s, t, y = make((6, 67), seed=int(hrm * 1000 + temperature * 10 + beta * 7))
    check(s, t, y, backend, hrm=hrm, kl=kl, beta=beta, temperature=temperature)


def low_precision_error(s, t, y, **kw):
    """PyTorch's own error in the dtype of s: the reference's formula evaluated in that dtype."""
    import torch.nn.functional as F
    sd = s.detach().clone().requires_grad_(True)
    lq = F.log_softmax(sd, -1)
    lp = F.log_softmax(t.to(s.dtype), -1)
    loss = F.cross_entropy(sd, y) + kw["hrm"] * F.kl_div(lq, lp, log_target=True, reduction="batchmean")
    loss.backward()
    ref = truth(s, t, y, **kw)
    return (loss.detach().double() - ref[0]).abs().item(), (sd.grad.double() - ref[4]).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dtypes_fair_to_low_precision(backend, dtype, ref_dtype):
    # the error against float64 truth on the same inputs is at most PyTorch's own error in that dtype
    s, t, y = make((37, 1271), dtype, ref_dtype)
    got = run(s, t, y, backend, hrm=0.5)
    ref = truth(s, t, y, hrm=0.5)
    if dtype == torch.float32:
        torch_loss_err, torch_grad_err = 0.0, 0.0
    else:
        torch_loss_err, torch_grad_err = low_precision_error(s, t, y, hrm=0.5)
    assert got[4].dtype == dtype and got[0].dtype == torch.float32
    assert (got[0].double() - ref[0]).abs().item() <= torch_loss_err + 2e-5 * ref[0].abs().item()
    # the gradient is computed in fp32 and rounded once to its dtype: within half an ulp of it
    ulp = torch.finfo(dtype).eps
    assert (got[4].double() - ref[4]).abs().max().item() <= torch_grad_err + ulp * ref[4].abs().max().item() + 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 5])
def test_reductions_and_ignore(backend, reduction, ignore_index):
    s, t, y = make((4, 7, 50), ignore=ignore_index)
    y[0, 1] = 5  # with ignore_index=5 a legal class id becomes the ignore value
    check(s, t, y, backend, hrm=0.5, reduction=reduction, ignore_index=ignore_index)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_all_ignored_is_zero_not_nan(backend, reduction, kl):
    s, t, y = make((5, 30))
    y[:] = -100
    loss, ce, k, _, grad, _ = run(s, t, y, backend, hrm=0.5, reduction=reduction, kl=kl)
    for x in (loss, ce, k, grad):
        assert torch.isfinite(x).all() and (x == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scalar(backend):
    s, t, y = make((8, 40), ignore=-100)
    check(s, t, y, backend, hrm=0.5, grad_out=torch.tensor(2.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_per_token_weights(backend, kl):
    s, t, y = make((3, 6, 40), ignore=-100)
    w = torch.rand(3, 6, generator=torch.Generator().manual_seed(1)) * 3
    check(s, t, y, backend, hrm=0.5, kl=kl, reduction="none", grad_out=w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_masked_vocabulary_is_dropped_vocabulary(backend, kl):
    # -inf at the same entries of student and reference = those entries removed from the vocabulary
    s, t, y = make((6, 40))
    keep = torch.ones(40, dtype=torch.bool)
    keep[[0, 7, 8, 39]] = False
    y = torch.where(keep[y], y, 1)
    sm, tm = s.masked_fill(~keep, -math.inf), t.masked_fill(~keep, -math.inf)
    loss, ce, k, _, grad, _ = run(sm, tm, y, backend, hrm=0.5, kl=kl, temperature=2.0)
    y_kept = torch.cumsum(keep.long(), 0)[y] - 1
    rl, rce, rk, _, rgrad, _ = truth(s[:, keep], t[:, keep], y_kept, hrm=0.5, kl=kl, temperature=2.0)
    close(loss, rl)
    close(k, rk)
    assert (grad[:, ~keep] == 0).all()
    close(grad[:, keep], rgrad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_minus_inf_where_student_finite(backend):
    # p = 0 at those entries: forward KL is finite (entries drop out), reverse KL is +inf (the right value)
    s, t, y = make((4, 30))
    t[:, :5] = -math.inf
    loss, ce, k, _, grad, _ = run(s, t, y, backend, hrm=0.5, kl="forward", reduction="none")
    lq = torch.log_softmax(s.double(), -1)[:, 5:]
    lp = torch.log_softmax(t.double()[:, 5:], -1)
    expected = (lp.exp() * (lp - lq)).sum(-1)
    close(k, expected)
    assert torch.isfinite(grad).all()
    _, _, k_rev, _, _, _ = run(s, t, y, backend, hrm=0.5, kl="reverse", reduction="none")
    assert torch.isinf(k_rev).all() and (k_rev > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_student_minus_inf_where_reference_finite(backend):
    # q = 0 at those entries: reverse KL is finite and their gradient is 0; forward KL is +inf
    s, t, y = make((4, 30))
    s[:, :5] = -math.inf
    y = y.clamp(min=5)
    loss, ce, k, _, grad, _ = run(s, t, y, backend, hrm=0.5, kl="reverse", reduction="none")
    lq = torch.log_softmax(s.double()[:, 5:], -1)
    lp = torch.log_softmax(t.double(), -1)[:, 5:]
    close(k, (lq.exp() * (lq - lp)).sum(-1))
    assert (grad[:, :5] == 0).all() and torch.isfinite(grad).all()
    _, _, k_fwd, _, _, _ = run(s, t, y, backend, hrm=0.5, kl="forward", reduction="none")
    assert torch.isinf(k_fwd).all() and (k_fwd > 0).all()


@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_gradcheck_float64_torch_backend(kl):
    s, t, y = make((3, 7))
    s = s.double().requires_grad_(True)
    y[1] = -100
    fn = lambda x: hrmloss.hrm_loss(x, t.double(), y, 0.7, kl=kl, temperature=1.5, backend="torch")  # noqa
    assert torch.autograd.gradcheck(fn, (s,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(backend, reduction):
    s = torch.zeros(0, 11, requires_grad=True)
    out = hrmloss.hrm_loss(s, torch.zeros(0, 11), torch.zeros(0, dtype=torch.long), backend=backend,
                           reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert out.item() == 0.0
        out.backward()
        assert s.grad.shape == (0, 11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_components_add_up_and_are_detached(backend):
    s, t, y = make((5, 20), ignore=-100)
    s.requires_grad_(True)
    out = hrmloss.hrm_loss(s, t, y, 0.3, return_components=True, backend=backend)
    assert isinstance(out, hrmloss.HRMLossOutput)
    assert out.loss.requires_grad and not out.ce.requires_grad and not out.kl.requires_grad
    close(out.loss.detach(), out.ce + 0.3 * out.kl, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_function(backend):
    s, t, y = make((5, 20), ignore=-100)
    crit = hrmloss.HRMLoss(hrm=0.5, kl="reverse", temperature=2.0, backend=backend)
    assert "kl='reverse'" in repr(crit)
    a = crit(s, t, y)
    b = hrmloss.hrm_loss(s, t, y, 0.5, kl="reverse", temperature=2.0, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_large_logits(backend, kl):
    # logits of size 60 stress the online rescaling and the fp32 cancellation in kl = E[u - w] - lse + lse
    s, t, y = make((3, 5000), scale=60.0)
    check(s, t, y, backend, hrm=2.0, kl=kl)

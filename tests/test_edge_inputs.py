"""Nothing silent (issue 20): every bad input a named error before anything runs, every edge case the right
number, on both backends and both entry points. The right numbers come from tests/reference.py (float64)."""
import math

import pytest
import torch

import hrmloss
from .harness import BACKENDS, make
from .reference import reference_loss

INF = math.inf


def linear_case(N=4, H=6, V=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    return h, w, torch.randn(N, V, generator=g), torch.randint(0, V, (N,), generator=g)


def both_entry_points(backend, s, t, y, **kw):
    """hrm_loss on logits s, and linear_hrm_loss on hidden states whose logits are another random s."""
    h, w, t2, _ = linear_case(*s.shape[:1], 6, s.shape[-1])
    h.requires_grad_()
    return (lambda: hrmloss.hrm_loss(s, t, y, backend=backend, **kw),
            lambda: hrmloss.linear_hrm_loss(h, w, y, ref_logits=None if t is None else t2, backend=backend, **kw))


# ---------------------------------------------------------------------------------------------------------
# 1. num_items


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [torch.tensor(-3.0), torch.tensor(-1), torch.tensor(math.nan), torch.tensor(INF)],
                         ids=["-3.", "-1", "nan", "inf"])
def test_num_items_tensor_out_of_range_is_named(backend, bad):
    s, t, y = make((4, 10))
    for call in both_entry_points(backend, s, t, y, num_items=bad):
        with pytest.raises(ValueError, match=r"num_items \(a tensor\): expected a finite number >= 0"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero", [0, 0.0, torch.tensor(0), torch.tensor(0.0)], ids=["0", "0.", "t0", "t0."])
def test_num_items_zero(backend, zero):
    s, t, y = make((4, 10))
    masked = torch.full_like(y, -100)
    for call in both_entry_points(backend, s.requires_grad_(), t, masked, num_items=zero):
        loss = call()
        assert loss.item() == 0.0  # a fully masked accumulated batch: 0, not inf / NaN
        loss.backward()
    for call in both_entry_points(backend, s, t, y, num_items=zero):
        with pytest.raises(ValueError, match="num_items=0 with counted tokens"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_as_a_float_weight_sum(backend):
    s, t, y = make((4, 10))
    w = torch.tensor([0.5, 1.5, 0.25, 2.0])
    got = hrmloss.hrm_loss(s, t, y, backend=backend, token_weights=w, num_items=8.5)
    want = reference_loss(s, t, y, token_weights=w, num_items=8.5)[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    h, wt, t2, y2 = linear_case()
    got = hrmloss.linear_hrm_loss(h, wt, y2, ref_logits=t2, backend=backend, num_items=torch.tensor(8.5))
    torch.testing.assert_close(got.double(), reference_loss(h.double() @ wt.double().T, t2, y2, num_items=8.5)[0],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad,exc", [(-1.0, ValueError), (math.nan, ValueError), (1e39, ValueError),
                                     (10 ** 400, ValueError), (True, TypeError), ("3", TypeError)])
def test_num_items_number_out_of_range_is_named(no_launch, bad, exc):
    s, t, y = make((4, 10))
    with pytest.raises(exc, match="num_items"):
        hrmloss.hrm_loss(s, t, y, num_items=bad)


# ---------------------------------------------------------------------------------------------------------
# 2. Python numbers as the float32 the passes see


@pytest.mark.parametrize("kwargs,text", [
    (dict(temperature=1e-50), "temperature=1e-50"), (dict(temperature=1e-39), "temperature=1e-39"),
    (dict(hrm=1e39), "hrm=1e"), (dict(hrm=10 ** 400), "hrm=inf"), (dict(z_loss=1e39), "z_loss=1e"),
    (dict(softcap=1e39), "softcap=1e"),
    (dict(beta=1e-50), "beta=1e-50"), (dict(beta=1 - 1e-10), "beta=0.99"),
    (dict(label_smoothing=1 - 1e-10), "label_smoothing=0.99")])
def test_numbers_are_checked_as_float32(no_launch, kwargs, text):
    s, t, y = make((4, 10))
    h, w, t2, y2 = linear_case()
    for call in (lambda: hrmloss.hrm_loss(s, t, y, **kwargs),
                 lambda: hrmloss.linear_hrm_loss(h, w, y2, ref_logits=t2, **kwargs),
                 lambda: hrmloss.HRMLoss(**kwargs)):
        with pytest.raises(ValueError, match=text):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_smallest_normal_temperature_is_accepted_as_number_and_tensor(backend):
    s, t, y = make((2, 8), scale=1e-37)  # logits / T stay finite
    tiny = torch.finfo(torch.float32).tiny
    for T in (tiny, torch.tensor(tiny)):
        assert torch.isfinite(hrmloss.hrm_loss(s, t, y, backend=backend, temperature=T))
    with pytest.raises(ValueError, match="temperature"):
        hrmloss.hrm_loss(s, t, y, backend=backend, temperature=torch.tensor(tiny / 2))


def test_as_float32_rounds_like_a_cast():
    from hrmloss.engine.options import as_float32
    g = torch.Generator().manual_seed(0)
    xs = (torch.rand(4000, generator=g, dtype=torch.float64) - 0.5) * 10 ** (torch.rand(4000, generator=g) * 86 - 47)
    xs = torch.cat([xs, torch.tensor([3.4028235677973366e38, 3.4028235677973362e38, 1e39, 7.1e-46, 7e-46, 0.0],
                                     dtype=torch.float64)])
    assert [as_float32(x) for x in xs.tolist()] == xs.float().double().tolist()


# ---------------------------------------------------------------------------------------------------------
# 3. token_weights


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [INF, -INF, math.nan, -1.0])
def test_token_weights_finite_and_nonnegative(backend, bad):
    s, t, y = make((4, 10))
    w = torch.tensor([1.0, bad, 1.0, 1.0])
    for call in both_entry_points(backend, s, t, y, token_weights=w):
        with pytest.raises(ValueError, match="token_weights: expected finite weights >= 0"):
            call()


# ---------------------------------------------------------------------------------------------------------
# 4. a sparse teacher's counted row of zero mass


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_counted_row_all_minus_inf(backend):
    s, _, y = make((4, 10))
    ids = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i))[:3] for i in range(4)])
    lps = torch.log_softmax(torch.randn(4, 3), -1) - 0.5
    lps[2] = -INF
    for call in both_entry_points(backend, s, None, y, ref_topk=(ids, lps)):
        with pytest.raises(ValueError, match="ref_topk logprobs: a counted row is all -inf.*row 2 "):
            call()
    h, w, _, _ = linear_case()
    with pytest.raises(ValueError, match="ref_topk logprobs: a counted row is all -inf.*row 2 "):
        hrmloss.linear_hrm_loss(h, w, y, ref_topk=(ids, lps), backend=backend, chunk_size=1)  # the flat row
    y2 = y.clone()
    y2[2] = -100  # an ignored row is never read
    got = hrmloss.hrm_loss(s, None, y2, backend=backend, ref_topk=(ids, lps), reduction="none")
    want = reference_loss(s, None, y2, ref_topk=(ids, lps), reduction="none")[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    # topk_mode="tail": a row of zero mass at the ids is all on the rest: KL(p||q) = -log q_rest
    got = hrmloss.hrm_loss(s, None, y, backend=backend, ref_topk=(ids, lps), topk_mode="tail", reduction="none")
    want = reference_loss(s, None, y, ref_topk=(ids, lps), topk_mode="tail", reduction="none")[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# 5. inplace_backward on logits whose elements share memory


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["expand", "as_strided"])
def test_inplace_backward_refuses_overlapping_logits(backend, view):
    _, t, y = make((4, 10))
    x = torch.randn(1, 10, requires_grad=True)
    base = x * 1.0
    logits = base.expand(4, 10) if view == "expand" else (x.repeat(1, 4) * 1.0).as_strided((4, 10), (3, 1))
    with pytest.raises(ValueError, match="inplace_backward=True: logits .* share memory"):
        hrmloss.hrm_loss(logits, t, y, backend=backend, inplace_backward=True)
    # a transposed (non-overlapping) view is still accepted, and gives the gradient of inplace_backward=False
    z = torch.randn(10, 4, requires_grad=True)
    grads = []
    for inplace in (True, False):
        hrmloss.hrm_loss((z * 1.0).t(), t, y, backend=backend, inplace_backward=inplace).backward()
        grads.append(z.grad.clone())
        z.grad = None
    torch.testing.assert_close(grads[0], grads[1])


def test_may_overlap():
    from hrmloss.engine.checks import may_overlap
    x = torch.zeros(6, 8)
    assert not any(may_overlap(v) for v in (x, x.t(), x[:, ::2], x[::2], x.view(2, 3, 8).permute(2, 0, 1), x[:1]))
    assert all(may_overlap(v) for v in (x[:1].expand(6, 8), x.as_strided((6, 8), (4, 1)),
                                        x.as_strided((6, 8), (1, 1))))


# ---------------------------------------------------------------------------------------------------------
# 7. devices: num_items on another device, all-meta tensors


def test_num_items_on_another_device_is_named(no_launch):
    s, t, y = make((4, 10))
    h, w, t2, y2 = linear_case()
    n = torch.tensor(3.0, device="meta")
    for call in (lambda: hrmloss.hrm_loss(s, t, y, num_items=n),
                 lambda: hrmloss.linear_hrm_loss(h, w, y2, ref_logits=t2, num_items=n)):
        with pytest.raises(ValueError, match="num_items is a tensor on meta: expected the CPU or the device"):
            call()


def test_all_meta_tensors_give_a_meta_scalar():
    m = lambda *shape: torch.empty(*shape, device="meta")  # noqa: E731
    y = torch.empty(4, dtype=torch.long, device="meta")
    for loss in (hrmloss.hrm_loss(m(4, 10), m(4, 10), y, backend="torch"),
                 hrmloss.linear_hrm_loss(m(4, 8), m(10, 8), y, ref_logits=m(4, 10), backend="torch"),
                 hrmloss.linear_hrm_loss(m(4, 8), m(10, 8), y, ref_hidden=m(4, 8), ref_weight=m(10, 8),
                                         backend="torch")):
        assert loss.device.type == "meta" and loss.shape == ()


# ---------------------------------------------------------------------------------------------------------
# 8. LinearHRMLoss(grad_acc_dtype=...) at construction


@pytest.mark.parametrize("bad,exc", [("x", TypeError), ("float32", TypeError), (torch.float64, ValueError),
                                     (torch.int32, ValueError)])
def test_grad_acc_dtype_refused_at_construction(bad, exc):
    with pytest.raises(exc, match="grad_acc_dtype="):
        hrmloss.LinearHRMLoss(grad_acc_dtype=bad)
    h, w, t, y = linear_case()
    with pytest.raises(exc, match="grad_acc_dtype="):
        hrmloss.linear_hrm_loss(h, w, y, ref_logits=t, grad_acc_dtype=bad)
    for ok in (None, torch.float32, torch.bfloat16):
        hrmloss.LinearHRMLoss(grad_acc_dtype=ok)


# ---------------------------------------------------------------------------------------------------------
# 4. a counted dense row of all -inf: no mass, no common support (design.md §1)


def _no_support_kl(kl, beta):
    return INF if kl != "jsd" else -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_reference_row_all_minus_inf(backend, kl):
    s, t, y = make((4, 10))
    t[1] = -INF
    beta = 0.3
    s.requires_grad_()
    out = hrmloss.hrm_loss(s, t, y, backend=backend, kl=kl, beta=beta, reduction="none", return_components=True)
    out.loss.sum().backward()
    assert out.kl[1].item() == pytest.approx(_no_support_kl(kl, beta), rel=1e-6)
    # the other rows and the CE of row 1 as the float64 oracle; row 1's gradient is the CE's alone
    keep = torch.tensor([0, 2, 3])
    want = reference_loss(s[keep], t[keep], y[keep], kl=kl, beta=beta, reduction="none")
    for got, ref in zip(out, want):
        torch.testing.assert_close(got[keep].double(), ref, rtol=1e-5, atol=1e-6)
    s64 = s.detach()[1].double().requires_grad_()
    ce = torch.nn.functional.cross_entropy(s64, y[1])
    ce.backward()
    torch.testing.assert_close(out.ce[1].double(), ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad[1].double(), s64.grad, rtol=1e-5, atol=1e-6)
    # linear_hrm_loss: the same row value
    h, w, t2, y2 = linear_case()
    t2[1] = -INF
    got = hrmloss.linear_hrm_loss(h, w, y2, ref_logits=t2, backend=backend, kl=kl, beta=beta, reduction="none",
                                  return_components=True)
    assert got.kl[1].item() == pytest.approx(_no_support_kl(kl, beta), rel=1e-6)
    assert torch.isfinite(got.ce).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_student_row_all_minus_inf(backend, kl):
    s, t, y = make((4, 10))
    s[2] = -INF
    s.requires_grad_()
    t.requires_grad_()
    out = hrmloss.hrm_loss(s, t, y, backend=backend, kl=kl, label_smoothing=0.1, z_loss=1e-3, reduction="none",
                           return_components=True)
    (out.loss[[0, 1, 3]].sum() + out.loss[2].clamp(max=0)).backward()
    # the label has probability 0: ce +inf; no common support: kl as above; no gradient anywhere in the row
    assert out.ce[2].item() == INF and out.z[2].item() == INF
    assert out.kl[2].item() == pytest.approx(_no_support_kl(kl, 0.5), rel=1e-6)
    assert (s.grad[2] == 0).all() and (t.grad[2] == 0).all()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    with pytest.raises(ValueError, match=r"check_finite: ce is \+inf at row 2 .*probability is 0"):
        hrmloss.hrm_loss(s, t, y, backend=backend, kl=kl, check_finite=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_finite_names_an_infinite_divergence(backend):
    s, t, y = make((4, 10))
    t[3, 5] = -INF  # finite student, reference 0 there: reverse KL +inf (the right value)
    assert hrmloss.hrm_loss(s, t, y, backend=backend, kl="reverse", reduction="none")[3].item() == INF
    with pytest.raises(ValueError, match=r"check_finite: kl is \+inf at row 3 .*one distribution is 0"):
        hrmloss.hrm_loss(s, t, y, backend=backend, kl="reverse", check_finite=True)


# ---------------------------------------------------------------------------------------------------------
# 6. logits near fp32's range


def _near_or_inf(x, r, overflows, what):
    """x (fp32) is r (float64) to within the rounding of logits near 3e38 (ulp ~ 2e31), or +inf where r is
    beyond ~1e37 or in a row whose statistics may overflow fp32 (`overflows`)."""
    ok = ((x.double() - r).abs() <= 1e32 + 1e-6 * r.abs()) | ((x == INF) & ((r > 1e37) | overflows))
    assert ok.all(), (what, x, r)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")  # numpy, in the interpreter
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("kw,seed", [({}, 0), (dict(temperature=2.0), 1), (dict(z_loss=1e-4), 2)],
                         ids=["T1", "T2", "z"])
def test_logits_near_the_fp32_range_never_give_minus_inf_or_nan(kl, kw, seed):
    g = torch.Generator().manual_seed(seed)
    B = 3e38
    s = (torch.randint(0, 2, (6, 8), generator=g) * 2 - 1).float() * B
    t = (torch.randint(0, 2, (6, 8), generator=g) * 2 - 1).float() * B
    s[0], t[1], s[2] = B, -B, torch.tensor([B, -B, 0, 0, 1, 2, 3, 4])
    y = torch.randint(0, 8, (6,), generator=g)
    outs = [hrmloss.hrm_loss(s, t, y, backend=b, kl=kl, reduction="none", return_components=True, **kw)
            for b in BACKENDS]
    ref = reference_loss(s, t, y, kl=kl, reduction="none", **kw)
    T = kw.get("temperature", 1.0)
    # the documented limit: a row whose sum over V of log-ratios |s - t| / T may overflow fp32
    overflows = ((s.double() - t.double()).abs() / T > torch.finfo(torch.float32).max / s.shape[-1]).any(-1)
    for backend, got in zip(BACKENDS, outs):
        for name, x, r in zip(("loss", "ce", "kl", "z"), got, ref):
            assert not (x.isnan() | (x == -INF)).any(), (backend, name, x)
            _near_or_inf(x, r, overflows, (backend, name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kl", [("renorm", "forward"), ("renorm", "jsd"), ("tail", "reverse")])
def test_student_row_all_minus_inf_with_a_sparse_teacher(backend, mode, kl):
    s, _, y = make((3, 10))
    s[1] = -INF
    s.requires_grad_()
    ids = torch.stack([torch.randperm(10, generator=torch.Generator().manual_seed(i))[:3] for i in range(3)])
    lps = torch.log_softmax(torch.randn(3, 3, generator=torch.Generator().manual_seed(9)), -1) - 0.3
    out = hrmloss.hrm_loss(s, None, y, backend=backend, ref_topk=(ids, lps), topk_mode=mode, kl=kl,
                           reduction="none", return_components=True)
    out.loss.sum().backward()
    assert out.ce[1].item() == INF
    assert out.kl[1].item() == pytest.approx(_no_support_kl(kl, 0.5), rel=1e-6)
    assert (s.grad[1] == 0).all() and torch.isfinite(s.grad).all()
    want = reference_loss(s[[0, 2]], None, y[[0, 2]], ref_topk=(ids[[0, 2]], lps[[0, 2]]), topk_mode=mode, kl=kl,
                          reduction="none")
    for got, ref in zip(out, want):
        torch.testing.assert_close(got[[0, 2]].double(), ref, rtol=1e-5, atol=1e-6)

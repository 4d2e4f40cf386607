"""A sparse teacher (ref_topk, topk_mode) on both backends against the float64 oracle of tests/reference.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import hrmloss
from .harness import BACKENDS, close
from .reference import reference_loss


def make_topk(shape, K, seed=0, scale=3.0, ignore=True):
    """Student logits (..., V), labels, and a teacher's top-K (ids, log-probs) of its own full softmax."""
    g = torch.Generator().manual_seed(seed)
    V = shape[-1]
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    y = torch.randint(0, V, shape[:-1], generator=g)
    if ignore:
        y.view(-1)[::4] = -100
    lp, ids = F.log_softmax(t, -1).topk(K, -1)
    perm = torch.argsort(torch.rand(ids.shape, generator=g), -1)  # ids in no particular order
    return s, t, y, ids.gather(-1, perm), lp.gather(-1, perm)


def run_topk(s, y, ids, lps, backend, grad_out=None, **kw):
    s = s.detach().clone().requires_grad_(True)
    out = hrmloss.hrm_loss(s, None, y, ref_topk=(ids, lps), backend=backend, return_components=True, **kw)
    out.loss.backward(grad_out if grad_out is not None else torch.ones_like(out.loss))
    return (*(x.detach() for x in out), s.grad)


def truth_topk(s, y, ids, lps, grad_out=None, **kw):
    s64 = s.detach().double().requires_grad_(True)
    out = reference_loss(s64, None, y, ref_topk=(ids, lps), **kw)
    out[0].backward(grad_out.double() if grad_out is not None else torch.ones_like(out[0]))
    return (*(x.detach() for x in out), s64.grad)


def check_topk(s, y, ids, lps, backend, atol=2e-5, grad_out=None, **kw):
    got = run_topk(s, y, ids, lps, backend, grad_out, **kw)
    want = truth_topk(s, y, ids, lps, grad_out, **kw)
    for name, a, b in zip(("loss", "ce", "kl", "z", "grad"), got, want):
        close(a, b, atol=atol * max(1.0, b.abs().max().item()))
    return got


MODES_KLS = [("renorm", "forward"), ("renorm", "jsd"), ("tail", "forward"), ("tail", "reverse"), ("tail", "jsd")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kl", MODES_KLS)
@pytest.mark.parametrize("K", [1, 5, 40])
def test_random_cases(backend, mode, kl, K):
    s, t, y, ids, lps = make_topk((3, 7, 83), K, seed=K)
    check_topk(s, y, ids, lps, backend, hrm=0.7, kl=kl, beta=0.3, topk_mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(temperature=2.0), dict(temperature=0.5, kl="jsd", beta=0.7),
                                  dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3),
                                  dict(temperature=1.5, softcap=3.0, reduction="none"),
                                  dict(reduction="sum", hrm=0.0)], ids=str)
def test_renorm_options(backend, opts):
    s, t, y, ids, lps = make_topk((4, 5, 61), 8, seed=3)
    grad_out = torch.rand(4, 5) if opts.get("reduction") == "none" else None
    check_topk(s, y, ids, lps, backend, grad_out=grad_out, **{"hrm": 0.5, **opts})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("opts", [dict(softcap=4.0, label_smoothing=0.1, z_loss=1e-3, reduction="none"),
                                  dict(kl="reverse", reduction="sum"), dict(kl="jsd", beta=0.9)], ids=str)
def test_tail_options(backend, opts):
    s, t, y, ids, lps = make_topk((4, 5, 61), 8, seed=4)
    grad_out = torch.rand(4, 5) if opts.get("reduction") == "none" else None
    check_topk(s, y, ids, lps, backend, grad_out=grad_out, topk_mode="tail", **{"hrm": 0.5, **opts})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kl,T", [("renorm", "forward", 1.0), ("renorm", "forward", 2.0), ("renorm", "jsd", 0.5),
                                       ("tail", "forward", 1.0), ("tail", "reverse", 1.0), ("tail", "jsd", 1.0)])
def test_k_equal_v_is_the_dense_loss(backend, mode, kl, T):
    # every id given: both modes are the dense divergence to softmax(t)
    s, t, y, ids, lps = make_topk((2, 5, 37), 37, seed=5)
    got = run_topk(s, y, ids, lps, backend, hrm=0.5, kl=kl, temperature=T, topk_mode=mode)
    sd = s.clone().requires_grad_(True)
    dense = hrmloss.hrm_loss(sd, t, y, 0.5, kl=kl, temperature=T, backend=backend, return_components=True)
    dense.loss.backward()
    for a, b in zip(got, (*dense, sd.grad)):
        close(a, b.detach(), atol=5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_forms_with_one_id(backend):
    # K = 1: renorm forward KL = -log q_k; tail forward KL = the binary KL of (p, 1 - p) to (q, 1 - q)
    s, t, y, ids, lps = make_topk((6, 30), 1, seed=6, ignore=False)
    lps = lps - 0.4  # p = 0.67 exp(lp): a rest of mass >= 1/3
    lq = F.log_softmax(s.double(), -1).gather(-1, ids)[:, 0]
    for mode, want in (("renorm", -lq),
                       ("tail", lambda p, q: p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log())):
        out = hrmloss.hrm_loss(s, None, y, ref_topk=(ids, lps), topk_mode=mode, backend=backend, reduction="none",
                               return_components=True)
        if mode == "tail":
            want = want(lps.double()[:, 0].exp(), lq.exp())
        close(out.kl, want, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tail_rest_mass_does_not_cancel(backend):
    # a confident student: q_rest ~ 1e-13, far below fp32's 1 - sum_k q_k resolution (~1e-7); the teacher
    # keeps 1e-3 off its ids, so p_rest log(p_rest / q_rest) ~ 0.02 depends on log q_rest directly
    V, K = 50, 3
    s = torch.full((2, V), -5.0)
    s[:, :K] = torch.tensor([30.0, 29.0, 28.0])
    ids = torch.arange(K).expand(2, K).contiguous()
    p = torch.tensor([0.7, 0.2, 0.099])
    lps = p.log().expand(2, K).contiguous()
    y = torch.tensor([0, 1])
    got = run_topk(s, y, ids, lps, backend, topk_mode="tail", reduction="sum")
    want = truth_topk(s, y, ids, lps, topk_mode="tail", reduction="sum")
    assert want[2].item() > 0.02
    close(got[2], want[2], atol=1e-6, rtol=1e-5)
    close(got[4], want[4], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shifted_views_int32_and_bf16(backend):
    s, t, y, ids, lps = make_topk((2, 9, 70), 6, seed=7)
    sv, yv = s[:, :-1].to(torch.bfloat16), y[:, 1:]
    got = run_topk(sv, yv, ids[:, 1:].int(), lps[:, 1:], backend, hrm=0.5, topk_mode="tail")
    want = truth_topk(sv, yv, ids[:, 1:], lps[:, 1:], hrm=0.5, topk_mode="tail")
    assert got[4].dtype == torch.bfloat16 and got[4].shape == sv.shape
    close(got[0], want[0], atol=1e-4)
    close(got[4], want[4], atol=1e-2)



def test_bad_sparse_teacher(no_launch):
    s, t, y, ids, lps = make_topk((4, 10), 3, ignore=False)
    bad = [
        (dict(kl="reverse"), ValueError, "kl='reverse'"),
        (dict(topk_mode="tail", temperature=2.0), ValueError, "temperature"),
        (dict(topk_mode="tail", temperature=torch.tensor(1.0)), ValueError, "temperature"),
        (dict(topk_mode="top"), ValueError, "topk_mode"),
        (dict(ref_topk=(ids, lps, lps)), TypeError, "ref_topk"),
        (dict(ref_topk=(ids.float(), lps)), TypeError, "indices.dtype"),
        (dict(ref_topk=(ids, lps.long())), TypeError, "logprobs.dtype"),
        (dict(ref_topk=(ids[:3], lps[:3])), ValueError, "indices.shape"),
        (dict(ref_topk=(ids, lps[:, :2])), ValueError, "logprobs.shape"),
        (dict(ref_topk=(torch.arange(11).expand(4, 11), torch.full((4, 11), -3.0))), ValueError, "K <= V"),
        (dict(ref_topk=(ids.clone().fill_(10), lps)), ValueError, "outside"),
        (dict(ref_topk=(torch.tensor([[0, 1, 1]] * 4), lps)), ValueError, "repeated"),
        (dict(ref_topk=(ids, lps.abs() + 0.1)), ValueError, "<= 0"),
        (dict(ref_topk=(ids, lps.clone().fill_(float("nan")))), ValueError, "<= 0"),
        (dict(ref_topk=(ids, torch.full((4, 3), math.log(0.5)))), ValueError, "sum above"),
        (dict(ref_topk=(ids, lps), ref_logits=t), ValueError, "ref_topk"),
    ]
    for backend in BACKENDS:
        for kw, exc, text in bad:
            kw = dict(kw)
            ref = kw.pop("ref_logits", None)
            kw.setdefault("ref_topk", (ids, lps))
            with pytest.raises(exc, match=text):
                hrmloss.hrm_loss(s, ref, y, backend=backend, **kw)
    # no reference at all is no longer an error (issue 21): the fused cross-entropy alone, no reference read


def test_torch_compile_fullgraph():
    # the sparse teacher and token weights trace through torch.compile(fullgraph=True): same loss and gradient
    s, t, y, ids, lps = make_topk((2, 5, 40), 6, seed=8)
    w = torch.rand(2, 5)

    def f(s):
        return hrmloss.hrm_loss(s, None, y, 0.5, ref_topk=(ids, lps), topk_mode="tail", kl="jsd", token_weights=w,
                                backend="torch")
    grads = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        x = s.clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    close(grads[1][0], grads[0][0], atol=1e-6)
    close(grads[1][1], grads[0][1], atol=1e-6)


@pytest.fixture
def split(monkeypatch):
    """The Triton launcher splits (6, 5000) rows into 3 ranges for the reading passes, 2 for the gradient
    (as tests/test_vocab_split.py): the rest mass merges over split rows like any lse."""
    from hrmloss.kernels import launch
    monkeypatch.setattr(launch, "multiprocessor_count", lambda device: 64)
    monkeypatch.setattr(launch, "MIN_SPLIT_BLOCKS", 1)
    assert launch.vocab_splits(6, 5000, 1024, 64)[0] == 3


@pytest.mark.parametrize("mode,kl", [("renorm", "jsd"), ("tail", "forward"), ("tail", "reverse")])
def test_split_rows(split, mode, kl):
    s, t, y, ids, lps = make_topk((2, 3, 5000), 12, seed=9)
    ids[0, 0, :3] = torch.tensor([0, 2047, 4999])  # ids at the ranges' edges
    check_topk(s, y, ids, lps.clamp(max=-3.0), "triton", hrm=0.5, kl=kl, topk_mode=mode)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,kl", [("renorm", "forward"), ("tail", "jsd")])
def test_inplace_backward(backend, mode, kl):
    # the gradient overwrites the logits (an intermediate result); the term at the ids still lands
    s, t, y, ids, lps = make_topk((2, 5, 61), 6, seed=10)
    want = truth_topk(s, y, ids, lps, hrm=0.5, kl=kl, topk_mode=mode)
    leaf = s.clone().requires_grad_(True)
    x = leaf * 1.0
    x.retain_grad()
    loss = hrmloss.hrm_loss(x, None, y, 0.5, kl=kl, topk_mode=mode, ref_topk=(ids, lps), backend=backend,
                            inplace_backward=True)
    loss.backward()
    close(loss.detach(), want[0])
    close(leaf.grad, want[4], atol=2e-5)

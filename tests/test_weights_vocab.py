"""token_weights and ref_vocab="truncate" on both backends against the float64 oracle of tests/reference.py."""
import pytest
import torch

import hrmloss
from .harness import BACKENDS, close, make
from .reference import reference_loss
from .test_topk import no_launch  # noqa: F401 (a fixture)


def run(s, t, y, backend, grad_out=None, ref_grad=False, **kw):
    s = s.detach().clone().requires_grad_(True)
    t = t.detach().clone().requires_grad_(ref_grad)
    out = hrmloss.hrm_loss(s, t, y, backend=backend, return_components=True, **kw)
    out.loss.backward(grad_out if grad_out is not None else torch.ones_like(out.loss))
    return (*(x.detach() for x in out), s.grad, t.grad)


def truth(s, t, y, grad_out=None, ref_grad=False, **kw):
    s64 = s.detach().double().requires_grad_(True)
    t64 = t.detach().double().requires_grad_(ref_grad)
    out = reference_loss(s64, t64, y, **kw)
    out[0].backward(grad_out.double() if grad_out is not None else torch.ones_like(out[0]))
    return (*(x.detach() for x in out), s64.grad, t64.grad)


def check(s, t, y, backend, atol=3e-5, **kw):
    got, want = run(s, t, y, backend, **kw), truth(s, t, y, **kw)
    for name, a, b in zip(("loss", "ce", "kl", "z", "grad", "ref_grad"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        close(a, b, atol=atol * max(1.0, b.abs().max().item()))


def weights(shape, seed=0):
    w = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2
    w.view(-1)[1::5] = 0.0
    return w


# ---------------------------------------------------------------------------------------- token weights

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", [dict(kl="forward"), dict(kl="jsd", temperature=2.0, z_loss=1e-3),
                                  dict(kl="reverse", num_items=7)], ids=str)
def test_token_weights(backend, reduction, opts):
    if "num_items" in opts and reduction != "mean":
        pytest.skip("num_items is for 'mean'")
    s, t, y = make((3, 5, 40), ignore=-100)
    grad_out = torch.rand(3, 5) if reduction == "none" else None
    check(s, t, y, backend, hrm=0.5, reduction=reduction, token_weights=weights((3, 5)), grad_out=grad_out, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_weights_with_a_sparse_teacher(backend):
    from .test_topk import check_topk, make_topk
    s, t, y, ids, lps = make_topk((3, 5, 40), 6)
    check_topk(s, y, ids, lps, backend, hrm=0.5, topk_mode="tail", token_weights=weights((3, 5)))


def test_token_weights_edge_cases():
    s, t, y = make((4, 30))
    ones = hrmloss.hrm_loss(s, t, y, token_weights=torch.ones(4), return_components=True)
    plain = hrmloss.hrm_loss(s, t, y, return_components=True)
    for a, b in zip(ones, plain):
        close(a, b)
    s.requires_grad_(True)
    zero = hrmloss.hrm_loss(s, t, y, token_weights=torch.zeros(4))
    zero.backward()
    assert zero.item() == 0.0 and (s.grad == 0).all()  # "mean" of no weight is 0, not NaN
    # an infinite row with weight 0 counts nowhere
    t2 = t.clone()
    t2[0, 3] = float("-inf")
    got = hrmloss.hrm_loss(s.detach(), t2, y, kl="reverse", token_weights=torch.tensor([0.0, 1, 1, 1]))
    assert torch.isfinite(got)


def test_bad_token_weights(no_launch):
    s, t, y = make((4, 30))
    for w, exc, text in [(torch.ones(3), ValueError, "token_weights.shape"),
                         (torch.ones(4, dtype=torch.long), TypeError, "token_weights.dtype"),
                         ([1.0] * 4, TypeError, "token_weights"),
                         (torch.tensor([1.0, -0.5, 1, 1]), ValueError, "weights >= 0"),
                         (torch.tensor([1.0, float("nan"), 1, 1]), ValueError, "weights >= 0")]:
        for backend in BACKENDS:
            with pytest.raises(exc, match=text):
                hrmloss.hrm_loss(s, t, y, token_weights=w, backend=backend)


# ---------------------------------------------------------------------------------------- ref_vocab

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,V_ref", [(50, 43), (43, 50)])
@pytest.mark.parametrize("opts", [dict(kl="forward"), dict(kl="reverse", temperature=2.0),
                                  dict(kl="jsd", beta=0.3, label_smoothing=0.1, softcap=5.0)], ids=str)
def test_truncate(backend, V, V_ref, opts):
    s, _, y = make((2, 6, V), ignore=-100)
    t = make((2, 6, V_ref), seed=1)[1]
    check(s, t, y, backend, hrm=0.7, ref_vocab="truncate", ref_grad=True, **opts)


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_shifted_view(backend):
    s, _, y = make((2, 9, 60))
    t = make((2, 9, 52), seed=2)[1]
    check(s[:, :-1], t[:, :-1], y[:, 1:], backend, hrm=0.5, kl="jsd", ref_vocab="truncate", reduction="none",
          grad_out=torch.rand(2, 8))


def test_truncate_equals_padding_the_student_away():
    # V > V_ref: the divergence is that of the student's first V_ref logits; CE over all V
    s, _, y = make((5, 30))
    t = make((5, 24), seed=3)[1]
    got = hrmloss.hrm_loss(s, t, y, ref_vocab="truncate", return_components=True, backend="torch")
    kl_only = hrmloss.hrm_loss(s[:, :24], t, y.clamp(max=23), return_components=True, backend="torch").kl
    ce_only = torch.nn.functional.cross_entropy(s, y)
    close(got.kl, kl_only)
    close(got.ce, ce_only)


def test_mismatched_vocab_is_an_error_by_default(no_launch):
    s, t, y = make((4, 30))
    with pytest.raises(ValueError, match="ref_vocab='truncate'"):
        hrmloss.hrm_loss(s, t[:, :20], y)
    with pytest.raises(ValueError, match="ref_vocab"):
        hrmloss.hrm_loss(s, t, y, ref_vocab="pad")

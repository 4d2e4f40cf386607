"""docs/divergences.md, checked: hrmloss's kl kinds reproduce PyTorch's F.kl_div, TRL's GKD generalized JSD
and Liger-Kernel's chunked JSD under the documented mappings, and closed forms."""
import importlib
import math

import pytest
import torch
import torch.nn.functional as F

import hrmloss
from .harness import close


def _rows(n=6, v=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2, torch.randint(0, v, (n,), generator=g)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_kl_div_argument_order(T):
    # forward KL(p||q) = F.kl_div(input=log q, target=log p, log_target=True); reverse swaps them
    s, t, y = _rows()
    lq, lp = F.log_softmax(s / T, -1), F.log_softmax(t / T, -1)
    for kl, (inp, tgt) in (("forward", (lq, lp)), ("reverse", (lp, lq))):
        got = hrmloss.hrm_loss(s, t, y, kl=kl, temperature=T, reduction="sum", return_components=True).kl
        close(got, F.kl_div(inp, tgt, log_target=True, reduction="sum"))
        close(got, F.kl_div(inp, tgt.exp(), reduction="sum"))  # log_target=False takes probabilities
    # "batchmean" divides by input.size(0): hrmloss's "mean" over (N, V) rows when no token is ignored
    got = hrmloss.hrm_loss(s, t, y, return_components=True).kl
    close(got, F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean"))


def _trl_generalized_jsd(s, t, beta, T):
    """TRL's GKD loss where TRL is installed (its location moved between versions), else None."""
    for module, owner in (("trl.experimental.gkd", "GKDTrainer"), ("trl", "GKDTrainer"),
                          ("trl.trainer.gkd_trainer", "GKDTrainer")):
        try:
            fn = getattr(getattr(importlib.import_module(module), owner), "generalized_jsd_loss")
        except (ImportError, AttributeError):
            continue
        # with labels, "batchmean" is the mean over the counted tokens (without, TRL 1.16 divides by the
        # batch size: tests/test_trl.py)
        return fn(s[None], t[None], labels=torch.zeros(1, s.shape[0], dtype=torch.long), beta=beta,
                  temperature=T, reduction="batchmean")
    return None


@pytest.mark.parametrize("beta,kl", [(0.0, "forward"), (0.3, "jsd"), (0.8, "jsd"), (1.0, "reverse")])
def test_trl_gkd_beta(beta, kl):
    # TRL: m = beta p + (1 - beta) q, jsd = beta KL(p||m) + (1 - beta) KL(q||m); beta = 0 forward, 1 reverse
    pytest.importorskip("trl")
    s, t, y = _rows()
    want = _trl_generalized_jsd(s, t, beta, 2.0)
    if want is None:
        pytest.skip("this trl has no GKDTrainer.generalized_jsd_loss")
    got = hrmloss.hrm_loss(s, t, y, kl=kl, beta=beta if kl == "jsd" else 0.5, temperature=2.0,
                           return_components=True).kl
    close(got, want)


def _liger_inputs(seed):
    """Student and teacher hidden states and heads (V = 23) and labels with every 4th ignored."""
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(10, 8, generator=g), torch.randn(23, 8, generator=g)
    ht, wt = torch.randn(10, 6, generator=g), torch.randn(23, 6, generator=g)
    y = torch.randint(0, 23, (10,), generator=g)
    y[::4] = -100
    return h, w, ht, wt, y


@pytest.mark.parametrize("beta,kl", [(0.0, "forward"), (0.3, "jsd"), (0.7, "jsd"), (1.0, "reverse")])
def test_liger_chunked_jsd(beta, kl):
    # Liger: weight_hard_loss * CE + weight_soft_loss * JSD_beta (means over counted tokens), logits / T for
    # the JSD only = weight_hard_loss * linear_hrm_loss(hrm = weight_soft_loss / weight_hard_loss)
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    h, w, ht, wt, y = _liger_inputs(seed=1)
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=0.8, weight_soft_loss=0.4, beta=beta, temperature=2.0,
                                            compiled=False, chunk_size=4)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = liger(h1, w1, ht, wt, y)
    want.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = 0.8 * hrmloss.linear_hrm_loss(h2, w2, y, 0.4 / 0.8, ref_hidden=ht, ref_weight=wt, kl=kl,
                                        beta=beta if kl == "jsd" else 0.5, temperature=2.0)
    got.backward()
    close(got, want, atol=1e-5)
    close(h2.grad, h1.grad, atol=1e-5)
    close(w2.grad, w1.grad, atol=1e-5)


@pytest.mark.parametrize("hard", [0.0, 0.8])
def test_liger_weights_are_ce_weight_and_hrm(hard):
    # Liger's weight_hard_loss * CE + weight_soft_loss * JSD = linear_hrm_loss(hrm=soft, ce_weight=hard), hard = 0
    # (pure distillation) included
    chunked = pytest.importorskip("liger_kernel.chunked_loss")
    h, w, ht, wt, y = _liger_inputs(seed=3)
    liger = chunked.LigerFusedLinearJSDLoss(weight_hard_loss=hard, weight_soft_loss=0.4, beta=0.3, temperature=2.0,
                                            compiled=False, chunk_size=4)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    want = liger(h1, w1, ht, wt, y)
    want.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = hrmloss.linear_hrm_loss(h2, w2, y, 0.4, ce_weight=hard, ref_hidden=ht, ref_weight=wt, kl="jsd", beta=0.3,
                                  temperature=2.0)
    got.backward()
    close(got, want, atol=1e-5)
    close(h2.grad, h1.grad, atol=1e-5)
    close(w2.grad, w1.grad, atol=1e-5)


def test_closed_forms():
    V = 11
    t = torch.randn(3, V, generator=torch.Generator().manual_seed(2)) * 2
    s = torch.zeros(3, V)  # a uniform student
    y = torch.zeros(3, dtype=torch.long)
    lp = F.log_softmax(t.double(), -1)
    out = lambda kl, **kw: hrmloss.hrm_loss(s, t, y, kl=kl, reduction="none", return_components=True, **kw).kl  # noqa: E731
    close(out("forward"), math.log(V) + (lp.exp() * lp).sum(-1))      # KL(p||u) = log V - H(p)
    close(out("reverse"), -math.log(V) - lp.mean(-1))                   # KL(u||p) = -log V - mean log p
    # disjoint supports: JSD_beta = the binary entropy of beta, its maximum
    big = torch.tensor([[30.0, -30.0]])
    for beta in (0.2, 0.5):
        jsd = hrmloss.hrm_loss(big, -big, torch.tensor([0]), kl="jsd", beta=beta, return_components=True).kl
        close(jsd, torch.tensor(-beta * math.log(beta) - (1 - beta) * math.log(1 - beta)), atol=1e-6)
    # identical distributions: every divergence is 0
    for kl in ("forward", "reverse", "jsd"):
        same = hrmloss.hrm_loss(t, t, y, kl=kl, reduction="sum", return_components=True).kl
        assert abs(float(same)) < 1e-5

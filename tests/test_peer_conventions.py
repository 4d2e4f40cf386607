"""docs/divergences.md's mappings for torchtune and Axolotl, checked: against torchtune's own kd_losses.py
where torchtune is installed, and always against the formulas written out in float64 from the peers'
definitions (Axolotl is not installable here)."""
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

import hrmloss
from .test_topk import make_topk


def _rows(n=10, v=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(n, v, generator=g) * 2, torch.randn(n, v, generator=g) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[[1, 6]] = -100
    return s, t, y


def _torchtune_kd_losses():
    """torchtune's kd_losses module, loaded from its file: `import torchtune` itself demands torchao, which
    its loss module never uses. None without torchtune."""
    spec = importlib.util.find_spec("torchtune")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "modules", "loss", "kd_losses.py")
    module_spec = importlib.util.spec_from_file_location("_torchtune_kd_losses", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _written_out(s, t, y):
    """torchtune's three losses from their definitions, float64: ForwardKLLoss = mean -sum p log q,
    ReverseKLLoss = mean KL(q||p), over tokens with label != -100."""
    lq, lp = F.log_softmax(s.double(), -1), F.log_softmax(t.double(), -1)
    live = y != -100
    fwd = -(lp.exp() * lq).sum(-1)
    rev = (lq.exp() * (lq - lp)).sum(-1)
    return fwd[live].mean(), rev[live].mean()


def _value_and_grad(fn, s):
    s = s.clone().double().requires_grad_()
    value = fn(s)
    value.backward()
    return value.detach(), s.grad


def _hrm(s, t, y, **kw):
    return hrmloss.hrm_loss(s, t, y, ce_weight=0.0, backend="torch", **kw)


@pytest.mark.parametrize("source", ["torchtune", "written_out"])
def test_torchtune_kd_losses(source):
    s, t, y = _rows()
    if source == "torchtune":
        tt = _torchtune_kd_losses()
        if tt is None:
            pytest.skip("torchtune is not installed")
        peers = {"forward": lambda x: tt.ForwardKLLoss()(x, t.double(), y),
                 "reverse": lambda x: tt.ReverseKLLoss()(x, t.double(), y),
                 "symmetric": lambda x: tt.SymmetricKLLoss(0.3)(x, t.double(), y)}
    else:
        peers = {"forward": lambda x: _written_out(x, t, y)[0], "reverse": lambda x: _written_out(x, t, y)[1],
                 "symmetric": lambda x: 0.3 * _written_out(x, t, y)[0] + 0.7 * _written_out(x, t, y)[1]}
    lp = F.log_softmax(t.double(), -1)
    entropy = -(lp.exp() * lp).sum(-1)[y != -100].mean()  # H(p): ForwardKLLoss is KL(p||q) + H(p)
    ours = {"forward": lambda x: _hrm(x, t.double(), y, kl="forward"),
            "reverse": lambda x: _hrm(x, t.double(), y, kl="reverse"),
            "symmetric": lambda x: 0.3 * _hrm(x, t.double(), y, kl="forward")
            + 0.7 * _hrm(x, t.double(), y, kl="reverse")}
    offset = {"forward": entropy, "reverse": 0.0, "symmetric": 0.3 * entropy}
    tol = 1e-6 if source == "torchtune" else 1e-10  # torchtune computes its softmaxes in fp32
    for name in peers:
        want, want_grad = _value_and_grad(peers[name], s)
        got, got_grad = _value_and_grad(ours[name], s)
        torch.testing.assert_close(got + offset[name], want.double(), rtol=tol, atol=tol, msg=name)
        torch.testing.assert_close(got_grad, want_grad, rtol=tol, atol=tol, msg=name)


def _axolotl(s, y, ids, stored, T, kd_alpha, kd_ce_alpha, normalize_topk, num_items=None):
    """Axolotl's top-k KD objective from its definition, float64: kd_ce_alpha CE + kd_alpha loss_kd with
    loss_kd = T^2 sum over valid entries of p_k (lp_k - lq_k) / (num_items or the valid entries): its
    trainer's T^2 and num_items_in_batch, and the valid-entry mean of its forward_kl.loss without them."""
    s = s.double()
    at_ids = s.gather(-1, ids) / T
    lq = at_ids - torch.logsumexp(at_ids, -1, keepdim=True) if normalize_topk else \
        F.log_softmax(s / T, -1).gather(-1, ids)
    lp = stored.double()
    valid = (y != -100)[..., None].expand_as(ids)  # a full target_mask on the counted positions
    terms = (lp.exp() * (lp - lq))[valid]
    kd = T ** 2 * terms.sum() / (num_items if num_items is not None else terms.numel())
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), reduction="sum")
    ce = ce / (num_items if num_items is not None else (y != -100).sum())
    return kd_ce_alpha * ce + kd_alpha * kd


@pytest.mark.parametrize("normalize_topk", [True, False])
@pytest.mark.parametrize("num_items", [None, 17])
def test_axolotl_topk_kd(normalize_topk, num_items):
    s, t, y, ids, _ = make_topk((3, 5, 30), 6)
    T, kd_alpha, kd_ce_alpha, K = 2.0, 0.6, 0.4, ids.shape[-1]
    stored = torch.log_softmax(t.double().gather(-1, ids) / T, -1)  # Axolotl: renormalised at the KD temperature
    want, want_grad = _value_and_grad(lambda x: _axolotl(x, y, ids, stored, T, kd_alpha, kd_ce_alpha,
                                                         normalize_topk, num_items), s)
    hrm = kd_alpha * T ** 2 / (1 if num_items is not None else K)
    got, got_grad = _value_and_grad(lambda x: hrmloss.hrm_loss(
        x, None, y, hrm, ce_weight=kd_ce_alpha, temperature=T, ref_topk=(ids, T * stored), num_items=num_items,
        topk_mode="renorm_both" if normalize_topk else "renorm", backend="torch"), s)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-10)


def _axolotl_forward_kl():
    """Axolotl's own top-k forward KL (axolotl/integrations/kd/topk_logprob/forward_kl.py), loaded from its
    file: the axolotl package itself imports peft and more, which the loss never uses. None without it."""
    spec = importlib.util.find_spec("axolotl")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "integrations", "kd", "topk_logprob", "forward_kl.py")
    if not os.path.exists(path):
        return None
    module_spec = importlib.util.spec_from_file_location("_axolotl_forward_kl", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.loss


def test_axolotl_own_forward_kl_through_the_trainer_mapping():
    # Axolotl's stored columns (padding entries in target_mask, positions without a teacher masked) mapped
    # by HRMDistillTrainer's stored_topk, against Axolotl's own loss, with num_items_in_batch
    loss = _axolotl_forward_kl()
    if loss is None:
        pytest.skip("axolotl is not installed")
    pytest.importorskip("transformers")
    from hrmloss.integrations.transformers import stored_topk
    s, t, y, ids, _ = make_topk((2, 7, 30), 5)
    T = 2.0
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(ids.shape, generator=g) > 0.3
    mask[..., 0] = True
    mask &= (y != -100)[..., None]  # Axolotl masks positions by target_mask alone
    lps = torch.log_softmax((t.gather(-1, ids) / T).masked_fill(~mask, float("-inf")), -1)
    lps = torch.where(mask, lps, -5.0)  # what a padding entry holds is not read
    ids = torch.where(mask, ids, 0)
    n = 9
    s1 = s.clone().requires_grad_()
    want = loss(s1, ids, lps, mask.long(), num_items_in_batch=n, kd_temperature=T)
    want.backward()
    # the trainer's columns follow the logits and its labels are shifted: pad one position on each
    cols = dict(target_token_ids=F.pad(ids, (0, 0, 0, 1)), target_logprobs=F.pad(lps, (0, 0, 0, 1)),
                target_mask=F.pad(mask.long(), (0, 0, 0, 1)))
    ref_topk = stored_topk(cols, y, target_temperature=T)
    s2 = s.clone().requires_grad_()
    got = hrmloss.hrm_loss(s2, None, y, 1.0, ce_weight=0.0, temperature=T, ref_topk=ref_topk, num_items=n,
                           backend="torch")
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-7)

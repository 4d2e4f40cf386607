"""The test oracle: the loss of docs/design.md §1 in float64, composed from torch.nn.functional only.

Never imports hrmloss. Gradients come from autograd through these primitives.
"""
import math

import torch
import torch.nn.functional as F


def divergence(s, t, kl="forward", beta=0.5, temperature=1.0):
    """Per-row divergence (..., V) -> (...) in float64, between q_T = softmax(s/T) and p_T = softmax(t/T)."""
    lq = F.log_softmax(s.double() / temperature, -1)
    lp = F.log_softmax(t.double() / temperature, -1)
    if kl == "forward":   # KL(p || q): kl_div(input=log q, target=log p)
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    if kl == "reverse":   # KL(q || p)
        return F.kl_div(lp, lq, reduction="none", log_target=True).sum(-1)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
    return (beta * F.kl_div(lm, lp, reduction="none", log_target=True).sum(-1)
            + (1 - beta) * F.kl_div(lm, lq, reduction="none", log_target=True).sum(-1))


def reference_loss(s, t, y, hrm=1.0, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                   reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, num_items=None):
    """(loss, ce, kl, z) reduced like hrm_loss, float64; ignored tokens count nowhere."""
    V = s.shape[-1]
    s64, t64 = s.double().reshape(-1, V), t.double().reshape(-1, V)
    if softcap is not None:
        s64 = softcap * torch.tanh(s64 / softcap)
    y = y.reshape(-1).long()
    live = y != ignore_index
    ce = F.cross_entropy(s64, torch.where(live, y, 0), reduction="none", label_smoothing=label_smoothing)
    k = divergence(s64, t64, kl, beta, temperature)
    z = z_loss * torch.logsumexp(s64, -1) ** 2
    zero = torch.zeros((), dtype=torch.float64)
    ce, k, z = (torch.where(live, x, zero) for x in (ce, k, z))
    loss = ce + hrm * k + z if hrm else ce + z

    def red(x):
        if reduction == "none":
            return x.view(s.shape[:-1])
        if reduction == "sum":
            return x.sum()
        return x.sum() / (live.sum().clamp(min=1) if num_items is None else num_items)
    return red(loss), red(ce), red(k), red(z)

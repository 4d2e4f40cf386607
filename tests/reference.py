"""The test oracle: the loss of docs/design.md §1 in float64, composed from torch.nn.functional only.

Never imports hrmloss. Gradients come from autograd through these primitives.
"""
import math

import torch
import torch.nn.functional as F


def _kl(la, lb):
    """KL(a || b) per row from log-probabilities: sum_j a_j (log a_j - log b_j), a term 0 where a_j = 0
    (also where b_j = 0 there: -inf logits are removed entries), +inf where a_j > 0 = b_j; NaN where a
    or b is no distribution (a row of all -inf logits: log_softmax is NaN)."""
    has = la > -math.inf
    undefined = (la.isnan() | lb.isnan()).any(-1)
    la, lb = torch.where(has, la, 0.0), torch.where(has, lb, 0.0)  # no -inf - -inf, nor NaN gradients
    kl = torch.where(has, la.exp() * (la - lb), 0.0).sum(-1)
    return torch.where(undefined, math.nan, kl)


def divergence(s, t, kl="forward", beta=0.5, temperature=1.0):
    """Per-row divergence (..., V) -> (...) in float64, between q_T = softmax(s/T) and p_T = softmax(t/T)."""
    lq = F.log_softmax(s.double() / temperature, -1)
    lp = F.log_softmax(t.double() / temperature, -1)
    if kl == "forward":   # KL(p || q)
        return _kl(lp, lq)
    if kl == "reverse":   # KL(q || p)
        return _kl(lq, lp)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log(1 - beta))
    return beta * _kl(lp, lm) + (1 - beta) * _kl(lq, lm)


def reference_loss(s, t, y, hrm=1.0, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                   reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, num_items=None,
                   ref_topk=None, topk_mode="renorm", ref_vocab="error", token_weights=None, ce_weight=1.0):
    """(loss, ce, kl, z) reduced like hrm_loss, float64; ignored tokens count nowhere.

    t: (..., V_t) dense reference (V_t != V: the first min(V, V_t) ids of both, ref_vocab="truncate"), or
    None with ref_topk = (ids, logprobs) (topk_divergence). token_weights multiply each token's terms;
    "mean" then divides by their sum over counted tokens."""
    V = s.shape[-1]
    s64 = s.double().reshape(-1, V)
    if softcap is not None:
        s64 = softcap * torch.tanh(s64 / softcap)
    y = y.reshape(-1).long()
    live = y != ignore_index
    ce = F.cross_entropy(s64, torch.where(live, y, 0), reduction="none", label_smoothing=label_smoothing)
    if ref_topk is not None:
        ids, lps = (x.reshape(-1, x.shape[-1]) for x in ref_topk)
        k = topk_divergence(s64, ids, lps, topk_mode, kl, beta, temperature)
    elif t is None:  # no reference: the cross-entropy family alone
        k = torch.zeros_like(s64[:, 0])
    else:
        t64 = t.double().reshape(-1, t.shape[-1])
        v = min(V, t64.shape[-1])
        k = divergence(s64[:, :v], t64[:, :v], kl, beta, temperature)
    z = z_loss * torch.logsumexp(s64, -1) ** 2
    zero = torch.zeros((), dtype=torch.float64)
    ce, k, z = (torch.where(live, x, zero) for x in (ce, k, z))
    w = None if token_weights is None else token_weights.double().reshape(-1)
    if w is not None:
        ce, k, z = ce * w, k * w, z * w
    loss = (ce_weight * ce if ce_weight else 0 * z) + (hrm * k if hrm else 0 * z) + z

    def red(x):
        if reduction == "none":
            return x.view(s.shape[:-1])
        if reduction == "sum":
            return x.sum()
        if num_items is not None:
            return x.sum() / num_items
        den = live.sum() if w is None else torch.where(live, w, 0.0).sum()
        return x.sum() / den if den > 0 else x.sum() * 0
    return red(loss), red(ce), red(k), red(z)


def topk_divergence(s, ids, logprobs, mode="renorm", kl="forward", beta=0.5, temperature=1.0):
    """Per-row divergence to a sparse teacher (..., K) in float64, written from its definition.

    renorm: the teacher p~ = softmax(logprobs / T) placed on its ids of a dense (..., V) distribution
    (0 elsewhere), against q = softmax(s / T) over the whole vocabulary. tail: both coarsened to K + 1
    outcomes (the ids, the rest), p_rest = max(0, 1 - sum exp(logprobs)), q_rest summed off the ids.
    """
    s, lps, ids = s.double(), logprobs.double(), ids.long()
    lq = F.log_softmax(s / temperature, -1)
    if mode == "renorm":
        p = torch.zeros_like(lq).scatter(-1, ids, F.softmax(lps / temperature, -1))
        q = lq.exp()
    elif mode == "renorm_both":  # both restricted to the K ids (of finite log-prob) and renormalised there
        p = F.softmax(lps / temperature, -1)
        q = F.softmax((s.gather(-1, ids) / temperature).masked_fill(lps.isneginf(), float("-inf")), -1)
    else:
        off = torch.ones_like(lq, dtype=torch.bool).scatter(-1, ids, False)
        q_rest = torch.where(off, lq.exp(), 0.0).sum(-1, keepdim=True)
        p_rest = 0.0 if ids.shape[-1] == s.shape[-1] else (1 - lps.exp().sum(-1, keepdim=True)).clamp(min=0)
        q = torch.cat((lq.gather(-1, ids).exp(), q_rest), -1)
        p = torch.cat((lps.exp(), torch.zeros_like(q_rest) + p_rest), -1)
    if kl == "forward":   # KL(p || q) = kl_div(input=log q, target=p)
        return F.kl_div(q.log(), p, reduction="none").sum(-1)
    if kl == "reverse":
        return F.kl_div(p.log(), q, reduction="none").sum(-1)
    m = beta * p + (1 - beta) * q
    return (beta * F.kl_div(m.log(), p, reduction="none").sum(-1)
            + (1 - beta) * F.kl_div(m.log(), q, reduction="none").sum(-1))

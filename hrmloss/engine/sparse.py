"""A sparse teacher: its top-k ids and log-probabilities per token instead of reference logits.

The student's row is read by the dense passes without a reference (Structure.has_ref False), which give
lse_u = logsumexp(u), u = s / T, and, when the rest outcome matters (Structure.rest),
lse_rest = logsumexp of u over the ids outside the top-k. Everything else here is O(N K): gathers of the
student's logits at the K ids and K + 1 outcome probabilities per row (docs/divergences.md):

    outcomes o = the K ids, and "rest" (every other id)
    q_k = exp(u_k - lse_u)                 q_rest = exp(lse_rest - lse_u)   (summed directly: no 1 - sum q_k)
    renorm: p_k = softmax_k(lp / T)        p_rest = 0
    tail:   p_k = exp(lp_k)                p_rest = max(0, 1 - sum_k p_k)    (T = 1)
    renorm_both: p_k as renorm, and the student too: q_k = softmax_k(u_k), q_rest = 0 (Axolotl's
            normalize_topk=True), over the ids of finite log-prob; the gradient is at the ids only,
            q_k (r_k - R), coef = 0
    forward kl = sum_o p_o log(p_o / q_o),   reverse = sum_o q_o log(q_o / p_o),
    jsd = beta sum_o p_o log(p_o / m_o) + (1 - beta) sum_o q_o log(q_o / m_o),  m = beta p + (1 - beta) q

With p_rest = 0 the rest outcome adds 0 to forward KL and is exact for JSD over the full vocabulary
(q_j / m_j = 1 / (1 - beta) for every j off the ids), so "renorm" is the teacher renormalised over its ids
against the student's full-vocabulary distribution, and "tail" the two distributions coarsened to K + 1
outcomes. Gradient: with r_o = d kl / d q_o (up to a constant) and R = sum_o q_o r_o,

    d kl / d u_j = q_j (r_o(j) - R) = coef q_j + [j in ids] q_j (r_j - r_rest),  coef = r_rest - R
    forward: r_o = -p_o / q_o, R = -sum_o p_o;  reverse: r_o = log q_o - log p_o, R = kl;
    jsd: r_o = (1 - beta) log(q_o / m_o), R = (1 - beta) KL(q||m)

The dense part coef * q is the gradient pass's (FINAL.coef, no reference read), off the ids when the
rest outcome matters (Structure.rest: coef = r_rest - R can be huge, -p_rest / q_rest); the term at the
ids is added here, an O(N K) scatter: q_k (r_k - R) then, else the q_k (r_k - r_rest) that coef q_k leaves. Terms with p_o = 0 (or q_o = 0) contribute 0 (0 log 0 = 0).
"""
from typing import NamedTuple

import torch

from .layout import KINDS, PARAMS, PARTIAL
from .maths import log_mixture, no_support_divergence, soft_cap, weigh, xlog_ratio, zero_where
from .rows import acc_dtype, rows_3d

NEG_INF = float("-inf")


class TopK(NamedTuple):
    """A sparse teacher, rows flattened: ids (N, K) global token ids, logprobs (N, K) at temperature 1."""

    ids: torch.Tensor
    logprobs: torch.Tensor


def student_at_ids(logits, ids, params, st, vocab_start):
    """(s_k soft-capped, d s / d s_raw or None, owned) at the ids in this shard, each (N, K) in the
    accumulation dtype; s_k = 0 at ids outside the shard. logits (..., V), ids (..., K) of one lead shape."""
    s3, i3 = rows_3d(logits, ids.view(*logits.shape[:-1], ids.shape[-1]))
    local = i3.long() - vocab_start
    owned = (local >= 0) & (local < s3.shape[-1])
    s = s3.gather(2, torch.where(owned, local, 0)).reshape(ids.shape).to(acc_dtype(logits))
    owned = owned.reshape(ids.shape)
    s, dcap = soft_cap(s, params, st)
    return torch.where(owned, s, 0.0), dcap, owned


def divergence(u, logprobs, partial, params, st, live, vocab_size):
    """Per row kl (N,), coef (N,) and the correction (N, K) of d kl / d u at the ids (module docstring).

    u: (N, K) the student's u = s / T at the ids (every id's value, over all shards); partial: the
    (N, PARTIAL) statistics of the whole vocabulary; live: (N,) counted rows (others get zeros);
    vocab_size: the whole vocabulary (with K = V there is no rest outcome)."""
    acc = u.dtype
    lse_u = partial[:, PARTIAL.lse_u]
    if st.renorm_both:  # the student renormalised over the teacher's ids too (those of finite log-prob:
        # a padding entry, log-prob -inf, is in neither): q~_k = softmax_k(u_k), no rest outcome
        u = torch.where(logprobs == NEG_INF, NEG_INF, u)
        lse_u = torch.logsumexp(u, -1)
    lq = torch.cat((u - lse_u[:, None], (partial[:, PARTIAL.lse_rest] - lse_u)[:, None]), 1)  # (N, K + 1)
    if not st.rest:  # forward "renorm", "renorm_both": p_rest = 0 (= q_rest), the rest outcome never enters
        lq[:, -1] = NEG_INF
    lp = logprobs.to(acc)
    if not st.tail:  # "renorm", "renorm_both"
        a = lp / params[PARAMS.temperature]
        lp = a - torch.logsumexp(a, -1, keepdim=True)
        lp_rest = torch.full_like(lse_u, NEG_INF)
    elif logprobs.shape[1] == vocab_size:  # K = V: the rest outcome is empty (rounding in the stored
        lp_rest = torch.full_like(lse_u, NEG_INF)  # log-probs would make p_rest > 0 = q_rest, kl infinite)
    else:  # the teacher's rest in float64 (its own cancellation is the data's, not ours to add to)
        mass = logprobs.double().exp().sum(-1)
        lp_rest = torch.log((1 - mass).clamp(min=0)).to(acc)
    lp = torch.cat((lp, lp_rest[:, None]), 1)
    q, p = lq.exp(), lp.exp()
    if st.kind == KINDS.forward:
        kl = xlog_ratio(p, lp, lq).sum(-1)
        r = zero_where(p == 0, -torch.exp(lp - lq))
        big_r = -p.sum(-1)
    elif st.kind == KINDS.reverse:
        kl = xlog_ratio(q, lq, lp).sum(-1)
        r = zero_where(q == 0, lq - lp)
        big_r = kl
    else:
        beta = params[PARAMS.beta]
        lm = log_mixture(lq, lp, beta)
        kl_qm = xlog_ratio(q, lq, lm).sum(-1)
        kl = beta * xlog_ratio(p, lp, lm).sum(-1) + (1 - beta) * kl_qm
        r = (1 - beta) * zero_where(q == 0, lq - lm)
        big_r = (1 - beta) * kl_qm
    r_rest = r[:, -1]
    # renorm_both: kl depends on u at the ids only, d kl / d u_k = q~_k (r_k - R), no dense part (coef 0)
    coef = torch.zeros_like(big_r) if st.renorm_both else r_rest - big_r
    # the term at the ids: the whole q_k (r_k - R) where the pass skips the ids (st.rest: coef can be
    # huge, p_rest / q_rest, and coef q_k would cancel against it), else what coef q_k leaves out
    corr = zero_where(q[:, :-1] == 0, q[:, :-1] * (r[:, :-1] - (big_r if st.rest or st.renorm_both
                                                                 else r_rest)[:, None]))
    # a student row of all -inf (lse_u = -inf) shares no support with the teacher: KL +inf, JSD its
    # maximum, no gradient (as for a dense reference, stats.finalize)
    empty = lse_u == NEG_INF
    kl = torch.where(empty, no_support_divergence(st.kind == KINDS.jsd, params[PARAMS.beta]), kl)
    zero = torch.zeros((), dtype=acc, device=u.device)
    return (torch.where(live, kl, zero), torch.where(live & ~empty, coef, zero),
            torch.where((live & ~empty)[:, None], corr, zero))


def add_correction(ds, topk, at_ids, corr, g, params, vocab_start):
    """ds (shaped like the logits, or the logits themselves after an in-place backward) += g hrm / T * corr
    at the ids of this shard, through the soft cap; at_ids: `student_at_ids` of the logits, read before."""
    _, dcap, owned = at_ids
    c = params[PARAMS.hrm] / params[PARAMS.temperature]
    add = weigh(g[:, None].to(corr.dtype), weigh(c, corr))  # 0 in a row of weight 0, even if corr is not finite
    if dcap is not None:
        add = add * dcap
    ds3, i3 = rows_3d(ds, topk.ids.view(*ds.shape[:-1], topk.ids.shape[-1]))  # views: the scatter writes ds
    local = i3.long() - vocab_start
    own3 = owned.view(i3.shape)
    ds3.scatter_add_(2, torch.where(own3, local, 0), torch.where(own3, add.view(i3.shape), 0.0).to(ds.dtype))
    return ds


def check_shapes(topk, labels_shape, vocab):
    """ref_topk = (indices, logprobs): types and shapes, K <= V; returns the flat TopK. Before any launch."""
    if not isinstance(topk, (tuple, list)) or len(topk) != 2:
        raise TypeError(f"ref_topk: expected a pair (indices, logprobs), got {type(topk).__name__}")
    ids, lps = topk
    for name, x in (("indices", ids), ("logprobs", lps)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ref_topk {name}: expected a torch.Tensor, got {type(x).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"ref_topk indices.dtype={ids.dtype}: expected int64 or int32")
    if not lps.dtype.is_floating_point:
        raise TypeError(f"ref_topk logprobs.dtype={lps.dtype}: expected a float dtype")
    lead = tuple(labels_shape)
    if ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        raise ValueError(f"ref_topk indices.shape={tuple(ids.shape)}: expected labels.shape + (K,) = "
                         f"{lead} + (K,) with K >= 1")
    if lps.shape != ids.shape:
        raise ValueError(f"ref_topk logprobs.shape={tuple(lps.shape)}: expected the shape of indices, "
                         f"{tuple(ids.shape)}")
    K = ids.shape[-1]
    if K > vocab:
        raise ValueError(f"ref_topk: K={K} ids per token for a vocabulary of V={vocab}: expected K <= V")
    return TopK(ids.reshape(-1, K), lps.reshape(-1, K).detach())


def chunk_rows(topk, r0, r1):
    return None if topk is None else TopK(topk.ids[r0:r1], topk.logprobs[r0:r1])


"""Row statistics: merging partial statistics over vocabulary ranges, and finalising them into ce and kl.

`finalize` turns the partial statistics of the whole vocabulary (V classes, `layout.PARTIAL`) into per-row
ce, kl, z, the loss and the final statistics the gradient pass reads (`layout.FINAL`):

    kl_p = KL(p||q) = ep - lse_w + lse_u,  kl_q = KL(q||p) = eq - lse_u + lse_w   (forward / reverse)
    kl_p = KL(p||m), kl_q = KL(q||m)  from the second (JSD) pass                   (jsd)
    ce = (1 - eps) (lse_s - s[y]) + eps (lse_s - sum_s / V),  z = z_loss lse_s^2
    loss = ce_weight ce + hrm kl + z

(docs/design.md §1-2). Every value option is a 0-dim tensor of the params (`layout.PARAMS`): a term
whose weight is 0 contributes 0 even where its factor is infinite (hrm = 0 with an infinite kl).
"""
import torch

from .layout import FINAL, JSD, KINDS, PARAMS, PARTIAL, PARTIAL_MERGE
from .maths import no_support_divergence, weigh

INF = float("inf")
# the partial columns by how they merge (layout.PARTIAL_MERGE): log-sum-exp, plain sums, and expectations
# (column, the lse column of the softmax they are taken under)
_LSE = [PARTIAL.index(n) for n in PARTIAL if PARTIAL_MERGE[n] == "lse"]
_SUM = [PARTIAL.index(n) for n in PARTIAL if PARTIAL_MERGE[n] == "sum"]
_MEAN = [(PARTIAL.index(n), PARTIAL.index(PARTIAL_MERGE[n][1])) for n in PARTIAL
         if isinstance(PARTIAL_MERGE[n], tuple)]





def _share_times(share, lse, x):
    """share * x for a range's expectation x; 0 for an empty range (lse = -inf), +inf kept when x = +inf.

    x = +inf means p > 0 faces q = 0 in this range: the divergence is infinite whatever the share.
    """
    value = torch.where(x == INF, x, share * x)
    return torch.where(lse == -INF, torch.zeros((), dtype=x.dtype, device=x.device), value)


def merge_partial(partial, max_over, sum_over):
    """Merge the partial statistics of vocabulary ranges (layout.PARTIAL_MERGE), on the device.

    partial: (..., len(PARTIAL)) statistics of each range; `max_over(x)` and `sum_over(x)` reduce a tensor
    of that leading shape over the ranges: over a dimension of one tensor (the split rows of one pass,
    hrmloss/kernels/launch.py) or over the ranks of a process group (all_reduce, hrmloss/engine/distributed.py). The
    result of max_over must broadcast against its input; that of sum_over is (N, k).

        lse = M + log sum_r exp(lse_r - M)         (M = max_r lse_r, 0 for a row empty everywhere)
        E   = sum_r exp(lse_r - lse) E_r           (an expectation under the softmax whose lse is lse_r)
        sum = sum_r x_r

    Rows whose every range is empty (all -inf) get lse = -inf and expectations 0, like one range.
    """
    lse = partial[..., _LSE]
    top = max_over(lse.clone())
    top = torch.where(top == -INF, torch.zeros((), dtype=top.dtype, device=top.device), top)
    share = torch.exp(lse - top)                         # each range's sum-exp, rescaled to top
    weighted = [_share_times(share[..., _LSE.index(c)], lse[..., _LSE.index(c)], partial[..., i])[..., None]
                for i, c in _MEAN]                       # each range's expectation, weighted by its share
    sums = sum_over(torch.cat((share, partial[..., _SUM], *weighted), -1))
    total = sums[:, :len(_LSE)]
    safe = torch.where(total == 0, torch.ones((), dtype=total.dtype, device=total.device), total)
    out = sums.new_empty((sums.shape[0], len(PARTIAL)))
    out[:, _LSE] = top.reshape(total.shape) + torch.log(total)   # log 0 = -inf for an all-empty row
    out[:, _SUM] = sums[:, len(_LSE):len(_LSE) + len(_SUM)]
    for k, (i, c) in enumerate(_MEAN):
        out[:, i] = sums[:, len(_LSE) + len(_SUM) + k] / safe[:, _LSE.index(c)]
    return out


def disjoint(lse_u, lse_w):
    """Rows where the student (at T, over the ids it shares with the reference) or the reference has no
    mass (an all -inf row): the divergence is constant there (+inf, or JSD's maximum), its gradient 0."""
    return (lse_u == -INF) | (lse_w == -INF)


def finalize(partial, jsd_sums, labels, params, st, vocab_size, topk_kl=None):
    """(N, PARTIAL) statistics of the whole vocabulary -> per-row loss, ce, kl, z and (N, FINAL) stats.

    jsd_sums: (N, JSD) [KL(p||m), KL(q||m)] for kl="jsd", else None. topk_kl: (kl, coef) (N,) each from a
    sparse teacher (hrmloss/engine/sparse.py), else None. Ignored rows get zeros everywhere.
    """
    p = PARTIAL.unbind(partial)
    hrm, beta, eps, z_loss, ce_weight = (params[getattr(PARAMS, k)]
                                         for k in ("hrm", "beta", "label_smoothing", "z_loss", "ce_weight"))
    coef = torch.zeros_like(p["lse_s"])
    if topk_kl is not None:
        kl, coef = topk_kl
        kl_p = kl_q = torch.zeros_like(kl)
    elif st.kind == KINDS.jsd:
        kl_p, kl_q = JSD.unbind(jsd_sums).values()
        kl = beta * kl_p + (1.0 - beta) * kl_q
    else:
        kl_p = p["ep"] - p["lse_w"] + p["lse_u"]
        kl_q = p["eq"] - p["lse_u"] + p["lse_w"]
    if topk_kl is None:
        # a row of all -inf logits (lse = -inf: no mass) shares no support with the other distribution:
        # KL +inf either way, JSD its maximum -b log b - (1 - b) log(1 - b) (design.md §1)
        empty = disjoint(p["lse_u"], p["lse_w"])
        value = no_support_divergence(st.kind == KINDS.jsd, beta)  # kl_p = kl_q = it: so is JSD's mixture
        kl_p, kl_q = (torch.where(empty, value, x) for x in (kl_p, kl_q))
        kl = beta * kl_p + (1.0 - beta) * kl_q if st.kind == KINDS.jsd else kl_p if st.kind == KINDS.forward \
            else kl_q
    live = labels != st.ignore_index
    zero = partial.new_zeros(())
    nll = p["lse_s"] - p["s_y"]
    ce = nll + weigh(eps, (p["lse_s"] - p["sum_s"] / vocab_size) - nll)  # (1 - eps) nll + eps smooth
    ce = torch.where(p["lse_s"] == -INF, INF, ce)  # all -inf logits: the label has probability 0
    # ce and kl are >= 0: -inf or NaN from logits without NaN / +inf (no lse is NaN) is an fp32 overflow
    # of the statistics (logits near fp32's range): +inf, as on every backend
    clean = ~(p["lse_s"].isnan() | p["lse_u"].isnan() | p["lse_w"].isnan())
    ce, kl = (torch.where(clean & (x.isnan() | (x == -INF)), INF, x) for x in (ce, kl))
    ce = torch.where(live, ce, zero)
    kl = torch.where(live, kl, zero)
    z = torch.where(live, weigh(z_loss, p["lse_s"] * p["lse_s"]), zero)
    loss = weigh(ce_weight, ce) + weigh(hrm, kl) + z  # ce, kl and z are returned unweighted
    columns = {"lse_s": p["lse_s"], "lse_u": p["lse_u"], "lse_w": p["lse_w"], "kl_p": kl_p, "kl_q": kl_q,
               "coef": coef}
    final = torch.where(live[:, None], torch.stack([columns[name] for name in FINAL], 1), zero)
    return loss, ce, kl, z, final

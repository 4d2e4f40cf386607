"""Pieces both backends share: the row layout and the step from partial row statistics to ce and kl.

`finalize` turns the partial statistics of the whole vocabulary (V classes, `_layout.PARTIAL`) into per-row
ce, kl, z, the loss and the final statistics the gradient pass reads (`_layout.FINAL`):

    kl_p = KL(p||q) = ep - lse_w + lse_u,  kl_q = KL(q||p) = eq - lse_u + lse_w   (forward / reverse)
    kl_p = KL(p||m), kl_q = KL(q||m)  from the second (JSD) pass                   (jsd)
    ce = (1 - eps) (lse_s - s[y]) + eps (lse_s - sum_s / V),  z = z_loss lse_s^2
    loss = ce + hrm kl + z

(docs/design.md §1-2). Every value option is a 0-dim tensor of the params (`_layout.PARAMS`): a term
whose weight is 0 contributes 0 even where its factor is infinite (hrm = 0 with an infinite kl).
"""
import torch

from ._layout import FINAL, JSD, PARAMS, PARTIAL, PARTIAL_MERGE

INF = float("inf")
# the partial columns by how they merge (_layout.PARTIAL_MERGE): log-sum-exp, plain sums, and expectations
# (column, the lse column of the softmax they are taken under)
_LSE = [PARTIAL.index(n) for n in PARTIAL if PARTIAL_MERGE[n] == "lse"]
_SUM = [PARTIAL.index(n) for n in PARTIAL if PARTIAL_MERGE[n] == "sum"]
_MEAN = [(PARTIAL.index(n), PARTIAL.index(PARTIAL_MERGE[n][1])) for n in PARTIAL
         if isinstance(PARTIAL_MERGE[n], tuple)]


def acc_dtype(x):
    """The arithmetic and statistics dtype: fp32 for every supported dtype; float64 stays float64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rows_3d(*xs):
    """View tensors of one leading shape (..., V_i) as (B, T, V_i) with unit stride on the last dim,
    without a copy if possible (the last dims may differ: a reference with fewer columns).

    Flat (N, V) row layouts become (1, N, V); when any of them is not flat (a shifted view such as
    logits[:, :-1] of a (B, T+1, V) tensor), all become (B, T, V), each with its own strides, so one
    row index b * T + t addresses all of them. Only a last dim that is not contiguous, or more than
    two leading dims that cannot be merged, costs a copy.
    """
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    try:
        return [x.view(1, -1, x.shape[-1]) for x in xs]
    except RuntimeError:
        pass
    T = xs[0].shape[-2]
    return [x.reshape(-1, T, x.shape[-1]) if x.dim() > 3 else x for x in xs]


def weigh(weight, x):
    """weight * x, and 0 where weight == 0 even if x is infinite (0 * inf would be NaN)."""
    return torch.where(weight == 0, torch.zeros((), dtype=x.dtype, device=x.device), weight * x)


def _share_times(share, lse, x):
    """share * x for a range's expectation x; 0 for an empty range (lse = -inf), +inf kept when x = +inf.

    x = +inf means p > 0 faces q = 0 in this range: the divergence is infinite whatever the share.
    """
    value = torch.where(x == INF, x, share * x)
    return torch.where(lse == -INF, torch.zeros((), dtype=x.dtype, device=x.device), value)


def merge_partial(partial, max_over, sum_over):
    """Merge the partial statistics of vocabulary ranges (_layout.PARTIAL_MERGE), on the device.

    partial: (..., len(PARTIAL)) statistics of each range; `max_over(x)` and `sum_over(x)` reduce a tensor
    of that leading shape over the ranges: over a dimension of one tensor (the split rows of one pass,
    hrmloss/_triton.py) or over the ranks of a process group (all_reduce, hrmloss/distributed.py). The
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


def finalize(partial, jsd_sums, labels, params, st, vocab_size, sparse=None):
    """(N, PARTIAL) statistics of the whole vocabulary -> per-row loss, ce, kl, z and (N, FINAL) stats.

    jsd_sums: (N, JSD) [KL(p||m), KL(q||m)] for kl="jsd", else None. sparse: (kl, coef) (N,) each from a
    sparse teacher (hrmloss/_topk.py), else None. Ignored rows get zeros everywhere.
    """
    p = PARTIAL.unbind(partial)
    hrm, beta, eps, z_loss = (params[getattr(PARAMS, k)] for k in ("hrm", "beta", "label_smoothing", "z_loss"))
    coef = torch.zeros_like(p["lse_s"])
    if sparse is not None:
        kl, coef = sparse
        kl_p = kl_q = torch.zeros_like(kl)
    elif st.kind == 2:
        kl_p, kl_q = JSD.unbind(jsd_sums).values()
        kl = beta * kl_p + (1.0 - beta) * kl_q
    else:
        kl_p = p["ep"] - p["lse_w"] + p["lse_u"]
        kl_q = p["eq"] - p["lse_u"] + p["lse_w"]
        kl = kl_p if st.kind == 0 else kl_q
    live = labels != st.ignore_index
    zero = partial.new_zeros(())
    nll = p["lse_s"] - p["s_y"]
    ce = nll + weigh(eps, (p["lse_s"] - p["sum_s"] / vocab_size) - nll)  # (1 - eps) nll + eps smooth
    ce = torch.where(live, ce, zero)
    kl = torch.where(live, kl, zero)
    z = torch.where(live, weigh(z_loss, p["lse_s"] * p["lse_s"]), zero)
    loss = ce + weigh(hrm, kl) + z
    columns = {"lse_s": p["lse_s"], "lse_u": p["lse_u"], "lse_w": p["lse_w"], "kl_p": kl_p, "kl_q": kl_q,
               "coef": coef}
    final = torch.where(live[:, None], torch.stack([columns[name] for name in FINAL], 1), zero)
    return loss, ce, kl, z, final

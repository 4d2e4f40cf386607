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

from ._layout import FINAL, JSD, PARAMS, PARTIAL


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

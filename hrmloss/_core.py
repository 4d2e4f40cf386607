"""Pieces both backends share: the row layout and the step from partial row statistics to ce and kl.

Partial statistics, one row of 7 fp32 per token (DESIGN.md §1, notation of kernels/hrm_loss.py):

    lse_s, s[y], lse_u, lse_w, ep = E_p[w - u], eq = E_q[u - w], sum_s = sum_j s_j

They are what one pass over (a shard of) the vocabulary yields; `finalize` turns the statistics of the
whole vocabulary (V classes) into per-row ce, kl, z and the 5 final statistics the gradient pass reads:

    lse_s, lse_u, lse_w, kl_p, kl_q
    kl_p = KL(p||q) = ep - lse_w + lse_u,  kl_q = KL(q||p) = eq - lse_u + lse_w   (forward / reverse)
    kl_p = KL(p||m), kl_q = KL(q||m)  from the second (JSD) pass                   (jsd)
    ce = (1 - eps) (lse_s - s[y]) + eps (lse_s - sum_s / V),  z = z_loss lse_s^2
    loss = ce + hrm kl + z
"""
import torch

N_PARTIAL = 7
N_FINAL = 5


def acc_dtype(x):
    """The arithmetic and statistics dtype: fp32 for every supported dtype; float64 stays float64 (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def rows_3d(*xs):
    """View tensors of one shape (..., V) as (B, T, V) with unit stride on V, without a copy if possible.

    Flat (N, V) row layouts become (1, N, V); when any of them is not flat (a shifted view such as
    logits[:, :-1] of a (B, T+1, V) tensor), all become (B, T, V), each with its own strides, so one
    row index b * T + t addresses all of them. Only a last dim that is not contiguous, or more than
    two leading dims that cannot be merged, costs a copy.
    """
    V = xs[0].shape[-1]
    xs = [x if x.stride(-1) == 1 else x.contiguous() for x in xs]
    try:
        return [x.view(1, -1, V) for x in xs]
    except RuntimeError:
        pass
    T = xs[0].shape[-2]
    return [x.reshape(-1, T, V) if x.dim() > 3 else x for x in xs]


def finalize(partial, jsd_sums, labels, opts, vocab_size):
    """(N, 7) partial statistics of the whole vocabulary -> per-row loss, ce, kl, z and (N, 5) final stats.

    jsd_sums: (N, 2) [KL(p||m), KL(q||m)] for kl="jsd", else None. Ignored rows get zeros everywhere.
    """
    lse_s, s_y, lse_u, lse_w, ep, eq, sum_s = partial.unbind(1)
    if opts.kl == "jsd":
        kl_p, kl_q = jsd_sums.unbind(1)
        kl = opts.beta * kl_p + (1.0 - opts.beta) * kl_q
    else:
        kl_p = ep - lse_w + lse_u
        kl_q = eq - lse_u + lse_w
        kl = kl_p if opts.kl == "forward" else kl_q
    live = labels != opts.ignore_index
    zero = partial.new_zeros(())
    eps = opts.label_smoothing
    ce = lse_s - s_y if eps == 0 else (1 - eps) * (lse_s - s_y) + eps * (lse_s - sum_s / vocab_size)
    ce = torch.where(live, ce, zero)
    kl = torch.where(live, kl, zero)
    z = torch.where(live, opts.z_loss * lse_s * lse_s, zero)
    # hrm = 0 ignores even an infinite kl; the loss is a tensor of its own (ce, kl, z are not differentiable)
    loss = ce + opts.hrm * kl if opts.hrm else ce.clone()
    if opts.z_loss:
        loss = loss + z
    final = torch.where(live[:, None], torch.stack((lse_s, lse_u, lse_w, kl_p, kl_q), 1), zero)
    return loss, ce, kl, z, final

"""The elementwise maths that the torch passes, the finaliser and the sparse teacher share (torch, any dtype).

The kernels (hrmloss/kernels) write the same formulas in Triton; docs/design.md §1 gives them. Every
product whose factor may be infinite is guarded: a zero weight (or probability) gives 0, never 0 * inf = NaN.
"""
import torch

from .layout import PARAMS


def weigh(weight, x):
    """weight * x, and 0 where weight == 0 even if x is infinite (0 * inf would be NaN)."""
    return torch.where(weight == 0, torch.zeros((), dtype=x.dtype, device=x.device), weight * x)


def zero_where(cond, value):
    """value, with 0 where cond (so 0 * inf or -inf - -inf never becomes NaN)."""
    return torch.where(cond, torch.zeros((), dtype=value.dtype, device=value.device), value)


def xlog_ratio(x, la, lb):
    """x * (la - lb), 0 where x = 0: a term p (log p - log q) of a divergence, 0 where p = 0."""
    return zero_where(x == 0, x * (la - lb))


def log_mixture(lq, lp, beta):
    """log m = log(beta p + (1 - beta) q) from log q, log p (JSD's mixture), without forming p or q."""
    return torch.logaddexp(lp + torch.log(beta), lq + torch.log1p(-beta))


def no_support_divergence(kind_is_jsd, beta):
    """The divergence between distributions without common support (one side a row of all -inf logits):
    +inf for KL either way, JSD's maximum -b log b - (1 - b) log(1 - b) (design.md §1). beta: 0-dim."""
    if kind_is_jsd:
        return -beta * torch.log(beta) - (1 - beta) * torch.log1p(-beta)
    return float("inf")


def soft_cap(sc, params, st):
    """(s, d s / d s_raw) of student logits in the accumulation dtype: s = c tanh(s_raw / c) and its
    derivative 1 - tanh^2 with a soft cap c (st.capped), else (s_raw, None)."""
    if not st.capped:
        return sc, None
    cap = params[PARAMS.softcap]
    th = torch.tanh(sc / cap)
    return cap * th, 1 - th * th

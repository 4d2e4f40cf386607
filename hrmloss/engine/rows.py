"""How the passes see their tensors: the accumulation dtype and the (B, T, V) row view of any (..., V) layout."""
import math

import torch


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
    n = math.prod(xs[0].shape[:-1])  # not -1: a shard may have no reference column (0 elements)
    try:
        return [x.view(1, n, x.shape[-1]) for x in xs]
    except RuntimeError:
        pass
    T = xs[0].shape[-2]
    return [x.reshape(-1, T, x.shape[-1]) if x.dim() > 3 else x for x in xs]

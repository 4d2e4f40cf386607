"""The reductions: per-row values to "mean" / "sum" / "none", the mean's denominator (the counted rows, their
token weights, or num_items) and each row's weight in the reduced loss, all on the device (no host sync)."""
import torch

from .maths import weigh


def num_items_to_check(num_items):
    """What of num_items the first pass checks (ops.check_num_items): a tensor, or a number 0 (then only
    allowed when no token counts) as a CPU tensor; None for a number > 0, checked at the call already."""
    if num_items is None or isinstance(num_items, torch.Tensor):
        return num_items
    return torch.zeros(()) if num_items == 0 else None


def mean_denominator(live, num_items=None, weights=None):
    """The divisor of reduction "mean": the count of counted rows (with token weights: their weight sum)
    or num_items; 1 where that is 0 (no token counts, checked for num_items: the mean is then 0). On the
    device."""
    if num_items is not None:
        if isinstance(num_items, torch.Tensor):
            return torch.where(num_items == 0, torch.ones_like(num_items), num_items)
        return num_items if num_items != 0 else 1
    den = live.sum() if weights is None else torch.where(live, weights, 0.0).sum()
    return torch.where(den == 0, torch.ones_like(den), den)


def row_weight(live, reduction, num_items, weights=None):
    """d reduced / d row_i for a counted row, on the device: 1 for "sum", 1 / the mean's denominator
    for "mean" (0-dim fp32), times the token weights (N,) when given."""
    if reduction == "sum":
        w = torch.ones((), device=live.device)
    else:
        w = 1.0 / torch.as_tensor(mean_denominator(live, num_items, weights), device=live.device).float()
    return w if weights is None else w * weights.float()


def weigh_rows(rows, weights):
    """rows * token weights, 0 where the weight is 0 even if the row is infinite; rows unchanged if None."""
    return rows if weights is None else weigh(weights.to(rows.dtype), rows)


def reduce_rows(rows, live, reduction, num_items=None, weights=None):
    """Reduce per-row values (N,) over counted rows: "sum", "mean" (by `mean_denominator`), or "none".
    With token weights (N,), rows are weighted first (ignored rows are 0 already)."""
    rows = weigh_rows(rows, weights)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / mean_denominator(live, num_items, weights)
    return rows

"""The backend passes as torch.library custom ops, so that torch.compile(fullgraph=True) traces the loss.

Each op takes the logits as the user gave them (any (..., V) layout; `rows_3d` views them inside), the
runtime scalars as the `params` tensor (`layout.PARAMS`), the `Structure` as a list of ints and the
resolved backend's name: typed arguments, so a new value of an option is new data, not a new graph.
The checks that read data (labels, tensor-valued options) run inside `row_stats`, before any launch, so
eager and compiled calls raise alike.
"""
import contextlib
import math
from typing import Optional

import torch
from torch import Tensor

from . import backends
from .rows import acc_dtype, rows_3d
from .layout import JSD, PARTIAL
from .options import NUM_ITEMS_RANGE, Structure, check_params


def no_autocast(x):
    """A context with autocast off for x's device: the passes (and linear.py's GEMMs) choose their own dtypes."""
    return torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") \
        else contextlib.nullcontext()


def check_labels(labels, lo, hi, ignore_index, name="labels"):
    """Every label in [lo, hi) or ignore_index: raised at once on the CPU; on CUDA an async device assert."""
    ok = ((labels >= lo) & (labels < hi)) | (labels == ignore_index)
    if labels.device.type == "cuda":
        torch._assert_async(ok.all(), f"{name}: a label outside [{lo}, {hi}) other than ignore_index")
    elif labels.numel() and not bool(ok.all()):
        bad = labels[~ok][0].item()
        raise ValueError(f"{name} contains {bad}: expected values in [{lo}, {hi}) or "
                         f"ignore_index={ignore_index}")


def _fail(ok, message, first_bad):
    """ValueError(message + the first bad value) on the CPU, an async device assert on CUDA (no sync)."""
    if ok.device.type == "cuda":
        torch._assert_async(ok.all(), message)
    elif ok.numel() and not bool(ok.all()):
        raise ValueError(f"{message}: {first_bad(~ok)}")


def check_topk(ids, logprobs, vocab_size, renorm_rows=None, first_row=0):
    """A sparse teacher's data: ids in [0, V) and distinct in each row, log-probs <= 0 (not NaN) whose
    probabilities sum to at most 1 + 1e-2 per row; renorm_rows (N,) bool (topk_mode="renorm": the counted
    rows): each with a finite log-prob (renormalising a row of zero mass is 0 / 0). first_row: the flat
    index of the first row (a chunk of linear_hrm_loss), for the messages."""
    _fail((ids >= 0) & (ids < vocab_size), f"ref_topk indices: an id outside [0, {vocab_size})",
          lambda bad: f"found {ids[bad][0].item()}")
    if ids.shape[-1] > 1:
        srt = ids.sort(-1).values
        _fail((srt[..., 1:] != srt[..., :-1]).all(-1), "ref_topk indices: an id repeated in a row",
              lambda bad: f"row {first_row + int(bad.reshape(-1).nonzero()[0, 0])} (flat)")
    _fail(logprobs <= 0, "ref_topk logprobs: expected log-probabilities <= 0 (and not NaN)",
          lambda bad: f"found {logprobs[bad][0].item()}")
    mass = logprobs.float().exp().sum(-1)
    _fail(mass <= 1 + 1e-2, "ref_topk logprobs: the top-k probabilities of a row sum above 1 + 1e-2",
          lambda bad: f"sum {mass[bad][0].item()}")
    if renorm_rows is not None:
        has_mass = (logprobs > -math.inf).any(-1) | ~renorm_rows.reshape(logprobs.shape[:-1])
        _fail(has_mass, "ref_topk logprobs: a counted row is all -inf (no teacher mass to renormalise with "
              "topk_mode='renorm'; topk_mode='tail' puts it all on the rest)",
              lambda bad: f"row {first_row + int(bad.reshape(-1).nonzero()[0, 0])} (flat)")


def check_weights(weights):
    _fail(torch.isfinite(weights) & (weights >= 0), "token_weights: expected finite weights >= 0 (not NaN)",
          lambda bad: f"found {weights[bad][0].item()}")


def check_num_items(num_items, counted):
    """A tensor num_items: finite and >= 0 (options.NUM_ITEMS_RANGE), on its own device; and 0 only when no
    token counts (counted: (N,) bool, the rows with a label and a non-zero weight), on the rows' device."""
    if num_items.dtype.is_floating_point or num_items.is_complex():
        in_range = NUM_ITEMS_RANGE.holds(num_items)
    else:
        in_range = num_items >= 0
    _fail(in_range, f"num_items (a tensor): expected {NUM_ITEMS_RANGE.text}",
          lambda bad: f"found {num_items.item()!r}")
    none_counted = ~counted.any() | (num_items != 0)  # a CPU num_items enters a CUDA op as a host scalar
    _fail(none_counted, "num_items=0 with counted tokens: expected num_items > 0 (0 is for a batch in which no "
          "token counts, whose mean is then 0)", lambda bad: f"{int(counted.sum())} counted in these rows")


@torch.library.custom_op("hrmloss::row_stats", mutates_args=())
def row_stats(logits: Tensor, ref_logits: Tensor, labels: Tensor, params: Tensor, structure: list[int],
              backend: str, vocab_start: int, vocab_size: int, topk_ids: Optional[Tensor] = None,
              topk_logprobs: Optional[Tensor] = None, token_weights: Optional[Tensor] = None,
              num_items: Optional[Tensor] = None, first_row: int = 0) -> Tensor:
    """(N, PARTIAL) partial row statistics of this vocabulary shard (see _layout).

    Without a dense reference (a sparse teacher) ref_logits is never read; topk_ids (N, K) feed
    PARTIAL.lse_rest. The data checks of labels, option tensors, the sparse teacher, the token
    weights and num_items (a tensor, or a 0 given as a number) run here, first; first_row: the flat index
    of the first of these rows (a chunk of linear_hrm_loss), for the messages."""
    st = Structure._make(structure)
    check_labels(labels, 0, vocab_size, st.ignore_index)
    check_params(params, st)
    live = labels != st.ignore_index
    if topk_ids is not None:
        check_topk(topk_ids, topk_logprobs, vocab_size, live if not st.tail else None, first_row)
    if token_weights is not None:
        check_weights(token_weights)
    if num_items is not None:
        check_num_items(num_items, live if token_weights is None else live & (token_weights != 0))
    with no_autocast(logits):
        s, t = rows_3d(logits, ref_logits)
        return backends.get(backend).row_stats(s, t, labels, params, st, vocab_start, topk_ids)


@row_stats.register_fake
def _(logits, ref_logits, labels, params, structure, backend, vocab_start, vocab_size, topk_ids=None,
      topk_logprobs=None, token_weights=None, num_items=None, first_row=0):
    return logits.new_empty((labels.numel(), len(PARTIAL)), dtype=acc_dtype(logits))


@torch.library.custom_op("hrmloss::jsd_sums", mutates_args=())
def jsd_sums(logits: Tensor, ref_logits: Tensor, labels: Tensor, lse_uw: Tensor, params: Tensor,
             structure: list[int], backend: str) -> Tensor:
    """(N, JSD) partial sums KL(p||m), KL(q||m) of this shard, given the final lse_u, lse_w."""
    st = Structure._make(structure)
    with no_autocast(logits):
        return backends.get(backend).jsd_sums(*rows_3d(logits, ref_logits), labels, lse_uw, params, st)


@jsd_sums.register_fake
def _(logits, ref_logits, labels, lse_uw, params, structure, backend):
    return logits.new_empty((labels.numel(), len(JSD)), dtype=acc_dtype(logits))


@torch.library.custom_op("hrmloss::grad", mutates_args=())
def grad(logits: Tensor, ref_logits: Tensor, labels: Tensor, final: Tensor, g: Tensor, params: Tensor,
         structure: list[int], backend: str, vocab_start: int, vocab_size: int,
         ref_grad: bool, topk_ids: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(d loss / d logits, d loss / d ref_logits) shaped like the inputs; the second is empty unless ref_grad.
    Without a dense reference, only the dense part of a sparse teacher's gradient (hrmloss/engine/sparse.py)."""
    st = Structure._make(structure)._replace(inplace=False)
    with no_autocast(logits):
        ds, dt = backends.get(backend).grad(*rows_3d(logits, ref_logits), labels, final, g, params, st,
                                             vocab_start, vocab_size, ref_grad, topk_ids)
    dt = dt.view(ref_logits.shape) if ref_grad else ref_logits.new_empty(0)
    return ds.view(logits.shape), dt


@grad.register_fake
def _(logits, ref_logits, labels, final, g, params, structure, backend, vocab_start, vocab_size, ref_grad,
      topk_ids=None):
    dt = torch.empty_like(ref_logits, memory_format=torch.contiguous_format) if ref_grad \
        else ref_logits.new_empty(0)
    return torch.empty_like(logits, memory_format=torch.contiguous_format), dt


@torch.library.custom_op("hrmloss::grad_inplace", mutates_args=("logits",))
def grad_inplace(logits: Tensor, ref_logits: Tensor, labels: Tensor, final: Tensor, g: Tensor, params: Tensor,
                 structure: list[int], backend: str, vocab_start: int, vocab_size: int,
                 ref_grad: bool, topk_ids: Optional[Tensor] = None) -> Tensor:
    """`grad` with d loss / d logits written into `logits` itself (inplace_backward=True); returns
    d loss / d ref_logits, empty unless ref_grad. torch.library bumps the version counter of `logits`,
    so autograd refuses a later use of values saved from it; under torch.compile the mutation is
    functionalised (the compiled graph may write a copy)."""
    st = Structure._make(structure)._replace(inplace=True)
    s, t = rows_3d(logits, ref_logits)
    with no_autocast(logits):
        ds, dt = backends.get(backend).grad(s, t, labels, final, g, params, st, vocab_start, vocab_size,
                                             ref_grad, topk_ids)
    if ds.data_ptr() != logits.data_ptr():  # rows_3d had to copy (a last dim that is not contiguous)
        logits.copy_(ds.reshape(logits.shape))
    return dt.view(ref_logits.shape) if ref_grad else ref_logits.new_empty(0)


@grad_inplace.register_fake
def _(logits, ref_logits, labels, final, g, params, structure, backend, vocab_start, vocab_size, ref_grad,
      topk_ids=None):
    return torch.empty_like(ref_logits, memory_format=torch.contiguous_format) if ref_grad \
        else ref_logits.new_empty(0)

"""The backend passes as torch.library custom ops, so that torch.compile(fullgraph=True) traces the loss.

Each op takes the logits as the user gave them (any (..., V) layout; `rows_3d` views them inside) and
the options as `LossOptions.key()`, a string (a constant to dynamo), whose `backend` is resolved.
The label check runs inside `row_stats`, before any launch, so eager and compiled calls raise alike.
"""
import contextlib

import torch
from torch import Tensor

from ._core import N_PARTIAL, acc_dtype, rows_3d
from ._options import LossOptions


def _impl(opts):
    """The launcher module of the resolved backend: _triton, or the torch passes (compiled per chunk on
    large CPU inputs when that pays off, see _torch_compiled.py)."""
    if opts.backend == "triton":
        from . import _triton
        return _triton
    from . import _torch_compiled
    return _torch_compiled


def _no_autocast(x):
    # the passes choose their own precision (fp32); autocast must not lower it
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


@torch.library.custom_op("hrmloss::row_stats", mutates_args=())
def row_stats(logits: Tensor, ref_logits: Tensor, labels: Tensor, opts: str, vocab_start: int,
              vocab_size: int) -> Tensor:
    """(N, 7) partial row statistics of this vocabulary shard (see _core)."""
    o = LossOptions.from_key(opts)
    check_labels(labels, 0, vocab_size, o.ignore_index)
    with _no_autocast(logits):
        return _impl(o).row_stats(*rows_3d(logits, ref_logits), labels, o, vocab_start)


@row_stats.register_fake
def _(logits, ref_logits, labels, opts, vocab_start, vocab_size):
    return logits.new_empty((labels.numel(), N_PARTIAL), dtype=acc_dtype(logits))


@torch.library.custom_op("hrmloss::jsd_sums", mutates_args=())
def jsd_sums(logits: Tensor, ref_logits: Tensor, labels: Tensor, lse_uw: Tensor, opts: str) -> Tensor:
    """(N, 2) partial sums KL(p||m), KL(q||m) of this shard, given the final lse_u, lse_w."""
    o = LossOptions.from_key(opts)
    with _no_autocast(logits):
        return _impl(o).jsd_sums(*rows_3d(logits, ref_logits), labels, lse_uw, o)


@jsd_sums.register_fake
def _(logits, ref_logits, labels, lse_uw, opts):
    return logits.new_empty((labels.numel(), 2), dtype=acc_dtype(logits))


@torch.library.custom_op("hrmloss::grad", mutates_args=())
def grad(logits: Tensor, ref_logits: Tensor, labels: Tensor, final: Tensor, g: Tensor, opts: str,
         vocab_start: int, vocab_size: int, ref_grad: bool) -> tuple[Tensor, Tensor]:
    """(d loss / d logits, d loss / d ref_logits) shaped like the inputs; the second is empty unless ref_grad."""
    o = LossOptions.from_key(opts)
    with _no_autocast(logits):
        ds, dt = _impl(o).grad(*rows_3d(logits, ref_logits), labels, final, g, o, vocab_size,
                               vocab_start=vocab_start, ref_grad=ref_grad)
    dt = dt.view(ref_logits.shape) if ref_grad else ref_logits.new_empty(0)
    return ds.view(logits.shape), dt


@grad.register_fake
def _(logits, ref_logits, labels, final, g, opts, vocab_start, vocab_size, ref_grad):
    dt = torch.empty_like(ref_logits, memory_format=torch.contiguous_format) if ref_grad \
        else ref_logits.new_empty(0)
    return torch.empty_like(logits, memory_format=torch.contiguous_format), dt

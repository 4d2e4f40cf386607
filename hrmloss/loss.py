"""Public API: `hrm_loss`, `HRMLoss`, `HRMLossOutput`. Validation, backend choice and reduction live here."""
import dataclasses
import os
from typing import NamedTuple

import torch

from ._function import HRMLossFunction
from ._options import LossOptions

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_ONLY_DTYPES = (torch.float64,)  # the torch backend also runs float64 (gradcheck)
LABEL_DTYPES = (torch.int64, torch.int32)


class HRMLossOutput(NamedTuple):
    """`loss` = `ce` + hrm * `kl` + `z`, each reduced the same way; `ce`, `kl`, `z` are detached fp32.

    `ce` includes label smoothing; `z` is the z-loss term z_loss * lse^2 (0 when z_loss = 0).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    z: torch.Tensor


def _triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend, device):
    """"auto" -> "triton" for CUDA tensors when triton imports, else "torch"; a forced choice is checked."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if not _triton_available():
        raise ValueError("backend='triton': triton is not installed; use backend='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' with tensors on {device.type}: expected CUDA tensors, or "
                         "TRITON_INTERPRET=1 set before triton is first imported")
    return "triton"


def check_tensors(logits, ref_logits, labels):
    """Shapes, dtypes and devices of the three tensors; TypeError / ValueError naming the argument."""
    for name, x in (("logits", logits), ("ref_logits", ref_logits), ("labels", labels)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    for name, x in (("logits", logits), ("ref_logits", ref_logits)):
        if x.dtype not in FLOAT_DTYPES + TORCH_ONLY_DTYPES:
            raise TypeError(f"{name}.dtype={x.dtype}: expected float32, bfloat16 or float16")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels.dtype={labels.dtype}: expected int64 or int32")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: expected (..., V) with V >= 1")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected the shape of logits, "
                         f"{tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels.shape={tuple(labels.shape)}: expected logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    for name, x in (("ref_logits", ref_logits), ("labels", labels)):
        if x.device != logits.device:
            raise ValueError(f"{name}.device={x.device}: expected the device of logits, {logits.device}")


def check_return_components(return_components):
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components={return_components!r}: expected a bool")


def check_num_items(num_items, reduction):
    """None, an int >= 1, or a 0-dim tensor (kept where it is: no host sync); "mean" only."""
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items={num_items!r} with reduction={reduction!r}: num_items is the "
                         "denominator of reduction='mean' only")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.dtype == torch.bool or num_items.is_complex():
            raise ValueError(f"num_items: expected an int or a 0-dim real tensor, got a tensor of shape "
                             f"{tuple(num_items.shape)} and dtype {num_items.dtype}")
    elif isinstance(num_items, bool) or not isinstance(num_items, int):
        raise TypeError(f"num_items={num_items!r}: expected None, an int or a 0-dim tensor")
    elif num_items < 1:
        raise ValueError(f"num_items={num_items!r}: expected num_items >= 1")


def mean_denominator(live, num_items=None):
    """The divisor of reduction "mean": max(count of counted rows, 1), or num_items; on the device."""
    return live.sum().clamp(min=1) if num_items is None else num_items


def reduce_rows(rows, live, reduction, num_items=None):
    """Reduce per-row values (N,) over counted rows: "sum", "mean" (by `mean_denominator`), or "none"."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / mean_denominator(live, num_items)
    return rows


def hrm_loss(logits, ref_logits, labels, hrm=1.0, *, kl="forward", beta=0.5, temperature=1.0,
             ignore_index=-100, reduction="mean", return_components=False, backend="auto",
             label_smoothing=0.0, z_loss=0.0, softcap=None, num_items=None, process_group=None):
    """Fused causal-LM cross-entropy plus `hrm` times a divergence to a reference, in one pass.

    Per token i with student logits s, reference logits t, label y (DESIGN.md §1):

        s      = softcap * tanh(s / softcap)                     (only with softcap)
        ce_i   = (1 - eps) (logsumexp(s) - s[y]) + eps mean_j(-log softmax(s)_j)   (eps = label_smoothing)
        kl_i   = KL(p_T || q_T)  (kl="forward"),  KL(q_T || p_T)  (kl="reverse"),
                 beta KL(p_T || m) + (1 - beta) KL(q_T || m),  m = beta p_T + (1 - beta) q_T  (kl="jsd")
        z_i    = z_loss * logsumexp(s)^2
        loss_i = ce_i + hrm * kl_i + z_i,   q_T = softmax(s / T),  p_T = softmax(t / T)

    Args:
        logits: (..., V) float32 / bfloat16 / float16, the student. Receives the gradient (its dtype).
            (float64 runs on backend="torch", for gradcheck.)
        ref_logits: (..., V), any of those dtypes, the reference. Receives a gradient when it requires
            grad (co-training, a learned reference), computed in the same backward pass; when it does
            not, it costs no extra memory traffic.
        labels: (...) int64 or int32, values in [0, V) or `ignore_index`.
        hrm: weight of the divergence, finite and >= 0.
        kl: "forward", "reverse" or "jsd".
        beta: the mixture weight of "jsd", 0 < beta < 1 (checked, unused by the other kinds).
        temperature: T > 0, applied to the divergence only (no T^2 factor).
        ignore_index: tokens with this label count nowhere and get a zero gradient.
        reduction: "mean" (over counted tokens; 0 when none), "sum", or "none" (shape of labels,
            0 at ignored tokens).
        return_components: return `HRMLossOutput(loss, ce, kl)` instead of the loss alone.
        backend: "auto" (Triton for CUDA tensors when triton imports, else torch), "triton", "torch".
        label_smoothing: eps in [0, 1), on the CE term only; matches F.cross_entropy(label_smoothing=eps).
        z_loss: weight >= 0 of the auxiliary z_loss * logsumexp(s)^2 per counted token (PaLM).
        softcap: None, or c > 0: the student logits become c * tanh(s / c) before everything else.
        num_items: for reduction="mean", the denominator instead of the count of counted tokens: an
            int >= 1 or a 0-dim tensor (stays on its device), e.g. the number of items of the global
            batch when accumulating gradients over micro-batches.
        process_group: None, or a `torch.distributed.ProcessGroup` over which the vocabulary is
            sharded: `logits` and `ref_logits` then hold this rank's contiguous shard (rank r: global
            ids [r V, (r+1) V) with V = logits.shape[-1], equal on every rank), `labels` the global ids,
            the same on every rank; the result is the loss over the whole vocabulary, on every rank,
            and the gradients are those of this shard. 3 all_reduce of O(N) floats per forward (4 for
            "jsd"), none in backward (hrmloss/distributed.py, docs/distributed.md).

    Returns:
        The fp32 loss, or `HRMLossOutput(loss, ce, kl, z)`, the last three reduced like the loss,
        detached, fp32.
    """
    opts = LossOptions(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index,
                       reduction=reduction, backend=backend, label_smoothing=label_smoothing,
                       z_loss=z_loss, softcap=softcap)
    check_return_components(return_components)
    check_num_items(num_items, opts.reduction)
    check_tensors(logits, ref_logits, labels)
    name = resolve_backend(opts.backend, logits.device)
    if name == "triton" and (logits.dtype in TORCH_ONLY_DTYPES or ref_logits.dtype in TORCH_ONLY_DTYPES):
        raise TypeError(f"logits.dtype={logits.dtype}, ref_logits.dtype={ref_logits.dtype}: the Triton "
                        "backend takes float32, bfloat16 or float16 (float64 runs on backend='torch')")
    flat = labels.reshape(-1)
    shard = None
    if process_group is not None:
        from .distributed import vocab_shard
        shard = vocab_shard(process_group, logits.shape[-1], flat)
    rows = HRMLossFunction.apply(logits, ref_logits, flat, dataclasses.replace(opts, backend=name), shard)
    live = flat != opts.ignore_index
    out = HRMLossOutput(*(reduce_rows(x, live, opts.reduction, num_items) for x in rows))
    if opts.reduction == "none":
        out = HRMLossOutput(*(x.view(labels.shape) for x in out))
    return out if return_components else out.loss


class HRMLoss(torch.nn.Module):
    """`hrm_loss` as a module: options at construction, `forward(logits, ref_logits, labels)`."""

    def __init__(self, hrm=1.0, *, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                 reduction="mean", return_components=False, backend="auto", label_smoothing=0.0,
                 z_loss=0.0, softcap=None, process_group=None):
        super().__init__()
        options = dict(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index,
                       reduction=reduction, backend=backend, label_smoothing=label_smoothing,
                       z_loss=z_loss, softcap=softcap)
        LossOptions(**options)  # fail at construction, not at the first call
        check_return_components(return_components)
        self.kwargs = dict(options, return_components=return_components)
        if process_group is not None:
            from .distributed import check_group
            check_group(process_group)
        self.process_group = process_group  # not in kwargs: a group is state, not an option to print

    def forward(self, logits, ref_logits, labels, num_items=None):
        """The loss of `hrm_loss` with this module's options; `num_items` per call (it changes per batch)."""
        return hrm_loss(logits, ref_logits, labels, num_items=num_items, **self.kwargs,
                        process_group=self.process_group)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

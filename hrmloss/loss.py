"""Public API: `hrm_loss`, `HRMLoss`, `HRMLossOutput`. Validation, backend choice and reduction live here."""
import os
from typing import NamedTuple

import torch

from ._function import HRMLossFunction
from ._options import LossOptions

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_ONLY_DTYPES = (torch.float64,)  # the torch backend also runs float64 (gradcheck)
LABEL_DTYPES = (torch.int64, torch.int32)


class HRMLossOutput(NamedTuple):
    """`loss` = `ce` + hrm * `kl`, each reduced the same way; `ce` and `kl` are detached fp32."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


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


def check_labels(labels, lo, hi, ignore_index, name="labels"):
    """Every label in [lo, hi) or ignore_index: raised at once on the CPU; on CUDA an async device assert."""
    ok = ((labels >= lo) & (labels < hi)) | (labels == ignore_index)
    if labels.device.type == "cuda":
        torch._assert_async(ok.all(), f"{name}: a label outside [{lo}, {hi}) other than ignore_index")
    elif labels.numel() and not bool(ok.all()):
        bad = labels[~ok][0].item()
        raise ValueError(f"{name} contains {bad}: expected values in [{lo}, {hi}) or "
                         f"ignore_index={ignore_index}")


def reduce_rows(rows, live, reduction):
    """Reduce per-row values (N,) over counted rows; "mean" divides by max(count, 1) on the device."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / live.sum().clamp(min=1)
    return rows


def hrm_loss(logits, ref_logits, labels, hrm=1.0, *, kl="forward", beta=0.5, temperature=1.0,
             ignore_index=-100, reduction="mean", return_components=False, backend="auto"):
    """Fused causal-LM cross-entropy plus `hrm` times a divergence to a reference, in one pass.

    Per token i with student logits s, reference logits t, label y (DESIGN.md §1):

        ce_i   = logsumexp(s) - s[y]
        kl_i   = KL(p_T || q_T)  (kl="forward"),  KL(q_T || p_T)  (kl="reverse"),
                 beta KL(p_T || m) + (1 - beta) KL(q_T || m),  m = beta p_T + (1 - beta) q_T  (kl="jsd")
        loss_i = ce_i + hrm * kl_i,   q_T = softmax(s / T),  p_T = softmax(t / T)

    Args:
        logits: (..., V) float32 / bfloat16 / float16, the student. Receives the gradient (its dtype).
        ref_logits: (..., V), any of those dtypes, the reference. A constant: no gradient flows to it,
            even if it requires grad.
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

    Returns:
        The fp32 loss, or `HRMLossOutput` whose `ce` and `kl` are reduced like the loss, detached, fp32.
    """
    opts = LossOptions(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index,
                       reduction=reduction, backend=backend)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components={return_components!r}: expected a bool")
    check_tensors(logits, ref_logits, labels)
    name = resolve_backend(opts.backend, logits.device)
    if name == "triton" and (logits.dtype in TORCH_ONLY_DTYPES or ref_logits.dtype in TORCH_ONLY_DTYPES):
        raise TypeError(f"logits.dtype={logits.dtype}, ref_logits.dtype={ref_logits.dtype}: the Triton "
                        "backend takes float32, bfloat16 or float16 (float64 runs on backend='torch')")
    flat = labels.reshape(-1)
    check_labels(flat, 0, logits.shape[-1], opts.ignore_index)
    loss, ce, kl_rows = HRMLossFunction.apply(logits, ref_logits.detach(), flat, opts, name)
    live = flat != opts.ignore_index
    out = HRMLossOutput(*(reduce_rows(x, live, opts.reduction) for x in (loss, ce, kl_rows)))
    if opts.reduction == "none":
        out = HRMLossOutput(*(x.view(labels.shape) for x in out))
    return out if return_components else out.loss


class HRMLoss(torch.nn.Module):
    """`hrm_loss` as a module: options at construction, `forward(logits, ref_logits, labels)`."""

    def __init__(self, hrm=1.0, *, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                 reduction="mean", return_components=False, backend="auto"):
        super().__init__()
        LossOptions(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index,
                    reduction=reduction, backend=backend)  # fail at construction, not at first call
        self.kwargs = dict(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, return_components=return_components, backend=backend)

    def forward(self, logits, ref_logits, labels):
        return hrm_loss(logits, ref_logits, labels, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

"""The autograd Function: per-row loss, ce, kl, z forward; recompute-and-scale backward. ctx handling only."""
import torch

from . import _ops
from ._core import finalize


def forward_rows(logits, ref_logits, labels, opts):
    """Per-row loss, ce, kl, z and the (N, 5) final statistics, from the backend's passes."""
    key = opts.key()
    V = logits.shape[-1]
    partial = _ops.row_stats(logits, ref_logits, labels, key, 0, V)
    jsd = _ops.jsd_sums(logits, ref_logits, labels, partial[:, 2:4], key) if opts.kl == "jsd" else None
    return finalize(partial, jsd, labels, opts, V)


class HRMLossFunction(torch.autograd.Function):
    """(logits (..., V), ref_logits (..., V), labels (N,) flat, LossOptions) -> per-row loss, ce, kl, z (N,).

    ce, kl and z are not differentiable. The gradient goes to logits, and to ref_logits when it
    requires grad (computed in the same backward pass; no extra traffic otherwise).
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, opts):
        loss, ce, kl, z, final = forward_rows(logits, ref_logits, labels, opts)
        ctx.save_for_backward(logits, ref_logits, labels, final)
        ctx.opts = opts
        ctx.mark_non_differentiable(ce, kl, z)
        return loss, ce, kl, z

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, ref_logits, labels, final = ctx.saved_tensors
        ref_grad = ctx.needs_input_grad[1]
        g = grad_loss.to(final.dtype).contiguous()
        ds, dt = _ops.grad(logits, ref_logits, labels, final, g, ctx.opts.key(), 0, logits.shape[-1],
                            ref_grad)
        return ds, dt if ref_grad else None, None, None

"""The autograd Function: per-row loss, ce, kl forward; recompute-and-scale backward. ctx handling only."""
import torch

from ._core import finalize, rows_3d


def backend_module(name):
    """The launcher module of a resolved backend name ("triton" or "torch")."""
    if name == "triton":
        from . import _triton
        return _triton
    from . import _torch_compiled  # the eager _torch functions, compiled per chunk when that pays off
    return _torch_compiled


def forward_rows(impl, s3, t3, labels, opts):
    """Per-row loss, ce, kl and the final statistics, from the backend's passes over s3, t3."""
    partial = impl.row_stats(s3, t3, labels, opts)
    jsd = impl.jsd_sums(s3, t3, labels, partial[:, 2:4], opts) if opts.kl == "jsd" else None
    return finalize(partial, jsd, labels, opts)


class HRMLossFunction(torch.autograd.Function):
    """(logits (..., V), ref_logits (..., V), labels (N,) flat, opts, backend) -> per-row loss, ce, kl (N,).

    ce and kl are not differentiable; the gradient goes to logits only (ref_logits is a constant).
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, opts, backend):
        impl = backend_module(backend)
        s3, t3 = rows_3d(logits), rows_3d(ref_logits)
        loss, ce, kl, final = forward_rows(impl, s3, t3, labels, opts)
        ctx.save_for_backward(logits, ref_logits, labels, final)
        ctx.opts, ctx.impl = opts, impl
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        logits, ref_logits, labels, final = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None
        g = grad_loss.float().contiguous()
        ds, _ = ctx.impl.grad(rows_3d(logits), rows_3d(ref_logits), labels, final, g, ctx.opts)
        return ds.view(logits.shape), None, None, None, None

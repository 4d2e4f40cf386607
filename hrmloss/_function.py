"""The autograd Function: per-row loss, ce, kl, z forward; recompute-and-scale backward. ctx handling only."""
import torch

from . import _ops
from ._core import finalize
from ._layout import PARTIAL


def vocab_range(logits, shard):
    """(first global id of this vocabulary shard, global vocabulary size); (0, V) without a shard."""
    return (0, logits.shape[-1]) if shard is None else (shard.vocab_start, shard.vocab_size)


def forward_rows(logits, ref_logits, labels, params, st, backend, shard=None):
    """Per-row loss, ce, kl, z and the (N, FINAL) final statistics, from the backend's passes.

    shard: None, or a `distributed.VocabShard` when logits hold one vocabulary shard: its merges turn
    this shard's statistics into those of the whole vocabulary (hrmloss/distributed.py).
    """
    start, V = vocab_range(logits, shard)
    structure = [int(x) for x in st]
    partial = _ops.row_stats(logits, ref_logits, labels, params, structure, backend, start, V)
    if shard is not None:
        partial = shard.merge_stats(partial)
    jsd = None
    if st.kind == 2:  # JSD: a second pass, with the normalisers of the whole vocabulary
        lse_uw = partial[:, [PARTIAL.lse_u, PARTIAL.lse_w]]
        jsd = _ops.jsd_sums(logits, ref_logits, labels, lse_uw, params, structure, backend)
        if shard is not None:
            jsd = shard.merge_sums(jsd)
    return finalize(partial, jsd, labels, params, st, V)


def grad_rows(logits, ref_logits, labels, final, g, params, st, backend, vocab_range_, ref_grad):
    """(d loss / d logits, d loss / d ref_logits or None), rows weighted by g (N,).

    With st.inplace the first is `logits` itself, overwritten by its gradient."""
    args = (labels, final, g.to(final.dtype).contiguous(), params, [int(x) for x in st], backend,
            *vocab_range_, ref_grad)
    if st.inplace:
        dt = _ops.grad_inplace(logits, ref_logits, *args)
        return logits, dt if ref_grad else None
    ds, dt = _ops.grad(logits, ref_logits, *args)
    return ds, dt if ref_grad else None


class HRMLossFunction(torch.autograd.Function):
    """(logits (..., V), ref_logits (..., V), labels (N,) flat, params, Structure, backend, shard) ->
    per-row loss, ce, kl, z (N,).

    ce, kl and z are not differentiable. The gradient goes to logits, and to ref_logits when it
    requires grad (computed in the same backward pass; no extra traffic otherwise). With a `shard`
    (vocabulary-parallel), the forward communicates; the backward does not. With st.inplace the
    gradient of the logits is written into their storage and returned as that tensor.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, params, st, backend, shard=None):
        loss, ce, kl, z, final = forward_rows(logits, ref_logits, labels, params, st, backend, shard)
        ctx.save_for_backward(logits, ref_logits, labels, final, params)
        ctx.st, ctx.backend, ctx.vocab_range = st, backend, vocab_range(logits, shard)
        ctx.mark_non_differentiable(ce, kl, z)
        return loss, ce, kl, z

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, ref_logits, labels, final, params = ctx.saved_tensors
        st = ctx.st._replace(inplace=ctx.st.inplace and ctx.needs_input_grad[0])
        ds, dt = grad_rows(logits, ref_logits, labels, final, grad_loss, params, st, ctx.backend,
                           ctx.vocab_range, ctx.needs_input_grad[1])
        return ds, dt, None, None, None, None, None

"""The autograd Function: per-row loss, ce, kl, z forward; recompute-and-scale backward. ctx handling only."""
import torch

from . import _ops
from ._core import finalize


def vocab_range(logits, shard):
    """(first global id of this vocabulary shard, global vocabulary size); (0, V) without a shard."""
    return (0, logits.shape[-1]) if shard is None else (shard.vocab_start, shard.vocab_size)


def forward_rows(logits, ref_logits, labels, opts, shard=None):
    """Per-row loss, ce, kl, z and the (N, 5) final statistics, from the backend's passes.

    shard: None, or a `distributed.VocabShard` when logits hold one vocabulary shard: its merges turn
    this shard's statistics into those of the whole vocabulary (hrmloss/distributed.py).
    """
    key = opts.key()
    start, V = vocab_range(logits, shard)
    partial = _ops.row_stats(logits, ref_logits, labels, key, start, V)
    if shard is not None:
        partial = shard.merge_stats(partial)
    jsd = _ops.jsd_sums(logits, ref_logits, labels, partial[:, 2:4], key) if opts.kl == "jsd" else None
    if jsd is not None and shard is not None:
        jsd = shard.merge_sums(jsd)
    return finalize(partial, jsd, labels, opts, V)


class HRMLossFunction(torch.autograd.Function):
    """(logits (..., V), ref_logits (..., V), labels (N,) flat, LossOptions) -> per-row loss, ce, kl, z (N,).

    ce, kl and z are not differentiable. The gradient goes to logits, and to ref_logits when it
    requires grad (computed in the same backward pass; no extra traffic otherwise). With a `shard`
    (vocabulary-parallel), the forward communicates; the backward does not.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, opts, shard=None):
        loss, ce, kl, z, final = forward_rows(logits, ref_logits, labels, opts, shard)
        ctx.save_for_backward(logits, ref_logits, labels, final)
        ctx.opts, ctx.vocab_range = opts, vocab_range(logits, shard)
        ctx.mark_non_differentiable(ce, kl, z)
        return loss, ce, kl, z

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, ref_logits, labels, final = ctx.saved_tensors
        ref_grad = ctx.needs_input_grad[1]
        g = grad_loss.to(final.dtype).contiguous()
        ds, dt = _ops.grad(logits, ref_logits, labels, final, g, ctx.opts.key(), *ctx.vocab_range, ref_grad)
        return ds, dt if ref_grad else None, None, None, None

"""The autograd Function: per-row loss, ce, kl, z forward; recompute-and-scale backward. ctx handling only."""
import torch

from . import ops, sparse
from .reduce import num_items_to_check
from .stats import finalize
from .layout import FINAL, KINDS, PARAMS, PARTIAL


def vocab_range(logits, shard):
    """(first global id of this vocabulary shard, global vocabulary size); (0, V) without a shard."""
    return (0, logits.shape[-1]) if shard is None else (shard.vocab_start, shard.vocab_size)


def _ref_or_stand_in(logits, ref_logits):
    """The reference, or for a sparse teacher a (..., 1) stand-in that the passes never read (a fresh
    tensor: an alias of the logits would meet the in-place backward's mutation)."""
    return ref_logits if ref_logits is not None else logits.new_empty((*logits.shape[:-1], 1))


def forward_rows(logits, ref_logits, labels, params, st, backend, shard=None, topk=None, token_weights=None,
                 num_items=None, first_row=0):
    """Per-row loss, ce, kl, z, the (N, FINAL) final statistics and, for a sparse teacher, the (N, K)
    correction of the gradient at its ids (else None), from the backend's passes.

    ref_logits: (..., V_ref) dense reference (V_ref < V with st.cut), or None with `topk` (a sparse
    teacher, `sparse.TopK`). shard: None, or a `distributed.VocabShard` when logits hold one vocabulary
    shard: its merges turn this shard's statistics into those of the whole vocabulary
    (hrmloss/engine/distributed.py). token_weights, num_items: only checked here (the front end applies
    them; `reduce.num_items_to_check`). first_row: the flat index of the first row (a chunk), for messages.
    """
    start, V = vocab_range(logits, shard)
    structure = [int(x) for x in st]
    t = _ref_or_stand_in(logits, ref_logits)
    ids, lps = topk if topk is not None else (None, None)
    partial = ops.row_stats(logits, t, labels, params, structure, backend, start, V, ids, lps, token_weights,
                            num_items_to_check(num_items), first_row)
    if shard is not None:
        partial = shard.merge_stats(partial)
    jsd, topk_kl, corr = None, None, None
    if topk is not None:
        s_k, _, _ = sparse.student_at_ids(logits, ids, params, st, start)
        if shard is not None:  # every rank needs every id's logit (each owned by one shard)
            s_k = shard.merge_sums(s_k)
        u = s_k / params[PARAMS.temperature] if st.scaled else s_k
        live = labels != st.ignore_index
        kl, coef, corr = sparse.divergence(u, lps, partial, params, st, live, V)
        topk_kl = (kl, coef)
    elif not st.has_ref:  # no reference: the CE family alone, kl = 0 and no divergence gradient (coef = 0)
        zero = partial.new_zeros(partial.shape[0])
        topk_kl = (zero, zero)
    elif st.kind == KINDS.jsd:  # JSD: a second pass, with the normalisers of the whole vocabulary
        lse_uw = partial[:, [PARTIAL.lse_u, PARTIAL.lse_w]]
        jsd = ops.jsd_sums(logits, t, labels, lse_uw, params, structure, backend)
        if shard is not None:
            jsd = shard.merge_sums(jsd)
    return (*finalize(partial, jsd, labels, params, st, V, topk_kl), corr)


def grad_rows(logits, ref_logits, labels, final, g, params, st, backend, vocab_range_, ref_grad, topk=None,
              corr=None):
    """(d loss / d logits, d loss / d ref_logits or None), rows weighted by g (N,).

    With st.inplace the first is `logits` itself, overwritten by its gradient. A sparse teacher (`topk`,
    its (N, K) `corr` from the forward) adds its term at the ids (`sparse.add_correction`)."""
    t = _ref_or_stand_in(logits, ref_logits)
    # a student row of all -inf logits (lse_s = -inf): probability 0 everywhere, gradient 0 (its loss is +inf)
    g = torch.where(final[:, FINAL.lse_s] == -float("inf"), 0.0, g.to(final.dtype)).contiguous()
    at_ids = None
    if topk is not None and not st.hrm_zero:  # read before an in-place backward overwrites the logits
        at_ids = sparse.student_at_ids(logits, topk.ids, params, st, vocab_range_[0])
    args = (labels, final, g, params, [int(x) for x in st], backend, *vocab_range_, ref_grad,
            None if topk is None else topk.ids)
    if st.inplace:
        dt = ops.grad_inplace(logits, t, *args)
        ds = logits
    else:
        ds, dt = ops.grad(logits, t, *args)
    if at_ids is not None:
        ds = sparse.add_correction(ds, topk, at_ids, corr, g, params, vocab_range_[0])
    return ds, dt if ref_grad else None


class HRMLossFunction(torch.autograd.Function):
    """(logits (..., V), ref_logits (..., V_ref) or None, labels (N,) flat, params, Structure, backend, shard,
    topk, token_weights, num_items) -> per-row loss, ce, kl, z (N,).

    ce, kl and z are not differentiable. The gradient goes to logits, and to ref_logits when it
    requires grad (computed in the same backward pass; no extra traffic otherwise). With a `shard`
    (vocabulary-parallel), the forward communicates; the backward does not. With st.inplace the
    gradient of the logits is written into their storage and returned as that tensor. `topk`
    (`sparse.TopK`) replaces ref_logits by a sparse teacher.
    """

    @staticmethod
    def forward(ctx, logits, ref_logits, labels, params, st, backend, shard=None, topk=None, token_weights=None,
                num_items=None):
        loss, ce, kl, z, final, corr = forward_rows(logits, ref_logits, labels, params, st, backend, shard, topk,
                                                    token_weights, num_items)
        ctx.save_for_backward(logits, ref_logits, labels, final, params, corr,
                              *(topk if topk is not None else ()))
        ctx.st, ctx.backend, ctx.vocab_range = st, backend, vocab_range(logits, shard)
        ctx.mark_non_differentiable(ce, kl, z)
        return loss, ce, kl, z

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, ref_logits, labels, final, params, corr, *topk = ctx.saved_tensors
        st = ctx.st._replace(inplace=ctx.st.inplace and ctx.needs_input_grad[0])
        ds, dt = grad_rows(logits, ref_logits, labels, final, grad_loss, params, st, ctx.backend,
                           ctx.vocab_range, ctx.needs_input_grad[1], sparse.TopK(*topk) if topk else None, corr)
        return ds, dt, None, None, None, None, None, None, None, None

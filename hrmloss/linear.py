"""Fused output projection + loss: `linear_hrm_loss`, `LinearHRMLoss`, and their autograd Function.

The student logits s = hidden @ weight.T (+ bias) are never materialised for all N tokens at once. Rows
(tokens) are processed in chunks of c rows; per chunk, with h the chunk's hidden states:

    s   = h @ weight.T (+ bias)                  (c, V)   GEMM 1
    t   = ref_logits[rows, :V]  or  ref_hidden[rows] @ ref_weight[:V].T (+ ref_bias[:V])   (GEMM 4, the
          reference's; none for a sparse teacher, ref_topk, whose (c, K) ids and log-probs are sliced instead)
    loss, ce, kl, z, final[, corr] = forward_rows(...)   the core passes of hrm_loss (one row = one token;
          corr: a sparse teacher's (c, K) gradient term at its ids)
    ds  = d loss_rows / d s, scaled per row by g (the core's grad pass, plus corr at the ids)
    grad_hidden[rows] = ds @ weight              (c, H)   GEMM 2
    grad_weight += ds.T @ h                      (V, H)   GEMM 3, accumulated over chunks
    grad_bias   += sum_rows ds

Every GEMM runs in one dtype, the "GEMM dtype": the inputs' dtype, or autocast's inside `torch.autocast`
(bf16 hidden with an fp32 weight, or the reverse, is then cast as F.linear would cast it). No fp32 copy of
a chunk of hidden, of ds or of the weight is ever made: bf16 inputs mean bf16 GEMMs (fp32 accumulation
inside each GEMM). Across chunks the weight gradient is summed into an accumulator of `grad_acc_dtype`:

    fp32 (default)  CUDA: one cuBLAS call per chunk, bf16 operands and an fp32 output that is also the
                    addend (aten::addmm.dtype); CPU, or a torch without it: bf16 GEMMs summed in a (V, H)
                    bf16 scratch over up to 4 chunks, then one fp32 add. Error against float64 ~ that of
                    the naive bf16 composition (docs/linear.md).
    weight's dtype  acc.addmm_(ds.T, h): bf16 in, bf16 out, every chunk rounds the running sum; saves the
                    fp32 accumulator's 4 V H bytes (docs/linear.md gives both errors).

Rows are independent in the loss, so chunking is exact; the vocabulary-parallel form (process_group) splits
the vocabulary instead and merges each chunk's row statistics over the group (hrmloss/engine/distributed.py).

When is the gradient computed? The incoming gradient of the loss decides:
- reduction "mean" / "sum": the loss is a scalar, so d loss / d s_i = grad_output * w_i with a known row
  weight w_i (1/max(count, 1) or 1, times the token weight). The forward computes the gradients with
  g = w (when grad is enabled) and the backward only multiplies them by the grad_output tensor (no host
  sync), fused with the cast to the weight's dtype. GEMMs: 3 student + 1 reference (none for a sparse
  teacher). Such a graph can be backpropagated once.
- reduction "none": grad_output is an arbitrary per-token tensor, unknown in the forward. The forward
  keeps only the (N, FINAL) final row statistics (and a sparse teacher's (N, K) gradient terms at its
  ids); the backward recomputes the logits chunk by chunk and runs the gradient pass with g = grad_output
  (token weights included): GEMMs 1 + 1 reference in the forward, 3 + 1 reference in the backward (the
  logits GEMMs are done twice), the memory stays O(c V).

All of it runs on one stream and never waits for the host, so the CPU queues chunk after chunk while the
GPU works. Per chunk the GEMMs dominate (~90 % of the time at N = 8192, H = 4096, V = 128256: four GEMMs
of 2 c H V FLOPs against ~5 c V bytes of memory-bound loss passes); the next chunk's logits GEMM could
overlap this chunk's loss kernels on a second stream, but a GEMM of that size fills every SM, so little
would run concurrently, and two chunks in flight would double the chunk buffers (docs/linear.md).
"""
import torch

from .engine import chunked, sparse
from .engine.frontend import LossModule, finish, prepare_linear
from .engine.options import LossOptions, check_value
from .engine.reduce import reduce_rows
from .engine.sharding import check_not_zero3, fsdp_redirect
from .engine.tensor_parallel import linear_call

_TENSOR_KEYWORDS = ("bias", "ref_logits", "ref_hidden", "ref_weight", "ref_bias", "ref_topk", "token_weights")


class LinearHRMLossFunction(torch.autograd.Function):
    """(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, plan, topk_ids,
    topk_logprobs, weights) -> (loss, ce_rows, kl_rows, z_rows): loss reduced for "mean" / "sum" (token
    weights applied), per row (N,) and unweighted for "none" (the front end's `finish` weighs it, and
    autograd with it); the others (N,) detached. The chunks are hrmloss/engine/chunked.py's; ctx handling here.

    Gradients flow to hidden, weight and bias only; the reference side (or sparse teacher) is a constant.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, plan,
                topk_ids=None, topk_logprobs=None, weights=None):
        call = plan.call
        reduction = call.opts.reduction
        topk = None if topk_ids is None else sparse.TopK(topk_ids, topk_logprobs)
        tensors = (hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias)
        wants = [plan.grad_enabled and w for w in ctx.needs_input_grad[:3]]
        rows, grads = chunked.forward(plan, tensors, topk, weights, wants)
        loss_rows, ce, kl, z, final = rows[:5]
        corr = rows[5] if topk is not None else None
        ctx.eager = any(wants) and reduction != "none"  # chunked.forward computed the gradients
        ctx.grads, ctx.plan, ctx.hidden_shape = grads, plan, hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce, kl, z)
        if reduction == "none":
            ctx.save_for_backward(*tensors, topk_ids, topk_logprobs, weights, final, corr)
            return loss_rows, ce, kl, z
        live = labels != call.st.ignore_index
        return reduce_rows(loss_rows, live, reduction, call.num_items, weights), ce, kl, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        if ctx.eager:  # "mean" / "sum": scale the forward's gradients by the scalar grad_loss
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_hrm_loss: a second backward through the same graph is not supported with "
                    "reduction 'mean' or 'sum' (the gradients were computed in the forward and scaled in "
                    "place by the first backward); run the forward again")
            grads, ctx.grads = ctx.grads, None
            gh, gw, gb = grads.result(grad_loss.float(), *ctx.dtypes)
        else:          # "none": recompute the logits chunk by chunk, backpropagate the per-row grad_loss
            *tensors, ids, lps, weights, final, corr = ctx.saved_tensors
            topk = None if ids is None else sparse.TopK(ids, lps)
            # token weights: in grad_loss already (finish weighs the rows)
            gh, gw, gb = chunked.backward(ctx.plan, tensors, topk, weights, final, corr,
                                          grad_loss.float().contiguous(), ctx.needs_input_grad[:3], ctx.dtypes)
        gh = None if gh is None else gh.view(ctx.hidden_shape)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


def _detach(x):
    return None if x is None else x.detach()


def _check_ref_softcap(ref_softcap, dense_ref):
    """ref_softcap: None, or a value with softcap's range, for a dense reference only."""
    if ref_softcap is None:
        return None
    if not dense_ref:
        raise ValueError(f"ref_softcap={ref_softcap!r} without ref_logits or ref_hidden: expected None (a sparse "
                         "teacher's log-probabilities are stored after the teacher's own cap)")
    if isinstance(ref_softcap, torch.Tensor):  # its range could not be checked without a host sync
        raise TypeError("ref_softcap: expected None or a number (a model config's cap), got a tensor")
    return check_value("ref_softcap", ref_softcap, LossOptions.__dataclass_fields__["softcap"].metadata["range"])


def linear_hrm_loss(hidden, weight, labels, hrm=1.0, *, bias=None, ref_logits=None, ref_hidden=None,
                    ref_weight=None, ref_bias=None, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                    reduction="mean", return_components=False, chunk_size=None, chunk_bytes=None,
                    grad_acc_dtype=None, backend="auto", label_smoothing=0.0, z_loss=0.0, softcap=None,
                    num_items=None, process_group=None, check_finite=False, ref_topk=None, topk_mode="renorm",
                    ref_vocab="error", token_weights=None, ref_softcap=None, ce_weight=1.0):
    """`hrm_loss` of the logits `hidden @ weight.T (+ bias)`, without ever holding all N x V of them.

    With s = hidden @ weight.T + bias (student) and t the reference logits, per token i (docs/design.md §1):

        ce_i   = logsumexp(s_i) - s_i[y_i]       (with label smoothing and soft cap as in hrm_loss)
        kl_i   = KL(p_T || q_T)  (kl="forward"),  KL(q_T || p_T)  (kl="reverse"),
                 beta KL(p_T || m) + (1 - beta) KL(q_T || m),  m = beta p_T + (1 - beta) q_T  (kl="jsd")
        loss_i = ce_weight * ce_i + hrm * kl_i + z_i,   q_T = softmax(s_i / T),  p_T = softmax(t_i / T)

    computed over chunks of tokens: peak extra memory O(chunk x V) plus the (N, H) gradient of hidden and
    the (V, H) accumulator of the gradient of weight (docs/linear.md). GEMMs: 3 student ones of 2 N H V
    FLOPs (logits, grad of hidden, grad of weight) plus 1 for a reference given as hidden states, all in
    the inputs' dtype; "none" recomputes the logits in the backward (see the module docstring).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16, the student's last hidden states. Receives a
            gradient of its shape and dtype.
        weight: (V, H), hidden's dtype, the student's output projection. Receives a gradient in its dtype.
            A DTensor weight: one that FSDP2 (`fully_shard`) manages is gathered by FSDP2 (the loss runs
            inside its unit's FSDP2 hooks); any other `Shard(0)` DTensor is a vocabulary shard (tensor
            parallel, the mesh's group as process_group). Same for bias, ref_weight, ref_bias
            (docs/distributed.md).
            Inside `torch.autocast`, hidden and weight (and bias, and the reference's) may have different
            float dtypes: every GEMM then runs in autocast's dtype, as F.linear would.
        labels: (...) = hidden.shape[:-1], int64 or int32, values in [0, V) or `ignore_index`.
        hrm: weight of the divergence, finite and >= 0.
        bias: optional (V,) output bias, weight's dtype (gets a gradient like weight).
        ref_logits: (..., V) any float dtype, precomputed reference logits; or instead
        ref_hidden, ref_weight, ref_bias: the reference's last hidden states (..., H_ref), output weight
            (V, H_ref) and optional bias (V,), one float dtype; the reference logits are then computed
            chunk by chunk too; or instead
        ref_topk, topk_mode: a sparse teacher (indices, logprobs), each labels.shape + (K,), as in
            `hrm_loss` (no reference GEMM). At most one of the three forms; none: no reference, the fused
            cross-entropy family alone (kl = 0, hrm unused). The reference side is a constant.
        ref_vocab: "error" (default) or "truncate", as in `hrm_loss`: ref_logits / ref_weight may then have
            V_ref != V classes; the divergence uses the first min(V, V_ref) ids (only the first V rows of
            a larger ref_weight are multiplied, only the first V columns of larger ref_logits are read).
        token_weights: (...) = labels.shape, float, >= 0, as in `hrm_loss`: each token's loss (and its
            gradient) is multiplied by its weight; "mean" divides by the weight sum of counted tokens.
        ref_softcap: None, or a number c > 0: the reference's own soft cap, its
            logits become c tanh(t / c) chunk by chunk in the GEMM dtype, before the temperature (a Gemma-2
            teacher's final_logit_softcapping given as ref_hidden + ref_weight). `softcap` caps the student
            only. Needs ref_logits or ref_hidden.
        kl, beta, temperature, ignore_index, reduction, backend, label_smoothing, z_loss, softcap,
        num_items, check_finite, ce_weight: as in `hrm_loss` (the value options may be 0-dim tensors there too).
        return_components: return `HRMLossOutput(loss, ce, kl, z)` instead of the loss alone.
        chunk_size: tokens per chunk; wins over chunk_bytes.
        chunk_bytes: memory budget of one chunk's (chunk, V) buffers (student logits, overwritten by
            their gradient, and the reference logits when computed from hidden states, in the GEMM
            dtype). None: 512 MiB on CUDA (rounded down to a multiple of 64 rows); elsewhere N / 8 rows
            within 64 MiB, in whole calls of the compiled CPU passes. At least 1 and at most N rows
            (`chunk_rows`; docs/linear.md).
        grad_acc_dtype: dtype of the weight (and bias) gradient accumulator: None or torch.float32
            (default, accurate: docs/linear.md), or the GEMM dtype (bf16 / fp16), which saves 2 V H bytes
            and, when it is the weight's dtype, the cast at the end; its error grows with the chunk count.
        process_group: None, or the `torch.distributed.ProcessGroup` over which the output layer is
            vocabulary-parallel (Megatron's column-parallel lm_head): rank r passes its rows
            [r V_l, (r+1) V_l) of weight (and bias, ref_weight, ref_bias, or its columns of ref_logits),
            V_l equal on every rank; hidden, ref_hidden, labels and ref_topk (global ids) are the same on
            every rank. With ref_vocab="truncate" and a smaller reference, a rank passes the reference's
            rows (columns) of the ids of its shard, fewer on the last ranks but at least one. The loss is
            that of the whole vocabulary; weight's gradient is that of this rank's rows, hidden's the full
            one (summed over the group: do not all-reduce it again).

    Returns:
        The fp32 loss (a scalar, or the shape of labels for reduction="none"), or `HRMLossOutput` whose
        `ce`, `kl` and `z` are reduced like the loss, detached, fp32.

    The graph of a "mean" / "sum" loss can be backpropagated once (its gradients are scaled in place).
    """
    ref_softcap = _check_ref_softcap(ref_softcap, ref_logits is not None or ref_hidden is not None)
    args = locals()
    check_not_zero3(args)
    redirected = fsdp_redirect(linear_hrm_loss, args)  # FSDP2-sharded weights: gathered by FSDP2
    if redirected is None:
        redirected = linear_call(linear_hrm_loss, args)  # a DTensor vocabulary shard (tensor parallel)
    if redirected is not None:
        return redirected
    p = prepare_linear(args)
    plan = p.plan if ref_softcap is None else p.plan._replace(ref_softcap=ref_softcap)
    out = LinearHRMLossFunction.apply(
        hidden, weight, bias, p.labels, *map(_detach, (ref_logits, ref_hidden, ref_weight, ref_bias)), plan,
        *(p.topk if p.topk is not None else (None, None)), p.weights)
    return finish(p, *out, labels)


class LinearHRMLoss(LossModule):
    """`linear_hrm_loss` as a module: the keywords of linear_hrm_loss (same names and defaults, including
    `process_group`) at construction, tensors at the call:

        forward(hidden, weight, labels, *, bias=None, ref_logits=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, num_items=None, ref_topk=None, token_weights=None)
    """

    def __init__(self, hrm=1.0, **options):
        super().__init__(linear_hrm_loss, {"hrm": hrm, **options}, per_call=_TENSOR_KEYWORDS + ("num_items",))
        from .engine.checks import check_chunking, check_grad_acc_dtype
        check_chunking(options.get("chunk_size"), options.get("chunk_bytes"))
        check_grad_acc_dtype(options.get("grad_acc_dtype"))

    def forward(self, hidden, weight, labels, *, bias=None, ref_logits=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, num_items=None, ref_topk=None, token_weights=None):
        return linear_hrm_loss(hidden, weight, labels, bias=bias, ref_logits=ref_logits, ref_hidden=ref_hidden,
                               ref_weight=ref_weight, ref_bias=ref_bias, num_items=num_items, ref_topk=ref_topk,
                               token_weights=token_weights, **self.kwargs)

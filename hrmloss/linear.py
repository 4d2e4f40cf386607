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
the vocabulary instead and merges each chunk's row statistics over the group (hrmloss/distributed.py).

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
import numbers
import warnings
from typing import NamedTuple

import torch

from . import _frontend, _topk
from ._core import rows_3d
from ._frontend import Call
from ._function import forward_rows, grad_rows, vocab_range
from ._layout import FINAL
from ._ops import no_autocast
from ._torch_compiled import compiled_rows

# Automatic chunk: the most rows whose per-chunk (c, V) buffers fit in `chunk_bytes`. The buffers are the
# student logits s (their gradient ds overwrites them), plus the reference logits t when they are computed
# from hidden states, each in the GEMM dtype (a sparse teacher adds only (c, K) values). Every chunk reads
# the (V, H) weight three times and the weight-gradient accumulator once, so small chunks turn the loss
# into weight traffic and small-K GEMMs.
# - CUDA: 512 MiB, 1024 rows at V = 128256 bf16 with a reference from hidden states (rounded down to a
#   multiple of CHUNK_ALIGN rows): GEMMs with M, K >= 1024 run near peak; s and t (0.49 GiB) stay below
#   the bf16 gradient (0.98 GiB at H = 4096) that the end of the backward allocates anyway.
# - elsewhere (CPU) by default: an eighth of the N rows and at most 64 MiB (~260 rows at V = 32000 with
#   fp32 s and t), so that the chunk stays a small part of what the naive composition holds (peak <= 1/4
#   of it: tests/test_linear*.py), in whole calls of the torch backend's compiled passes (at least one:
#   smaller calls, and a short last chunk, would run them eagerly, several times slower). A last chunk
#   shorter than one such call joins the one before it.
CHUNK_BYTES = {"cuda": 512 << 20}
CHUNK_BYTES_DEFAULT = 64 << 20
CHUNK_FRACTION_DEFAULT = 8
CHUNK_ALIGN = 64
_TENSOR_KEYWORDS = ("bias", "ref_logits", "ref_hidden", "ref_weight", "ref_bias", "ref_topk", "token_weights")


def chunk_rows(n_rows, vocab, buffer_bytes_per_row, device, chunk_bytes=None):
    """Rows per chunk when chunk_size=None, in [1, n_rows]: the most rows whose buffers (bytes per row) fit
    in chunk_bytes, or by default CHUNK_BYTES[device], rounded down to a multiple of CHUNK_ALIGN; elsewhere
    by default min(n_rows / CHUNK_FRACTION_DEFAULT, CHUNK_BYTES_DEFAULT), to the nearest whole number of
    compiled calls (>= 1)."""
    kind = torch.device(device).type
    if chunk_bytes is None and kind not in CHUNK_BYTES:
        call = compiled_rows(vocab)
        rows = min(CHUNK_BYTES_DEFAULT // buffer_bytes_per_row, n_rows // CHUNK_FRACTION_DEFAULT)
        rows = call * max(1, round(rows / call))
    else:
        rows = (chunk_bytes if chunk_bytes is not None else CHUNK_BYTES[kind]) // buffer_bytes_per_row
        if rows >= 2 * CHUNK_ALIGN:
            rows -= rows % CHUNK_ALIGN
    return max(1, min(n_rows, rows))


def chunk_bounds(n_rows, chunk, min_last=1):
    """(r0, r1) of consecutive chunks of `chunk` rows; a last chunk shorter than min_last joins the one before."""
    starts = list(range(0, n_rows, chunk))
    if len(starts) > 1 and n_rows - starts[-1] < min_last:
        starts.pop()
    return tuple(zip(starts, starts[1:] + [n_rows]))


# ---------------------------------------------------------------------------------------------------------
# The weight-gradient GEMM: acc += a @ b, chosen by device and accumulator dtype

_ADDMM_DTYPE = {"usable": True}  # aten::addmm.dtype with an fp32 addend; False once this torch refused it


def _fp32_output_gemm(acc, a):
    """True when acc += a @ b runs as one GEMM with an fp32 output: CUDA, torch.addmm(out_dtype=...) (torch
    >= 2.8, not traced by torch.compile), not refused before."""
    return acc.is_cuda and a.dtype != acc.dtype and _ADDMM_DTYPE["usable"] and not torch.compiler.is_compiling()


SCRATCH_CHUNKS = 4  # chunks summed in the GEMM-dtype scratch before one fp32 add into the accumulator


def _accumulate(acc, a, b, scratch, first, flush):
    """acc += a @ b with a, b in the GEMM dtype and acc fp32 or that dtype.

    Same dtype: one GEMM that adds into acc. fp32 acc, bf16 / fp16 operands: on CUDA one cuBLAS GEMM whose
    fp32 output is also its addend (aten::addmm.dtype). Elsewhere, or if this torch refuses it, GEMMs in
    the operands' dtype into `scratch` ((V, H), reused), which sums up to SCRATCH_CHUNKS chunks (`first`
    starts a sum) before one fp32 add into acc (`flush`): the add is a pass over V H that would cost as
    much as a small chunk's GEMM; 4 chunks in bf16 add ~1e-3 of relative error (docs/linear.md). On a
    CPU this is 2-4x faster than an fp32 GEMM of upcast operands.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if _fp32_output_gemm(acc, a):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError) as e:  # refused before any work: acc is untouched
            _ADDMM_DTYPE["usable"] = False
            warnings.warn(f"hrmloss: torch.addmm(out_dtype=float32) with an fp32 addend is not available "
                          f"({e}); the weight gradient uses a GEMM in {a.dtype} and an fp32 add per chunk")
            first, flush = True, True  # the scratch below is this call's own
    if scratch is None:
        scratch = a.new_empty((a.shape[0], b.shape[1]))
    if first:
        torch.mm(a, b, out=scratch)
    else:
        scratch.addmm_(a, b)
    if flush:
        acc.add_(scratch)


# ---------------------------------------------------------------------------------------------------------
# The chunked passes (plain functions; the Function below only handles ctx)


class _Operands(NamedTuple):
    """The tensors of one call, as the GEMMs read them: rows as (B, T, .) views (no copy of a shifted view),
    matrices in the GEMM dtype (a copy only when autocast changes a dtype); the reference side detached."""

    h3: torch.Tensor                 # (B, T, H) student hidden states, the caller's dtype
    weight: torch.Tensor             # (V, H) in the GEMM dtype
    bias: torch.Tensor | None        # (V,) in the GEMM dtype
    labels: torch.Tensor             # (N,) flat, contiguous
    ref3: torch.Tensor | None        # (B', T', V_ref) reference logits, (B', T', H_ref) reference hidden, or
                                     # None for a sparse teacher
    ref_weight: torch.Tensor | None  # (min(V_ref, V), H_ref) in the GEMM dtype, when ref3 holds hidden states
    ref_bias: torch.Tensor | None    # (min(V_ref, V),)
    dtype: torch.dtype               # the GEMM dtype
    topk: _topk.TopK | None          # a sparse teacher: flat (N, K) ids and log-probs
    weights: torch.Tensor | None     # (N,) token weights


def _operands(dtype, hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, topk=None,
              weights=None):
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731 (no copy when the dtype is already right)
    ref = ref_logits if ref_logits is not None else ref_hidden
    ref3 = None if ref is None else rows_3d(ref)[0]
    (h3,) = rows_3d(hidden)
    V = weight.shape[0]
    if ref_weight is not None and ref_weight.shape[0] > V:  # ref_vocab="truncate": only the first V rows
        ref_weight, ref_bias = ref_weight[:V], None if ref_bias is None else ref_bias[:V]
    return _Operands(h3, cast(weight), cast(bias), labels, ref3, cast(ref_weight), cast(ref_bias), dtype, topk,
                     weights)


def _take_rows(x3, r0, r1):
    """Flat rows [r0, r1) of a (B, T, D) view as (r1 - r0, D): a view, or a copy of only these rows when
    they straddle two leading indices."""
    T = x3.shape[1]
    b0, i0 = divmod(r0, T)
    if r1 - r0 <= T - i0:
        return x3[b0, i0:i0 + r1 - r0]
    return torch.cat([x3[b, max(r0 - b * T, 0):min(r1 - b * T, T)] for b in range(b0, (r1 - 1) // T + 1)])


def _linear(x, weight, bias):
    """x @ weight.T (+ bias): (c, H) x (V, H) -> (c, V), one GEMM in weight's dtype (x cast to it)."""
    x = x.to(weight.dtype)
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def _chunk_logits(ops, r0, r1):
    """(h, s, t) of rows [r0, r1): hidden (c, H) and student logits (c, V) in the GEMM dtype; reference
    logits (c, min(V_ref, V)), a view of ref_logits or computed from the reference's hidden states, or
    None for a sparse teacher."""
    h = _take_rows(ops.h3, r0, r1).to(ops.dtype)
    s = _linear(h, ops.weight, ops.bias)
    if ops.ref3 is None:
        return h, s, None
    ref = _take_rows(ops.ref3, r0, r1)
    t = ref[:, :s.shape[-1]] if ops.ref_weight is None else _linear(ref, ops.ref_weight, ops.ref_bias)
    return h, s, t


class _Grads(NamedTuple):
    """The gradient buffers of one call, None where not wanted (never reassigned: torch.compile traces
    the Function and only allows in-place tensor updates).

    hidden: (N, H) in hidden's dtype, written chunk by chunk; weight, bias: (V, H), (V,) accumulators of
    the accumulator dtype; scratch: the (V, H) GEMM-dtype buffer of `_accumulate` when it needs one, and
    then the buffer of the weight's gradient in the GEMM dtype at the end.
    """

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    scratch: torch.Tensor | None

    def add(self, ops, h, ds, r0, r1, k, n_chunks):
        """Chain rule through s = h @ weight.T + bias for chunk k of n_chunks: ds (c, V) -> the buffers."""
        if self.hidden is not None:
            if self.hidden.dtype == ds.dtype:
                torch.mm(ds, ops.weight, out=self.hidden[r0:r1])
            else:                                        # autocast: hidden kept another dtype
                self.hidden[r0:r1] = ds @ ops.weight
        if self.weight is not None:
            _accumulate(self.weight, ds.t(), h, self.scratch, first=k % SCRATCH_CHUNKS == 0,
                        flush=k % SCRATCH_CHUNKS == SCRATCH_CHUNKS - 1 or k == n_chunks - 1)
        if self.bias is not None:
            self.bias.add_(ds.sum(0, dtype=self.bias.dtype))

    def all_reduce_hidden(self, shard):
        """Vocabulary-parallel: grad_hidden = sum over ranks of ds_r @ weight_r (hidden is replicated)."""
        if shard is not None and self.hidden is not None:
            shard.merge_sums(self.hidden)

    def result(self, go, hidden_dtype, weight_dtype):
        """(grad_hidden, grad_weight, grad_bias) times go (a 0-dim tensor, or None for 1), in the inputs'
        dtypes: scaled in place when the dtype is already right, else scaled and cast in one pass."""
        def finish(x, dtype, out=None):
            if x is None:
                return None
            if x.dtype == dtype:
                return x if go is None else x.mul_(go)
            out = torch.empty_like(x, dtype=dtype) if out is None else out
            return out.copy_(x) if go is None else torch.mul(x, go, out=out)
        scratch = self.scratch if self.scratch is not None and self.scratch.dtype == weight_dtype else None
        return (finish(self.hidden, hidden_dtype), finish(self.weight, weight_dtype, scratch),
                finish(self.bias, weight_dtype))


def _new_grads(ops, want_hidden, want_weight, want_bias, acc_dtype):
    n, (V, H) = ops.labels.shape[0], ops.weight.shape
    weight = ops.weight.new_zeros((V, H), dtype=acc_dtype) if want_weight else None
    return _Grads(
        ops.h3.new_empty((n, H)) if want_hidden else None,
        weight,
        ops.weight.new_zeros((V,), dtype=acc_dtype) if want_bias and ops.bias is not None else None,
        ops.weight.new_empty((V, H)) if want_weight and acc_dtype != ops.dtype
        and not _fp32_output_gemm(weight, ops.weight) else None)


def _chunk_grad(s, t, y, final, g, plan, topk, corr):
    """d loss / d s (c, V) of one chunk, rows weighted by g (c,) fp32: the core's gradient pass (and a
    sparse teacher's term `corr` (c, K) at its ids), written into s itself (the chunk's own buffer, read
    by nothing after it), so ds costs no memory."""
    return grad_rows(s, t, y, final, g, plan.call.params, plan.call.st._replace(inplace=True), plan.call.backend,
                     vocab_range(s, plan.shard), False, topk, corr)[0]


def _forward_chunk(ops, plan, k, rows, g, grads):
    """Loss statistics of chunk k (rows [r0, r1)) into `rows` (loss, ce, kl, z, final[, a sparse teacher's
    corr]); with g (fp32 row weight: 0-dim, or (N,) with token weights) also the gradients with that weight.
    Its (c, V) buffers die when it returns."""
    call = plan.call
    r0, r1 = plan.chunks[k]
    h, s, t = _chunk_logits(ops, r0, r1)
    y = ops.labels[r0:r1]
    topk = _topk.chunk_rows(ops.topk, r0, r1)
    weights = None if ops.weights is None else ops.weights[r0:r1]
    out = forward_rows(s, t, y, call.params, call.st, call.backend, plan.shard, topk, weights)
    for buf, x in zip(rows, out):
        buf[r0:r1] = x
    if g is not None:
        g = g.expand(r1 - r0) if g.dim() == 0 else g[r0:r1]
        final, corr = out[4], out[5]
        ds = _chunk_grad(s, t, y, final, g, plan, topk, corr)
        del s, t  # before the two gradient GEMMs: only ds (in s's buffer) is live
        grads.add(ops, h, ds, r0, r1, k, len(plan.chunks))


def _backward_chunk(ops, plan, k, final, corr, g, grads):
    """Recompute the logits of chunk k and backpropagate per-row weights g (N,) fp32."""
    r0, r1 = plan.chunks[k]
    h, s, t = _chunk_logits(ops, r0, r1)
    ds = _chunk_grad(s, t, ops.labels[r0:r1], final[r0:r1], g[r0:r1], plan, _topk.chunk_rows(ops.topk, r0, r1),
                     None if corr is None else corr[r0:r1])
    del s, t
    grads.add(ops, h, ds, r0, r1, k, len(plan.chunks))


class _Plan(NamedTuple):
    """The non-tensor arguments of one call."""

    call: Call                # the front end's validated call (options, structure, backend, params, num_items)
    chunks: tuple             # (r0, r1) of each chunk of rows
    grad_enabled: bool        # autograd was on at the call (Function.forward runs with it off)
    gemm_dtype: torch.dtype   # every GEMM's operand dtype
    acc_dtype: torch.dtype    # the weight / bias gradient accumulator's dtype
    shard: object             # None, or the distributed.VocabShard of a vocabulary-parallel call


class LinearHRMLossFunction(torch.autograd.Function):
    """(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, plan, topk_ids,
    topk_logprobs, weights) -> (loss, ce_rows, kl_rows, z_rows): loss reduced for "mean" / "sum" (token
    weights applied), per row (N,) and unweighted for "none" (the front end's `finish` weighs it, and
    autograd with it); the others (N,) detached.

    Gradients flow to hidden, weight and bias only; the reference side (or sparse teacher) is a constant.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, plan,
                topk_ids=None, topk_logprobs=None, weights=None):
        call = plan.call
        reduction = call.opts.reduction
        topk = None if topk_ids is None else _topk.TopK(topk_ids, topk_logprobs)
        n = labels.shape[0]
        rows = (*(labels.new_empty((n,), dtype=call.params.dtype) for _ in range(4)),
                labels.new_empty((n, len(FINAL)), dtype=call.params.dtype))
        if topk is not None:  # the sparse teacher's gradient term at its ids, per row
            rows += (labels.new_empty(topk_ids.shape, dtype=call.params.dtype),)
        live = labels != call.st.ignore_index
        wants = [plan.grad_enabled and w for w in ctx.needs_input_grad[:3]]
        ctx.eager = any(wants) and reduction != "none"
        with no_autocast(hidden):
            ops = _operands(plan.gemm_dtype, hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight,
                            ref_bias, topk, weights)
            grads = _new_grads(ops, *wants, plan.acc_dtype) if ctx.eager else None
            g = _frontend.row_weight(live, reduction, call.num_items, weights) if ctx.eager else None
            for k in range(len(plan.chunks)):
                _forward_chunk(ops, plan, k, rows, g, grads)
            if grads is not None:
                grads.all_reduce_hidden(plan.shard)
        loss_rows, ce, kl, z, final = rows[:5]
        corr = rows[5] if topk is not None else None
        ctx.grads, ctx.plan, ctx.hidden_shape = grads, plan, hidden.shape
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(ce, kl, z)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias,
                                  topk_ids, topk_logprobs, weights, final, corr)
            return loss_rows, ce, kl, z
        return _frontend.reduce_rows(loss_rows, live, reduction, call.num_items, weights), ce, kl, z

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
            plan = ctx.plan
            topk = None if ids is None else _topk.TopK(ids, lps)
            with no_autocast(final):
                ops = _operands(plan.gemm_dtype, *tensors, topk, weights)
                grads = _new_grads(ops, *ctx.needs_input_grad[:3], plan.acc_dtype)
                g = grad_loss.float().contiguous()  # token weights: in grad_loss already (finish weighs rows)
                for k in range(len(plan.chunks)):
                    _backward_chunk(ops, plan, k, final, corr, g, grads)
                grads.all_reduce_hidden(plan.shard)
                gh, gw, gb = grads.result(None, *ctx.dtypes)
        gh = None if gh is None else gh.view(ctx.hidden_shape)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public API (the checks, backend choice and reduction are the front end's: _frontend.py)


def _check_chunking(chunk_size, chunk_bytes):
    for name, value in (("chunk_size", chunk_size), ("chunk_bytes", chunk_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name}={value!r}: expected None or an int")
        if value is not None and value < 1:
            raise ValueError(f"{name}={value!r}: expected None (automatic) or an int >= 1")


def _gemm_dtype(hidden):
    """Autocast's dtype inside torch.autocast for hidden's device (as F.linear), else hidden's dtype."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _check_grad_acc_dtype(grad_acc_dtype, gemm_dtype):
    """None means fp32; otherwise fp32 or the GEMM dtype."""
    if grad_acc_dtype is None:
        return torch.float32
    if grad_acc_dtype not in (torch.float32, gemm_dtype):
        raise ValueError(f"grad_acc_dtype={grad_acc_dtype!r}: expected None or torch.float32 (the default), or "
                         f"the GEMM dtype {gemm_dtype} (a smaller, less accurate accumulator)")
    return grad_acc_dtype


def _detach(x):
    return None if x is None else x.detach()


def linear_hrm_loss(hidden, weight, labels, hrm=1.0, *, bias=None, ref_logits=None, ref_hidden=None,
                    ref_weight=None, ref_bias=None, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                    reduction="mean", return_components=False, chunk_size=None, chunk_bytes=None,
                    grad_acc_dtype=None, backend="auto", label_smoothing=0.0, z_loss=0.0, softcap=None,
                    num_items=None, process_group=None, check_finite=False, ref_topk=None, topk_mode="renorm",
                    ref_vocab="error", token_weights=None):
    """`hrm_loss` of the logits `hidden @ weight.T (+ bias)`, without ever holding all N x V of them.

    With s = hidden @ weight.T + bias (student) and t the reference logits, per token i (docs/design.md §1):

        ce_i   = logsumexp(s_i) - s_i[y_i]       (with label smoothing and soft cap as in hrm_loss)
        kl_i   = KL(p_T || q_T)  (kl="forward"),  KL(q_T || p_T)  (kl="reverse"),
                 beta KL(p_T || m) + (1 - beta) KL(q_T || m),  m = beta p_T + (1 - beta) q_T  (kl="jsd")
        loss_i = ce_i + hrm * kl_i + z_i,   q_T = softmax(s_i / T),  p_T = softmax(t_i / T)

    computed over chunks of tokens: peak extra memory O(chunk x V) plus the (N, H) gradient of hidden and
    the (V, H) accumulator of the gradient of weight (docs/linear.md). GEMMs: 3 student ones of 2 N H V
    FLOPs (logits, grad of hidden, grad of weight) plus 1 for a reference given as hidden states, all in
    the inputs' dtype; "none" recomputes the logits in the backward (see the module docstring).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16, the student's last hidden states. Receives a
            gradient of its shape and dtype.
        weight: (V, H), hidden's dtype, the student's output projection. Receives a gradient in its dtype.
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
            `hrm_loss` (no reference GEMM). Exactly one of the three forms. The reference side is a constant.
        ref_vocab: "error" (default) or "truncate", as in `hrm_loss`: ref_logits / ref_weight may then have
            V_ref != V classes; the divergence uses the first min(V, V_ref) ids (only the first V rows of
            a larger ref_weight are multiplied, only the first V columns of larger ref_logits are read).
        token_weights: (...) = labels.shape, float, >= 0, as in `hrm_loss`: each token's loss (and its
            gradient) is multiplied by its weight; "mean" divides by the weight sum of counted tokens.
        kl, beta, temperature, ignore_index, reduction, backend, label_smoothing, z_loss, softcap,
        num_items, check_finite: as in `hrm_loss` (the value options may be 0-dim tensors there too).
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
    _check_chunking(chunk_size, chunk_bytes)
    mixed = isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type)
    _frontend.check_linear(hidden, weight, labels, bias, ref_logits, ref_hidden, ref_weight, ref_bias, ref_vocab,
                           topk=ref_topk is not None, mixed=mixed)
    V = weight.shape[0]
    vocab = V  # the ids of a sparse teacher are global: K <= the whole vocabulary
    if process_group is not None and ref_topk is not None:
        from .distributed import check_group
        vocab *= check_group(process_group)[1]
    topk = _frontend.check_topk(ref_topk, labels, vocab)
    weights = _frontend.check_weights(token_weights, labels)
    V_ref = V if topk is not None else (ref_logits.shape[-1] if ref_logits is not None else ref_weight.shape[0])
    gemm_dtype = _gemm_dtype(hidden)
    acc_dtype = _check_grad_acc_dtype(grad_acc_dtype, gemm_dtype)
    call = _frontend.make_call(
        dict(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
             backend=backend, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, topk_mode=topk_mode,
             ref_vocab=ref_vocab),
        hidden.device, (gemm_dtype,), return_components=return_components, num_items=num_items,
        check_finite=check_finite, topk=topk is not None, cut=V_ref < V)
    flat = labels.reshape(-1).contiguous()
    shard = None
    if process_group is not None:
        from .distributed import vocab_shard
        shard = vocab_shard(process_group, V, flat)
    n, min_last = flat.shape[0], 1
    if chunk_size is None:
        buffers = 2 if ref_hidden is not None else 1  # s (then ds in place), and t when computed here
        chunk_size = chunk_rows(n, V, buffers * V * gemm_dtype.itemsize, hidden.device, chunk_bytes)
        if chunk_bytes is None and hidden.device.type == "cpu":
            min_last = compiled_rows(V)  # a shorter last chunk would run the loss passes eagerly
    plan = _Plan(call, chunk_bounds(n, int(chunk_size), min_last), torch.is_grad_enabled(), gemm_dtype, acc_dtype,
                 shard)
    out = LinearHRMLossFunction.apply(
        hidden, weight, bias, flat, *map(_detach, (ref_logits, ref_hidden, ref_weight, ref_bias)), plan,
        *(topk if topk is not None else (None, None)), weights)
    return _frontend.finish(call, *out, labels, weights)


class LinearHRMLoss(torch.nn.Module):
    """`linear_hrm_loss` as a module: the keywords of linear_hrm_loss (same names and defaults, including
    `process_group`) at construction, tensors at the call:

        forward(hidden, weight, labels, *, bias=None, ref_logits=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, num_items=None, ref_topk=None, token_weights=None)
    """

    def __init__(self, hrm=1.0, **options):
        super().__init__()
        self.kwargs = _frontend.module_options("LinearHRMLoss", linear_hrm_loss, {"hrm": hrm, **options},
                                               per_call=_TENSOR_KEYWORDS + ("num_items",))
        _check_chunking(options.get("chunk_size"), options.get("chunk_bytes"))
        if options.get("process_group") is not None:
            from .distributed import check_group
            check_group(options["process_group"])

    def forward(self, hidden, weight, labels, *, bias=None, ref_logits=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, num_items=None, ref_topk=None, token_weights=None):
        return linear_hrm_loss(hidden, weight, labels, bias=bias, ref_logits=ref_logits, ref_hidden=ref_hidden,
                               ref_weight=ref_weight, ref_bias=ref_bias, num_items=num_items, ref_topk=ref_topk,
                               token_weights=token_weights, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "process_group")

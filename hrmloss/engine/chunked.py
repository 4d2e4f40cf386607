"""The fused projection's chunks (linear.py's engine): chunk policy, the weight-gradient GEMMs, the chunk
buffers and the per-chunk passes. The maths of the whole are in linear.py's module docstring.

Rows (tokens) are processed in chunks of c rows; per chunk, with h the chunk's hidden states, the logits
s = h @ weight.T (+ bias) (and the reference's t, when it is given as hidden states) are computed in the
GEMM dtype, the core passes (autograd.forward_rows / grad_rows) run on them, and the chain rule through
the projection accumulates the gradients of hidden, weight and bias (`Grads.add`). Every GEMM's operands
are in the GEMM dtype; the weight gradient goes through `_accumulate` (an fp32 accumulator by default).

    forward(plan, tensors, wants)            -> per-row results (and, for "mean" / "sum", the gradients)
    backward(plan, tensors, final, corr, g, wants)   -> the gradients ("none": the logits recomputed)
"""
import warnings
from typing import NamedTuple

import torch

from . import backends, sparse
from .autograd import forward_rows, grad_rows, vocab_range
from .layout import FINAL
from .ops import no_autocast
from .reduce import row_weight
from .rows import rows_3d

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


def chunk_rows(n_rows, vocab, buffer_bytes_per_row, device, chunk_bytes=None, backend="torch"):
    """Rows per chunk when chunk_size=None, in [1, n_rows]: the most rows whose buffers (bytes per row) fit
    in chunk_bytes, or by default CHUNK_BYTES[device], rounded down to a multiple of CHUNK_ALIGN; elsewhere
    by default min(n_rows / CHUNK_FRACTION_DEFAULT, CHUNK_BYTES_DEFAULT), to the nearest whole multiple (>= 1)
    of the rows that the backend's passes take at once (`Backend.preferred_rows`: the torch backend's
    compiled calls)."""
    kind = torch.device(device).type
    if chunk_bytes is None and kind not in CHUNK_BYTES:
        call = backends.get(backend).preferred_rows(vocab)
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
    topk: sparse.TopK | None          # a sparse teacher: flat (N, K) ids and log-probs
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


def _chunk_logits(ops, r0, r1, ref_softcap=None):
    """(h, s, t) of rows [r0, r1): hidden (c, H) and student logits (c, V) in the GEMM dtype; reference
    logits (c, min(V_ref, V)), a view of ref_logits or computed from the reference's hidden states (then
    soft-capped with ref_softcap), or None for a sparse teacher or without a reference."""
    h = _take_rows(ops.h3, r0, r1).to(ops.dtype)
    s = _linear(h, ops.weight, ops.bias)
    if ops.ref3 is None:
        return h, s, None
    ref = _take_rows(ops.ref3, r0, r1)
    if ops.ref_weight is None:
        t = ref[:, :s.shape[-1]]
        return h, s, t if ref_softcap is None else cap_logits(t, ref_softcap, inplace=False)
    t = _linear(ref, ops.ref_weight, ops.ref_bias)
    return h, s, t if ref_softcap is None else cap_logits(t, ref_softcap, inplace=True)


def cap_logits(t, cap, inplace):
    """A reference's soft cap, cap tanh(t / cap), in t's dtype as the models compute it (Gemma-2's
    final_logit_softcapping): in place on a chunk's own buffer, else into a new (c, V) one."""
    if inplace:
        return t.div_(cap).tanh_().mul_(cap)
    return torch.tanh(t / cap) * cap


class Grads(NamedTuple):
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
    return Grads(
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
    h, s, t = _chunk_logits(ops, r0, r1, plan.ref_softcap)
    y = ops.labels[r0:r1]
    topk = sparse.chunk_rows(ops.topk, r0, r1)
    weights = None if ops.weights is None else ops.weights[r0:r1]
    out = forward_rows(s, t, y, call.params, call.st, call.backend, plan.shard, topk, weights, call.num_items, r0)
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
    h, s, t = _chunk_logits(ops, r0, r1, plan.ref_softcap)
    ds = _chunk_grad(s, t, ops.labels[r0:r1], final[r0:r1], g[r0:r1], plan, sparse.chunk_rows(ops.topk, r0, r1),
                     None if corr is None else corr[r0:r1])
    del s, t
    grads.add(ops, h, ds, r0, r1, k, len(plan.chunks))


class Plan(NamedTuple):
    """The non-tensor arguments of one call."""

    call: object              # the front end's validated frontend.Call (options, structure, backend, params, ...)
    chunks: tuple             # (r0, r1) of each chunk of rows
    grad_enabled: bool        # autograd was on at the call (Function.forward runs with it off)
    gemm_dtype: torch.dtype   # every GEMM's operand dtype
    acc_dtype: torch.dtype    # the weight / bias gradient accumulator's dtype
    shard: object             # None, or the distributed.VocabShard of a vocabulary-parallel call
    ref_softcap: object = None  # None, or the reference's soft cap c: t = c tanh(t / c) per chunk (a value)


def autocast_enabled(kind):
    """torch.autocast is on for this device type (False for one autocast does not know, e.g. meta)."""
    return torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)


def gemm_dtype(hidden):
    """Autocast's dtype inside torch.autocast for hidden's device (as F.linear), else hidden's dtype."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if autocast_enabled(kind) else hidden.dtype


def make_plan(call, n_rows, vocab, device, dtype, acc_dtype, shard, *, ref_from_hidden, chunk_size=None,
         chunk_bytes=None):
    """The Plan of a call over n_rows tokens: chunk_size rows per chunk, or `chunk_rows` of the budget (the
    buffers: s, whose gradient overwrites it, and t when computed from hidden states, in the GEMM dtype);
    on the CPU by default a last chunk shorter than one call of the backend's passes joins the one before."""
    min_last = 1
    if chunk_size is None:
        buffers = 2 if ref_from_hidden else 1
        chunk_size = chunk_rows(n_rows, vocab, buffers * vocab * dtype.itemsize, device, chunk_bytes, call.backend)
        if chunk_bytes is None and torch.device(device).type not in CHUNK_BYTES:
            min_last = backends.get(call.backend).preferred_rows(vocab)  # a shorter chunk runs them slower
    return Plan(call, chunk_bounds(n_rows, int(chunk_size), min_last), torch.is_grad_enabled(), dtype, acc_dtype,
                shard)


def forward(plan, tensors, topk, weights, wants):
    """Every chunk's forward: per-row (loss, ce, kl, z, final[, a sparse teacher's corr]) and, when `wants`
    any gradient (hidden, weight, bias) and the reduction is "mean" / "sum", the gradients of the reduced
    loss with a grad_output of 1 (`Grads`, to be scaled by the backward), else None.

    tensors: (hidden, weight, bias, labels (N,), ref_logits, ref_hidden, ref_weight, ref_bias)."""
    call = plan.call
    n = tensors[3].shape[0]
    new = lambda *shape: tensors[3].new_empty(shape, dtype=call.params.dtype)  # noqa: E731
    rows = (*(new(n) for _ in range(4)), new(n, len(FINAL)))
    if topk is not None:  # the sparse teacher's gradient term at its ids, per row
        rows += (new(*topk.ids.shape),)
    eager = any(wants) and call.opts.reduction != "none"
    with no_autocast(tensors[0]):
        ops = _operands(plan.gemm_dtype, *tensors, topk, weights)
        grads = _new_grads(ops, *wants, plan.acc_dtype) if eager else None
        live = ops.labels != call.st.ignore_index
        g = row_weight(live, call.opts.reduction, call.num_items, weights) if eager else None
        for k in range(len(plan.chunks)):
            _forward_chunk(ops, plan, k, rows, g, grads)
        if grads is not None:
            grads.all_reduce_hidden(plan.shard)
    return rows, grads


def backward(plan, tensors, topk, weights, final, corr, g, wants, dtypes):
    """The gradients (hidden, weight, bias), each None unless wanted, of per-row weights g (N,) fp32 (token
    weights included): the logits recomputed chunk by chunk (reduction "none")."""
    with no_autocast(final):
        ops = _operands(plan.gemm_dtype, *tensors, topk, weights)
        grads = _new_grads(ops, *wants, plan.acc_dtype)
        for k in range(len(plan.chunks)):
            _backward_chunk(ops, plan, k, final, corr, g, grads)
        grads.all_reduce_hidden(plan.shard)
        return grads.result(None, *dtypes)

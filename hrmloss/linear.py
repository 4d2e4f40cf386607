"""Fused output projection + loss: `linear_hrm_loss`, `LinearHRMLoss`, and their autograd Function.

The student logits s = hidden @ weight.T (+ bias) are never materialised for all N tokens at once. Rows
(tokens) are processed in chunks of `chunk` rows; per chunk, with h the chunk's hidden states:

    s   = h @ weight.T (+ bias)                  (c, V), input dtype (the matmul accumulates in fp32)
    t   = ref_logits[rows]  or  ref_hidden[rows] @ ref_weight.T (+ ref_bias)
    loss, ce, kl, z, final = forward_rows(...)   the core passes of hrm_loss (one row = one token)
    ds  = d loss_rows / d s, scaled per row by g (the core's grad pass)
    grad_hidden[rows] = ds @ weight              grad_weight += ds.T @ h  (fp32)   grad_bias += sum(ds)

The loss statistics are per row, so chunking rows is exact. Peak extra memory: a few (chunk, V) buffers,
the (N, H) grad_hidden and an fp32 (V, H) grad_weight accumulator, never N x V.

When is the gradient computed? The incoming gradient of the loss decides:
- reduction "mean" / "sum": the loss is a scalar, so d loss / d s_i = grad_output * w_i with a known row
  weight w_i (1/max(count, 1) or 1). The forward computes the gradients with g = w (when grad is enabled)
  and the backward only multiplies them, in place, by the grad_output tensor (no host sync). Hence such
  a graph can be backpropagated once (a second backward through it raises).
- reduction "none": grad_output is an arbitrary per-token tensor, unknown in the forward. The forward
  keeps only the (N, FINAL) final row statistics (and a sparse teacher's (N, K) gradient terms); the backward recomputes the logits chunk by chunk and runs
  the gradient pass with g = grad_output (the matmuls are done twice, the memory stays O(chunk x V)).
"""
import numbers
from typing import NamedTuple

import torch

from . import _frontend
from ._core import rows_3d
from ._frontend import Call
from ._function import forward_rows, grad_rows
from ._layout import FINAL
from ._topk import TopK, chunk_rows

# Automatic chunk: the most rows whose (chunk, V) fp32 logits fit in these bytes (>= 1 row, <= N rows).
# Every chunk reads and writes the fp32 (V, H) grad_weight accumulator once and reads the (V, H) weight
# three times (logits, grad_hidden, grad_weight), so chunks of a few rows turn the loss into weight
# traffic. CPU: 32 MiB (262 rows at V = 32000) was 2x faster than 8 MiB at N = 2048, H = 1024 and keeps
# the peak under 1/4 of the naive composition (tests/test_linear.py). CUDA: the GEMMs need a few hundred
# rows to be compute-bound: 256 MiB is 512 rows at V = 128k.
CHUNK_BYTES = {"cuda": 256 << 20}
CHUNK_BYTES_DEFAULT = 32 << 20
_TENSOR_KEYWORDS = ("bias", "ref_logits", "ref_hidden", "ref_weight", "ref_bias", "ref_topk", "token_weights")



def auto_chunk_rows(n_rows, vocab, device):
    """Rows per chunk when chunk_size=None: max(1, min(N, bytes // (4 V))), bytes from CHUNK_BYTES."""
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES_DEFAULT)
    return max(1, min(n_rows, budget // (4 * vocab)))


# ---------------------------------------------------------------------------------------------------------
# The chunked passes (plain functions; the Function below only handles ctx)


class _Operands(NamedTuple):
    """The tensors of one call with rows as (B, T, .) views (no copy of a shifted view); ref side detached."""

    h3: torch.Tensor                 # (B, T, H) student hidden states
    weight: torch.Tensor             # (V, H)
    bias: torch.Tensor | None        # (V,)
    labels: torch.Tensor             # (N,) flat, contiguous
    ref3: torch.Tensor | None        # (B', T', V_ref) reference logits, (B', T', H_ref) reference hidden, or
                                     # None for a sparse teacher
    ref_weight: torch.Tensor | None  # (V_ref, H_ref) when ref3 holds hidden states
    ref_bias: torch.Tensor | None    # (V_ref,)
    topk: object = None              # a sparse teacher, `_topk.TopK` of flat (N, K) rows, or None
    weights: torch.Tensor | None = None  # (N,) token weights or None


class _Grads(NamedTuple):
    """Gradient buffers, None where not wanted: hidden (N, H) in its dtype, weight (V, H) and bias (V,) fp32."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _operands(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, topk=None, weights=None):
    ref = ref_logits if ref_logits is not None else ref_hidden
    ref3 = None if ref is None else rows_3d(ref)[0]
    (h3,) = rows_3d(hidden)
    V = weight.shape[0]
    if ref_weight is not None and ref_weight.shape[0] > V:  # ref_vocab="truncate": only the first V rows
        ref_weight, ref_bias = ref_weight[:V], None if ref_bias is None else ref_bias[:V]
    return _Operands(h3, weight, bias, labels, ref3, ref_weight, ref_bias, topk, weights)


def _take_rows(x3, r0, r1):
    """Flat rows [r0, r1) of a (B, T, D) view as (r1 - r0, D): a view, or a copy of only these rows when
    they straddle two leading indices."""
    T = x3.shape[1]
    b0, i0 = divmod(r0, T)
    if r1 - r0 <= T - i0:
        return x3[b0, i0:i0 + r1 - r0]
    return torch.cat([x3[b, max(r0 - b * T, 0):min(r1 - b * T, T)] for b in range(b0, (r1 - 1) // T + 1)])


def _linear(x, weight, bias):
    """x @ weight.T (+ bias): (c, H) x (V, H) -> (c, V) in the input dtype, fp32 accumulation in the GEMM."""
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def _chunk_logits(ops, r0, r1):
    """(h, s, t) of rows [r0, r1): hidden (c, H), student and reference logits (c, V)."""
    h = _take_rows(ops.h3, r0, r1)
    s = _linear(h, ops.weight, ops.bias)
    if ops.ref3 is None:  # a sparse teacher
        return h, s, None
    ref = _take_rows(ops.ref3, r0, r1)
    t = ref[:, :s.shape[-1]] if ops.ref_weight is None else _linear(ref, ops.ref_weight, ops.ref_bias)
    return h, s, t


def _backprop(ops, grads, h, ds, r0, r1):
    """Chain rule through s = h @ weight.T + bias for one chunk: ds (c, V) -> the three gradient buffers."""
    if grads.hidden is not None:
        torch.mm(ds, ops.weight, out=grads.hidden[r0:r1])
    if grads.weight is not None:
        # grad_weight += ds.T @ h, accumulated over chunks in fp32 (inputs upcast per chunk: O(chunk) memory)
        a, b = (ds.t(), h) if ds.dtype == torch.float32 else (ds.t().float(), h.float())
        grads.weight.addmm_(a, b)
    if grads.bias is not None:
        grads.bias.add_(ds.sum(0, dtype=torch.float32))


def _chunk_grad(s, t, y, final, g, call, topk=None, corr=None):
    """d loss / d s (c, V) of one chunk, rows weighted by g (c,) fp32: the core's gradient pass."""
    return grad_rows(s, t, y, final, g, call.params, call.st, call.backend, (0, s.shape[-1]), False, topk, corr)[0]


def _forward_chunk(ops, call, r0, r1, rows, g, grads):
    """Loss statistics of rows [r0, r1) into `rows` (loss, ce, kl, z, final[, the sparse teacher's
    correction]); with g (fp32 row weight: 0-dim, or (N,) with token weights) also the gradients with
    that weight. Its (c, V) temporaries die when it returns."""
    h, s, t = _chunk_logits(ops, r0, r1)
    y = ops.labels[r0:r1]
    topk = chunk_rows(ops.topk, r0, r1)
    weights = None if ops.weights is None else ops.weights[r0:r1]
    out = forward_rows(s, t, y, call.params, call.st, call.backend, None, topk, weights)
    for buf, x in zip(rows, out):
        buf[r0:r1] = x
    if g is not None:
        g = g.expand(r1 - r0) if g.dim() == 0 else g[r0:r1]
        _backprop(ops, grads, h, _chunk_grad(s, t, y, out[4], g, call, topk, out[5]), r0, r1)


def _backward_chunk(ops, call, r0, r1, final, corr, g, grads):
    """Recompute the logits of rows [r0, r1) and backpropagate per-row weights g (c,) fp32."""
    h, s, t = _chunk_logits(ops, r0, r1)
    _backprop(ops, grads, h, _chunk_grad(s, t, ops.labels[r0:r1], final[r0:r1], g, call,
                                         chunk_rows(ops.topk, r0, r1), None if corr is None else corr[r0:r1]),
              r0, r1)


def _new_grads(ops, want_hidden, want_weight, want_bias):
    n, (V, H) = ops.labels.shape[0], ops.weight.shape
    return _Grads(
        ops.h3.new_empty((n, H)) if want_hidden else None,
        ops.weight.new_zeros((V, H), dtype=torch.float32) if want_weight else None,
        ops.weight.new_zeros((V,), dtype=torch.float32) if want_bias and ops.bias is not None else None)


class _Plan(NamedTuple):
    """The non-tensor arguments of one call."""

    call: Call          # the front end's validated call (options, structure, backend, params, num_items)
    chunk: int          # rows per chunk
    grad_enabled: bool  # autograd was on at the call (Function.forward runs with it off)


class LinearHRMLossFunction(torch.autograd.Function):
    """(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, plan) ->
    (loss, ce_rows, kl_rows, z_rows): loss reduced for "mean" / "sum", per row (N,) for "none"; the
    others (N,) detached.

    Gradients flow to hidden, weight and bias only; the reference side is a constant.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, plan,
                topk_ids=None, topk_logprobs=None, weights=None):
        call = plan.call
        reduction = call.opts.reduction
        topk = None if topk_ids is None else TopK(topk_ids, topk_logprobs)
        ops = _operands(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias, topk, weights)
        n = labels.shape[0]
        rows = (*(labels.new_empty((n,), dtype=call.params.dtype) for _ in range(4)),
                labels.new_empty((n, len(FINAL)), dtype=call.params.dtype))
        if topk is not None:  # the sparse teacher's gradient term at its ids, per row
            rows += (labels.new_empty(topk_ids.shape, dtype=call.params.dtype),)
        live = labels != call.st.ignore_index
        wants = [plan.grad_enabled and w for w in ctx.needs_input_grad[:3]]
        ctx.eager = any(wants) and reduction != "none"
        grads = _new_grads(ops, *wants) if ctx.eager else None
        g = _frontend.row_weight(live, reduction, call.num_items, weights) if ctx.eager else None
        for r0 in range(0, n, plan.chunk):
            _forward_chunk(ops, call, r0, min(r0 + plan.chunk, n), rows, g, grads)
        loss_rows, ce, kl, z, final = rows[:5]
        corr = rows[5] if topk is not None else None
        ctx.grads, ctx.plan, ctx.hidden_shape, ctx.weight_dtype = grads, plan, hidden.shape, weight.dtype
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, bias, labels, ref_logits, ref_hidden, ref_weight, ref_bias,
                                  topk_ids, topk_logprobs, weights, final, corr)
        ctx.mark_non_differentiable(ce, kl, z)
        if reduction == "none":  # per row, unweighted: the front end's finish weighs them (and autograd)
            return loss_rows, ce, kl, z
        return _frontend.reduce_rows(loss_rows, live, reduction, call.num_items, weights), ce, kl, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        if ctx.eager:  # "mean" / "sum": scale the forward's gradients by the scalar grad_loss, in place
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_hrm_loss: a second backward through the same graph is not supported with "
                    "reduction 'mean' or 'sum' (the gradients were computed in the forward and scaled in "
                    "place by the first backward); run the forward again")
            grads, ctx.grads = ctx.grads, None
            go = grad_loss.float()
            grads = _Grads(*(None if x is None else x.mul_(go) for x in grads))
        else:          # "none": recompute the logits chunk by chunk, backpropagate the per-row grad_loss
            *tensors, ids, lps, weights, final, corr = ctx.saved_tensors
            plan = ctx.plan
            topk = None if ids is None else TopK(ids, lps)
            ops = _operands(*tensors, topk, weights)
            grads = _new_grads(ops, *ctx.needs_input_grad[:3])
            g, n = grad_loss.float().contiguous(), final.shape[0]  # token weights: in grad_loss already
            for r0 in range(0, n, plan.chunk):
                r1 = min(r0 + plan.chunk, n)
                _backward_chunk(ops, plan.call, r0, r1, final, corr, g[r0:r1], grads)
        gh, gw, gb = grads
        gh = None if gh is None else gh.view(ctx.hidden_shape)
        gw = None if gw is None else gw.to(ctx.weight_dtype)
        gb = None if gb is None else gb.to(ctx.weight_dtype)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public API (the checks, backend choice and reduction are the front end's: _frontend.py)


def _check_chunk_size(chunk_size):
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)):
        raise TypeError(f"chunk_size={chunk_size!r}: expected None or an int")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected None (automatic) or an int >= 1")


def _detach(x):
    return None if x is None else x.detach()


def linear_hrm_loss(hidden, weight, labels, hrm=1.0, *, bias=None, ref_logits=None, ref_hidden=None,
                    ref_weight=None, ref_bias=None, kl="forward", beta=0.5, temperature=1.0, ignore_index=-100,
                    reduction="mean", return_components=False, chunk_size=None, backend="auto",
                    label_smoothing=0.0, z_loss=0.0, softcap=None, num_items=None, check_finite=False,
                    ref_topk=None, topk_mode="renorm", ref_vocab="error", token_weights=None):
    """`hrm_loss` of the logits `hidden @ weight.T (+ bias)`, without ever holding all N x V of them.

    With s = hidden @ weight.T + bias (student) and t the reference logits, per token i (docs/design.md §1):

        ce_i   = logsumexp(s_i) - s_i[y_i]       (with label smoothing and soft cap as in hrm_loss)
        kl_i   = KL(p_T || q_T)  (kl="forward"),  KL(q_T || p_T)  (kl="reverse"),
                 beta KL(p_T || m) + (1 - beta) KL(q_T || m),  m = beta p_T + (1 - beta) q_T  (kl="jsd")
        loss_i = ce_i + hrm * kl_i + z_i,   q_T = softmax(s_i / T),  p_T = softmax(t_i / T)

    computed over chunks of `chunk_size` tokens: peak extra memory O(chunk_size x V) plus the (N, H)
    gradient of hidden and an fp32 (V, H) accumulator of the gradient of weight (see the module docstring
    for when the gradient is computed: in the forward for "mean" / "sum", recomputed in the backward
    for "none").

    Args:
        hidden: (..., H) float32 / bfloat16 / float16, the student's last hidden states. Receives a
            gradient of its shape and dtype.
        weight: (V, H), hidden's dtype, the student's output projection. Its gradient is accumulated
            over chunks in fp32 and returned in its dtype.
        labels: (...) = hidden.shape[:-1], int64 or int32, values in [0, V) or `ignore_index`.
        hrm: weight of the divergence, finite and >= 0.
        bias: optional (V,) output bias, weight's dtype (gets a gradient like weight).
        ref_logits: (..., V) any float dtype, precomputed reference logits; or instead
        ref_hidden, ref_weight, ref_bias: the reference's last hidden states (..., H_ref), output weight
            (V, H_ref) and optional bias (V,), one float dtype; the reference logits are then computed
            chunk by chunk too. Exactly one of the two forms. The reference side is a constant.
        kl, beta, temperature, ignore_index, reduction, backend, label_smoothing, z_loss, softcap,
        num_items, check_finite: as in `hrm_loss` (the value options may be 0-dim tensors there too).
        ref_topk, topk_mode: a sparse teacher instead of a dense reference, as in `hrm_loss`.
        ref_vocab: "truncate" lets ref_logits / ref_weight have V_ref != V classes (as in `hrm_loss`;
            with ref_weight of more rows only its first V are multiplied).
        token_weights: (...) = labels.shape, >= 0, as in `hrm_loss`.
        return_components: return `HRMLossOutput(loss, ce, kl, z)` instead of the loss alone.
        chunk_size: tokens per chunk; None picks the most rows whose fp32 logits fit in 32 MiB (CPU) or
            256 MiB (CUDA), at least 1 and at most N (`auto_chunk_rows`).

    Returns:
        The fp32 loss (a scalar, or the shape of labels for reduction="none"), or `HRMLossOutput` whose
        `ce`, `kl` and `z` are reduced like the loss, detached, fp32.

    The graph of a "mean" / "sum" loss can be backpropagated once (its gradients are scaled in place).
    """
    _check_chunk_size(chunk_size)
    _frontend.check_linear(hidden, weight, labels, bias, ref_logits, ref_hidden, ref_weight, ref_bias, ref_vocab,
                           topk=ref_topk is not None)
    V = weight.shape[0]
    topk = _frontend.check_topk(ref_topk, labels, V)
    weights = _frontend.check_weights(token_weights, labels)
    V_ref = V if topk is not None else (ref_logits.shape[-1] if ref_logits is not None else ref_weight.shape[0])
    call = _frontend.make_call(
        dict(hrm=hrm, kl=kl, beta=beta, temperature=temperature, ignore_index=ignore_index, reduction=reduction,
             backend=backend, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, topk_mode=topk_mode,
             ref_vocab=ref_vocab),
        hidden.device, (hidden.dtype,), return_components=return_components, num_items=num_items,
        check_finite=check_finite, topk=topk is not None, cut=V_ref < V)
    flat = labels.reshape(-1).contiguous()
    chunk = chunk_size if chunk_size is not None else auto_chunk_rows(flat.shape[0], V, hidden.device)
    plan = _Plan(call, int(chunk), torch.is_grad_enabled())
    out = LinearHRMLossFunction.apply(
        hidden, weight, bias, flat, *map(_detach, (ref_logits, ref_hidden, ref_weight, ref_bias)), plan,
        *(topk if topk is not None else (None, None)), weights)
    return _frontend.finish(call, *out, labels, weights)


class LinearHRMLoss(torch.nn.Module):
    """`linear_hrm_loss` as a module: options at construction (the keywords of linear_hrm_loss, same
    names and defaults), tensors at the call:

        forward(hidden, weight, labels, *, bias=None, ref_logits=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, num_items=None, ref_topk=None, token_weights=None)
    """

    def __init__(self, hrm=1.0, **options):
        super().__init__()
        self.kwargs = _frontend.module_options("LinearHRMLoss", linear_hrm_loss, {"hrm": hrm, **options},
                                               per_call=_TENSOR_KEYWORDS + ("num_items",))
        _check_chunk_size(options.get("chunk_size"))

    def forward(self, hidden, weight, labels, *, bias=None, ref_logits=None, ref_hidden=None, ref_weight=None,
                ref_bias=None, num_items=None, ref_topk=None, token_weights=None):
        return linear_hrm_loss(hidden, weight, labels, bias=bias, ref_logits=ref_logits, ref_hidden=ref_hidden,
                               ref_weight=ref_weight, ref_bias=ref_bias, num_items=num_items, ref_topk=ref_topk,
                               token_weights=token_weights, **self.kwargs)

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())

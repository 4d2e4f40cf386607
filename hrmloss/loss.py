"""Public API on logits: `hrm_loss`, `HRMLoss`, `HRMLossOutput`. The checks, the backend choice and the
reduction are the front end's (hrmloss/engine/frontend.py); this file wires them to the autograd Function."""
from .engine.autograd import HRMLossFunction
from .engine.frontend import HRMLossOutput, LossModule, finish, prepare_logits
from .engine.tensor_parallel import logits_call

__all__ = ["HRMLoss", "HRMLossOutput", "hrm_loss"]


def hrm_loss(logits, ref_logits, labels, hrm=1.0, *, kl="forward", beta=0.5, temperature=1.0,
             ignore_index=-100, reduction="mean", return_components=False, backend="auto",
             label_smoothing=0.0, z_loss=0.0, softcap=None, num_items=None, process_group=None,
             check_finite=False, inplace_backward=False, ref_topk=None, topk_mode="renorm", ref_vocab="error",
             token_weights=None, ce_weight=1.0):
    """Fused causal-LM cross-entropy plus `hrm` times a divergence to a reference, in one pass.

    Per token i with student logits s, reference logits t, label y (docs/design.md §1):

        s      = softcap * tanh(s / softcap)                     (only with softcap)
        ce_i   = (1 - eps) (logsumexp(s) - s[y]) + eps mean_j(-log softmax(s)_j)   (eps = label_smoothing)
        kl_i   = KL(p_T || q_T)  (kl="forward"),  KL(q_T || p_T)  (kl="reverse"),
                 beta KL(p_T || m) + (1 - beta) KL(q_T || m),  m = beta p_T + (1 - beta) q_T  (kl="jsd")
        z_i    = z_loss * logsumexp(s)^2
        loss_i = ce_weight * ce_i + hrm * kl_i + z_i,   q_T = softmax(s / T),  p_T = softmax(t / T)

    Args:
        logits: (..., V) float32 / bfloat16 / float16, the student. Receives the gradient (its dtype).
            A DTensor `Shard(-1)` over one mesh dimension (a ColwiseParallel lm_head's) is the
            vocabulary-parallel call over that dimension's group; shards may be uneven (docs/distributed.md).
            (float64 runs on backend="torch", for gradcheck.)
        ref_logits: (..., V), any of those dtypes, the reference. Receives a gradient when it requires
            grad (co-training, a learned reference), computed in the same backward pass; when it does
            not, it costs no extra memory traffic. None with `ref_topk`. Another number of columns
            V_ref != V is an error unless ref_vocab="truncate". None without ref_topk: no reference, the
            fused cross-entropy family alone (ce + z, with label smoothing, soft cap, token weights,
            vocabulary-parallel): kl = 0, hrm and temperature unused, each pass reads the logits only.
        labels: (...) int64 or int32, values in [0, V) or `ignore_index`.
        hrm: weight of the divergence, finite and >= 0: a number or a 0-dim float tensor (see "Values").
        ce_weight: weight of the cross-entropy, finite and >= 0 (default 1), a value like hrm: 0 gives pure
            distillation (hrm * kl + z, a CE that is infinite counts nowhere). The z-loss term is not
            weighted by it, and the returned ce, kl, z are unweighted.
        kl: "forward", "reverse" or "jsd".
        beta: the mixture weight of "jsd", 0 < beta < 1 (checked, unused by the other kinds). A value.
        temperature: T > 0 (at least the smallest normal float32, ~1.18e-38), applied to the divergence
            only (no T^2 factor). A value.
        ignore_index: tokens with this label count nowhere and get a zero gradient.
        reduction: "mean" (over counted tokens; 0 when none), "sum", or "none" (shape of labels,
            0 at ignored tokens).
        return_components: return `HRMLossOutput(loss, ce, kl, z)` instead of the loss alone: ce with
            label smoothing, kl before the hrm weight, z the z-loss term.
        backend: "auto" (Triton for CUDA tensors when triton imports, else torch), "triton", "torch".
        label_smoothing: eps in [0, 1), on the CE term only; matches F.cross_entropy(label_smoothing=eps).
            A value.
        z_loss: weight >= 0 of the auxiliary z_loss * logsumexp(s)^2 per counted token (PaLM). A value.
        softcap: None, or c > 0: the student logits become c * tanh(s / c) before everything else. A
            value (None switches the cap off, which is structure).
        num_items: for reduction="mean", the denominator instead of the count of counted tokens: a
            finite number >= 0 (an int count, or a float weight sum with token_weights) or a 0-dim
            tensor on the CPU or the inputs' device (stays there; its value is checked in the first
            pass), e.g. the number of items of the global batch when accumulating gradients over
            micro-batches. 0 only for a batch in which no token counts (the mean is then 0).
        process_group: None, or a `torch.distributed.ProcessGroup` over which the vocabulary is
            sharded: `logits` and `ref_logits` then hold this rank's contiguous shard (rank r: global
            ids [r V, (r+1) V) with V = logits.shape[-1], equal on every rank), `labels` the global ids,
            the same on every rank; the result is the loss over the whole vocabulary, on every rank,
            and the gradients are those of this shard. 3 all_reduce of O(N) floats per forward (4 for
            "jsd"), none in backward (hrmloss/engine/distributed.py, docs/distributed.md).
        check_finite: after the forward, raise ValueError naming the first counted row whose ce or kl
            is not finite, and why: NaN (its logits or ref_logits hold NaN or +inf), +inf (a label of
            probability 0, distributions that are 0 at different ids, a row of all -inf, an fp32
            overflow: docs/design.md §1). Synchronises with the host (it reads the result), so it is off
            by default; without it such a row's loss is that value (NaN as in PyTorch).
        inplace_backward: write the gradient of `logits` into the storage of `logits` itself (flash-attn's
            option), so that the backward allocates no (..., V) gradient buffer: peak memory ~0 NVs
            above the inputs instead of 1 NV. `logits` must be an intermediate result (e.g. the lm
            head's output) that nothing reads after the backward: a leaf that requires grad, or a
            view of one, is refused with a ValueError; another autograd node that saved `logits` and
            runs its backward after this one raises autograd's "modified by an inplace operation"
            error. Logits whose elements share memory (an expand-ed view) are refused too. Under
            torch.compile the mutation is functionalised and may cost a copy. Off by default.
        ref_topk: a sparse teacher instead of ref_logits (then None): (indices, logprobs), each of shape
            labels.shape + (K,), K <= V: int32/int64 token ids, distinct in each row, and float
            log-probabilities (<= 0, at temperature 1) of the teacher at those ids. No (N, V) teacher
            tensor is ever made; the student's row is read once per pass, the ids K times a row.
        topk_mode: "renorm" (default): the teacher restricted to its ids and renormalised, p~ = softmax
            over the K ids of logprobs / T, against the student's full-vocabulary q = softmax(s / T)
            (kl "forward" or "jsd"; "reverse" is infinite there and an error). "tail": the exact
            divergence of the two distributions coarsened to K + 1 outcomes, the ids and the rest
            (p_rest = max(0, 1 - sum p_k)); T = 1 only; "forward", "reverse" or "jsd". The student's
            rest mass q_rest is summed over the ids off the top-k, never 1 - sum q_k (docs/divergences.md).
            "renorm_both": both renormalised over the K ids, p~ as in "renorm" and q~ = softmax over the
            ids of s / T (Axolotl's normalize_topk=True): the gradient reaches the K ids only; any kl.
        ref_vocab: "error" (default): a reference with V_ref != V columns is an error. "truncate": the
            divergence uses the first min(V, V_ref) ids of both (the student renormalised over them when
            V > V_ref; the other ids are the padding rows of lm_head that such model pairs have); the
            CE always uses the student's whole vocabulary.
        token_weights: None, or a float tensor of the shape of labels, >= 0: each token's ce, kl and z
            (and its gradient) are multiplied by its weight. "mean" divides by the sum of the weights
            of counted tokens (the mean is 0 when that sum is 0), or by num_items when given: then
            num_items must be the global weight sum for accumulated micro-batches to equal one batch.

    Values: hrm, ce_weight, temperature, beta, label_smoothing, z_loss and softcap are each a Python number or a
    0-dim float tensor (any float dtype, on the CPU or on the logits' device; never differentiated).
    A new value never recompiles a kernel or a `torch.compile` graph and never syncs the host. A Python
    number is checked at the call, as the float32 it becomes; a tensor's range is checked inside the
    first pass: ValueError on the CPU, a device-side assert on CUDA (docs/design.md §4). hrm = 0 drops
    the divergence even where it is infinite, for a number and a tensor alike.

    Returns:
        The loss, or `HRMLossOutput(loss, ce, kl, z)`, the last three reduced like the loss, detached.
        fp32 for fp32 / bf16 / fp16 logits, float64 for float64 logits (backend="torch").
    """
    redirected = logits_call(hrm_loss, locals())  # DTensor logits, Shard(-1): vocabulary-parallel
    if redirected is not None:
        return redirected
    p = prepare_logits(locals())
    rows = HRMLossFunction.apply(logits, p.ref, p.labels, p.call.params, p.call.st, p.call.backend, p.shard, p.topk,
                                 p.weights, p.call.num_items)
    return finish(p, *rows, labels)


class HRMLoss(LossModule):
    """`hrm_loss` as a module: the keywords of `hrm_loss` (same names and defaults) at construction,
    `forward(logits, ref_logits, labels, num_items=None)` at the call.

    The options are kept in `self.kwargs`; a value option may be a 0-dim tensor that a schedule updates
    in place (`hrm.fill_(x)`), or be replaced (`criterion.kwargs["hrm"] = x`): neither recompiles.
    """

    def __init__(self, hrm=1.0, **options):
        super().__init__(hrm_loss, {"hrm": hrm, **options}, per_call=("num_items", "ref_topk", "token_weights"))

    def forward(self, logits, ref_logits, labels, num_items=None, *, ref_topk=None, token_weights=None):
        """The loss of `hrm_loss` with this module's options; per call: `num_items` (it changes per batch),
        a sparse teacher `ref_topk` (with ref_logits=None) and `token_weights`."""
        return hrm_loss(logits, ref_logits, labels, num_items=num_items, ref_topk=ref_topk,
                        token_weights=token_weights, **self.kwargs)

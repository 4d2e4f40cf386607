"""The one front end of every public entry point: validation, backend choice, reduction, `num_items`.

`hrm_loss` / `HRMLoss` (loss.py), `linear_hrm_loss` / `LinearHRMLoss` (linear.py) and the vocabulary-
parallel path (distributed.py) all go through here:

    call = make_call(options, device, dtype, ...)   # LossOptions checked, backend resolved, params built
    ... the autograd Function of the entry point runs the passes with call.params / call.st ...
    return finish(call, loss, ce, kl, z, labels)      # reduction, num_items, check_finite, the output

Every check here raises ValueError / TypeError naming the argument, before any pass runs; the checks
that read data (labels, tensor-valued options) run inside the first pass (_ops.row_stats).
"""
import inspect
import numbers
from typing import NamedTuple

import torch

from . import _backends
from ._core import weigh
from ._options import OPTION_NAMES, LossOptions, Structure

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_ONLY_DTYPES = (torch.float64,)  # the torch backend also runs float64 (gradcheck)
LABEL_DTYPES = (torch.int64, torch.int32)
_FLOATS = "float32, bfloat16 or float16"


class HRMLossOutput(NamedTuple):
    """`loss` = `ce` + hrm * `kl` + `z`, each reduced the same way; `ce`, `kl`, `z` are detached.

    `ce` is the cross-entropy including label smoothing; `kl` the divergence (before the hrm weight);
    `z` the z-loss term z_loss * logsumexp(s)^2 (0 when z_loss = 0). All four are fp32 (float64 for
    float64 logits on the torch backend).
    """

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor
    z: torch.Tensor


class Call(NamedTuple):
    """The validated non-tensor state of one call."""

    opts: LossOptions          # as given (values may be tensors)
    st: Structure              # what the passes compile for
    backend: str               # resolved: "torch" or "triton"
    params: torch.Tensor       # the runtime scalars on the device (_layout.PARAMS)
    num_items: object          # None, an int or a 0-dim tensor: the denominator of "mean"
    return_components: bool
    check_finite: bool


# ---------------------------------------------------------------------------------------------------------
# argument checks


def check_tensor(name, x, dtypes=None, expected=_FLOATS):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}.dtype={x.dtype}: expected {expected}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected a bool")


def check_num_items(num_items, reduction):
    """None, an int >= 1, or a 0-dim tensor (kept where it is: no host sync); "mean" only."""
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items={num_items!r} with reduction={reduction!r}: num_items is the "
                         "denominator of reduction='mean' only")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.dtype == torch.bool or num_items.is_complex():
            raise ValueError(f"num_items: expected an int or a 0-dim real tensor, got a tensor of shape "
                             f"{tuple(num_items.shape)} and dtype {num_items.dtype}")
    elif isinstance(num_items, bool) or not isinstance(num_items, numbers.Integral):
        raise TypeError(f"num_items={num_items!r}: expected None, an int or a 0-dim tensor")
    elif num_items < 1:
        raise ValueError(f"num_items={num_items!r}: expected num_items >= 1")


def _check_option_devices(opts, device):
    for name, value in opts.values().items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu" and value.device != device:
            raise ValueError(f"{name} is a tensor on {value.device}: expected the CPU or the device of the "
                             f"inputs, {device}")


def check_ref_vocab(name, shape, V_ref, V, ref_vocab):
    """A reference of V_ref != V classes: an error unless ref_vocab="truncate"."""
    if V_ref != V and ref_vocab != "truncate":
        raise ValueError(f"{name}.shape={tuple(shape)}: a reference vocabulary of V_ref={V_ref} for a student of "
                         f"V={V}: expected equal vocabularies, or ref_vocab='truncate' (the divergence then uses "
                         "the first min(V, V_ref) ids of both)")


def check_logits(logits, ref_logits, labels, ref_vocab="error", topk=False):
    """Shapes, dtypes and devices of hrm_loss's tensors; returns the reference as the passes read it (its
    first V columns when it has more, ref_vocab="truncate"), or None for a sparse teacher (topk)."""
    check_tensor("logits", logits, FLOAT_DTYPES + TORCH_ONLY_DTYPES)
    check_tensor("labels", labels, LABEL_DTYPES, "int64 or int32")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: expected (..., V) with V >= 1")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels.shape={tuple(labels.shape)}: expected logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    _same_device("logits", logits, {"labels": labels})
    if topk:
        if ref_logits is not None:
            raise ValueError("ref_logits and ref_topk were both given: expected ref_logits=None with ref_topk")
        return None
    if ref_logits is None:
        raise ValueError("ref_logits=None: expected reference logits, or ref_topk=(indices, logprobs)")
    check_tensor("ref_logits", ref_logits, FLOAT_DTYPES + TORCH_ONLY_DTYPES)
    if ref_logits.shape[:-1] != logits.shape[:-1] or ref_logits.shape[-1] < 1:
        raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected the shape of logits, "
                         f"{tuple(logits.shape)}")
    check_ref_vocab("ref_logits", ref_logits.shape, ref_logits.shape[-1], logits.shape[-1], ref_vocab)
    _same_device("logits", logits, {"ref_logits": ref_logits})
    return ref_logits[..., :logits.shape[-1]]


def check_weights(token_weights, labels):
    """token_weights: None, or a float tensor of the shape of labels on its device (values: in the pass)."""
    if token_weights is None:
        return None
    check_tensor("token_weights", token_weights, FLOAT_DTYPES + TORCH_ONLY_DTYPES, "a float dtype")
    if token_weights.shape != labels.shape:
        raise ValueError(f"token_weights.shape={tuple(token_weights.shape)}: expected the shape of labels, "
                         f"{tuple(labels.shape)}")
    _same_device("labels", labels, {"token_weights": token_weights})
    return token_weights.detach().reshape(-1)


def check_topk(ref_topk, labels, vocab):
    """ref_topk=(indices, logprobs) -> the flat `_topk.TopK`, or None; shapes, dtypes, K <= V, device."""
    if ref_topk is None:
        return None
    from ._topk import check_shapes
    topk = check_shapes(ref_topk, labels.shape, vocab)
    _same_device("labels", labels, {"ref_topk indices": topk.ids, "ref_topk logprobs": topk.logprobs})
    return topk


def check_inplace(logits):
    """inplace_backward=True overwrites the logits with their gradient during backward: refuse logits that
    the caller may still read afterwards, a leaf that requires grad or a view of one (autograd's version
    counter only protects values saved by other nodes of the graph)."""
    if not (logits.requires_grad and torch.is_grad_enabled()):
        return  # no gradient of the logits will be computed: nothing is overwritten
    base = logits._base
    if logits.is_leaf or (base is not None and base.is_leaf):
        what = "a leaf tensor" if logits.is_leaf else "a view of a leaf tensor"
        raise ValueError(f"inplace_backward=True: logits is {what} that requires grad; the backward would "
                         "overwrite it with its gradient while you may still read it. Expected the output of "
                         "a differentiable op (e.g. the lm head), or inplace_backward=False")


def _same_device(anchor_name, anchor, others):
    for name, x in others.items():
        if x is not None and x.device != anchor.device:
            raise ValueError(f"{name}.device={x.device}: expected the device of {anchor_name}, {anchor.device}")


def _check_projection(prefix, hidden, weight, bias, mixed=False):
    """hidden (..., H), weight (V, H) of hidden's dtype, bias (V,) of that dtype.
    mixed (inside torch.autocast): the three may have different float dtypes."""
    check_tensor(f"{prefix}hidden", hidden, FLOAT_DTYPES)
    check_tensor(f"{prefix}weight", weight, FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}hidden.shape={tuple(hidden.shape)}: expected (..., H) with H >= 1")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"{prefix}weight.shape={tuple(weight.shape)}: expected (V, H) with V >= 1 and "
                         f"H = {prefix}hidden.shape[-1] = {H}")
    if weight.dtype != hidden.dtype and not mixed:
        raise TypeError(f"{prefix}weight.dtype={weight.dtype}: expected the dtype of {prefix}hidden, "
                        f"{hidden.dtype} (different dtypes are accepted inside torch.autocast only)")
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, FLOAT_DTYPES if mixed else (weight.dtype,),
                     _FLOATS if mixed else f"the dtype of {prefix}weight, {weight.dtype}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}bias.shape={tuple(bias.shape)}: expected ({weight.shape[0]},)")


def check_linear(hidden, weight, labels, bias, ref_logits, ref_hidden, ref_weight, ref_bias, ref_vocab="error",
                 topk=False, mixed=False):
    """Types, shapes, dtypes and devices of a linear_hrm_loss call; mixed: inside torch.autocast."""
    _check_projection("", hidden, weight, bias, mixed=mixed)
    check_tensor("labels", labels, LABEL_DTYPES, "int64 or int32")
    lead, V = tuple(hidden.shape[:-1]), weight.shape[0]
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels.shape={tuple(labels.shape)}: expected hidden.shape[:-1] = {lead}")
    if topk:
        if ref_logits is not None or ref_hidden is not None or ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_topk was given together with ref_logits / ref_hidden / ref_weight / ref_bias: "
                             "expected one reference")
        refs = {}
    elif ref_logits is not None:
        if ref_hidden is not None or ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_logits was given together with ref_hidden / ref_weight / ref_bias: "
                             "expected exactly one of ref_logits or (ref_hidden, ref_weight[, ref_bias])")
        check_tensor("ref_logits", ref_logits, FLOAT_DTYPES)
        if tuple(ref_logits.shape[:-1]) != lead or ref_logits.shape[-1] < 1:
            raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected hidden.shape[:-1] + (V,) "
                             f"= {(*lead, V)} with V = weight.shape[0]")
        check_ref_vocab("ref_logits", ref_logits.shape, ref_logits.shape[-1], V, ref_vocab)
        refs = {"ref_logits": ref_logits}
    else:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("no reference: expected ref_logits, or both ref_hidden and ref_weight "
                             f"(got ref_hidden={'a tensor' if ref_hidden is not None else None}, "
                             f"ref_weight={'a tensor' if ref_weight is not None else None})")
        _check_projection("ref_", ref_hidden, ref_weight, ref_bias, mixed=mixed)
        check_ref_vocab("ref_weight", ref_weight.shape, ref_weight.shape[0], V, ref_vocab)
        if tuple(ref_hidden.shape[:-1]) != lead:
            raise ValueError(f"ref_hidden.shape={tuple(ref_hidden.shape)}: expected hidden.shape[:-1] + "
                             f"(H_ref,) with hidden.shape[:-1] = {lead}")
        refs = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    _same_device("hidden", hidden, {"weight": weight, "bias": bias, "labels": labels, **refs})


# ---------------------------------------------------------------------------------------------------------
# the call


def make_call(options, device, dtypes, *, return_components=False, num_items=None, check_finite=False,
              topk=False, cut=False):
    """Validate the non-tensor arguments of a call on tensors of `device` and floating `dtypes`.

    options: the LossOptions keywords as given. Builds the runtime-scalar tensor on the device.
    topk: the reference is a sparse teacher; cut: a dense reference with fewer columns than the student.
    """
    opts = LossOptions(**options)
    if topk:
        opts.check_topk()
    check_bool("return_components", return_components)
    check_bool("check_finite", check_finite)
    check_num_items(num_items, opts.reduction)
    _check_option_devices(opts, device)
    backend = _backends.resolve(opts.backend, device)
    _backends.check_dtypes(backend, *dtypes)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    return Call(opts, opts.structure(topk, cut), backend, opts.params(device, acc), num_items,
                return_components, check_finite)


def module_options(module, fn, options, per_call=()):
    """The options a module (HRMLoss, LinearHRMLoss) stores for `fn`: its parameters with a default (hrm
    and the keywords) but the per-call ones, checked at construction (the device is known only then)."""
    names = [p.name for p in inspect.signature(fn).parameters.values()
             if p.default is not p.empty and p.name not in per_call]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{module} got unexpected option(s) {unknown}: expected some of {names}")
    LossOptions(**{k: v for k, v in options.items() if k in OPTION_NAMES})
    check_bool("return_components", options.get("return_components", False))
    check_bool("check_finite", options.get("check_finite", False))
    return options


def mean_denominator(live, num_items=None, weights=None):
    """The divisor of reduction "mean": the count of counted rows (with token weights: their weight sum)
    or num_items; 1 where that count is 0 (the mean is then 0). On the device."""
    if num_items is not None:
        return num_items
    den = live.sum() if weights is None else torch.where(live, weights, 0.0).sum()
    return torch.where(den == 0, torch.ones_like(den), den)


def row_weight(live, reduction, num_items, weights=None):
    """d reduced / d row_i for a counted row, on the device: 1 for "sum", 1 / the mean's denominator
    for "mean" (0-dim fp32), times the token weights (N,) when given."""
    if reduction == "sum":
        w = torch.ones((), device=live.device)
    else:
        w = 1.0 / torch.as_tensor(mean_denominator(live, num_items, weights), device=live.device).float()
    return w if weights is None else w * weights.float()


def weigh_rows(rows, weights):
    """rows * token weights, 0 where the weight is 0 even if the row is infinite; rows unchanged if None."""
    return rows if weights is None else weigh(weights.to(rows.dtype), rows)


def reduce_rows(rows, live, reduction, num_items=None, weights=None):
    """Reduce per-row values (N,) over counted rows: "sum", "mean" (by `mean_denominator`), or "none".
    With token weights (N,), rows are weighted first (ignored rows are 0 already)."""
    rows = weigh_rows(rows, weights)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / mean_denominator(live, num_items, weights)
    return rows


def _check_finite(ce, kl, live):
    """check_finite=True: NaN in a counted row's ce or kl means NaN (or +inf) in that row's inputs (syncs)."""
    for name, x, culprit in (("ce", ce, "logits"), ("kl", kl, "logits or ref_logits")):
        bad = torch.isnan(x) & live
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"check_finite: {name} is NaN at row {row} (flat token index): {culprit} "
                             "contains NaN or +inf in that row")


def finish(call, loss, ce, kl, z, labels, weights=None):
    """The call's result from per-row ce, kl, z (N,) and the loss (per row, or already reduced);
    weights: the flat (N,) token weights or None."""
    flat = labels.reshape(-1)
    live = flat != call.st.ignore_index
    if call.check_finite:
        _check_finite(ce, kl, live)
    reduction, num_items = call.opts.reduction, call.num_items
    out = HRMLossOutput(*(x if x.dim() == 0 else reduce_rows(x, live, reduction, num_items, weights)
                          for x in (loss, ce, kl, z)))
    if reduction == "none":
        out = HRMLossOutput(*(x.view(labels.shape) for x in out))
    return out if call.return_components else out.loss


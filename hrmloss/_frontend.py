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


def check_logits(logits, ref_logits, labels):
    """Shapes, dtypes and devices of hrm_loss's three tensors."""
    for name, x in (("logits", logits), ("ref_logits", ref_logits), ("labels", labels)):
        check_tensor(name, x)
    for name, x in (("logits", logits), ("ref_logits", ref_logits)):
        check_tensor(name, x, FLOAT_DTYPES + TORCH_ONLY_DTYPES)
    check_tensor("labels", labels, LABEL_DTYPES, "int64 or int32")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: expected (..., V) with V >= 1")
    if ref_logits.shape != logits.shape:
        raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected the shape of logits, "
                         f"{tuple(logits.shape)}")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels.shape={tuple(labels.shape)}: expected logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    _same_device("logits", logits, {"ref_logits": ref_logits, "labels": labels})


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


def _check_projection(prefix, hidden, weight, bias, vocab=None, mixed=False):
    """hidden (..., H), weight (V, H) of hidden's dtype, bias (V,) of that dtype; V = vocab when given.
    mixed (inside torch.autocast): the three may have different float dtypes."""
    check_tensor(f"{prefix}hidden", hidden, FLOAT_DTYPES)
    check_tensor(f"{prefix}weight", weight, FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}hidden.shape={tuple(hidden.shape)}: expected (..., H) with H >= 1")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        raise ValueError(f"{prefix}weight.shape={tuple(weight.shape)}: expected (V, H) with V >= 1 and "
                         f"H = {prefix}hidden.shape[-1] = {H}")
    if vocab is not None and weight.shape[0] != vocab:
        raise ValueError(f"{prefix}weight.shape={tuple(weight.shape)}: expected V = weight.shape[0] = {vocab} "
                         "rows (the student's vocabulary)")
    if weight.dtype != hidden.dtype and not mixed:
        raise TypeError(f"{prefix}weight.dtype={weight.dtype}: expected the dtype of {prefix}hidden, "
                        f"{hidden.dtype} (different dtypes are accepted inside torch.autocast only)")
    if bias is not None:
        check_tensor(f"{prefix}bias", bias, FLOAT_DTYPES if mixed else (weight.dtype,),
                     _FLOATS if mixed else f"the dtype of {prefix}weight, {weight.dtype}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}bias.shape={tuple(bias.shape)}: expected ({weight.shape[0]},)")


def check_linear(hidden, weight, labels, bias, ref_logits, ref_hidden, ref_weight, ref_bias, mixed=False):
    """Types, shapes, dtypes and devices of a linear_hrm_loss call; mixed: inside torch.autocast."""
    _check_projection("", hidden, weight, bias, mixed=mixed)
    check_tensor("labels", labels, LABEL_DTYPES, "int64 or int32")
    lead, V = tuple(hidden.shape[:-1]), weight.shape[0]
    if tuple(labels.shape) != lead:
        raise ValueError(f"labels.shape={tuple(labels.shape)}: expected hidden.shape[:-1] = {lead}")
    if ref_logits is not None:
        if ref_hidden is not None or ref_weight is not None or ref_bias is not None:
            raise ValueError("ref_logits was given together with ref_hidden / ref_weight / ref_bias: "
                             "expected exactly one of ref_logits or (ref_hidden, ref_weight[, ref_bias])")
        check_tensor("ref_logits", ref_logits, FLOAT_DTYPES)
        if tuple(ref_logits.shape) != (*lead, V):
            raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected hidden.shape[:-1] + (V,) "
                             f"= {(*lead, V)} with V = weight.shape[0]")
        refs = {"ref_logits": ref_logits}
    else:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("no reference: expected ref_logits, or both ref_hidden and ref_weight "
                             f"(got ref_hidden={'a tensor' if ref_hidden is not None else None}, "
                             f"ref_weight={'a tensor' if ref_weight is not None else None})")
        _check_projection("ref_", ref_hidden, ref_weight, ref_bias, vocab=V, mixed=mixed)
        if tuple(ref_hidden.shape[:-1]) != lead:
            raise ValueError(f"ref_hidden.shape={tuple(ref_hidden.shape)}: expected hidden.shape[:-1] + "
                             f"(H_ref,) with hidden.shape[:-1] = {lead}")
        refs = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    _same_device("hidden", hidden, {"weight": weight, "bias": bias, "labels": labels, **refs})


# ---------------------------------------------------------------------------------------------------------
# the call


def make_call(options, device, dtypes, *, return_components=False, num_items=None, check_finite=False):
    """Validate the non-tensor arguments of a call on tensors of `device` and floating `dtypes`.

    options: the LossOptions keywords as given. Builds the runtime-scalar tensor on the device.
    """
    opts = LossOptions(**options)
    check_bool("return_components", return_components)
    check_bool("check_finite", check_finite)
    check_num_items(num_items, opts.reduction)
    _check_option_devices(opts, device)
    backend = _backends.resolve(opts.backend, device)
    _backends.check_dtypes(backend, *dtypes)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    return Call(opts, opts.structure(), backend, opts.params(device, acc), num_items, return_components,
                check_finite)


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


def mean_denominator(live, num_items=None):
    """The divisor of reduction "mean": max(count of counted rows, 1), or num_items; on the device."""
    return live.sum().clamp(min=1) if num_items is None else num_items


def row_weight(live, reduction, num_items):
    """d reduced / d row_i for a counted row (0-dim fp32, on the device): 1 for "sum", 1 / the mean's
    denominator for "mean"."""
    if reduction == "sum":
        return torch.ones((), device=live.device)
    return 1.0 / torch.as_tensor(mean_denominator(live, num_items), device=live.device).float()


def reduce_rows(rows, live, reduction, num_items=None):
    """Reduce per-row values (N,) over counted rows: "sum", "mean" (by `mean_denominator`), or "none"."""
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / mean_denominator(live, num_items)
    return rows


def _check_finite(ce, kl, live):
    """check_finite=True: NaN in a counted row's ce or kl means NaN (or +inf) in that row's inputs (syncs)."""
    for name, x, culprit in (("ce", ce, "logits"), ("kl", kl, "logits or ref_logits")):
        bad = torch.isnan(x) & live
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"check_finite: {name} is NaN at row {row} (flat token index): {culprit} "
                             "contains NaN or +inf in that row")


def finish(call, loss, ce, kl, z, labels):
    """The call's result from per-row ce, kl, z (N,) and the loss (per row, or already reduced)."""
    flat = labels.reshape(-1)
    live = flat != call.st.ignore_index
    if call.check_finite:
        _check_finite(ce, kl, live)
    reduction, num_items = call.opts.reduction, call.num_items
    out = HRMLossOutput(*(x if x.dim() == 0 else reduce_rows(x, live, reduction, num_items)
                          for x in (loss, ce, kl, z)))
    if reduction == "none":
        out = HRMLossOutput(*(x.view(labels.shape) for x in out))
    return out if call.return_components else out.loss


"""The argument checks of every entry point: types, shapes, dtypes and devices, before any pass runs.

Each raises a ValueError / TypeError naming the argument, its value and what was expected. The checks that
read tensor data (labels, tensor-valued options, a sparse teacher's ids, token weights, num_items) are not
here: they run inside the first pass (ops.row_stats), a ValueError on the CPU and a device-side assert on
CUDA. docs/design.md §4 tabulates what is checked where.
"""
import numbers

import torch

from .options import NUM_ITEMS_RANGE, as_float32

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH_ONLY_DTYPES = (torch.float64,)  # the torch backend also runs float64 (gradcheck)
LABEL_DTYPES = (torch.int64, torch.int32)
_FLOATS = "float32, bfloat16 or float16"



def check_tensor(name, x, dtypes=None, expected=_FLOATS):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name}.dtype={x.dtype}: expected {expected}")


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r}: expected a bool")


def check_num_items(num_items, reduction, device):
    """None, a finite number >= 0 (an int count, or a float weight sum with token weights), or a 0-dim
    real tensor on the CPU or on `device` (kept there: no host sync; its value is checked in the first
    pass, ops.check_num_items); "mean" only. 0 is for a batch with no counted token (the mean is then 0)."""
    if num_items is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items={num_items!r} with reduction={reduction!r}: num_items is the "
                         "denominator of reduction='mean' only")
    if isinstance(num_items, torch.Tensor):
        if num_items.dim() != 0 or num_items.dtype == torch.bool or num_items.is_complex():
            raise ValueError(f"num_items: expected a number or a 0-dim real tensor, got a tensor of shape "
                             f"{tuple(num_items.shape)} and dtype {num_items.dtype}")
        if num_items.device.type != "cpu" and num_items.device != device:
            raise ValueError(f"num_items is a tensor on {num_items.device}: expected the CPU or the device of "
                             f"the inputs, {device}")
        return
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise TypeError(f"num_items={num_items!r}: expected None, a number or a 0-dim tensor")
    if not NUM_ITEMS_RANGE.holds(num_items if torch.compiler.is_compiling() else as_float32(num_items)):
        raise ValueError(f"num_items={num_items!r}: expected {NUM_ITEMS_RANGE.text}")


def check_option_devices(opts, device):
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


def check_logits(logits, ref_logits, labels, ref_vocab="error", topk=False, empty_ref=False):
    """Shapes, dtypes and devices of hrm_loss's tensors; returns the reference as the passes read it (its
    first V columns when it has more, ref_vocab="truncate"), or None for a sparse teacher (topk).
    empty_ref: a vocabulary shard past a truncated reference's vocabulary may have no reference column."""
    check_tensor("logits", logits, FLOAT_DTYPES + TORCH_ONLY_DTYPES)
    check_tensor("labels", labels, LABEL_DTYPES, "int64 or int32")
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits.shape={tuple(logits.shape)}: expected (..., V) with V >= 1")
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels.shape={tuple(labels.shape)}: expected logits.shape[:-1] = "
                         f"{tuple(logits.shape[:-1])}")
    same_device("logits", logits, {"labels": labels})
    if topk:
        if ref_logits is not None:
            raise ValueError("ref_logits and ref_topk were both given: expected ref_logits=None with ref_topk")
        return None
    if ref_logits is None:  # no reference: the fused cross-entropy family alone
        return None
    check_tensor("ref_logits", ref_logits, FLOAT_DTYPES + TORCH_ONLY_DTYPES)
    if ref_logits.shape[:-1] != logits.shape[:-1] or ref_logits.shape[-1] < (0 if empty_ref else 1):
        raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected the shape of logits, "
                         f"{tuple(logits.shape)}")
    check_ref_vocab("ref_logits", ref_logits.shape, ref_logits.shape[-1], logits.shape[-1], ref_vocab)
    same_device("logits", logits, {"ref_logits": ref_logits})
    return ref_logits[..., :logits.shape[-1]]


def check_weights(token_weights, labels):
    """token_weights: None, or a float tensor of the shape of labels on its device (values: in the pass)."""
    if token_weights is None:
        return None
    check_tensor("token_weights", token_weights, FLOAT_DTYPES + TORCH_ONLY_DTYPES, "a float dtype")
    if token_weights.shape != labels.shape:
        raise ValueError(f"token_weights.shape={tuple(token_weights.shape)}: expected the shape of labels, "
                         f"{tuple(labels.shape)}")
    same_device("labels", labels, {"token_weights": token_weights})
    return token_weights.detach().reshape(-1)


def check_topk(ref_topk, labels, vocab):
    """ref_topk=(indices, logprobs) -> the flat `sparse.TopK`, or None; shapes, dtypes, K <= V, device."""
    if ref_topk is None:
        return None
    from .sparse import check_shapes
    topk = check_shapes(ref_topk, labels.shape, vocab)
    same_device("labels", labels, {"ref_topk indices": topk.ids, "ref_topk logprobs": topk.logprobs})
    return topk


def may_overlap(x):
    """True unless x's elements provably occupy distinct memory: with its dimensions by increasing stride,
    each stride exceeds the farthest offset the smaller ones reach (False for every dense layout, True
    for an expand-ed (stride 0) or an as_strided view whose rows share memory)."""
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(x.stride(), x.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_inplace(logits):
    """inplace_backward=True overwrites the logits with their gradient during backward: refuse logits that
    the caller may still read afterwards, a leaf that requires grad or a view of one (autograd's version
    counter only protects values saved by other nodes of the graph), and logits whose elements share
    memory (one place cannot hold two gradients)."""
    if not (logits.requires_grad and torch.is_grad_enabled()):
        return  # no gradient of the logits will be computed: nothing is overwritten
    if may_overlap(logits):
        raise ValueError(f"inplace_backward=True: logits (shape {tuple(logits.shape)}, strides {logits.stride()}) "
                         "has elements that share memory (an expand-ed or as_strided view), which cannot hold "
                         "their separate gradients; expected logits with distinct elements (e.g. .contiguous()), "
                         "or inplace_backward=False")
    base = logits._base
    if logits.is_leaf or (base is not None and base.is_leaf):
        what = "a leaf tensor" if logits.is_leaf else "a view of a leaf tensor"
        raise ValueError(f"inplace_backward=True: logits is {what} that requires grad; the backward would "
                         "overwrite it with its gradient while you may still read it. Expected the output of "
                         "a differentiable op (e.g. the lm head), or inplace_backward=False")


def same_device(anchor_name, anchor, others):
    for name, x in others.items():
        if x is not None and x.device != anchor.device:
            raise ValueError(f"{name}.device={x.device}: expected the device of {anchor_name}, {anchor.device}")


def check_projection(prefix, hidden, weight, bias, mixed=False, min_rows=1):
    """hidden (..., H), weight (V, H) of hidden's dtype, bias (V,) of that dtype, V >= min_rows.
    mixed (inside torch.autocast): the three may have different float dtypes."""
    check_tensor(f"{prefix}hidden", hidden, FLOAT_DTYPES)
    check_tensor(f"{prefix}weight", weight, FLOAT_DTYPES)
    if hidden.dim() < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"{prefix}hidden.shape={tuple(hidden.shape)}: expected (..., H) with H >= 1")
    H = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < min_rows:
        raise ValueError(f"{prefix}weight.shape={tuple(weight.shape)}: expected (V, H) with V >= {min_rows} and "
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
                 topk=False, mixed=False, empty_ref=False):
    """Types, shapes, dtypes and devices of a linear_hrm_loss call; mixed: inside torch.autocast; empty_ref:
    as in check_logits."""
    check_projection("", hidden, weight, bias, mixed=mixed)
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
        if tuple(ref_logits.shape[:-1]) != lead or ref_logits.shape[-1] < (0 if empty_ref else 1):
            raise ValueError(f"ref_logits.shape={tuple(ref_logits.shape)}: expected hidden.shape[:-1] + (V,) "
                             f"= {(*lead, V)} with V = weight.shape[0]")
        check_ref_vocab("ref_logits", ref_logits.shape, ref_logits.shape[-1], V, ref_vocab)
        refs = {"ref_logits": ref_logits}
    elif ref_hidden is None and ref_weight is None and ref_bias is None:
        refs = {}  # no reference: the fused cross-entropy family alone
    else:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("an incomplete reference: expected ref_logits, or both ref_hidden and ref_weight "
                             f"(got ref_hidden={'a tensor' if ref_hidden is not None else None}, "
                             f"ref_weight={'a tensor' if ref_weight is not None else None})")
        check_projection("ref_", ref_hidden, ref_weight, ref_bias, mixed=mixed, min_rows=0 if empty_ref else 1)
        check_ref_vocab("ref_weight", ref_weight.shape, ref_weight.shape[0], V, ref_vocab)
        if tuple(ref_hidden.shape[:-1]) != lead:
            raise ValueError(f"ref_hidden.shape={tuple(ref_hidden.shape)}: expected hidden.shape[:-1] + "
                             f"(H_ref,) with hidden.shape[:-1] = {lead}")
        refs = {"ref_hidden": ref_hidden, "ref_weight": ref_weight, "ref_bias": ref_bias}
    same_device("hidden", hidden, {"weight": weight, "bias": bias, "labels": labels, **refs})


def check_chunking(chunk_size, chunk_bytes):
    """linear_hrm_loss's chunk_size and chunk_bytes: None (automatic) or an int >= 1."""
    for name, value in (("chunk_size", chunk_size), ("chunk_bytes", chunk_bytes)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise TypeError(f"{name}={value!r}: expected None or an int")
        if value is not None and value < 1:
            raise ValueError(f"{name}={value!r}: expected None (automatic) or an int >= 1")


def check_grad_acc_dtype(grad_acc_dtype, gemm_dtype=None):
    """The weight-gradient accumulator's dtype: None means fp32; otherwise fp32 or the GEMM dtype (a float
    dtype, all that can be checked without the inputs: gemm_dtype None, at a module's construction)."""
    if grad_acc_dtype is None:
        return torch.float32
    if not isinstance(grad_acc_dtype, torch.dtype):
        raise TypeError(f"grad_acc_dtype={grad_acc_dtype!r}: expected None or a torch.dtype (torch.float32, "
                        "or the GEMM dtype torch.bfloat16 / torch.float16)")
    if grad_acc_dtype not in FLOAT_DTYPES:
        raise ValueError(f"grad_acc_dtype={grad_acc_dtype!r}: expected None, torch.float32, or the GEMM dtype "
                         "(torch.bfloat16 or torch.float16)")
    if gemm_dtype is not None and grad_acc_dtype not in (torch.float32, gemm_dtype):
        raise ValueError(f"grad_acc_dtype={grad_acc_dtype!r}: expected None or torch.float32 (the default), or "
                         f"the GEMM dtype {gemm_dtype} (a smaller, less accurate accumulator)")
    return grad_acc_dtype

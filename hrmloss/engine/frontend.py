"""The one front end of every entry point: `prepare` a call, run it, `finish` it.

`hrm_loss` / `HRMLoss` (hrmloss/loss.py) and `linear_hrm_loss` / `LinearHRMLoss` (hrmloss/linear.py) each
make one call here with their arguments (`locals()`), and get back what the call needs:

    p = prepare_logits(args)          # or prepare_linear(args): every check, the options, the backend,
                                      # the vocabulary shard (and for the projection, the chunk plan)
    rows = <the entry point's autograd Function>.apply(..., p.call.params, p.call.st, ...)
    return finish(p, *rows, labels)   # check_finite, the reduction, num_items, the output

The option dictionary is built here, once, from the option list (`options.OPTION_NAMES`); every check
raises ValueError / TypeError naming the argument before any pass runs (checks.py); the checks that read
data (labels, tensor-valued options, a sparse teacher's ids, token weights) run inside the first pass
(ops.row_stats). `LossModule` is the base of the two modules.
"""
import dataclasses
import inspect
from typing import NamedTuple

import torch

from . import backends, checks, chunked
from .options import OPTION_NAMES, LossOptions, Structure
from .reduce import reduce_rows


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
    params: torch.Tensor       # the runtime scalars on the device (layout.PARAMS)
    num_items: object          # None, a number or a 0-dim tensor: the denominator of "mean"
    return_components: bool
    check_finite: bool


class Prepared(NamedTuple):
    """What one checked call needs: its Call, the tensors as the passes read them, the shard, the plan."""

    call: Call
    labels: torch.Tensor            # (N,) flat
    ref: object                     # hrm_loss: the reference logits as the passes read them (or None)
    topk: object                    # None, or the flat sparse.TopK of a sparse teacher
    weights: object                 # None, or the (N,) flat token weights (detached)
    shard: object                   # None, or this rank's distributed.VocabShard
    plan: object = None             # linear_hrm_loss: its chunked.Plan


def make_call(options, device, dtypes, *, return_components=False, num_items=None, check_finite=False,
              topk=False, cut=False, ref=True):
    """Validate the non-tensor arguments of a call on tensors of `device` and floating `dtypes`.

    options: the LossOptions keywords as given. Builds the runtime-scalar tensor on the device.
    topk: the reference is a sparse teacher; cut: a dense reference with fewer columns than the student;
    ref=False: no reference at all (the CE family alone: hrm the number 0, T = 1, kl "forward": the kernel
    variants of a sparse teacher's renorm mode, no reference read, no T path, no JSD pass).
    """
    opts = LossOptions(**options)
    if not ref and not topk:  # checked as given, then without a divergence
        opts = dataclasses.replace(opts, hrm=0.0, temperature=1.0, kl="forward")
    if topk:
        opts.check_topk()
    checks.check_bool("return_components", return_components)
    checks.check_bool("check_finite", check_finite)
    checks.check_num_items(num_items, opts.reduction, device)
    checks.check_option_devices(opts, device)
    backend = backends.resolve(opts.backend, device)
    backends.check_dtypes(backend, *dtypes)
    acc = torch.float64 if torch.float64 in dtypes else torch.float32
    return Call(opts, opts.structure(topk, cut, ref), backend, opts.params(device, acc), num_items,
                return_components, check_finite)


def _options(args):
    """The LossOptions keywords of an entry point's arguments (those of the option list it takes)."""
    return {name: args[name] for name in OPTION_NAMES if name in args}


def _teacher_and_call(args, labels, device, dtypes, vocab, cut, ref=True):
    """The sparse teacher, token weights and Call of either entry point, in the order of their checks."""
    group = args["process_group"]
    if group is not None and args["ref_topk"] is not None:  # the ids are global: K <= the whole vocabulary
        from .distributed import global_vocab
        vocab = global_vocab(group, vocab)
    topk = checks.check_topk(args["ref_topk"], labels, vocab)
    weights = checks.check_weights(args["token_weights"], labels)
    call = make_call(_options(args), device, dtypes, return_components=args["return_components"],
                     num_items=args["num_items"], check_finite=args["check_finite"], topk=topk is not None,
                     cut=cut, ref=ref)
    return topk, weights, call


def _shard(group, vocab, flat, call, topk, weights):
    if group is None:
        return None
    from .distributed import vocab_shard
    return vocab_shard(group, vocab, flat, call, topk, weights)


def _in_group(prepare, args):
    """prepare(args); in a vocabulary-parallel call (process_group), a rank whose arguments are rejected
    still joins the group's first collective, with a status word naming the argument, so that every rank
    raises (distributed.vocab_shard) instead of waiting for it."""
    group = args["process_group"]
    if group is None:
        return prepare(args)
    from .distributed import GroupError, check_group, vocab_shard
    check_group(group)  # an unusable group raises at once: there is nothing to communicate over
    try:
        return prepare(args)
    except GroupError:
        raise
    except (ValueError, TypeError) as error:
        tensors = [args.get(k) for k in ("logits", "hidden", "labels")]
        device = next((x.device for x in tensors if isinstance(x, torch.Tensor)), torch.device("cpu"))
        vocab_shard(group, 0, None, failure=error, device=device)
        raise


def prepare_logits(args):
    """Check a `hrm_loss` call (its arguments, `locals()` at its start) and prepare it."""
    return _in_group(_prepare_logits, args)


def prepare_linear(args):
    """Check a `linear_hrm_loss` call (its arguments, `locals()` at its start) and prepare it, with the
    chunk plan (chunked.make_plan)."""
    return _in_group(_prepare_linear, args)


def _empty_ref_allowed(args):
    """A vocabulary shard wholly past a truncated reference's vocabulary: no reference column, and it adds
    nothing to the divergence (its student columns are outside the first V_ref ids)."""
    return args["process_group"] is not None and args["ref_vocab"] == "truncate"


def _prepare_logits(args):
    logits, labels = args["logits"], args["labels"]
    ref = checks.check_logits(logits, args["ref_logits"], labels, args["ref_vocab"],
                              topk=args["ref_topk"] is not None, empty_ref=_empty_ref_allowed(args))
    V = logits.shape[-1]
    dtypes = (logits.dtype,) + (() if ref is None else (ref.dtype,))
    topk, weights, call = _teacher_and_call(args, labels, logits.device, dtypes, V,
                                            cut=ref is not None and ref.shape[-1] < V, ref=ref is not None)
    if call.st.inplace:
        checks.check_inplace(logits)
    flat = labels.reshape(-1)
    return Prepared(call, flat, ref, topk, weights, _shard(args["process_group"], V, flat, call, topk, weights))


def _prepare_linear(args):
    hidden, weight, labels = args["hidden"], args["weight"], args["labels"]
    checks.check_chunking(args["chunk_size"], args["chunk_bytes"])
    mixed = isinstance(hidden, torch.Tensor) and chunked.autocast_enabled(hidden.device.type)
    has_topk = args["ref_topk"] is not None
    checks.check_linear(hidden, weight, labels, args["bias"], args["ref_logits"], args["ref_hidden"],
                        args["ref_weight"], args["ref_bias"], args["ref_vocab"], topk=has_topk, mixed=mixed,
                        empty_ref=_empty_ref_allowed(args))
    V = weight.shape[0]
    has_ref = args["ref_logits"] is not None or args["ref_weight"] is not None
    V_ref = args["ref_logits"].shape[-1] if args["ref_logits"] is not None else \
        args["ref_weight"].shape[0] if args["ref_weight"] is not None else V
    gemm_dtype = chunked.gemm_dtype(hidden)
    acc_dtype = checks.check_grad_acc_dtype(args["grad_acc_dtype"], gemm_dtype)
    topk, weights, call = _teacher_and_call(args, labels, hidden.device, (gemm_dtype,), V, cut=V_ref < V,
                                            ref=has_ref)
    flat = labels.reshape(-1).contiguous()
    plan = chunked.make_plan(call, flat.shape[0], V, hidden.device, gemm_dtype, acc_dtype, None,
                             ref_from_hidden=args["ref_hidden"] is not None, chunk_size=args["chunk_size"],
                             chunk_bytes=args["chunk_bytes"])
    shard = _shard(args["process_group"], V, flat, call, topk, weights)  # last: nothing raises after the check
    return Prepared(call, flat, None, topk, weights, shard, plan._replace(shard=shard))


# check_finite's cause of each non-finite value, by component and kind of value
_CAUSES = {
    ("ce", "NaN"): "logits contain NaN or +inf in that row",
    ("kl", "NaN"): "logits or ref_logits contain NaN or +inf in that row",
    ("ce", "+inf"): "the label's probability is 0 (its logit is -inf, the row's logits are all -inf, or they "
                    "overflow float32)",
    ("kl", "+inf"): "one distribution is 0 where the other is not (-inf in one of logits / ref_logits only, an "
                    "all -inf row, or logits that overflow float32)",
    ("ce", "-inf"): "the logits overflow float32", ("kl", "-inf"): "the logits overflow float32",
}


def _check_finite(ce, kl, live):
    """check_finite=True: ValueError naming the first counted row whose ce or kl is not finite, and why (syncs)."""
    for name, x in (("ce", ce), ("kl", kl)):
        bad = ~torch.isfinite(x) & live
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            value = x[row].item()
            kind = "NaN" if value != value else "+inf" if value > 0 else "-inf"
            raise ValueError(f"check_finite: {name} is {kind} at row {row} (flat token index): "
                             f"{_CAUSES[name, kind]}")


def finish(prepared, loss, ce, kl, z, labels):
    """The call's result from per-row ce, kl, z (N,) and the loss (per row, or already reduced)."""
    call, weights = prepared.call, prepared.weights
    live = prepared.labels != call.st.ignore_index
    if call.check_finite:
        _check_finite(ce, kl, live)
    reduction, num_items = call.opts.reduction, call.num_items
    out = HRMLossOutput(*(x if x.dim() == 0 else reduce_rows(x, live, reduction, num_items, weights)
                          for x in (loss, ce, kl, z)))
    if reduction == "none":
        out = HRMLossOutput(*(x.view(labels.shape) for x in out))
    return out if call.return_components else out.loss


class LossModule(torch.nn.Module):
    """The base of `HRMLoss` and `LinearHRMLoss`: the keywords of the functional form `fn` (its parameters
    with a default, but the per-call ones) stored in `self.kwargs`, checked at construction.

    A value option may be a 0-dim tensor that a schedule updates in place (`hrm.fill_(x)`), or be replaced
    (`module.kwargs["hrm"] = x`): neither recompiles.
    """

    def __init__(self, fn, options, per_call):
        super().__init__()
        names = [p.name for p in inspect.signature(fn).parameters.values()
                 if p.default is not p.empty and p.name not in per_call]
        unknown = sorted(set(options) - set(names))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected option(s) {unknown}: expected some of {names}")
        LossOptions(**_options(options))
        checks.check_bool("return_components", options.get("return_components", False))
        checks.check_bool("check_finite", options.get("check_finite", False))
        if options.get("process_group") is not None:
            from .distributed import check_group
            check_group(options["process_group"])
        self.kwargs = options

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items() if k != "process_group")

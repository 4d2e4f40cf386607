"""Sharded weights of the fused projection: FSDP2 (and DeepSpeed ZeRO-3) parameters are gathered by the engine.

The rule that tells the two readings of a `Shard(0)` DTensor weight apart (both look the same: a DTensor
whose rows are split over a 1-D mesh):

- a parameter that `fully_shard` manages (found in FSDP2's registry of managed modules) is a data-parallel
  shard: the whole weight is needed, and FSDP2 gathers it (below);
- any other DTensor weight whose rows are `Shard(0)` over a mesh is a vocabulary shard (a `ColwiseParallel`
  lm_head): the vocabulary-parallel mode over the mesh's group (hrmloss/engine/tensor_parallel.py).

Forward redirection. `linear_hrm_loss(hidden, lm_head.weight, ...)` runs outside lm_head's forward, where
FSDP2 holds only this rank's rows. Rather than all-gathering by hand (and re-implementing FSDP2's mixed
precision, gradient division, accumulation without sync and reduce-scatter), the loss runs *inside* the
forward of the FSDP2 unit that owns the weight, between FSDP2's own pre- and post-forward hooks of that
unit (only FSDP2's: the unit's other forward hooks expect its logits). FSDP2's pre-forward hook all-gathers
the unit's parameters in `param_dtype` (and casts `hidden` to it, as it would lm_head's input), the loss
reads the unsharded parameters, and the post-forward hook reshards them and hooks the backward, where
FSDP2 reduce-scatters the weight's gradient in `reduce_dtype`, averaged over the data-parallel ranks,
exactly as for `nn.Linear`. Per call, for a weight of V x H elements:

    memory         one unsharded copy, in param_dtype, from the all-gather to the end of the forward (the
                   fp32 gradient accumulator of the fused loss besides); FSDP2 frees it after the forward
                   (reshard_after_forward=True) and gathers it again for the backward, like nn.Linear's
    communication  that of nn.Linear under the same FSDP2: 1 all-gather of V H in the forward, 1 more in
                   the backward when the unit reshards after forward, 1 reduce-scatter of the V H gradient

The same redirection applies to `bias`, `ref_weight` and `ref_bias` (the reference's unit gets
`ref_hidden`). A weight read while its unit is unsharded (e.g. the root's, after the model's forward) is a
plain tensor and needs nothing of this. On a 2-D mesh (FSDP x TP) the unsharded parameter is the TP
DTensor, which the inner call reads as a vocabulary shard. `call_inside` runs any function (the trainer's
base model) inside a managed module's FSDP2 hooks.

DeepSpeed ZeRO-3 keeps no registry from a parameter to its module, so a placeholder (0 elements outside
the module's forward) is refused by name, and `inside_forward(lm_head, fn, hidden)` runs the loss as the
module's forward, with all its hooks, where ZeRO-3 gathers for the forward and for the backward.
"""


def _fsdp_states():
    """(module, state) of every module that `fully_shard` manages (FSDP2's own registry, weak references)."""
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:  # a torch without FSDP2
        return []
    pairs = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref()
        if isinstance(state, FSDPState):
            pairs.append((module, state))
    return pairs


def call_inside(module, fn, kwargs):
    """fn(**kwargs) between FSDP2's forward hooks of `module` when fully_shard manages it (its parameters
    unsharded, as inside module(**kwargs), and its backward hooked), plain fn(**kwargs) otherwise. E.g. a
    causal LM's base model run inside the root's hooks, so that the root's own parameters (embeddings,
    final norm, lm_head) are gathered: what TRL and Liger call forward redirection."""
    state = next((st for m, st in _fsdp_states() if m is module), None)
    if state is None:
        return fn(**kwargs)
    _, kwargs = state._pre_forward(module, (), kwargs)
    return state._post_forward(module, (), fn(**kwargs))


def fsdp_unit(tensor):
    """(module, FSDP2 state, FSDPParam) of the FSDP2 unit whose sharded parameter `tensor` is, or None for
    any other tensor."""
    if not is_dtensor(tensor):
        return None
    for module, state in _fsdp_states():
        for group in state._fsdp_param_groups:
            for param in group.fsdp_params:
                if param.sharded_param is tensor:
                    return module, state, param
    return None


def is_dtensor(x):
    if x is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(x, DTensor)


PARAMETERS = ("weight", "bias", "ref_weight", "ref_bias")
INPUT_OF = {"weight": "hidden", "bias": "hidden", "ref_weight": "ref_hidden", "ref_bias": "ref_hidden"}


def fsdp_redirect(fn, args):
    """Run `fn(**args)` inside the forward of the FSDP2 units owning args' parameters, or return None when
    none of them is an FSDP2-sharded parameter. `args`: the keyword arguments of linear_hrm_loss."""
    owned = {name: fsdp_unit(args[name]) for name in PARAMETERS}
    owned = {name: found for name, found in owned.items() if found is not None}
    if not owned:
        return None
    units = []  # (unit, its FSDP2 state, the input it casts, its parameters), first the student's
    for name, (unit, state, param) in owned.items():
        entry = next((u for u in units if u[0] is unit), None)
        if entry is None:
            entry = (unit, state, INPUT_OF[name], {})
            units.append(entry)
        entry[3][name] = param
    return _run_inside(units, fn, dict(args))


def _run_inside(units, fn, args):
    """fn(**args) between FSDP2's pre- and post-forward hooks of each unit (only FSDP2's: a unit's other
    forward hooks, e.g. ColwiseParallel's on a 2-D mesh, expect its logits and are not run)."""
    if not units:
        return fn(**args)
    (unit, state, input_name, params), rest = units[0], units[1:]
    inputs = (args[input_name],)
    (args[input_name],), _ = state._pre_forward(unit, inputs, {})  # all-gather; the input cast to param_dtype
    for name, param in params.items():
        args[name] = param.unsharded_param  # what the unit holds between its hooks
    out = _run_inside(rest, fn, args)
    return state._post_forward(unit, inputs, out)  # reshard, and hook the backward's reduce-scatter


def is_zero3_placeholder(tensor):
    """A DeepSpeed ZeRO-3 partitioned parameter read outside its module's forward (0 elements there)."""
    return tensor is not None and hasattr(tensor, "ds_id") and tensor.numel() == 0  # gathered: all its elements


def check_not_zero3(args):
    """ValueError for a ZeRO-3 placeholder among linear_hrm_loss's parameters: it must run inside the forward
    of the module holding them (inside_forward), where ZeRO-3 gathers them for the forward and the backward."""
    for name in PARAMETERS:
        if is_zero3_placeholder(args[name]):
            raise ValueError(f"{name}: a DeepSpeed ZeRO-3 partitioned parameter, shape "
                             f"{tuple(args[name].shape)} outside its module's forward: expected the call inside "
                             "that module's forward, hrmloss.inside_forward(lm_head, lambda h: "
                             "linear_hrm_loss(h, lm_head.weight, ...), hidden) (docs/distributed.md)")


def inside_forward(module, fn, *inputs):
    """fn(*inputs) run as `module`'s forward, for one call: module(*inputs) with every hook of the module,
    so that an engine hooking modules (DeepSpeed ZeRO-3, FSDP) gathers the module's parameters for the call
    and for its backward and reduces their gradients, as for the module's own forward. The module's other
    forward hooks see fn's result instead of the module's output."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")

    def forward(*xs):
        _restore()
        return fn(*xs)

    def _restore():
        if had:
            module.forward = saved
        else:
            module.__dict__.pop("forward", None)

    module.forward = forward
    try:
        return module(*inputs)
    finally:
        _restore()

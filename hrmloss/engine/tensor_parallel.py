"""DTensor inputs of the vocabulary-parallel mode: a tensor-parallel lm_head's logits or weight, no unwrapping.

`hrm_loss(logits, ...)` with logits a DTensor `Shard(-1)` over one mesh dimension (what
`ColwiseParallel(output_layouts=Shard(-1))` gives an lm_head), and `linear_hrm_loss(hidden, weight, ...)` with
a weight `Shard(0)` over one mesh dimension that FSDP2 does not manage (hrmloss/engine/sharding.py states the
rule), are the vocabulary-parallel calls of hrmloss/engine/distributed.py over that mesh dimension's group:

    shard widths   DTensor's: ceil(V / W) columns on the first ranks, the rest on the last (uneven V works);
                   rank r's global ids start at the sum of the widths before it
    the reference  a DTensor sharded like the student: its local shard; replicated (a Replicate DTensor or a
                   plain tensor of the whole vocabulary): this rank's columns (rows of ref_weight / ref_bias)
    replicated     labels, hidden, ref_hidden, token_weights, ref_topk, num_items: plain, or Replicate DTensors
    gradients      the local tensors come from `to_local()`, so autograd returns the gradient of the logits
                   (the weight, the bias) as a DTensor of their placements; a Replicate hidden gets the full
                   gradient, summed over the group inside the loss

The result is a plain tensor, the same on every rank (the loss of the whole vocabulary). Passing
`process_group` as well is an error: the mesh gives the group.
"""
from .distributed import ShardLayout
from .sharding import is_dtensor

REPLICATED = ("labels", "hidden", "ref_hidden", "token_weights", "num_items")


def shard_widths(V, world):
    """DTensor's split of V rows over `world` ranks (torch.chunk's): ceil(V / world) each but the last ones."""
    size = -(-V // world)
    return tuple(min(V, (r + 1) * size) - min(V, r * size) for r in range(world))


def _mesh_dim(x, dim, name):
    """The one mesh dimension over which DTensor x is `Shard(dim)`, the others `Replicate()`; else ValueError."""
    from torch.distributed.tensor import Replicate, Shard
    dim = dim % x.dim()
    sharded = [i for i, p in enumerate(x.placements) if type(p) is Shard and p.dim % x.dim() == dim]
    rest = [p for i, p in enumerate(x.placements) if i not in sharded]
    if len(sharded) != 1 or not all(isinstance(p, Replicate) for p in rest):
        raise ValueError(f"{name}: a DTensor with placements {tuple(x.placements)}: expected Shard({dim}) over "
                         "one mesh dimension (the vocabulary) and Replicate() over any other")
    return sharded[0]


class _Layout:
    """This rank's vocabulary shard of a DTensor `x` sharded along `dim` (the vocabulary) over a mesh dim."""

    def __init__(self, x, dim, name):
        self.mesh, self.mesh_dim = x.device_mesh, _mesh_dim(x, dim, name)
        self.V = x.shape[dim]
        world = self.mesh.size(self.mesh_dim)
        rank = self.mesh.get_local_rank(self.mesh_dim)
        self.widths = shard_widths(self.V, world)
        if min(self.widths) < 1:
            raise ValueError(f"{name}.shape={tuple(x.shape)}: a vocabulary of {self.V} over {world} ranks leaves "
                             "a rank without columns: expected at least one column per rank")
        self.start, self.width = sum(self.widths[:rank]), self.widths[rank]
        self.group = ShardLayout(self.mesh.get_group(self.mesh_dim), self.widths)

    def local(self, x, dim, name):
        """This rank's part along `dim` of x: its shard of a DTensor sharded like the student, its slice of
        a replicated (DTensor or plain) tensor (fewer entries, or none, past the end of a shorter one)."""
        if x is None:
            return None
        if is_dtensor(x):
            from torch.distributed.tensor import Replicate
            if not all(isinstance(p, Replicate) for p in x.placements):  # sharded: like the student, or refused
                if x.device_mesh != self.mesh or x.shape[dim] != self.V or _mesh_dim(x, dim, name) != self.mesh_dim:
                    raise ValueError(f"{name}: a DTensor of shape {tuple(x.shape)} and placements "
                                     f"{tuple(x.placements)}: expected the student's vocabulary sharding "
                                     f"(V = {self.V} over mesh dimension {self.mesh_dim}), or a replicated "
                                     "tensor")
                return x.to_local()
            x = _replicated(x, name)
        start = min(self.start, x.shape[dim])  # past a truncated reference's end: no column at all
        return x.narrow(dim, start, min(self.start + self.width, x.shape[dim]) - start)


def _replicated(x, name):
    """The local tensor of a replicated DTensor (its gradient a Replicate one), x itself otherwise."""
    if not is_dtensor(x):
        return x
    from torch.distributed.tensor import Replicate
    if not all(isinstance(p, Replicate) for p in x.placements):
        raise ValueError(f"{name}: a DTensor with placements {tuple(x.placements)}: expected a replicated "
                         "tensor (Replicate() on every mesh dimension) or a plain one, the same on every rank")
    return x.to_local()


def _no_group(args, what):
    if args["process_group"] is not None:
        raise ValueError(f"process_group={args['process_group']!r} with a DTensor {what}: the mesh gives the "
                         "group; expected process_group=None")


def _common(args, layout):
    new = dict(args, process_group=layout.group)
    for name in REPLICATED:
        if name in new:
            new[name] = _replicated(new[name], name)
    if new.get("ref_topk") is not None:
        new["ref_topk"] = tuple(_replicated(x, "ref_topk") for x in new["ref_topk"])
    return new


def logits_call(fn, args):
    """hrm_loss's call with DTensor logits, as the vocabulary-parallel call on local shards; None otherwise."""
    logits = args["logits"]
    if not is_dtensor(logits):
        return None
    _no_group(args, "logits")
    layout = _Layout(logits, -1, "logits")
    new = _common(args, layout)
    new["logits"] = logits.to_local()
    new["ref_logits"] = layout.local(args["ref_logits"], -1, "ref_logits")
    return fn(**new)


def linear_call(fn, args):
    """linear_hrm_loss's call with a DTensor weight (not FSDP2's), vocabulary-parallel; None otherwise."""
    weight = args["weight"]
    if not is_dtensor(weight):
        return None
    _no_group(args, "weight")
    layout = _Layout(weight, 0, "weight")
    new = _common(args, layout)
    new["weight"] = weight.to_local()
    for name, dim in (("bias", 0), ("ref_weight", 0), ("ref_bias", 0), ("ref_logits", -1)):
        new[name] = layout.local(args[name], dim, name)
    return fn(**new)

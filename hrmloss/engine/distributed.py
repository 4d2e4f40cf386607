"""Vocabulary-parallel loss: merge the per-shard row statistics of the core passes over a process group.

With a tensor-parallel output layer, rank r of a group of W ranks holds the logits of the contiguous
vocabulary shard [r V_l, (r+1) V_l) (equal shards of V_l columns, global vocabulary V = W V_l; a DTensor's
shards may be unequal: ShardLayout) and the labels, with global ids, are the same on every rank. Each rank
runs the core passes on its shard; the shard statistics combine exactly (notation of hrmloss/kernels,
shards r = 0..W-1):

    lse      = log sum_r exp(lse_r)                          for lse_s, lse_u, lse_w
    E_p[w-u] = sum_r exp(lse_w,r - lse_w) E_p,r[w-u]          E_p,r: the expectation under the shard's
    E_q[u-w] = sum_r exp(lse_u,r - lse_u) E_q,r[u-w]                 own softmax (its partial stats)
    s[y]     = sum_r s_r[y]                                   (only the owner's is non-zero)
    sum_j s_j = sum_r of the shard sums                       (label smoothing)
    KL(p||m), KL(q||m) = sum_r of the shard sums              (JSD second pass, given the merged lse)

Collectives per forward call, all `all_reduce` on tensors of the logits' device, N = rows:

    1. check: SUM of a (W, 1 + len(AGREED)) int64 matrix, row r rank r's status word and what must agree
       (V_l, N, checksums of the labels, ids and token weights, the options' bit patterns; vocab_shard)
    2. stats: MAX of (N, 4) fp32, the shard lse (a stable reference for the exponentials)
    3. stats: SUM of (N, 8) fp32, the rescaled sums, s[y], sum_j s_j and the weighted expectations
    4. (kl="jsd" only) SUM of (N, 2) fp32, the JSD partial sums
       (a sparse teacher, ref_topk, instead) SUM of (N, K) fp32: the student's logit at each top-k id,
       from the shard that owns it (0 elsewhere); lse_rest, the student's mass off the ids, merges as lse

so 3 (forward, reverse) or 4 (jsd, top-k) collectives of at most max(8, K) N floats, never the logits.
With ref_vocab="truncate", each rank's ref_logits hold the reference's columns for the global ids of its
own shard (the last shards fewer columns, at least one, when the reference's vocabulary is smaller). The backward pass
reads the merged statistics saved by the forward and needs no communication: each rank writes the
gradient of its own shard.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

from .layout import PARAMS
from .options import OPTION_NAMES
from .stats import merge_partial


class ShardLayout(NamedTuple):
    """A vocabulary split into shards of known, possibly unequal widths (a DTensor's `Shard` of V columns
    over W ranks: widths ceil(V / W) but the last ones, hrmloss/engine/tensor_parallel.py). Passed as
    `process_group` by the DTensor entry points; plain tensors mean equal shards."""

    group: object
    widths: tuple


class VocabShard:
    """This rank's place in a vocabulary-parallel group, and the merges of the core statistics over it.

    Built by `vocab_shard`, which checks that the ranks agree. `widths` are the columns of every rank's
    shard (equal for plain tensors); `vocab_start` = sum(widths[:rank]) is the first global id of this
    rank's shard, `vocab_size` = sum(widths) the global vocabulary.
    """

    def __init__(self, group, rank, world, widths):
        self.group, self.rank, self.world, self.widths = group, rank, world, tuple(widths)
        self.v_local = self.widths[rank]

    @property
    def vocab_start(self):
        return sum(self.widths[:self.rank])

    @property
    def vocab_size(self):
        return sum(self.widths)

    def merge_stats(self, partial):
        """(N, PARTIAL) statistics of this shard -> (N, PARTIAL) of the whole vocabulary (2 all_reduce).

        Each column merges by its rule in layout.PARTIAL_MERGE. Rows whose every shard is empty (all
        -inf) get lse = -inf and expectations 0, like one process.
        """
        def all_reduce(op):
            def reduce(x):
                dist.all_reduce(x, op=op, group=self.group)
                return x
            return reduce
        return merge_partial(partial, all_reduce(dist.ReduceOp.MAX), all_reduce(dist.ReduceOp.SUM))

    def merge_sums(self, x):
        """(N, k) per-shard sums -> the sums over the whole vocabulary (1 all_reduce, in place)."""
        x = x.contiguous()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x


def global_vocab(process_group, v_local):
    """The whole vocabulary of a vocabulary-parallel call whose shard has v_local columns."""
    if isinstance(process_group, ShardLayout):
        return sum(process_group.widths)
    return v_local * check_group(process_group)[1]


def check_group(process_group):
    """(rank, world size) of this process in `process_group` (or a ShardLayout's group); TypeError /
    ValueError when it is unusable."""
    if isinstance(process_group, ShardLayout):
        process_group = process_group.group
    if not dist.is_available():
        raise ValueError(f"process_group={process_group!r}: this build of torch has no torch.distributed")
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group={process_group!r}: expected a torch.distributed.ProcessGroup "
                        f"or None, got {type(process_group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"process_group={process_group!r}: torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first, or pass process_group=None")
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    if rank < 0:
        raise ValueError(f"process_group={process_group!r}: this process is not a member of the group")
    return rank, world


# What every rank must agree on, one int64 word each (the bit patterns of float64 values): the columns of
# the agreement matrix after its first column, the status word (0, or 1 + the index of the rejected argument)
AGREED = ("V_local", "rows", "labels", "structure") + tuple(PARAMS) + ("num_items", "ref_topk", "token_weights")
WHAT = {
    "V_local": "the vocabulary shard width V_local = logits.shape[-1]",
    "V": "the whole vocabulary V of the DTensors' shards",
    "rows": "the number of label rows, labels.numel()",
    "labels": "the labels, which must be the same on every rank (checksum sum_i (i+1) labels[i])",
    "structure": "the options kl, reduction, ignore_index, topk_mode, whether softcap is given and which values "
                 "are tensors",
    "ref_topk": "the ref_topk indices, which must be the same on every rank",
    "token_weights": "the token_weights, which must be the same on every rank",
}
# the arguments whose rejection on one rank the others are told of (by index); others: "an argument"
ARGUMENTS = ("logits", "ref_logits", "labels", "hidden", "weight", "bias", "ref_hidden", "ref_weight", "ref_bias",
             "ref_topk", "token_weights", "num_items", "return_components", "check_finite", "chunk_size",
             "chunk_bytes", "grad_acc_dtype", "inplace_backward", "process_group") + tuple(OPTION_NAMES)


class GroupError(ValueError):
    """A ValueError that every rank of the group raises alike (after the agreement collective)."""


def _checksum(x):
    """sum_i (i + 1) x_i in int64 over the flat integers x (wrapping identically everywhere): differs when
    values differ, or their order; one elementwise pass."""
    x = x.reshape(-1).long()
    return (x * torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.int64)).sum()


def _bits(value, device):
    """The float64 bit pattern of a number, a 0-dim tensor (no host sync) or None (a NaN's), as int64."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    value = float("nan") if value is None else (value.detach() if isinstance(value, torch.Tensor) else value)
    return ((zero + value) + 0.0).view(torch.int64)  # + 0.0: -0.0 is 0.0


def agreement_row(call, labels, v_agreed, topk=None, weights=None):
    """This rank's (len(AGREED),) int64 words of what the ranks must agree on, on labels' device."""
    import zlib
    device = labels.device
    st = call.st._replace(cut=False, inplace=False)  # a cut reference may differ by rank (truncate)
    structure = zlib.crc32(repr((tuple(st), call.opts.kl, call.opts.reduction, call.opts.topk_mode)).encode())
    words = [torch.tensor([v_agreed, labels.numel(), 0, structure], dtype=torch.int64, device=device)]
    words.append(call.params.double().view(torch.int64))
    words.append(_bits(call.num_items, device).reshape(1))
    for x in (None if topk is None else topk.ids, None if weights is None else weights.float().view(torch.int32)):
        words.append((torch.zeros((), dtype=torch.int64, device=device) if x is None else _checksum(x)).reshape(1))
    row = torch.cat(words)
    row[2] = _checksum(labels)
    return row


def failure_code(error):
    """The status word of a rank whose arguments were rejected by `error` (its message starts with the name)."""
    import re
    name = re.match(r"[A-Za-z_]*", str(error)).group(0)
    return 1 + (ARGUMENTS.index(name) if name in ARGUMENTS else len(ARGUMENTS))


def vocab_shard(process_group, v_local, labels, call=None, topk=None, weights=None, failure=None, device=None):
    """Check that the ranks of `process_group` agree, and return this rank's `VocabShard`.

    Args:
        process_group: an initialised `torch.distributed.ProcessGroup` (e.g. `dist.group.WORLD`, the
            tensor-parallel group, or `device_mesh.get_group(dim)`), or a `ShardLayout` of one (DTensors).
        v_local: the vocabulary columns of this rank's logits shard.
        labels: (N,) flat int labels of this rank, global ids; must be the same on every rank.
        call, topk, weights: the front end's Call, sparse teacher and token weights, whose values must agree.
        failure: None, or the error that rejected this rank's arguments: it still joins the collective (so
            that no rank waits for it), with a status word naming the argument, and raises it after.
        device: the collective's device when labels is not a tensor (a rejected call).

    One all_reduce (SUM) of a (W, 1 + len(AGREED)) int64 matrix, row r rank r's status word and words
    (V_l, or V for a ShardLayout; N; a checksum of the labels; the options' structure; the bit patterns of
    the values; checksums of the sparse teacher's ids and of the token weights), so every rank sees every
    rank's row. On CPU tensors a rejected rank or a disagreement raises the same ValueError on every rank
    (naming the argument and the rank), so none is left waiting in a later collective; on CUDA it is a
    device-side assert on the other ranks (no host synchronisation is added) and the rejected rank raises
    its own error.
    """
    rank, world = check_group(process_group)
    widths, v_agreed, v_name = (v_local,) * world, v_local, "V_local"
    if isinstance(process_group, ShardLayout):  # a DTensor's shards: the ranks agree on the whole vocabulary
        process_group, widths = process_group.group, process_group.widths
        v_agreed, v_name = sum(widths), "V"
    device = labels.device if failure is None else device
    matrix = torch.zeros(world, 1 + len(AGREED), dtype=torch.int64, device=device)
    if failure is None:
        matrix[rank, 1:] = agreement_row(call, labels, v_agreed, topk, weights)
    else:
        matrix[rank, 0] = failure_code(failure)
    dist.all_reduce(matrix, op=dist.ReduceOp.SUM, group=process_group)
    status, words = matrix[:, 0], matrix[:, 1:]
    same = (words == words[:1]).all(0)
    names = [v_name if a == "V_local" else a for a in AGREED]
    if device.type == "cuda":
        if failure is not None:
            raise failure
        torch._assert_async((status == 0).all(), "process_group: another rank rejected its arguments")
        for k, name in enumerate(names):
            torch._assert_async(same[k], f"process_group: ranks disagree on {WHAT.get(name, name)}")
    else:
        _raise_on_cpu(status.tolist(), words, same.tolist(), names, world, failure)
    return VocabShard(process_group, rank, world, widths)


def _raise_on_cpu(status, words, same, names, world, failure):
    """The same ValueError on every rank of a CPU group: the first rejected rank, else the first disagreement."""
    bad = [r for r, code in enumerate(status) if code]
    if bad:
        r = bad[0]
        code = status[r] - 1
        name = ARGUMENTS[code] if code < len(ARGUMENTS) else "an argument"
        raise GroupError(f"process_group: rank {r} of {world} rejected {name}, so no rank computes the loss "
                         f"(ranks that rejected an argument: {bad}; the rank's own error is this one's cause)"
                         ) from failure
    for k, name in enumerate(names):
        if not same[k]:
            values = words[:, k].tolist()
            if name in PARAMS or name == "num_items":  # show the float values of the bit patterns
                values = words[:, k].view(torch.float64).tolist()
            odd = [r for r, v in enumerate(values) if v != values[0]]
            raise GroupError(f"process_group: ranks disagree on {WHAT.get(name, name)}: {values[0]} on rank 0, "
                             f"{values[odd[0]]} on rank {odd[0]} of {world} (every rank's: {values})")

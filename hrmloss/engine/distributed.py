"""Vocabulary-parallel loss: merge the per-shard row statistics of the core passes over a process group.

With a tensor-parallel output layer, rank r of a group of W ranks holds the logits of the contiguous
vocabulary shard [r V_l, (r+1) V_l) (equal shards of V_l columns, global vocabulary V = W V_l) and the
labels, with global ids, are the same on every rank. Each rank runs the core passes on its shard; the
shard statistics combine exactly (notation of hrmloss/kernels, shards r = 0..W-1):

    lse      = log sum_r exp(lse_r)                          for lse_s, lse_u, lse_w
    E_p[w-u] = sum_r exp(lse_w,r - lse_w) E_p,r[w-u]          E_p,r: the expectation under the shard's
    E_q[u-w] = sum_r exp(lse_u,r - lse_u) E_q,r[u-w]                 own softmax (its partial stats)
    s[y]     = sum_r s_r[y]                                   (only the owner's is non-zero)
    sum_j s_j = sum_r of the shard sums                       (label smoothing)
    KL(p||m), KL(q||m) = sum_r of the shard sums              (JSD second pass, given the merged lse)

Collectives per forward call, all `all_reduce` on tensors of the logits' device, N = rows:

    1. check: MAX of 6 int64, [V_l, -V_l, N, -N, c, -c] (c a checksum of the labels)
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

from .stats import merge_partial


def _labels_checksum(labels):
    # sum_i (i + 1) * y_i in int64 (wrapping identically everywhere): differs when labels differ in
    # value or in order across ranks, at the cost of one elementwise pass over N integers
    weights = torch.arange(1, labels.numel() + 1, device=labels.device, dtype=torch.int64)
    return (labels.long() * weights).sum()


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


def vocab_shard(process_group, v_local, labels):
    """Check that the ranks of `process_group` agree, and return this rank's `VocabShard`.

    Args:
        process_group: an initialised `torch.distributed.ProcessGroup` (e.g. `dist.group.WORLD`, the
            tensor-parallel group, or `device_mesh.get_group(dim)`), or a `ShardLayout` of one (DTensors).
        v_local: the vocabulary columns of this rank's logits shard.
        labels: (N,) flat int labels of this rank, global ids; must be the same on every rank.

    One all_reduce (MAX of [V_l, -V_l, N, -N, c, -c]) compares V_l (V for a ShardLayout), the row count N and a checksum c of
    the labels across ranks. On CPU tensors a disagreement raises ValueError on every rank (every rank
    sees the same reduced values, so none is left waiting in a later collective); on CUDA it is a
    device-side assert, so that no host synchronisation is added.
    """
    rank, world = check_group(process_group)
    widths, v_agreed = (v_local,) * world, v_local
    if isinstance(process_group, ShardLayout):  # a DTensor's shards: the ranks agree on the whole vocabulary
        process_group, widths = process_group.group, process_group.widths
        v_agreed = sum(widths)
    n, c = labels.numel(), _labels_checksum(labels)
    sizes = torch.tensor([v_agreed, -v_agreed, n, -n], dtype=torch.int64, device=labels.device)
    agreed = torch.cat((sizes, torch.stack((c, -c))))
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=process_group)
    same = agreed[0::2] == -agreed[1::2]                     # max == min for V_l, N and the checksum
    what = ("the vocabulary shard width V_local = logits.shape[-1]" if v_agreed == v_local else
            "the whole vocabulary V of the DTensors' shards",
            "the number of label rows, labels.numel()",
            "the labels, which must be the same on every rank (checksum sum_i (i+1) labels[i])")
    if labels.device.type == "cuda":
        for k in range(3):
            torch._assert_async(same[k], f"process_group: ranks disagree on {what[k]}")
    else:
        for k in range(3):
            if not bool(same[k]):
                raise ValueError(
                    f"process_group: ranks disagree on {what[k]}: {(v_agreed, n, int(c))[k]} on rank "
                    f"{rank} of {world}, values from {-int(agreed[2 * k + 1])} to {int(agreed[2 * k])} "
                    "across the group")
    return VocabShard(process_group, rank, world, widths)

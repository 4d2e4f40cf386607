"""The loss engine: everything between the public functions (hrmloss/loss.py, linear.py) and the passes.
Internal: names here may change between versions; the public API is what `hrmloss` exports.

One way down (docs/design.md §3):

    frontend.py      prepare(): every argument check, the options, the backend, the shard -> a Prepared
                     call; finish(): the reduction and the output. checks.py holds the argument checks.
    options.py       LossOptions (values and structure), Structure, the params tensor, value ranges
    layout.py        the named columns of every statistic, the runtime scalars and the divergence kinds
    autograd.py      HRMLossFunction: forward_rows / grad_rows over the custom ops (ctx handling only)
    ops.py           the passes as torch.library custom ops, with the data checks
    backends.py      the registry: "torch" (torch_passes.py, torch_compiled.py), "triton" (hrmloss/kernels)
    stats.py         merging partial row statistics and finalising them into ce, kl, z and the loss
    maths.py         the guarded elementwise maths and the soft cap the torch passes share
    sparse.py        a sparse (top-k) teacher's O(N K) divergence and gradient terms
    chunked.py       the fused projection's chunks: chunk policy, weight-gradient GEMMs, buffers
    distributed.py   the vocabulary-parallel merges over a process group
"""

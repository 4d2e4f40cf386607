"""Triton kernels for the fused loss  loss_i = ce_i + hrm * kl_i  (the maths: docs/design.md §1-2): the
"triton" backend. One family of three passes, a file each, their shared helpers, and the launcher:

    stats.py    `_hrm_stats_kernel`: read s, t once; the partial row statistics (layout.PARTIAL)
    jsd.py      `_hrm_jsd_kernel`: read s, t once more (kl="jsd" only); KL(p||m), KL(q||m) (layout.JSD)
    grad.py     `_hrm_grad_kernel`: read s, t, write ds (and dt), from the final statistics (layout.FINAL)
    common.py   constants and the `@triton.jit` helpers every pass shares
    launch.py   the launchers (the `Backend` protocol of hrmloss/engine/backends.py): allocate, choose block
                sizes, warps and the vocabulary split, launch by keyword

A program handles one row (token) and one range of its vocabulary (the whole row unless the launcher
splits the vocabulary over a second grid axis), streamed in blocks of BLOCK_V. Notation, per row:

    s  student logits (soft-capped first when asked: s <- c tanh(s / c)),
       u = s / T,  q = softmax(u)     (q1 = softmax(s) for the CE term)
    t  reference logits, w = t / T,  p = softmax(w)
    lse_s = logsumexp(s), lse_u = logsumexp(u), lse_w = logsumexp(w)

With the partial statistics of the whole vocabulary (merged over split rows or shards,
hrmloss/engine/stats.py):
    ce = (1 - eps) (lse_s - s[y]) + eps (lse_s - sum_s / V),    (label smoothing eps)
    KL(p||q) = ep - lse_w + lse_u,  KL(q||p) = eq - lse_u + lse_w,  z = z_loss lse_s^2.

Column layouts and the runtime scalars (PARAMS: hrm, temperature, beta, label_smoothing, z_loss, softcap,
ce_weight, read from one small fp32 tensor) are named in hrmloss/engine/layout.py; common.py's constants are their
indices. Constexprs select structure only, never a value.

Instruction budget (docs/performance.md): the two reading passes keep every running statistic per thread
(a [BLOCK_V // ELEMS, ELEMS] tile whose rows are one thread's 16-byte loads) and reduce across the block
once per row. Exponentials are exp2 with log2(e) folded into the scale, e^((x - m) / T) = 2^(c (x - m))
with c = log2(e) / T: one FADD, one FMUL and one MUFU.EX2 per element and distribution.
tests/aot_compile.py counts the result.

Traffic (NVs = bytes of one logits tensor): stats 2 (s and t once), grad 3 (s, t, ds), JSD +2; a sparse
teacher: stats 1, grad 2, plus O(K) a row. Rows whose label is ignore_index read nothing and get a zero
gradient. -inf logits are legal: probability 0, gradient 0; a p > 0 facing q = 0 (or the reverse) gives +inf.

Nothing here is imported by `import hrmloss`: the backend registry imports launch.py when the "triton"
backend is first used.
"""

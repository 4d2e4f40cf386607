"""The named layouts shared by the kernels, the torch path, the finaliser and the vocabulary-parallel merge.

Every per-row statistic and every runtime scalar has one name here; readers index by name
(`PARTIAL.lse_s`, `FINAL.kl_p`, `PARAMS.hrm`, `KINDS.jsd`), never by a bare column number. Pure Python (no torch, no
triton), so that kernels/ can import it too. docs/design.md §2 gives the maths behind each column.
"""


class Layout(tuple):
    """A tuple of column names whose attributes are their indices: `Layout(("a", "b")).b == 1`."""

    def __getattr__(self, name):
        try:
            return self.index(name)
        except ValueError:
            raise AttributeError(f"no column {name!r} in {tuple(self)}") from None

    def unbind(self, x):
        """dict name -> x[:, column] of a (N, len(self)) tensor."""
        return dict(zip(self, x.unbind(1)))


# Partial row statistics: what one pass over (a shard of) the vocabulary yields, per row, fp32.
#   lse_s = logsumexp(s)          s_y = s[y] (0 unless this shard owns the label)
#   lse_u = logsumexp(u = s / T)  lse_w = logsumexp(w = t / T)
#   ep = E_p[w - u]               eq = E_q[u - w]          sum_s = sum_j s_j (label smoothing)
#   lse_rest = logsumexp of u over the ids outside the row's top-k ids (a sparse teacher that needs the
#              student's mass off its ids: topk_mode="tail" or kl="jsd"; else lse_u: no id is excluded)
# Without a dense reference (a sparse teacher), lse_w = -inf and ep = eq = 0.
PARTIAL = Layout(("lse_s", "s_y", "lse_u", "lse_w", "ep", "eq", "sum_s", "lse_rest"))

# How each partial column combines over vocabulary shards (the vocabulary-parallel merge):
#   "lse":      log sum_r exp(x_r)
#   "sum":      sum_r x_r
#   ("mean", c): sum_r exp(c_r - c) x_r, an expectation under the softmax whose lse is column c
PARTIAL_MERGE = {"lse_s": "lse", "s_y": "sum", "lse_u": "lse", "lse_w": "lse",
                 "ep": ("mean", "lse_w"), "eq": ("mean", "lse_u"), "sum_s": "sum", "lse_rest": "lse"}

# Final row statistics of the whole vocabulary, saved by the forward for the gradient pass.
#   kl_p = KL(p||q), kl_q = KL(q||p) (forward / reverse);  KL(p||m), KL(q||m) for "jsd"
#   coef = a: without a dense reference (a sparse teacher) the divergence's gradient is
#          d kl / d u = a q + (a correction at the top-k ids, applied outside the pass); 0 otherwise
FINAL = Layout(("lse_s", "lse_u", "lse_w", "kl_p", "kl_q", "coef"))

# The JSD pass's per-row sums: KL(p||m), KL(q||m).
JSD = Layout(("kl_pm", "kl_qm"))

# The divergence kinds (`kl=`), by their index in Structure.kind and the kernels' KIND constexpr:
#   forward KL(p||q), reverse KL(q||p), jsd  beta KL(p||m) + (1 - beta) KL(q||m)
KINDS = Layout(("forward", "reverse", "jsd"))

# Runtime scalars of a call, one small device tensor (LossOptions.params): values, never structure.
# A placeholder stands where an option is off (softcap None).
PARAMS = Layout(("hrm", "temperature", "beta", "label_smoothing", "z_loss", "softcap", "ce_weight"))

"""The plain-PyTorch passes: the same three passes as hrmloss/kernels, chunked over rows.

Its extra memory is a few (chunk, V) fp32 buffers, never N x V beyond the gradient it returns.
The signatures of `backends.Backend`; the math is written out in the kernels and docs/design.md.
Runtime scalars are read from `params` as 0-dim tensors (`layout.PARAMS`), so that a compiled chunk
(torch_compiled.py) treats them as inputs, never as constants.
"""
import torch

from .maths import log_mixture, soft_cap, weigh, xlog_ratio, zero_where
from .rows import acc_dtype
from .stats import disjoint
from .layout import FINAL, JSD, KINDS, PARAMS, PARTIAL

CHUNK_ELEMS = 1 << 20  # elements of one (chunk, V) fp32 temporary: 4 MiB
NEG_INF = float("-inf")
BIG = 1.0e38  # a finite stand-in for an infinite log-ratio multiplied by 0 (the kernels' common.BIG)


def _chunks(s, t):
    """Yield (r0, r1, s[r0:r1], t[r0:r1]) over the flat rows of (B, T, V) views, never crossing b."""
    B, T_rows, V = s.shape
    # traced by torch.compile (see torch_compiled.py), the caller has chunked: one chunk, fused by Inductor
    step = T_rows if torch.compiler.is_compiling() else max(1, CHUNK_ELEMS // max(V, 1))
    for b in range(B):
        for i in range(0, T_rows, step):
            j = min(i + step, T_rows)
            yield b * T_rows + i, b * T_rows + j, s[b, i:j], t[b, i:j]



def _param(params, name):
    return params[getattr(PARAMS, name)]



def _scaled(x, params, st):
    """x / T (x itself on the T = 1 path)."""
    return x / _param(params, "temperature") if st.scaled else x


def _lse_and_mean(x, y):
    """(logsumexp(x), E_softmax(x)[x - y]) over the last dim, as the kernel does (hrmloss/kernels/stats.py):
    the weighted sum is divided by the computed sum of exponentials, so rounding in the normaliser
    cancels; x - y is clamped below at -BIG, the side that only zero weights reach (a difference that
    overflows fp32 meets a weight that underflowed), and terms where x = -inf are 0. An infinite term
    of non-zero weight (y = -inf < x) stays +inf, or NaN where its weight underflowed: both mean +inf.
    An all -inf row gives (-inf, 0)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == NEG_INF, 0.0, m)
    e = torch.exp(x - m)
    a = zero_where(x == NEG_INF, e * torch.clamp(x - y, min=-BIG)).sum(-1)
    d = e.sum(-1)
    mean = torch.where(d == 0, 0.0, a / d)
    return m[:, 0] + torch.log(d), torch.where(mean.isnan() & (d != 0), float("inf"), mean)


def _cut(u, t, st):
    """u = s / T, -inf beyond the reference's V_ref columns when st.cut (ref_vocab="truncate")."""
    if st.cut:
        u = u.clone()
        u[:, t.shape[-1]:] = NEG_INF
    return u


def _ref(tc, V, params):
    """w = t / T in the accumulation dtype, padded with -inf (p = 0) to the student's V columns."""
    w = tc / _param(params, "temperature")
    return torch.nn.functional.pad(w, (0, V - w.shape[-1]), value=NEG_INF) if w.shape[-1] < V else w


def _off_ids(u, ids, vocab_start):
    """u with -inf at the row's top-k ids that fall in this shard (the rest outcome's logits): a copy of
    u padded by one column, where the ids outside the shard land (a scatter Inductor keeps cheap)."""
    local = ids.long() - vocab_start
    V = u.shape[-1]
    padded = torch.nn.functional.pad(u, (0, 1), value=NEG_INF)
    return padded.scatter(1, torch.where((local >= 0) & (local < V), local, V), NEG_INF)[:, :V]


def row_stats(s, t, labels, params, st, vocab_start=0, topk_ids=None):
    """(N, PARTIAL) partial statistics: lse_s, s[y], lse_u, lse_w, E_p[w-u], E_q[u-w], sum_j s_j, lse_rest.

    t: (B, T, V_ref) reference logits (V_ref < V with st.cut), not read without a dense reference;
    topk_ids: (N, K) global top-k ids, read when st.rest."""
    B, T_rows, V = s.shape
    acc = acc_dtype(s)
    out = torch.empty((B * T_rows, len(PARTIAL)), device=s.device, dtype=acc)
    for r0, r1, sc, tc in _chunks(s, t):
        sc = soft_cap(sc.to(acc), params, st)[0]
        u = _cut(_scaled(sc, params, st), tc, st)
        if st.has_ref:
            w = _ref(tc.to(acc), V, params)
            lse_u, eq = _lse_and_mean(u, w)
            lse_w, ep = _lse_and_mean(w, u)
        else:  # (_lse_and_mean's pattern: Inductor fuses it into one pass, torch.logsumexp into more)
            lse_u, eq = _lse_and_mean(u, u)
            lse_w, ep = torch.full_like(lse_u, NEG_INF), eq
        y = labels[r0:r1].long() - vocab_start
        owned = (labels[r0:r1] != st.ignore_index) & (y >= 0) & (y < V)
        s_y = sc.gather(1, torch.where(owned, y, 0)[:, None])[:, 0]
        lse_rest = _lse_and_mean(_off_ids(u, topk_ids[r0:r1], vocab_start), u)[0] if st.rest else lse_u
        columns = {"lse_s": torch.logsumexp(sc, -1) if st.scaled or st.cut else lse_u,
                   "s_y": torch.where(owned, s_y, 0.0), "lse_u": lse_u, "lse_w": lse_w, "ep": ep, "eq": eq,
                   "sum_s": sc.sum(-1), "lse_rest": lse_rest}
        out[r0:r1] = torch.stack([columns[name] for name in PARTIAL], 1)
    return out


def _log_probs(u, w, lse_u, lse_w):
    lq = u - lse_u[:, None]
    lp = w - lse_w[:, None]
    return lq, lp, lq.exp(), lp.exp()




def _divergence_grads(st, beta, lq, lp, q, p, kl_p, kl_q, ref_grad):
    """(d kl / d u, d kl / d w or None): the formulas of hrmloss/kernels; d kl / d w only if ref_grad."""
    kl_p, kl_q = kl_p[:, None], kl_q[:, None]
    if st.kind == KINDS.forward:
        return q - p, (xlog_ratio(p, lp, lq) - p * kl_p) if ref_grad else None
    if st.kind == KINDS.reverse:
        return xlog_ratio(q, lq, lp) - q * kl_q, (p - q) if ref_grad else None
    lm = log_mixture(lq, lp, beta)
    dku = (1 - beta) * (xlog_ratio(q, lq, lm) - q * kl_q)
    return dku, beta * (xlog_ratio(p, lp, lm) - p * kl_p) if ref_grad else None


def jsd_sums(s, t, labels, lse_uw, params, st):
    """(N, JSD) partial sums KL(p||m), KL(q||m) given the final (N, 2) lse_u, lse_w."""
    acc = acc_dtype(s)
    V = s.shape[-1]
    out = torch.empty((lse_uw.shape[0], len(JSD)), device=s.device, dtype=acc)
    for r0, r1, sc, tc in _chunks(s, t):
        sc = soft_cap(sc.to(acc), params, st)[0]
        u, w = _cut(_scaled(sc, params, st), tc, st), _ref(tc.to(acc), V, params)
        lq, lp, q, p = _log_probs(u, w, lse_uw[r0:r1, 0], lse_uw[r0:r1, 1])
        lm = log_mixture(lq, lp, _param(params, "beta"))
        sums = {"kl_pm": xlog_ratio(p, lp, lm).sum(-1), "kl_qm": xlog_ratio(q, lq, lm).sum(-1)}
        out[r0:r1] = torch.stack([sums[name] for name in JSD], 1)
    return out


def grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad=False, topk_ids=None):
    """d loss / d s (B, T, V) in the dtype of s, and d loss / d t (N, V_ref) (or None), scaled per row by g
    (N,) fp32. With st.inplace the gradient of s is written into s itself, chunk by chunk (each chunk is
    read into the accumulation dtype before its gradient overwrites it), and s is returned.

    Without a dense reference the divergence's part is coef * q only (off the top-k ids with st.rest):
    the caller adds the term at the ids (hrmloss/engine/sparse.py)."""
    B, T_rows, V = s.shape
    ds = s if st.inplace else torch.empty((B, T_rows, V), device=s.device, dtype=s.dtype)
    dt = torch.empty((B * T_rows, t.shape[-1]), device=t.device, dtype=t.dtype) if ref_grad else None
    hrm, eps, z_loss, beta, a = (_param(params, k) for k in ("hrm", "label_smoothing", "z_loss", "beta", "ce_weight"))
    c = hrm / _param(params, "temperature")
    acc = acc_dtype(s)
    for r0, r1, sc, tc in _chunks(s, t):
        f = FINAL.unbind(final[r0:r1])
        lse_s = f["lse_s"]
        y = labels[r0:r1]
        live = (y != st.ignore_index) & (g[r0:r1] != 0)
        gl = torch.where(live, g[r0:r1], 0.0)[:, None]
        sc, dcap = soft_cap(sc.to(acc), params, st)
        # 1. cross-entropy with label smoothing eps, weighted by a = ce_weight, and z-loss:
        #    q1 (a + 2 z lse_s) - a (1 - eps) onehot(y) - a eps / V
        d = torch.exp(sc - lse_s[:, None]) * (a + 2 * z_loss * lse_s[:, None]) - a * eps / vocab_size
        y_local = y.long() - vocab_start
        owned = live & (y_local >= 0) & (y_local < V)
        hit = a * (1 - eps) * owned.to(acc)
        d.scatter_add_(1, torch.where(owned, y_local, 0)[:, None], -hit[:, None])
        u = _cut(_scaled(sc, params, st), tc, st)
        if not st.has_ref:
            # 2'. a sparse teacher: the dense part coef * q of d kl / d u
            if not st.hrm_zero:
                q = torch.exp((_off_ids(u, topk_ids[r0:r1], vocab_start) if st.rest else u) - f["lse_u"][:, None])
                d += weigh(c, zero_where(q == 0, f["coef"][:, None] * q))
        elif not st.hrm_zero or ref_grad:
            # 2. divergence; hrm = 0 (c = 0) drops the term, which can be infinite, instead of scaling it
            dku, dkw = _divergence_grads(st, beta, *_log_probs(u, _ref(tc.to(acc), V, params), f["lse_u"],
                                                               f["lse_w"]), f["kl_p"], f["kl_q"], ref_grad)
            # a row where one side has no mass (stats.disjoint): a constant divergence, no gradient
            c_row = torch.where(disjoint(f["lse_u"], f["lse_w"])[:, None], 0.0, c)
            d += weigh(c_row, dku)
            if ref_grad:
                dt[r0:r1] = torch.where(live[:, None], gl * weigh(c_row, dkw[:, :t.shape[-1]]), 0.0)
        # 3. through the soft cap, scale by g; dead rows get zeros
        if dcap is not None:
            d *= dcap
        i = r0 % T_rows
        ds[r0 // T_rows, i:i + r1 - r0] = torch.where(live[:, None], gl * d, 0.0)
    return ds, dt

"""The plain-PyTorch backend: the same three passes as kernels/hrm_loss.py, chunked over rows.

Its extra memory is a few (chunk, V) fp32 buffers, never N x V beyond the gradient it returns.
Same signatures as the Triton launchers in _triton.py; the math is written out there and in the kernels.
"""
import math

import torch

from ._core import N_PARTIAL, acc_dtype

CHUNK_ELEMS = 1 << 20  # elements of one (chunk, V) fp32 temporary: 4 MiB
NEG_INF = float("-inf")


def _chunks(s, t):
    """Yield (r0, r1, s[r0:r1], t[r0:r1]) over the flat rows of (B, T, V) views, never crossing b."""
    B, T_rows, V = s.shape
    # traced by torch.compile (see _torch_compiled.py), the caller has chunked: one chunk, fused by Inductor
    step = T_rows if torch.compiler.is_compiling() else max(1, CHUNK_ELEMS // max(V, 1))
    for b in range(B):
        for i in range(0, T_rows, step):
            j = min(i + step, T_rows)
            yield b * T_rows + i, b * T_rows + j, s[b, i:j], t[b, i:j]


def _zero_where(cond, value):
    # value, with 0 where cond (so 0 * inf or -inf - -inf never becomes NaN)
    return torch.where(cond, torch.zeros((), dtype=value.dtype, device=value.device), value)


def _student(sc, opts):
    """Student chunk in the accumulation dtype, soft-capped when asked, and d s / d s_raw (or None)."""
    if not opts.capped:
        return sc, None
    th = torch.tanh(sc / opts.softcap)
    return opts.softcap * th, 1 - th * th


def _lse_and_mean(x, y):
    """(logsumexp(x), E_softmax(x)[x - y]) over the last dim, as the kernel does: the weighted sum is
    divided by the computed sum of exponentials, so rounding in the normaliser cancels. Terms where
    x = -inf are 0, +inf where y = -inf < x; an all -inf row gives (-inf, 0)."""
    m = x.amax(-1, keepdim=True)
    m = torch.where(m == NEG_INF, 0.0, m)
    e = torch.exp(x - m)
    # +inf wherever y = -inf < x, even where e underflowed to 0 (the true weight is not 0)
    a = _zero_where(x == NEG_INF, torch.where(y == NEG_INF, float("inf"), e * (x - y))).sum(-1)
    d = e.sum(-1)
    return m[:, 0] + torch.log(d), torch.where(d == 0, 0.0, a / d)


def row_stats(s, t, labels, opts, vocab_start=0):
    """(N, 7) fp32 partial statistics: lse_s, s[y], lse_u, lse_w, E_p[w-u], E_q[u-w], sum_j s_j."""
    B, T_rows, V = s.shape
    acc = acc_dtype(s)
    out = torch.empty((B * T_rows, N_PARTIAL), device=s.device, dtype=acc)
    for r0, r1, sc, tc in _chunks(s, t):
        sc, tc = _student(sc.to(acc), opts)[0], tc.to(acc)
        u = sc * opts.inv_temp if opts.scaled else sc
        w = tc * opts.inv_temp
        lse_u, eq = _lse_and_mean(u, w)
        lse_w, ep = _lse_and_mean(w, u)
        lse_s = torch.logsumexp(sc, -1) if opts.scaled else lse_u
        y = labels[r0:r1].long() - vocab_start
        owned = (labels[r0:r1] != opts.ignore_index) & (y >= 0) & (y < V)
        s_y = sc.gather(1, torch.where(owned, y, 0)[:, None])[:, 0]
        out[r0:r1, 0] = lse_s
        out[r0:r1, 1] = torch.where(owned, s_y, 0.0)
        out[r0:r1, 2] = lse_u
        out[r0:r1, 3] = lse_w
        out[r0:r1, 4] = ep
        out[r0:r1, 5] = eq
        out[r0:r1, 6] = sc.sum(-1)
    return out


def _log_probs(sc, tc, lse_u, lse_w, opts):
    u = sc * opts.inv_temp if opts.scaled else sc
    lq = u - lse_u[:, None]
    lp = tc * opts.inv_temp - lse_w[:, None]
    return lq, lp, lq.exp(), lp.exp()


def _xlog_ratio(x, la, lb):
    # x * (la - lb), 0 where x = 0
    return _zero_where(x == 0, x * (la - lb))


def _log_mixture(lq, lp, beta):
    # log(beta p + (1 - beta) q)
    return torch.logaddexp(lp + math.log(beta), lq + math.log(1.0 - beta))


def _divergence_grads(opts, lq, lp, q, p, kl_p, kl_q, ref_grad):
    """(d kl / d u, d kl / d w or None): the formulas of kernels/hrm_loss.py; d kl / d w only if ref_grad."""
    kl_p, kl_q = kl_p[:, None], kl_q[:, None]
    if opts.kl == "forward":
        return q - p, (_xlog_ratio(p, lp, lq) - p * kl_p) if ref_grad else None
    if opts.kl == "reverse":
        return _xlog_ratio(q, lq, lp) - q * kl_q, (p - q) if ref_grad else None
    lm = _log_mixture(lq, lp, opts.beta)
    dku = (1 - opts.beta) * (_xlog_ratio(q, lq, lm) - q * kl_q)
    return dku, opts.beta * (_xlog_ratio(p, lp, lm) - p * kl_p) if ref_grad else None


def jsd_sums(s, t, labels, lse_uw, opts):
    """(N, 2) fp32 partial sums KL(p||m), KL(q||m) given the final (N, 2) lse_u, lse_w."""
    acc = acc_dtype(s)
    out = torch.empty((lse_uw.shape[0], 2), device=s.device, dtype=acc)
    for r0, r1, sc, tc in _chunks(s, t):
        sc = _student(sc.to(acc), opts)[0]
        lq, lp, q, p = _log_probs(sc, tc.to(acc), lse_uw[r0:r1, 0], lse_uw[r0:r1, 1], opts)
        lm = _log_mixture(lq, lp, opts.beta)
        out[r0:r1, 0] = _xlog_ratio(p, lp, lm).sum(-1)
        out[r0:r1, 1] = _xlog_ratio(q, lq, lm).sum(-1)
    return out


def grad(s, t, labels, final, g, opts, vocab_size, vocab_start=0, ref_grad=False):
    """d loss / d s (N, V) in the dtype of s, and d loss / d t (or None), scaled per row by g (N,) fp32."""
    B, T_rows, V = s.shape
    ds = torch.empty((B * T_rows, V), device=s.device, dtype=s.dtype)
    dt = torch.empty((B * T_rows, V), device=t.device, dtype=t.dtype) if ref_grad else None
    c = opts.hrm * opts.inv_temp
    acc = acc_dtype(s)
    for r0, r1, sc, tc in _chunks(s, t):
        lse_s, lse_u, lse_w, kl_p, kl_q = final[r0:r1].unbind(1)
        y = labels[r0:r1]
        live = (y != opts.ignore_index) & (g[r0:r1] != 0)
        gl = torch.where(live, g[r0:r1], 0.0)[:, None]
        sc, dcap = _student(sc.to(acc), opts)
        # 1. cross-entropy with label smoothing eps, and z-loss:
        #    q1 (1 + 2 z lse_s) - (1 - eps) onehot(y) - eps / V
        d = torch.exp(sc - lse_s[:, None])
        if opts.z_loss:
            d *= 1 + 2 * opts.z_loss * lse_s[:, None]
        if opts.label_smoothing:
            d -= opts.label_smoothing / vocab_size
        y_local = y.long() - vocab_start
        owned = live & (y_local >= 0) & (y_local < V)
        hit = (1 - opts.label_smoothing) * owned.to(acc)
        d.scatter_add_(1, torch.where(owned, y_local, 0)[:, None], -hit[:, None])
        if opts.hrm != 0 or ref_grad:
            # 2. divergence
            dku, dkw = _divergence_grads(opts, *_log_probs(sc, tc.to(acc), lse_u, lse_w, opts), kl_p, kl_q,
                                         ref_grad)
            d.add_(dku, alpha=c)
            if ref_grad:
                dt[r0:r1] = torch.where(live[:, None], gl * c * dkw, 0.0)
        # 3. through the soft cap, scale by g; dead rows get zeros
        if dcap is not None:
            d *= dcap
        ds[r0:r1] = torch.where(live[:, None], gl * d, 0.0)
    return ds, dt

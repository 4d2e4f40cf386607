"""The plain-PyTorch backend: the same three passes as kernels/hrm_loss.py, chunked over rows.

Its extra memory is a few (chunk, V) fp32 buffers, never N x V beyond the gradient it returns.
Same signatures as the Triton launchers in _triton.py; the math is written out there and in the kernels.
"""
import torch

from ._core import N_PARTIAL

CHUNK_ELEMS = 1 << 21  # elements of one (chunk, V) fp32 temporary: 8 MiB


def _chunks(s, t):
    """Yield (r0, r1, s[r0:r1], t[r0:r1]) over the flat rows of (B, T, V) views, never crossing b."""
    B, T_rows, V = s.shape
    # traced by torch.compile (see _torch_compiled.py), the caller has chunked: one chunk, fused by Inductor
    step = T_rows if torch.compiler.is_compiling() else max(1, CHUNK_ELEMS // max(V, 1))
    for b in range(B):
        for i in range(0, T_rows, step):
            j = min(i + step, T_rows)
            yield b * T_rows + i, b * T_rows + j, s[b, i:j], t[b, i:j]


def _where_x(x, value, zero_at):
    # value, but 0 where the weight x is 0 (so 0 * inf or -inf - -inf never becomes NaN)
    return torch.where(zero_at, torch.zeros((), dtype=value.dtype, device=value.device), value)


def _expectation(lse, a, b):
    """E_softmax(a)[a - b] over the last dim; 0 terms where a = -inf, +inf where b = -inf < a."""
    prob = torch.exp(a - lse[:, None])
    diff = torch.where(b == float("-inf"), float("inf"), a - b)
    return _where_x(prob, prob * diff, a == float("-inf")).sum(-1)


def row_stats(s, t, labels, opts, vocab_start=0):
    """(N, 6) fp32 partial statistics: lse_s, s[y], lse_u, lse_w, E_p[w-u], E_q[u-w]."""
    B, T_rows, V = s.shape
    out = torch.empty((B * T_rows, N_PARTIAL), device=s.device, dtype=torch.float32)
    for r0, r1, sc, tc in _chunks(s, t):
        sc, tc = sc.float(), tc.float()
        lse_s = torch.logsumexp(sc, -1)
        u = sc * opts.inv_temp if opts.scaled else sc
        w = tc * opts.inv_temp
        lse_u = torch.logsumexp(u, -1) if opts.scaled else lse_s
        lse_w = torch.logsumexp(w, -1)
        y = labels[r0:r1].long() - vocab_start
        owned = (labels[r0:r1] != opts.ignore_index) & (y >= 0) & (y < V)
        s_y = sc.gather(1, torch.where(owned, y, 0)[:, None])[:, 0]
        out[r0:r1, 0] = lse_s
        out[r0:r1, 1] = torch.where(owned, s_y, 0.0)
        out[r0:r1, 2] = lse_u
        out[r0:r1, 3] = lse_w
        out[r0:r1, 4] = _expectation(lse_w, w, u)
        out[r0:r1, 5] = _expectation(lse_u, u, w)
    return out


def _log_probs(sc, tc, lse_u, lse_w, opts):
    u = sc * opts.inv_temp if opts.scaled else sc
    lq = u - lse_u[:, None]
    lp = tc * opts.inv_temp - lse_w[:, None]
    return lq, lp, lq.exp(), lp.exp()


def _xlog_ratio(x, la, lb):
    # x * (la - lb), 0 where x = 0
    return _where_x(x, x * (la - lb), x == 0)


def _log_mixture(lq, lp, beta):
    # log(beta p + (1 - beta) q)
    return torch.logaddexp(lp + torch.log(torch.tensor(beta)), lq + torch.log(torch.tensor(1.0 - beta)))


def jsd_sums(s, t, labels, lse_uw, opts):
    """(N, 2) fp32 partial sums KL(p||m), KL(q||m) given the final (N, 2) lse_u, lse_w."""
    out = torch.empty((lse_uw.shape[0], 2), device=s.device, dtype=torch.float32)
    for r0, r1, sc, tc in _chunks(s, t):
        lq, lp, q, p = _log_probs(sc.float(), tc.float(), lse_uw[r0:r1, 0], lse_uw[r0:r1, 1], opts)
        lm = _log_mixture(lq, lp, opts.beta)
        out[r0:r1, 0] = _xlog_ratio(p, lp, lm).sum(-1)
        out[r0:r1, 1] = _xlog_ratio(q, lq, lm).sum(-1)
    return out


def grad(s, t, labels, final, g, opts, vocab_start=0, ref_grad=False):
    """d loss / d s (N, V) in the dtype of s, and d loss / d t (or None), scaled per row by g (N,) fp32."""
    B, T_rows, V = s.shape
    ds = torch.empty((B * T_rows, V), device=s.device, dtype=s.dtype)
    dt = torch.empty((B * T_rows, V), device=t.device, dtype=t.dtype) if ref_grad else None
    c = opts.hrm * opts.inv_temp
    for r0, r1, sc, tc in _chunks(s, t):
        lse_s, lse_u, lse_w, kl_p, kl_q = final[r0:r1].unbind(1)
        y = labels[r0:r1]
        live = (y != opts.ignore_index) & (g[r0:r1] != 0)
        gl = torch.where(live, g[r0:r1], 0.0)[:, None]
        sc = sc.float()
        # 1. cross-entropy: q1 - onehot(y)
        d = torch.exp(sc - lse_s[:, None])
        y_local = y.long() - vocab_start
        owned = live & (y_local >= 0) & (y_local < V)
        d.scatter_add_(1, torch.where(owned, y_local, 0)[:, None], -owned.float()[:, None])
        if opts.hrm != 0 or ref_grad:
            lq, lp, q, p = _log_probs(sc, tc.float(), lse_u, lse_w, opts)
            # 2. divergence (kernels/hrm_loss.py gives the formulas)
            if opts.kl == "forward":
                dku = q - p
                dkw = _xlog_ratio(p, lp, lq) - p * kl_p[:, None]
            elif opts.kl == "reverse":
                dku = _xlog_ratio(q, lq, lp) - q * kl_q[:, None]
                dkw = p - q
            else:
                lm = _log_mixture(lq, lp, opts.beta)
                dku = (1 - opts.beta) * (_xlog_ratio(q, lq, lm) - q * kl_q[:, None])
                dkw = opts.beta * (_xlog_ratio(p, lp, lm) - p * kl_p[:, None])
            d += c * dku
            if ref_grad:
                dt[r0:r1] = torch.where(live[:, None], gl * c * dkw, 0.0)
        # 3. scale by g; dead rows get zeros
        ds[r0:r1] = torch.where(live[:, None], gl * d, 0.0)
    return ds, dt

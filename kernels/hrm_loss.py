"""Triton kernels for the fused loss  loss_i = ce_i + hrm * kl_i  (the maths: docs/design.md §1-2).

One program handles one row (token) and streams its vocabulary in blocks of BLOCK_V. Notation, per row:

    s  student logits (soft-capped first when asked: s <- c tanh(s / c)),
       u = s / T,  q = softmax(u)     (q1 = softmax(s) for the CE term)
    t  reference logits, w = t / T,  p = softmax(w)
    lse_s = logsumexp(s), lse_u = logsumexp(u), lse_w = logsumexp(w)

Three kernels, one family:

Column layouts (PARTIAL, FINAL, JSD) and the runtime scalars (PARAMS: hrm, temperature, beta,
label_smoothing, z_loss, softcap, read from one small fp32 tensor) are named in hrmloss/_layout.py; the
constants below are their indices. Constexprs select structure only, never a value.

1. `_hrm_stats_kernel` (read s, t once; write 7 floats a row): the *partial* row statistics
       lse_s, s[y], lse_u, lse_w, ep = E_p[w - u], eq = E_q[u - w], sum_s = sum_j s_j
   from online max / sum-exp with running rescaling. They are combinable over vocabulary shards
   (lse by logsumexp, the expectations weighted by exp(lse_shard - lse), s[y] and sum_s by sum),
   which is what the vocabulary-parallel path merges before finalising. With them
       ce = (1 - eps) (lse_s - s[y]) + eps (lse_s - sum_s / V)     (label smoothing eps)
       KL(p||q) = ep - lse_w + lse_u,  KL(q||p) = eq - lse_u + lse_w,  z = z_loss lse_s^2.
2. `_hrm_jsd_kernel` (read s, t once more; JSD only): with the final lse_u, lse_w and
   m = beta p + (1 - beta) q, the sums  kpm = KL(p||m),  kqm = KL(q||m);
   JSD = beta kpm + (1 - beta) kqm.  Needs both normalisers first, hence the second pass.
3. `_hrm_grad_kernel` (read s, t, write ds [and dt]): the gradient, scaled per row by g_i
   (grad_output times the reduction's factor, 0 for ignored rows):
       ds = g * ((q1 (1 + 2 z_loss lse_s) - (1 - eps) onehot(y) - eps / V) + hrm / T * dkl/du) * dcap
       dt = g * hrm / T * dkl/dw            (dcap = 1 - tanh^2(s_raw / c) with a soft cap, else 1)
   with, for KIND = 0 forward KL(p||q), 1 reverse KL(q||p), 2 JSD:
       0:  dkl/du = q - p                                  dkl/dw = p (log p - log q - KL(p||q))
       1:  dkl/du = q (log q - log p - KL(q||p))           dkl/dw = p - q
       2:  dkl/du = (1-b) q (log q - log m - KL(q||m))     dkl/dw = b p (log p - log m - KL(p||m))

Without a dense reference (HAS_REF = False: a sparse teacher given as top-k ids and log-probs, see
hrmloss/_topk.py) the stats pass reads s only and yields lse_s, s[y], lse_u, sum_s, and with REST also
       lse_rest = logsumexp of u over the ids outside the row's K ids
(the student's mass off the top-k, q_rest = exp(lse_rest - lse_u), summed directly, never as 1 - sum_k q_k,
which cancels in fp32); the ids of a block are marked with a K-element histogram. The grad pass then
adds  hrm / T * a q  with a per-row coefficient a (FINAL.coef), off the ids with REST; the O(K) term
at the ids is applied outside (hrmloss/_topk.py). With CUT (ref_vocab="truncate", V_ref < V reference
columns) u is -inf beyond V_ref: q is the student renormalised over the first V_ref ids, and lse_s is kept
apart.

Traffic (NVs = bytes of one logits tensor): stats 2 (s and t once), grad 3 (s, t, ds), JSD +2; a sparse
teacher: stats 1, grad 2, plus O(K) a row.
Rows whose label is ignore_index read nothing (masked loads) and get a zero gradient.
-inf logits are legal: probability 0, gradient 0; a p > 0 facing q = 0 (or the reverse) gives +inf.
"""
import triton
import triton.language as tl

from .._layout import FINAL, JSD, PARAMS, PARTIAL

NEG_INF = tl.constexpr(float("-inf"))
INF = tl.constexpr(float("inf"))

# columns of the partial statistics written by the stats pass
P_LSE_S = tl.constexpr(PARTIAL.lse_s)
P_S_Y = tl.constexpr(PARTIAL.s_y)
P_LSE_U = tl.constexpr(PARTIAL.lse_u)
P_LSE_W = tl.constexpr(PARTIAL.lse_w)
P_EP = tl.constexpr(PARTIAL.ep)
P_EQ = tl.constexpr(PARTIAL.eq)
P_SUM_S = tl.constexpr(PARTIAL.sum_s)
P_LSE_REST = tl.constexpr(PARTIAL.lse_rest)
N_PARTIAL = tl.constexpr(len(PARTIAL))
# columns of the final statistics read by the gradient pass
F_LSE_S = tl.constexpr(FINAL.lse_s)
F_LSE_U = tl.constexpr(FINAL.lse_u)
F_LSE_W = tl.constexpr(FINAL.lse_w)
F_KL_P = tl.constexpr(FINAL.kl_p)
F_KL_Q = tl.constexpr(FINAL.kl_q)
F_COEF = tl.constexpr(FINAL.coef)
N_FINAL = tl.constexpr(len(FINAL))
# the JSD pass's sums, and the (N, 2) lse_u, lse_w it reads
J_KL_PM = tl.constexpr(JSD.kl_pm)
J_KL_QM = tl.constexpr(JSD.kl_qm)
N_JSD = tl.constexpr(len(JSD))
# runtime scalars
HRM = tl.constexpr(PARAMS.hrm)
TEMPERATURE = tl.constexpr(PARAMS.temperature)
BETA = tl.constexpr(PARAMS.beta)
LABEL_SMOOTHING = tl.constexpr(PARAMS.label_smoothing)
Z_LOSS = tl.constexpr(PARAMS.z_loss)
SOFTCAP_C = tl.constexpr(PARAMS.softcap)


@triton.jit
def _row_offset(row, T_rows, stride_b, stride_t):
    # logits are viewed as (B, T_rows, V) with strides (stride_b, stride_t, 1); row = b * T_rows + t
    return (row // T_rows) * stride_b + (row % T_rows) * stride_t


@triton.jit
def _online_update(m, d, a, x, y):
    # Running max m, sum d = sum_j e^(x_j - m) and weighted sum a = sum_j e^(x_j - m) (x_j - y_j),
    # updated with one block x (with -inf at masked lanes). Terms where x = -inf are 0; where x is
    # finite and y = -inf the term is +inf (the divergence is infinite there).
    m_new = tl.maximum(m, tl.max(x, 0))
    m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)  # avoid (-inf) - (-inf)
    r = tl.exp(m - m_ref)
    e = tl.exp(x - m_ref)
    diff = tl.where(x == NEG_INF, 0.0, tl.where(y == NEG_INF, INF, e * (x - y)))
    return m_new, d * r + tl.sum(e, 0), a * r + tl.sum(diff, 0)


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice): 1 - 2 / (e^(2x) + 1); exactly +-1 for large |x|
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _load_student(ptr, mask, softcap, SOFTCAP: tl.constexpr):
    # Student logits in fp32 with -inf at masked lanes, and d s / d s_raw. With SOFTCAP the logits
    # become softcap * tanh(s_raw / softcap) (Gemma-2), whose derivative is 1 - tanh^2.
    s = tl.load(ptr, mask=mask, other=NEG_INF).to(tl.float32)
    dcap = tl.full(s.shape, 1.0, tl.float32)
    if SOFTCAP:
        th = _tanh(s / softcap)
        s = tl.where(mask, softcap * th, NEG_INF)
        dcap = 1.0 - th * th
    return s, dcap


@triton.jit
def _lse_and_mean(m, d, a):
    # (m, d, a) -> (logsumexp, a / d), with an empty (all -inf) row giving (-inf, 0)
    lse = tl.where(d == 0.0, NEG_INF, m + tl.log(d))
    return lse, tl.where(d == 0.0, 0.0, a / tl.where(d == 0.0, 1.0, d))


@triton.jit
def _hrm_stats_kernel(
    s_ptr,          # [B, T_rows, V] student logits, strides (s_stride_b, s_stride_t, 1)
    s_stride_b, s_stride_t,
    t_ptr,          # [B, T_rows, V_ref] reference logits, strides (t_stride_b, t_stride_t, 1) (HAS_REF)
    t_stride_b, t_stride_t,
    y_ptr,          # [N] labels (int32/int64), N = B * T_rows
    ids_ptr,        # [N, K] int top-k ids (global, contiguous), read when REST
    stats_ptr,      # [N, N_PARTIAL] fp32 out: the PARTIAL columns
    params_ptr,     # [len(PARAMS)] fp32 in: runtime scalars (temperature, softcap used here)
    T_rows,         # rows per leading index
    V,              # vocabulary (shard) size
    V_ref,          # reference columns: V, or fewer with CUT
    K,              # top-k ids per row (REST)
    vocab_start,    # first global id of this shard (0 without sharding)
    ignore_index,
    SCALED: tl.constexpr,   # T != 1: keep separate statistics for u = s / T
    SOFTCAP: tl.constexpr,
    HAS_REF: tl.constexpr,  # a dense reference: else no t loads, lse_w = -inf, ep = eq = 0
    REST: tl.constexpr,     # lse_rest: u's logsumexp outside the row's K ids (else lse_rest = lse_u)
    CUT: tl.constexpr,      # u = -inf beyond V_ref (ref_vocab="truncate"); lse_s kept apart
    K_PAD: tl.constexpr,    # next power of 2 >= K (REST)
    BLOCK_V: tl.constexpr,
):
    # read s and t once: 2 NVs (1 without a dense reference); write 32 bytes a row
    row = tl.program_id(0).to(tl.int64)
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    y = tl.load(y_ptr + row).to(tl.int64)
    live = y != ignore_index
    V_live = tl.where(live, V, 0)  # an ignored row reads nothing
    s_row = s_ptr + _row_offset(row, T_rows, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_offset(row, T_rows, t_stride_b, t_stride_t)
    zero = tl.zeros([], tl.float32)
    m_s, d_s = zero + NEG_INF, zero
    m_u, d_u, a_u = zero + NEG_INF, zero, zero   # a_u = sum e^(u - m_u) (u - w)
    m_w, d_w, a_w = zero + NEG_INF, zero, zero   # a_w = sum e^(w - m_w) (w - u)
    sum_s = tl.zeros([BLOCK_V], tl.float32)      # sum_j s_j, for label smoothing
    if REST:  # this row's top-k ids, local to the shard (out-of-shard ids never fall in a block)
        m_r, d_r = zero + NEG_INF, zero          # sum-exp of u off the ids
        kk = tl.arange(0, K_PAD)
        ids = tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1).to(tl.int64) - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V_live
        # 1. load one block of each row and go to fp32 at once (the student soft-capped if asked)
        s, _dcap = _load_student(s_row + cols, mask, softcap, SOFTCAP)
        sum_s += tl.where(mask, s, 0.0)
        # 2. online max / sum-exp; the KL accumulators ride on the same exponentials
        if SCALED:
            u = s * inv_temp
        else:
            u = s
        if CUT:
            u = tl.where(cols < V_ref, u, NEG_INF)
        if SCALED or CUT:
            m_s, d_s, _unused = _online_update(m_s, d_s, zero, s, s)
        if HAS_REF:
            t = tl.load(t_row + cols, mask=mask & (cols < V_ref), other=NEG_INF).to(tl.float32)
            w = t * inv_temp
            m_u, d_u, a_u = _online_update(m_u, d_u, a_u, u, w)
            m_w, d_w, a_w = _online_update(m_w, d_w, a_w, w, u)
        else:
            m_u, d_u, _unused3 = _online_update(m_u, d_u, zero, u, u)
        if REST:
            # the block's lanes that hold one of the row's ids: a K-element histogram over the block
            in_block = (ids >= start) & (ids < start + BLOCK_V)
            hit = tl.histogram((ids - start).to(tl.int32), BLOCK_V, mask=in_block) > 0
            m_r, d_r, _unused4 = _online_update(m_r, d_r, zero, tl.where(hit, NEG_INF, u), u)
    # 3. normalise: lse and the expectations E_q[u - w], E_p[w - u]
    lse_u, eq = _lse_and_mean(m_u, d_u, a_u)
    lse_w, ep = _lse_and_mean(m_w, d_w, a_w)
    if SCALED or CUT:
        lse_s, _unused2 = _lse_and_mean(m_s, d_s, zero)
    else:
        lse_s = lse_u
    if REST:
        lse_rest, _unused5 = _lse_and_mean(m_r, d_r, zero)
    else:
        lse_rest = lse_u
    # 4. the target logit, if this shard owns the label (one element)
    y_local = y - vocab_start
    owned = live & (y_local >= 0) & (y_local < V)
    s_y, _dcap_y = _load_student(s_row + tl.where(owned, y_local, 0), owned, softcap, SOFTCAP)
    s_y = tl.where(owned, s_y, 0.0)
    out = stats_ptr + row * N_PARTIAL
    tl.store(out + P_LSE_S, lse_s)
    tl.store(out + P_S_Y, s_y)
    tl.store(out + P_LSE_U, lse_u)
    tl.store(out + P_LSE_W, lse_w)
    tl.store(out + P_EP, ep)
    tl.store(out + P_EQ, eq)
    tl.store(out + P_SUM_S, tl.sum(sum_s, 0))
    tl.store(out + P_LSE_REST, lse_rest)


@triton.jit
def _log_probs(s, t, lse_u, lse_w, inv_temp, SCALED: tl.constexpr):
    # log q = u - lse_u, log p = w - lse_w and the probabilities (0 at -inf logits)
    if SCALED:
        lq = s * inv_temp - lse_u
    else:
        lq = s - lse_u
    lp = t * inv_temp - lse_w
    return lq, lp, tl.exp(lq), tl.exp(lp)


@triton.jit
def _xlog_ratio(x, la, lb):
    # x * (la - lb) with 0 where x = 0 (so -inf - -inf never becomes NaN)
    return tl.where(x == 0.0, 0.0, x * (la - lb))


@triton.jit
def _log_mixture(lq, lp, beta):
    # log m = log(beta p + (1 - beta) q), computed as a logaddexp of the two log terms
    a = lp + tl.log(beta)
    b = lq + tl.log(1.0 - beta)
    hi = tl.maximum(a, b)
    hi_ref = tl.where(hi == NEG_INF, 0.0, hi)
    return hi_ref + tl.log(tl.exp(a - hi_ref) + tl.exp(b - hi_ref))


@triton.jit
def _hrm_jsd_kernel(
    s_ptr, s_stride_b, s_stride_t,   # [B, T_rows, V] student logits
    t_ptr, t_stride_b, t_stride_t,   # [B, T_rows, V_ref] reference logits
    y_ptr,          # [N] labels
    lse_ptr,        # [N, 2] fp32 in: final lse_u, lse_w (over the whole vocabulary)
    out_ptr,        # [N, N_JSD] fp32 out: partial sums kpm = sum p log(p/m), kqm = sum q log(q/m)
    params_ptr,     # [len(PARAMS)] fp32 in: runtime scalars (temperature, beta, softcap used here)
    T_rows, V,
    V_ref,          # reference columns: V, or fewer with CUT
    ignore_index,
    SCALED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    CUT: tl.constexpr,      # u = -inf beyond V_ref
    BLOCK_V: tl.constexpr,
):
    # read s and t once more: 2 NVs
    row = tl.program_id(0).to(tl.int64)
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    beta = tl.load(params_ptr + BETA)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    V_live = tl.where(tl.load(y_ptr + row).to(tl.int64) != ignore_index, V, 0)
    s_row = s_ptr + _row_offset(row, T_rows, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_offset(row, T_rows, t_stride_b, t_stride_t)
    lse_u = tl.load(lse_ptr + row * 2)
    lse_w = tl.load(lse_ptr + row * 2 + 1)
    kpm = tl.zeros([BLOCK_V], tl.float32)
    kqm = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V_live
        s, _dcap = _load_student(s_row + cols, mask, softcap, SOFTCAP)
        if CUT:
            s = tl.where(cols < V_ref, s, NEG_INF)
        t = tl.load(t_row + cols, mask=mask & (cols < V_ref), other=NEG_INF).to(tl.float32)
        lq, lp, q, p = _log_probs(s, t, lse_u, lse_w, inv_temp, SCALED)
        lm = _log_mixture(lq, lp, beta)
        kpm += _xlog_ratio(p, lp, lm)
        kqm += _xlog_ratio(q, lq, lm)
    tl.store(out_ptr + row * N_JSD + J_KL_PM, tl.sum(kpm, 0))
    tl.store(out_ptr + row * N_JSD + J_KL_QM, tl.sum(kqm, 0))


@triton.jit
def _hrm_grad_kernel(
    s_ptr, s_stride_b, s_stride_t,   # [B, T_rows, V] student logits
    t_ptr, t_stride_b, t_stride_t,   # [B, T_rows, V_ref] reference logits (HAS_REF)
    y_ptr,          # [N] labels
    ids_ptr,        # [N, K] int top-k ids (global, contiguous), read when REST
    stats_ptr,      # [N, N_FINAL] fp32 in: the FINAL columns lse_s, lse_u, lse_w, kl_p, kl_q, coef
    g_ptr,          # [N] fp32 in: per-row scale g_i (grad_output x reduction factor)
    params_ptr,     # [len(PARAMS)] fp32 in: runtime scalars
    ds_ptr,         # [N, V] out, dtype of s: d loss / d s (contiguous rows of ds_stride)
    ds_stride,
    dt_ptr,         # [N, V] out, dtype of t: d loss / d t (only when REF_GRAD)
    dt_stride,
    T_rows, V, vocab_start,
    vocab_size,              # V_total, the whole vocabulary over all shards (label smoothing's eps / V_total)
    V_ref,                   # reference columns: V, or fewer with CUT
    K,                       # top-k ids per row (REST)
    ignore_index,
    KIND: tl.constexpr,      # 0 forward KL(p||q), 1 reverse KL(q||p), 2 JSD
    SCALED: tl.constexpr,    # T != 1
    SOFTCAP: tl.constexpr,
    READ_REF: tl.constexpr,  # hrm != 0 or REF_GRAD: the divergence's gradient is needed
    REF_GRAD: tl.constexpr,  # write dt
    HAS_REF: tl.constexpr,   # a dense reference; else d kl / d u = coef q here (+ the sparse correction)
    REST: tl.constexpr,      # without HAS_REF: coef q off the row's K ids only (the ids' term is the caller's)
    CUT: tl.constexpr,       # u = -inf beyond V_ref
    K_PAD: tl.constexpr,     # next power of 2 >= K (REST)
    BLOCK_V: tl.constexpr,
):
    # read s (and t when READ_REF), write ds (and dt): 3 NVs for the usual case
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    live = y != ignore_index
    g = tl.where(live, tl.load(g_ptr + row), 0.0)
    live = live & (g != 0.0)
    V_live = tl.where(live, V, 0)  # nothing to read for an ignored or zero-weight row
    s_row = s_ptr + _row_offset(row, T_rows, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_offset(row, T_rows, t_stride_b, t_stride_t)
    st = stats_ptr + row * N_FINAL
    lse_s = tl.load(st + F_LSE_S)
    lse_u = tl.load(st + F_LSE_U)
    lse_w = tl.load(st + F_LSE_W)
    kl_p = tl.load(st + F_KL_P)   # KL(p||q), or KL(p||m) for JSD
    kl_q = tl.load(st + F_KL_Q)   # KL(q||p), or KL(q||m) for JSD
    coef = tl.load(st + F_COEF)   # a of d kl / d u = a q (+ the correction at the ids) without HAS_REF
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    beta = tl.load(params_ptr + BETA)
    label_smoothing = tl.load(params_ptr + LABEL_SMOOTHING)  # eps: CE target (1 - eps) onehot(y) + eps / V_total
    smooth_per_class = label_smoothing / vocab_size
    z_loss = tl.load(params_ptr + Z_LOSS)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    y_local = y - vocab_start
    c = tl.load(params_ptr + HRM) * inv_temp
    if REST:  # this row's top-k ids, local to the shard
        kk = tl.arange(0, K_PAD)
        ids = tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1).to(tl.int64) - vocab_start
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        mask = cols < V_live
        s, dcap = _load_student(s_row + cols, mask, softcap, SOFTCAP)
        # 1. cross-entropy with label smoothing, plus z-loss:
        #    d/ds [ce + z lse_s^2] = q1 (1 + 2 z lse_s) - (1 - eps) onehot(y) - eps / V_total
        q1 = tl.exp(s - lse_s)
        ds = q1 * (1.0 + 2.0 * z_loss * lse_s) - tl.where(cols == y_local, 1.0 - label_smoothing, 0.0)
        ds -= smooth_per_class
        s_u = s
        if CUT:
            s_u = tl.where(cols < V_ref, s, NEG_INF)
        if not HAS_REF:
            # 2'. a sparse teacher: the dense part a q of d kl / d u (no reference to read); with REST
            #     only off the ids, where |a q_j| <= q_j + p_rest stays small even when a is huge
            if c != 0.0:
                if SCALED:
                    q = tl.exp(s_u * inv_temp - lse_u)
                else:
                    q = tl.exp(s_u - lse_u)
                if REST:
                    in_block = (ids >= start) & (ids < start + BLOCK_V)
                    q = tl.where(tl.histogram((ids - start).to(tl.int32), BLOCK_V, mask=in_block) > 0, 0.0, q)
                ds += c * tl.where(q == 0.0, 0.0, coef * q)
        elif READ_REF:
            # 2. divergence: the formulas of the module docstring, 0 where the probability is 0; hrm = 0
            #    (c = 0) drops the term instead of multiplying it by 0, since it can be infinite
            if c != 0.0:
                t = tl.load(t_row + cols, mask=mask & (cols < V_ref), other=NEG_INF).to(tl.float32)
                lq, lp, q, p = _log_probs(s_u, t, lse_u, lse_w, inv_temp, SCALED)
                if KIND == 0:
                    dku = q - p
                    dkw = _xlog_ratio(p, lp, lq) - p * kl_p
                elif KIND == 1:
                    dku = _xlog_ratio(q, lq, lp) - q * kl_q
                    dkw = p - q
                else:
                    lm = _log_mixture(lq, lp, beta)
                    dku = (1.0 - beta) * (_xlog_ratio(q, lq, lm) - q * kl_q)
                    dkw = beta * (_xlog_ratio(p, lp, lm) - p * kl_p)
                ds += c * dku
                if REF_GRAD:
                    dt = tl.where(live, g * c * dkw, 0.0)
                    tl.store(dt_ptr + row * dt_stride + cols, dt.to(dt_ptr.dtype.element_ty), mask=cols < V_ref)
            elif REF_GRAD:
                tl.store(dt_ptr + row * dt_stride + cols, tl.zeros([BLOCK_V], dt_ptr.dtype.element_ty), mask=cols < V_ref)
        # 3. through the soft cap (d s / d s_raw), scale by g; a dead row writes zeros
        ds = tl.where(live, g * ds * dcap, 0.0)
        tl.store(ds_ptr + row * ds_stride + cols, ds.to(ds_ptr.dtype.element_ty), mask=in_row)

"""Triton kernels for the fused loss  loss_i = ce_i + hrm * kl_i  (the maths: docs/design.md §1-2).

A program handles one row (token) and one range of its vocabulary (the whole row unless the launcher
splits the vocabulary over a second grid axis), streamed in blocks of BLOCK_V. Notation, per row:

    s  student logits (soft-capped first when asked: s <- c tanh(s / c)),
       u = s / T,  q = softmax(u)     (q1 = softmax(s) for the CE term)
    t  reference logits, w = t / T,  p = softmax(w)
    lse_s = logsumexp(s), lse_u = logsumexp(u), lse_w = logsumexp(w)

Column layouts (PARTIAL, FINAL, JSD) and the runtime scalars (PARAMS: hrm, temperature, beta,
label_smoothing, z_loss, softcap, read from one small fp32 tensor) are named in hrmloss/layout.py; the
constants below are their indices. Constexprs select structure only, never a value.

Three kernels, one family:

1. `_hrm_stats_kernel` (read s, t once; write 7 floats a row and range): the *partial* row statistics
       lse_s, s[y], lse_u, lse_w, ep = E_p[w - u], eq = E_q[u - w], sum_s = sum_j s_j
   from online max / sum-exp with running rescaling. They are combinable over vocabulary ranges
   (lse by logsumexp, the expectations weighted by exp(lse_range - lse), s[y] and sum_s by sum:
   `layout.PARTIAL_MERGE`), which is how the launcher merges split rows and the vocabulary-parallel
   path merges shards before finalising. With them
       ce = (1 - eps) (lse_s - s[y]) + eps (lse_s - sum_s / V),    (label smoothing eps)
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
   ds may be the storage of s itself (in-place backward): each element is read, then written, by the
   same program.

Instruction budget (docs/performance.md): the two reading passes keep every running statistic per
thread. A block is a [BLOCK_V // ELEMS, ELEMS] tile whose rows are ELEMS contiguous columns (one 16-byte
load) owned by one thread; the statistics are [BLOCK_V // ELEMS] vectors, one entry per tile row, updated
with in-thread reductions along axis 1, and reduced across the block once, after the loop. Exponentials
are exp2 with log2(e) folded into the scale, e^((x - m) / T) = 2^(c (x - m)) with c = log2(e) / T: one
FADD, one FMUL and one MUFU.EX2 per element and distribution. tests/aot_compile.py counts the result.

Without a dense reference (HAS_REF = False: a sparse teacher given as top-k ids and log-probs, see
hrmloss/sparse.py) the stats pass reads s only and yields lse_s, s[y], lse_u, sum_s, and with REST also
       lse_rest = logsumexp of u over the ids outside the row's K ids
(the student's mass off the top-k, q_rest = exp(lse_rest - lse_u), summed directly, never as 1 - sum_k q_k,
which cancels in fp32); the ids of a block are marked with a K-element histogram. The grad pass then
adds  hrm / T * a q  with a per-row coefficient a (FINAL.coef), off the ids with REST; the O(K) term
at the ids is applied outside (hrmloss/sparse.py). With CUT (ref_vocab="truncate", V_ref < V reference
columns) u is -inf beyond V_ref: q is the student renormalised over the first V_ref ids, and lse_s is kept
apart.

Traffic (NVs = bytes of one logits tensor): stats 2 (s and t once), grad 3 (s, t, ds), JSD +2; a sparse
teacher: stats 1, grad 2, plus O(K) a row.
Rows whose label is ignore_index read nothing and get a zero gradient.
-inf logits are legal: probability 0, gradient 0; a p > 0 facing q = 0 (or the reverse) gives +inf.
"""
import os

import triton
import triton.language as tl

from ..engine.layout import FINAL, JSD, PARAMS, PARTIAL

NEG_INF = tl.constexpr(float("-inf"))
INF = tl.constexpr(float("inf"))
LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): e^x = 2^(x log2 e)
LN2 = tl.constexpr(0.6931471805599453)     # ln(2): ln x = ln 2 log2 x
BIG = tl.constexpr(1.0e38)                 # a finite stand-in for an infinite log-ratio multiplied by 0
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # the smallest normal fp32

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


if os.environ.get("TRITON_INTERPRET") == "1":  # the test triton.jit itself applies when decorating
    @triton.jit
    def _log2(x):
        # log2 on the interpreter, which runs no inline assembly
        return tl.log2(x)
else:
    @triton.jit
    def _log2(x):
        # log2 in one MUFU.LG2 (absolute error < 2^-22; x < 2^-126 flushes to 0, giving -inf): tl.log2
        # compiles to ~15 instructions of libdevice
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _exp(x):
    # e^x as one FMUL and one MUFU.EX2 (tl.exp2 is ex2.approx.ftz; tl.exp adds 3 instructions of
    # denormal fix-up); a result below 2^-126 flushes to 0
    return tl.exp2(x * LOG2E)


@triton.jit
def _row_offset(row, T_rows, stride_b, stride_t):
    # logits are viewed as (B, T_rows, V) with strides (stride_b, stride_t, 1); row = b * T_rows + t
    return (row // T_rows) * stride_b + (row % T_rows) * stride_t


@triton.jit
def _column_range(V, split_cols):
    # the columns [lo, hi) of this program: grid axis 1 splits the vocabulary into ranges of
    # split_cols columns, a multiple of BLOCK_V (one range, split_cols >= V, when unsplit)
    lo = tl.program_id(1) * split_cols
    return lo, tl.minimum(lo + split_cols, V)


@triton.jit
def _tile(BLOCK_V: tl.constexpr, ELEMS: tl.constexpr):
    # column offsets of a [BLOCK_V // ELEMS, ELEMS] tile: tile row r holds the ELEMS contiguous columns
    # r * ELEMS ... r * ELEMS + ELEMS - 1, which one thread loads with one vector load
    return tl.arange(0, BLOCK_V // ELEMS)[:, None] * ELEMS + tl.arange(0, ELEMS)[None, :]


@triton.jit
def _tanh(x):
    # tanh from exp (no libdevice): 1 - 2 / (e^(2x) + 1); exactly +-1 for large |x|
    return 1.0 - 2.0 / (_exp(2.0 * x) + 1.0)


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
def _ref(m):
    # a running max m as the reference point of its exponentials; 0 while m = -inf (nothing but -inf
    # seen yet), so that no -inf - (-inf) appears
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _exp2_block(m_old, m_new, x, c):
    # Per tile row with running max m_old -> m_new of x: the factor 2^(c (m_old - m_new)) that rescales
    # the row's old sums (0 while m_old = -inf), and the terms 2^(c (x - m_new)) (0 at x = -inf).
    # x - m first, then the scale: the exponent is exact where it matters most (x near the max).
    ref = _ref(m_new)
    return tl.exp2(c * (m_old - ref)), tl.exp2(c * (x - ref[:, None]))


@triton.jit
def _block_shares(m, c):
    # The cross-thread step, once per row: with M = max of the per-tile-row maxima m (0 for an empty
    # row), each tile row's share 2^(c (m - M)), so that sum_j 2^(c x_j) = 2^(c M) sum_r d_r share_r
    M = _ref(tl.max(m, 0))
    return tl.exp2(c * (m - M)), M


@triton.jit
def _hrm_stats_kernel(
    s_ptr,          # [B, T_rows, V] student logits, strides (s_stride_b, s_stride_t, 1)
    s_stride_b, s_stride_t,
    t_ptr,          # [B, T_rows, V_ref] reference logits, strides (t_stride_b, t_stride_t, 1) (HAS_REF)
    t_stride_b, t_stride_t,
    y_ptr,          # [N] labels (int32/int64), N = B * T_rows
    ids_ptr,        # [N, K] int top-k ids (global, contiguous), read when REST
    stats_ptr,      # [N, num_programs(1), N_PARTIAL] fp32 out: the PARTIAL columns of each column range
    params_ptr,     # [len(PARAMS)] fp32 in: runtime scalars (temperature, softcap used here)
    T_rows,         # rows per leading index
    V,              # vocabulary (shard) size
    V_ref,          # reference columns: V, or fewer with CUT
    K,              # top-k ids per row (REST)
    vocab_start,    # first global id of this shard (0 without sharding)
    split_cols,     # columns per program along grid axis 1 (a multiple of BLOCK_V; >= V when unsplit)
    ignore_index,
    SCALED: tl.constexpr,   # T != 1: a separate lse for s at T = 1
    SOFTCAP: tl.constexpr,
    HAS_REF: tl.constexpr,  # a dense reference: else no t loads, lse_w = -inf, ep = eq = 0
    REST: tl.constexpr,     # lse_rest: u's logsumexp off the row's K ids (else lse_rest = lse_u)
    CUT: tl.constexpr,      # u = -inf beyond V_ref (ref_vocab="truncate"); lse_s from its own maximum
    K_PAD: tl.constexpr,    # next power of 2 >= K (REST)
    BLOCK_V: tl.constexpr,  # columns per loop iteration
    ELEMS: tl.constexpr,    # contiguous columns per thread per iteration: 16 bytes of the wider dtype
):
    # read s and t once: 2 NVs (1 without a dense reference); write 32 bytes a row and range
    row = tl.program_id(0).to(tl.int64)
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    y = tl.load(y_ptr + row).to(tl.int64)
    live = y != ignore_index
    lo, hi = _column_range(V, split_cols)
    hi_live = tl.where(live, hi, lo)  # an ignored row reads nothing
    s_row = s_ptr + _row_offset(row, T_rows, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_offset(row, T_rows, t_stride_b, t_stride_t)
    # exponents in base 2: u = s / T, w = t / T enter as 2^(c s), 2^(c t) with c = log2(e) / T
    c1 = LOG2E   # the scale of s itself (T = 1), for lse_s
    if SCALED:
        c = inv_temp * LOG2E
    else:
        c = c1
    R: tl.constexpr = BLOCK_V // ELEMS
    cols0 = _tile(BLOCK_V, ELEMS)
    # per tile row (one thread's slice of every block), with m = running max of the raw logits:
    #   d_u = sum 2^(c (s - m_s)),  a_u = sum 2^(c (s - m_s)) (s - t)     -> lse_u, E_q[u - w]
    #   d_w = sum 2^(c (t - m_t)),  b_w = sum 2^(c (t - m_t)) (s - t)     -> lse_w, E_p[w - u]
    #   d_s = sum 2^(log2(e) (s - m_s))  (SCALED)                         -> lse_s
    m_s = tl.full([R], NEG_INF, tl.float32)
    m_t = tl.full([R], NEG_INF, tl.float32)
    d_u = tl.zeros([R], tl.float32)
    a_u = tl.zeros([R], tl.float32)
    d_w = tl.zeros([R], tl.float32)
    b_w = tl.zeros([R], tl.float32)
    d_s = tl.zeros([R], tl.float32)
    m_f = tl.full([R], NEG_INF, tl.float32)   # CUT: running max of all of s, for lse_s
    sum_s = tl.zeros([R], tl.float32)
    if REST:  # this row's top-k ids, local to the shard (out-of-shard ids never fall in a block), and
        #       the sum-exp of u off them (per tile row, with their own running max)
        kk = tl.arange(0, K_PAD)
        ids = tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1).to(tl.int64) - vocab_start
        m_r = tl.full([R], NEG_INF, tl.float32)
        d_r = tl.zeros([R], tl.float32)
    for start in range(lo, hi_live, BLOCK_V):
        cols = start + cols0
        mask = cols < hi_live
        # 1. load one block of each row, in fp32 at once (the student soft-capped if asked); with CUT
        #    the columns past the reference's leave u (su), not lse_s
        s, _dcap = _load_student(s_row + cols, mask, softcap, SOFTCAP)
        if CUT:
            su = tl.where(cols < V_ref, s, NEG_INF)
            t_mask = mask & (cols < V_ref)
        else:
            su = s
            t_mask = mask
        if HAS_REF:
            t = tl.load(t_row + cols, mask=t_mask, other=NEG_INF).to(tl.float32)
        sum_s += tl.sum(tl.where(mask, s, 0.0), 1)
        # 2. running maxima (max(c x) = c max(x) for c > 0) and one exp2 per element per distribution
        ms_new = tl.maximum(m_s, tl.max(su, 1))
        if HAS_REF:
            mt_new = tl.maximum(m_t, tl.max(t, 1))
        r_u, e_u = _exp2_block(m_s, ms_new, su, c)
        if HAS_REF:
            r_w, e_w = _exp2_block(m_t, mt_new, t, c)
            # 3. the weighted sums of s - t. Where a term's weight is 0 the log-ratio may be infinite
            #    (or NaN at -inf - -inf): clamping it on the side that only meets zero weights keeps
            #    those terms 0, while an infinite term of non-zero weight (q > 0 facing p = 0 in a_u,
            #    p > 0 facing q = 0 in b_w) stays infinite, or NaN when its weight underflowed; both
            #    mean +inf.
            diff = su - t
            d_u = d_u * r_u + tl.sum(e_u, 1)
            a_u = a_u * r_u + tl.sum(e_u * tl.maximum(diff, -BIG), 1)
            d_w = d_w * r_w + tl.sum(e_w, 1)
            b_w = b_w * r_w + tl.sum(e_w * tl.minimum(diff, BIG), 1)
            m_t = mt_new
        else:
            d_u = d_u * r_u + tl.sum(e_u, 1)
        if CUT:
            mf_new = tl.maximum(m_f, tl.max(s, 1))
            r_s, e_s = _exp2_block(m_f, mf_new, s, c1)
            d_s = d_s * r_s + tl.sum(e_s, 1)
            m_f = mf_new
        elif SCALED:
            r_s, e_s = _exp2_block(m_s, ms_new, s, c1)
            d_s = d_s * r_s + tl.sum(e_s, 1)
        if REST:
            # the block's lanes that hold one of the row's ids: a K-element histogram over the block
            in_block = (ids >= start) & (ids < start + BLOCK_V)
            hit = tl.histogram((ids - start).to(tl.int32), BLOCK_V, mask=in_block) > 0
            off = tl.where(tl.reshape(hit, [R, ELEMS]), NEG_INF, su)
            mr_new = tl.maximum(m_r, tl.max(off, 1))
            r_r, e_r = _exp2_block(m_r, mr_new, off, c)
            d_r = d_r * r_r + tl.sum(e_r, 1)
            m_r = mr_new
        m_s = ms_new
    # 4. across the block, once: rescale every tile row to the row's maximum M and add up;
    #    lse_u = ln(2^(c M_s) D_u) = M_s / T + ln2 log2(D_u), and log2(0) = -inf for an empty range
    f_u, M_s = _block_shares(m_s, c)
    f_w, M_t = _block_shares(m_t, c)
    D_u = tl.sum(d_u * f_u, 0)
    D_w = tl.sum(d_w * f_w, 0)
    A_u = tl.sum(a_u * f_u, 0)
    B_w = tl.sum(b_w * f_w, 0)
    lse_u = M_s * inv_temp + tl.log2(D_u) * LN2
    lse_w = M_t * inv_temp + tl.log2(D_w) * LN2
    # E_q[u - w] = A_u / (T D_u), E_p[w - u] = -B_w / (T D_w); 0 for an empty range, +inf for NaN
    eq = tl.where(D_u == 0.0, 0.0, A_u / tl.where(D_u == 0.0, 1.0, D_u)) * inv_temp
    ep = tl.where(D_w == 0.0, 0.0, -B_w / tl.where(D_w == 0.0, 1.0, D_w)) * inv_temp
    eq = tl.where(eq == eq, eq, INF)
    ep = tl.where(ep == ep, ep, INF)
    if CUT:
        f_s, M_f = _block_shares(m_f, c1)
        lse_s = M_f + tl.log2(tl.sum(d_s * f_s, 0)) * LN2
    elif SCALED:
        f_s, _M = _block_shares(m_s, c1)
        lse_s = M_s + tl.log2(tl.sum(d_s * f_s, 0)) * LN2
    else:
        lse_s = lse_u
    if REST:
        f_r, M_r = _block_shares(m_r, c)
        lse_rest = M_r * inv_temp + tl.log2(tl.sum(d_r * f_r, 0)) * LN2
    else:
        lse_rest = lse_u
    # 5. the target logit, if this range owns the label (one element)
    y_local = y - vocab_start
    owned = live & (y_local >= lo) & (y_local < hi)
    s_y, _dcap_y = _load_student(s_row + tl.where(owned, y_local, 0), owned, softcap, SOFTCAP)
    s_y = tl.where(owned, s_y, 0.0)
    out = stats_ptr + (row * tl.num_programs(1) + tl.program_id(1)) * N_PARTIAL
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
    # log q = u - lse_u, log p = w - lse_w (one FFMA each: s / T - lse exact before its rounding) and
    # the probabilities (0 at -inf logits)
    if SCALED:
        lq = s * inv_temp - lse_u
    else:
        lq = s - lse_u
    lp = t * inv_temp - lse_w
    return lq, lp, _exp(lq), _exp(lp)


@triton.jit
def _xlog_ratio(x, la, lb):
    # x * (la - lb) with 0 where x = 0 (so -inf - -inf never becomes NaN)
    return tl.where(x == 0.0, 0.0, x * (la - lb))


@triton.jit
def _log_mixture(p, q, beta):
    # log m = log(beta p + (1 - beta) q), with m raised to the smallest normal fp32. The log2 flushes a
    # subnormal argument to 0 (-inf): without the floor, a normal p ~ 1e-38 whose m is subnormal would
    # weigh a log-ratio of ~1e38 and add ~1 to KL(p||m). With it, p (log p - log m) stays ~p (tiny), and
    # p = q = 0 meets a finite log m (zero weights, no NaN).
    return _log2(tl.maximum(beta * p + (1.0 - beta) * q, FLT_MIN)) * LN2


@triton.jit
def _hrm_jsd_kernel(
    s_ptr, s_stride_b, s_stride_t,   # [B, T_rows, V] student logits
    t_ptr, t_stride_b, t_stride_t,   # [B, T_rows, V_ref] reference logits
    y_ptr,          # [N] labels
    lse_ptr,        # [N, 2] fp32 in: final lse_u, lse_w (over the whole vocabulary)
    out_ptr,        # [N, num_programs(1), N_JSD] fp32 out: kpm = sum p log(p/m), kqm = sum q log(q/m)
    params_ptr,     # [len(PARAMS)] fp32 in: runtime scalars (temperature, beta, softcap used here)
    T_rows, V,
    V_ref,          # reference columns: V, or fewer with CUT
    split_cols,     # columns per program along grid axis 1 (a multiple of BLOCK_V)
    ignore_index,
    SCALED: tl.constexpr,
    SOFTCAP: tl.constexpr,
    CUT: tl.constexpr,      # u = -inf beyond V_ref
    BLOCK_V: tl.constexpr,
    ELEMS: tl.constexpr,    # contiguous columns per thread per iteration
):
    # read s and t once more: 2 NVs
    row = tl.program_id(0).to(tl.int64)
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    beta = tl.load(params_ptr + BETA)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    live = tl.load(y_ptr + row).to(tl.int64) != ignore_index
    lo, hi = _column_range(V, split_cols)
    hi_live = tl.where(live, hi, lo)  # an ignored row reads nothing
    s_row = s_ptr + _row_offset(row, T_rows, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_offset(row, T_rows, t_stride_b, t_stride_t)
    lse_u = tl.load(lse_ptr + row * 2)
    lse_w = tl.load(lse_ptr + row * 2 + 1)
    R: tl.constexpr = BLOCK_V // ELEMS
    cols0 = _tile(BLOCK_V, ELEMS)
    kpm = tl.zeros([R], tl.float32)   # sum p log(p / m), per tile row
    kqm = tl.zeros([R], tl.float32)   # sum q log(q / m)
    for start in range(lo, hi_live, BLOCK_V):
        cols = start + cols0
        mask = cols < hi_live
        s, _dcap = _load_student(s_row + cols, mask, softcap, SOFTCAP)
        t_mask = mask
        if CUT:
            s = tl.where(cols < V_ref, s, NEG_INF)
            t_mask = mask & (cols < V_ref)
        t = tl.load(t_row + cols, mask=t_mask, other=NEG_INF).to(tl.float32)
        # m = beta p + (1 - beta) q > 0 wherever p > 0 or q > 0. A zero probability is a zero weight:
        # the logs are clamped to >= -BIG so that 0 * (a finite difference) = 0, never NaN.
        lq, lp, q, p = _log_probs(s, t, lse_u, lse_w, inv_temp, SCALED)
        lm = _log_mixture(p, q, beta)
        kpm += tl.sum(p * (tl.maximum(lp, -BIG) - lm), 1)
        kqm += tl.sum(q * (tl.maximum(lq, -BIG) - lm), 1)
    out = out_ptr + (row * tl.num_programs(1) + tl.program_id(1)) * N_JSD
    tl.store(out + J_KL_PM, tl.sum(kpm, 0))
    tl.store(out + J_KL_QM, tl.sum(kqm, 0))


@triton.jit
def _hrm_grad_kernel(
    s_ptr, s_stride_b, s_stride_t,   # [B, T_rows, V] student logits
    t_ptr, t_stride_b, t_stride_t,   # [B, T_rows, V_ref] reference logits (HAS_REF)
    y_ptr,          # [N] labels
    ids_ptr,        # [N, K] int top-k ids (global, contiguous), read when REST
    stats_ptr,      # [N, N_FINAL] fp32 in: the FINAL columns lse_s, lse_u, lse_w, kl_p, kl_q, coef
    g_ptr,          # [N] fp32 in: per-row scale g_i (grad_output x reduction factor)
    params_ptr,     # [len(PARAMS)] fp32 in: runtime scalars
    ds_ptr,         # [B, T_rows, V] out, dtype of s: d loss / d s (may be s itself: in-place backward)
    ds_stride_b, ds_stride_t,
    dt_ptr,         # [B, T_rows, V_ref] out, dtype of t: d loss / d t (only when REF_GRAD)
    dt_stride_b, dt_stride_t,
    T_rows, V, vocab_start,
    vocab_size,     # V_total, the whole vocabulary over all shards (label smoothing's eps / V_total)
    V_ref,          # reference columns: V, or fewer with CUT
    K,              # top-k ids per row (REST)
    split_cols,     # columns per program along grid axis 1 (a multiple of BLOCK_V)
    ignore_index,
    KIND: tl.constexpr,      # 0 forward KL(p||q), 1 reverse KL(q||p), 2 JSD
    SCALED: tl.constexpr,    # T != 1
    SOFTCAP: tl.constexpr,
    READ_REF: tl.constexpr,  # a dense reference and (hrm != 0 or REF_GRAD): its gradient terms are needed
    REF_GRAD: tl.constexpr,  # write dt
    HAS_REF: tl.constexpr,   # a dense reference; else d kl / d u = coef q here (+ the sparse term at the ids)
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
    lo, hi = _column_range(V, split_cols)
    hi_live = tl.where(live, hi, lo)  # nothing to read for an ignored or zero-weight row
    s_row = s_ptr + _row_offset(row, T_rows, s_stride_b, s_stride_t)
    t_row = t_ptr + _row_offset(row, T_rows, t_stride_b, t_stride_t)
    ds_row = ds_ptr + _row_offset(row, T_rows, ds_stride_b, ds_stride_t)
    dt_row = dt_ptr + _row_offset(row, T_rows, dt_stride_b, dt_stride_t)
    st = stats_ptr + row * N_FINAL
    lse_s = tl.load(st + F_LSE_S)
    lse_u = tl.load(st + F_LSE_U)
    lse_w = tl.load(st + F_LSE_W)
    kl_p = tl.load(st + F_KL_P)   # KL(p||q), or KL(p||m) for JSD
    kl_q = tl.load(st + F_KL_Q)   # KL(q||p), or KL(q||m) for JSD
    coef = tl.load(st + F_COEF)   # a of d kl / d u = a q (+ the term at the ids) without HAS_REF
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
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < hi
        mask = cols < hi_live
        s, dcap = _load_student(s_row + cols, mask, softcap, SOFTCAP)
        # 1. cross-entropy with label smoothing, plus z-loss:
        #    d/ds [ce + z lse_s^2] = q1 (1 + 2 z lse_s) - (1 - eps) onehot(y) - eps / V_total
        q1 = _exp(s - lse_s)
        ds = q1 * (1.0 + 2.0 * z_loss * lse_s) - tl.where(cols == y_local, 1.0 - label_smoothing, 0.0)
        ds -= smooth_per_class
        if CUT:
            su = tl.where(cols < V_ref, s, NEG_INF)
            t_mask = mask & (cols < V_ref)
            dt_mask = in_row & (cols < V_ref)
        else:
            su = s
            t_mask = mask
            dt_mask = in_row
        if not HAS_REF:
            # 2'. a sparse teacher: the dense part a q of d kl / d u (no reference to read); with REST
            #     only off the ids, where |a q_j| <= q_j + p_rest stays small even when a is huge
            if c != 0.0:
                if SCALED:
                    q = _exp(su * inv_temp - lse_u)
                else:
                    q = _exp(su - lse_u)
                if REST:
                    in_block = (ids >= start) & (ids < start + BLOCK_V)
                    q = tl.where(tl.histogram((ids - start).to(tl.int32), BLOCK_V, mask=in_block) > 0, 0.0, q)
                ds += c * tl.where(q == 0.0, 0.0, coef * q)
        if READ_REF:
            # 2. divergence: the formulas of the module docstring, 0 where the probability is 0; hrm = 0
            #    (c = 0) drops the term instead of multiplying it by 0, since it can be infinite
            if c != 0.0:
                t = tl.load(t_row + cols, mask=t_mask, other=NEG_INF).to(tl.float32)
                lq, lp, q, p = _log_probs(su, t, lse_u, lse_w, inv_temp, SCALED)
                if KIND == 0:
                    dku = q - p
                    dkw = _xlog_ratio(p, lp, lq) - p * kl_p
                elif KIND == 1:
                    dku = _xlog_ratio(q, lq, lp) - q * kl_q
                    dkw = p - q
                else:
                    lm = _log_mixture(p, q, beta)
                    dku = (1.0 - beta) * (_xlog_ratio(q, lq, lm) - q * kl_q)
                    dkw = beta * (_xlog_ratio(p, lp, lm) - p * kl_p)
                ds += c * dku
                if REF_GRAD:
                    dt = tl.where(live, g * c * dkw, 0.0)
                    tl.store(dt_row + cols, dt.to(dt_ptr.dtype.element_ty), mask=dt_mask)
            elif REF_GRAD:
                tl.store(dt_row + cols, tl.zeros([BLOCK_V], dt_ptr.dtype.element_ty), mask=dt_mask)
        # 3. through the soft cap (d s / d s_raw), scale by g; a dead row writes zeros
        ds = tl.where(live, g * ds * dcap, 0.0)
        tl.store(ds_row + cols, ds.to(ds_ptr.dtype.element_ty), mask=in_row)

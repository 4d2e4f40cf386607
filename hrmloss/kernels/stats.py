"""The stats pass: the partial row statistics of one range of a row's vocabulary (`layout.PARTIAL`).

    lse_s, s[y], lse_u, lse_w, ep = E_p[w - u], eq = E_q[u - w], sum_s = sum_j s_j, lse_rest

from online max / sum-exp with running rescaling, combinable over vocabulary ranges (`layout.PARTIAL_MERGE`),
which is how the launcher merges split rows and the vocabulary-parallel path merges shards before
finalising. Without a dense reference (HAS_REF False: a sparse teacher) it reads s only; with REST it also
sums the student's mass off the row's top-k ids, lse_rest, directly (never as 1 - sum_k q_k, which cancels
in fp32); with CUT u is -inf past the reference's V_ref columns and lse_s is kept apart.

Per thread: a block is a [BLOCK_V // ELEMS, ELEMS] tile whose rows are one thread's 16-byte slices; every
running statistic is a [BLOCK_V // ELEMS] vector updated with in-thread reductions, and reduced across the
block once, after the loop (no shuffle, no barrier in the loop). tests/aot_compile.py counts the result.
"""
import triton
import triton.language as tl

from .common import (
    BIG,
    INF,
    LN2,
    LOG2E,
    N_PARTIAL,
    NEG_INF,
    P_EP,
    P_EQ,
    P_LSE_REST,
    P_LSE_S,
    P_LSE_U,
    P_LSE_W,
    P_S_Y,
    P_SUM_S,
    SOFTCAP_C,
    TEMPERATURE,
    _block_shares,
    _column_range,
    _divergence_logits,
    _exp2_block,
    _id_lanes,
    _load_student,
    _ref_lanes,
    _row_ids,
    _row_label,
    _row_offset,
    _tile,
)


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
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    cap_scale = 2.0 * LOG2E / softcap   # the soft cap's 2 log2(e) / c (common._load_student)
    row, y = _row_label(y_ptr)
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
    if REST:  # this row's top-k ids, and the sum-exp of u off them (per tile row, with their own running max)
        ids = _row_ids(ids_ptr, row, K, vocab_start, K_PAD)
        m_r = tl.full([R], NEG_INF, tl.float32)
        d_r = tl.zeros([R], tl.float32)
    for start in range(lo, hi_live, BLOCK_V):
        cols = start + cols0
        mask = cols < hi_live
        # 1. load one block of each row, in fp32 at once (the student soft-capped if asked); with CUT
        #    the columns past the reference's leave u (su), not lse_s
        s, _dcap = _load_student(s_row + cols, mask, cap_scale, softcap, SOFTCAP)
        su = _divergence_logits(s, cols, V_ref, CUT)
        if HAS_REF:
            t = tl.load(t_row + cols, mask=_ref_lanes(cols, mask, V_ref, CUT), other=NEG_INF).to(tl.float32)
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
            # the block's lanes that hold one of the row's ids leave the rest's sum
            off = tl.where(tl.reshape(_id_lanes(ids, start, BLOCK_V), [R, ELEMS]), NEG_INF, su)
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
    s_y, _dcap_y = _load_student(s_row + tl.where(owned, y_local, 0), owned, cap_scale, softcap, SOFTCAP)
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

"""The gradient pass: d loss / d s (and d loss / d t) of one range of a row's vocabulary, recomputed from the
final row statistics (`layout.FINAL`) and scaled per row by g_i (grad_output times the reduction's factor,
0 for ignored rows):

    ds = g * ((q1 (a + 2 z_loss lse_s) - a (1 - eps) onehot(y) - a eps / V) + hrm / T * dkl/du) * dcap
    dt = g * hrm / T * dkl/dw            (dcap = 1 - tanh^2(s_raw / c) with a soft cap, else 1; a = ce_weight)

with, by KIND (layout.KINDS):
    forward  dkl/du = q - p                                  dkl/dw = p (log p - log q - KL(p||q))
    reverse  dkl/du = q (log q - log p - KL(q||p))           dkl/dw = p - q
    jsd      dkl/du = (1-b) q (log q - log m - KL(q||m))     dkl/dw = b p (log p - log m - KL(p||m))

Without a dense reference (HAS_REF False: a sparse teacher) the divergence's part here is hrm / T * a q with
a per-row coefficient a (FINAL.coef), off the top-k ids with REST; the O(K) term at the ids is applied by
hrmloss/engine/sparse.py. ds may be the storage of s itself (in-place backward): each element is read,
then written, by the same program.
"""
import triton
import triton.language as tl

from .common import (
    BETA,
    F_COEF,
    F_KL_P,
    F_KL_Q,
    F_LSE_S,
    F_LSE_U,
    F_LSE_W,
    FORWARD,
    CE_WEIGHT,
    HRM,
    LABEL_SMOOTHING,
    LOG2E,
    N_FINAL,
    NEG_INF,
    REVERSE,
    SOFTCAP_C,
    TEMPERATURE,
    Z_LOSS,
    _column_range,
    _divergence_logits,
    _exp,
    _id_lanes,
    _load_student,
    _log_mixture,
    _log_probs,
    _ref_lanes,
    _row_ids,
    _row_label,
    _row_offset,
    _xlog_ratio,
)


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
    KIND: tl.constexpr,      # layout.KINDS: forward KL(p||q), reverse KL(q||p), jsd
    SCALED: tl.constexpr,    # T != 1
    SOFTCAP: tl.constexpr,
    READ_REF: tl.constexpr,  # a dense reference and (hrm != 0 or REF_GRAD): its gradient terms are needed
    REF_GRAD: tl.constexpr,  # write dt
    HAS_REF: tl.constexpr,   # a dense reference; else d kl / d u = coef q here (+ the sparse term at the ids)
    REST: tl.constexpr,      # without HAS_REF: coef q off the row's K ids only (the ids' term is the caller's)
    CUT: tl.constexpr,       # u = -inf beyond V_ref
    K_PAD: tl.constexpr,     # next power of 2 >= K (REST)
    BLOCK_V: tl.constexpr,
    PTX: tl.constexpr,       # an NVIDIA target: the log as PTX (common._log2); set by the launcher
):
    # read s (and t when READ_REF), write ds (and dt): 3 NVs for the usual case
    row, y = _row_label(y_ptr)
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
    ce_weight = tl.load(params_ptr + CE_WEIGHT)     # a: loss = a ce + hrm kl + z (per-row scalars below)
    smooth_per_class = ce_weight * label_smoothing / vocab_size
    label_hit = ce_weight * (1.0 - label_smoothing)
    q1_coef = ce_weight + 2.0 * tl.load(params_ptr + Z_LOSS) * lse_s
    softcap = tl.load(params_ptr + SOFTCAP_C)
    cap_scale = 2.0 * LOG2E / softcap   # the soft cap's 2 log2(e) / c (common._load_student)
    y_local = y - vocab_start
    c = tl.load(params_ptr + HRM) * inv_temp
    if HAS_REF:  # one side has no mass (an all -inf row): a constant divergence, no gradient
        c = tl.where((lse_u == NEG_INF) | (lse_w == NEG_INF), 0.0, c)
    if REST:  # this row's top-k ids, local to the shard
        ids = _row_ids(ids_ptr, row, K, vocab_start, K_PAD)
    for start in range(lo, hi, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < hi
        mask = cols < hi_live
        s, dcap = _load_student(s_row + cols, mask, cap_scale, softcap, SOFTCAP)
        # 1. cross-entropy with label smoothing, weighted by a = ce_weight, plus z-loss:
        #    d/ds [a ce + z lse_s^2] = q1 (a + 2 z lse_s) - a (1 - eps) onehot(y) - a eps / V_total
        q1 = _exp(s - lse_s)
        ds = q1 * q1_coef - tl.where(cols == y_local, label_hit, 0.0)
        ds -= smooth_per_class
        su = _divergence_logits(s, cols, V_ref, CUT)
        if not HAS_REF:
            # 2'. a sparse teacher: the dense part a q of d kl / d u (no reference to read); with REST
            #     only off the ids, where |a q_j| <= q_j + p_rest stays small even when a is huge
            if c != 0.0:
                if SCALED:
                    q = _exp(su * inv_temp - lse_u)
                else:
                    q = _exp(su - lse_u)
                if REST:
                    q = tl.where(_id_lanes(ids, start, BLOCK_V), 0.0, q)
                ds += c * tl.where(q == 0.0, 0.0, coef * q)
        if READ_REF:
            # 2. divergence: the formulas of the module docstring, 0 where the probability is 0; hrm = 0
            #    (c = 0) drops the term instead of multiplying it by 0, since it can be infinite
            if c != 0.0:
                t = tl.load(t_row + cols, mask=_ref_lanes(cols, mask, V_ref, CUT), other=NEG_INF).to(tl.float32)
                lq, lp, q, p = _log_probs(su, t, lse_u, lse_w, inv_temp, SCALED)
                if KIND == FORWARD:
                    dku = q - p
                    dkw = _xlog_ratio(p, lp, lq) - p * kl_p
                elif KIND == REVERSE:
                    dku = _xlog_ratio(q, lq, lp) - q * kl_q
                    dkw = p - q
                else:
                    lm = _log_mixture(p, q, beta, PTX)
                    dku = (1.0 - beta) * (_xlog_ratio(q, lq, lm) - q * kl_q)
                    dkw = beta * (_xlog_ratio(p, lp, lm) - p * kl_p)
                ds += c * dku
                if REF_GRAD:
                    dt = tl.where(live, g * c * dkw, 0.0)
                    tl.store(dt_row + cols, dt.to(dt_ptr.dtype.element_ty), mask=_ref_lanes(cols, in_row, V_ref, CUT))
            elif REF_GRAD:
                tl.store(dt_row + cols, tl.zeros([BLOCK_V], dt_ptr.dtype.element_ty),
                         mask=_ref_lanes(cols, in_row, V_ref, CUT))
        # 3. through the soft cap (d s / d s_raw), scale by g; a dead row writes zeros
        ds = tl.where(live, g * ds * dcap, 0.0)
        tl.store(ds_row + cols, ds.to(ds_ptr.dtype.element_ty), mask=in_row)

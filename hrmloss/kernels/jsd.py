"""The JSD pass (kl="jsd" only): with the final lse_u, lse_w of the whole vocabulary and the mixture
m = beta p + (1 - beta) q, the sums of one range of a row's vocabulary (`layout.JSD`)

    kpm = KL(p||m) = sum_j p_j (log p_j - log m_j),   kqm = KL(q||m) = sum_j q_j (log q_j - log m_j)

so that JSD = beta kpm + (1 - beta) kqm. It needs both normalisers first, hence a second reading pass.
"""
import triton
import triton.language as tl

from .common import (
    BETA,
    BIG,
    J_KL_PM,
    J_KL_QM,
    LOG2E,
    N_JSD,
    NEG_INF,
    SOFTCAP_C,
    TEMPERATURE,
    _column_range,
    _divergence_logits,
    _load_student,
    _log_mixture,
    _log_probs,
    _ref_lanes,
    _row_label,
    _row_offset,
    _tile,
)


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
    PTX: tl.constexpr,      # an NVIDIA target: the log as PTX (common._log2); set by the launcher
):
    # read s and t once more: 2 NVs
    row, y = _row_label(y_ptr)
    live = y != ignore_index
    lo, hi = _column_range(V, split_cols)
    hi_live = tl.where(live, hi, lo)  # an ignored row reads nothing
    inv_temp = 1.0 / tl.load(params_ptr + TEMPERATURE)
    beta = tl.load(params_ptr + BETA)
    softcap = tl.load(params_ptr + SOFTCAP_C)
    cap_scale = 2.0 * LOG2E / softcap   # the soft cap's 2 log2(e) / c (common._load_student)
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
        s, _dcap = _load_student(s_row + cols, mask, cap_scale, softcap, SOFTCAP)
        s = _divergence_logits(s, cols, V_ref, CUT)
        t = tl.load(t_row + cols, mask=_ref_lanes(cols, mask, V_ref, CUT), other=NEG_INF).to(tl.float32)
        # m = beta p + (1 - beta) q > 0 wherever p > 0 or q > 0. A zero probability is a zero weight:
        # the logs are clamped to >= -BIG so that 0 * (a finite difference) = 0, never NaN.
        lq, lp, q, p = _log_probs(s, t, lse_u, lse_w, inv_temp, SCALED)
        lm = _log_mixture(p, q, beta, PTX)
        kpm += tl.sum(p * (tl.maximum(lp, -BIG) - lm), 1)
        kqm += tl.sum(q * (tl.maximum(lq, -BIG) - lm), 1)
    out = out_ptr + (row * tl.num_programs(1) + tl.program_id(1)) * N_JSD
    tl.store(out + J_KL_PM, tl.sum(kpm, 0))
    tl.store(out + J_KL_QM, tl.sum(kqm, 0))

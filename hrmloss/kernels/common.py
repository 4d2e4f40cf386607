"""The shared constants and `@triton.jit` helpers of the kernel family (stats.py, jsd.py, grad.py): the column
indices of the named layouts (hrmloss/engine/layout.py), the exponentials and logs, the row prologue, the
soft-capped student load, the truncated-reference masks, a sparse teacher's ids, and the running-max
rescaling that the reading passes share. Each is written once; the kernels read like the maths of
hrmloss/kernels/__init__.py.
"""
import triton
import triton.language as tl

from ..engine.layout import FINAL, JSD, KINDS, PARAMS, PARTIAL

NEG_INF = tl.constexpr(float("-inf"))
INF = tl.constexpr(float("inf"))
LOG2E = tl.constexpr(1.4426950408889634)   # log2(e): e^x = 2^(x log2 e)
LN2 = tl.constexpr(0.6931471805599453)     # ln(2): ln x = ln 2 log2 x
BIG = tl.constexpr(1.0e38)                 # a finite stand-in for an infinite log-ratio multiplied by 0
FLT_MIN = tl.constexpr(1.1754943508222875e-38)  # the smallest normal fp32

# The column indices of the named layouts, one constexpr a name. (Written out rather than generated in a
# loop, so that a reader and a linter see every name the kernels use; the values come from layout.py.)
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
CE_WEIGHT = tl.constexpr(PARAMS.ce_weight)
# the divergence kinds, the grad pass's KIND
FORWARD = tl.constexpr(KINDS.forward)
REVERSE = tl.constexpr(KINDS.reverse)
JSD_KIND = tl.constexpr(KINDS.jsd)


@triton.jit
def _log2(x, PTX: tl.constexpr):
    # log2 with the accuracy contract the kernels rely on: absolute error < 2^-22 for a normal x, and
    # a subnormal x (< 2^-126) either flushed (-inf) or exact; every caller passes x >= FLT_MIN.
    # PTX (an NVIDIA target, chosen by the launcher at compile time): one MUFU.LG2, lg2.approx.ftz
    # (tl.log2 compiles to ~15 instructions of libdevice there). Elsewhere (AMD, the interpreter)
    # tl.log2, which meets the contract (AMD: v_log_f32 with its denormal scaling, ~1 ulp).
    if PTX:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


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
def _load_student(ptr, mask, cap_scale, softcap, SOFTCAP: tl.constexpr):
    # Student logits in fp32 with -inf at masked lanes, and d s / d s_raw. With SOFTCAP the logits
    # become c tanh(s_raw / c) (Gemma-2, c = softcap), with cap_scale = 2 log2(e) / c (a scalar):
    #   tanh x = 1 - 2 r,  r = 1 / (2^(2 log2(e) x) + 1),  so  s = c - 2c r  and  d s / d s_raw = 4 r (1 - r)
    # One FMUL, one MUFU.EX2, one FADD, one fast reciprocal (fdiv approx: MUFU.RCP on NVIDIA, v_rcp_f32
    # on AMD; <= 2 ulp for a denominator in [1, 2^126], 0 above, where tanh rounds to 1 anyway) and one
    # FFMA an element. r is 1 at s_raw = -inf, 0 at +inf: s = -c, c exactly. |c tanh - s| <= 4e-7 c
    # against float64 (tests/test_softcap_accuracy.py).
    s = tl.load(ptr, mask=mask, other=NEG_INF).to(tl.float32)
    dcap = tl.full(s.shape, 1.0, tl.float32)
    if SOFTCAP:
        r = tl.math.fdiv(1.0, tl.exp2(s * cap_scale) + 1.0, approx=True)
        s = tl.where(mask, softcap - (2.0 * softcap) * r, NEG_INF)
        dcap = 4.0 * r * (1.0 - r)
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
def _log_mixture(p, q, beta, PTX: tl.constexpr):
    # log m = log(beta p + (1 - beta) q), with m raised to the smallest normal fp32. The log2 flushes a
    # subnormal argument to 0 (-inf): without the floor, a normal p ~ 1e-38 whose m is subnormal would
    # weigh a log-ratio of ~1e38 and add ~1 to KL(p||m). With it, p (log p - log m) stays ~p (tiny), and
    # p = q = 0 meets a finite log m (zero weights, no NaN).
    return _log2(tl.maximum(beta * p + (1.0 - beta) * q, FLT_MIN), PTX) * LN2


@triton.jit
def _row_label(y_ptr):
    # The row prologue of every pass, with _column_range: this program's row (token) and its label.
    # (One helper returning the column range and whether the row counts as well compiles to 8 more
    # registers on sm_90, 48 instead of 40 in the stats pass: measured with tests/aot_compile.py.)
    row = tl.program_id(0).to(tl.int64)
    return row, tl.load(y_ptr + row).to(tl.int64)


@triton.jit
def _ref_lanes(cols, mask, V_ref, CUT: tl.constexpr):
    # The lanes of `mask` that hold a reference column: all of them, or with CUT (ref_vocab="truncate",
    # a reference of V_ref < V columns) those below V_ref
    if CUT:
        mask = mask & (cols < V_ref)
    return mask


@triton.jit
def _divergence_logits(s, cols, V_ref, CUT: tl.constexpr):
    # The student's logits as the divergence sees them: with CUT -inf past the reference's V_ref columns
    # (q is then the student renormalised over the shared ids), else s itself
    if CUT:
        s = tl.where(cols < V_ref, s, NEG_INF)
    return s


@triton.jit
def _row_ids(ids_ptr, row, K, vocab_start, K_PAD: tl.constexpr):
    # A sparse teacher's K ids of this row, local to the shard, padded to K_PAD with ids below 0 (an id
    # outside the shard, or a pad, falls in no block)
    kk = tl.arange(0, K_PAD)
    return tl.load(ids_ptr + row * K + kk, mask=kk < K, other=-1).to(tl.int64) - vocab_start


@triton.jit
def _id_lanes(ids, start, BLOCK_V: tl.constexpr):
    # The lanes of the block of columns [start, start + BLOCK_V) that hold one of the row's ids: a
    # K-element histogram over the block (no K x BLOCK_V comparison)
    in_block = (ids >= start) & (ids < start + BLOCK_V)
    return tl.histogram((ids - start).to(tl.int32), BLOCK_V, mask=in_block) > 0

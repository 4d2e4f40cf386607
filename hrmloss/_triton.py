"""The "triton" backend (`_backends.Backend`): launchers for kernels/hrm_loss.py. Allocate outputs, pick
block size and warps, launch one program a row; none synchronises with the host.
"""
import torch
import triton

from .kernels.hrm_loss import _hrm_grad_kernel, _hrm_jsd_kernel, _hrm_stats_kernel
from ._layout import JSD, PARTIAL

MAX_BLOCK_V = 2048


def launch_config(V):
    """(BLOCK_V, num_warps) for a vocabulary (shard) of V: the whole row up to MAX_BLOCK_V, else blocks."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    warps = 8 if block >= 1024 else 4
    return block, warps


def _strides(x):
    return x.stride(0), x.stride(1)


def row_stats(s, t, labels, params, st, vocab_start=0, topk_ids=None):
    """(N, PARTIAL) fp32 partial statistics. Reads s (and t with a dense reference) once.

    t: (B, T, V_ref) with V_ref <= V (st.cut), or anything without a dense reference (never read);
    topk_ids: (N, K) global ids, read when st.rest."""
    B, T_rows, V = s.shape
    out = torch.empty((B * T_rows, len(PARTIAL)), device=s.device, dtype=torch.float32)
    ids = topk_ids.contiguous() if st.rest else labels  # never read unless REST
    K = ids.shape[1] if st.rest else 1
    if out.numel():
        block, warps = launch_config(V)
        _hrm_stats_kernel[(B * T_rows,)](
            s, *_strides(s), t, *_strides(t), labels, ids, out, params, T_rows, V, t.shape[-1], K, vocab_start,
            st.ignore_index, SCALED=st.scaled, SOFTCAP=st.capped, HAS_REF=st.has_ref, REST=st.rest, CUT=st.cut,
            K_PAD=triton.next_power_of_2(K), BLOCK_V=block, num_warps=warps)
    return out


def jsd_sums(s, t, labels, lse_uw, params, st):
    """(N, JSD) fp32 partial sums KL(p||m), KL(q||m) given the final (N, 2) lse_u, lse_w. Reads s, t once."""
    B, T_rows, V = s.shape
    out = torch.empty((B * T_rows, len(JSD)), device=s.device, dtype=torch.float32)
    if out.numel():
        block, warps = launch_config(V)
        _hrm_jsd_kernel[(B * T_rows,)](
            s, *_strides(s), t, *_strides(t), labels, lse_uw.contiguous(), out, params, T_rows, V, t.shape[-1],
            st.ignore_index, SCALED=st.scaled, SOFTCAP=st.capped, CUT=st.cut, BLOCK_V=block, num_warps=warps)
    return out


def grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad=False, topk_ids=None):
    """d loss / d s (N, V) in the dtype of s, and d loss / d t (or None), scaled per row by g (N,) fp32.

    Without a dense reference (st.has_ref False) the divergence's part is coef * q only (off the top-k
    ids with st.rest): the caller adds the term at the ids (hrmloss/_topk.py)."""
    B, T_rows, V = s.shape
    N = B * T_rows
    V_ref = t.shape[-1]
    ds = torch.empty((N, V), device=s.device, dtype=s.dtype)
    dt = torch.empty((N, V_ref), device=t.device, dtype=t.dtype) if ref_grad else None
    dt_arg = dt if ref_grad else ds  # not written unless REF_GRAD
    ids = topk_ids.contiguous() if st.rest else labels  # never read unless REST
    K = ids.shape[1] if st.rest else 1
    if N:
        block, warps = launch_config(V)
        _hrm_grad_kernel[(N,)](
            s, *_strides(s), t, *_strides(t), labels, ids, final.contiguous(), g.contiguous(), params,
            ds, ds.stride(0), dt_arg, dt_arg.stride(0), T_rows, V, vocab_start, vocab_size, V_ref, K,
            st.ignore_index, KIND=st.kind, SCALED=st.scaled, SOFTCAP=st.capped,
            READ_REF=not st.hrm_zero or ref_grad, REF_GRAD=ref_grad, HAS_REF=st.has_ref, REST=st.rest, CUT=st.cut,
            K_PAD=triton.next_power_of_2(K), BLOCK_V=block, num_warps=warps)
    return ds, dt

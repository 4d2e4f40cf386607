"""Launchers for kernels/hrm_loss.py: allocate outputs, pick block size and warps, launch one program a row.

Every function takes the (B, T, V) views of `rows_3d` and the flat (N,) labels; none synchronises
with the host.
"""
import torch
import triton

from .kernels.hrm_loss import _hrm_grad_kernel, _hrm_jsd_kernel, _hrm_stats_kernel
from ._core import N_PARTIAL

MAX_BLOCK_V = 2048


def launch_config(V):
    """(BLOCK_V, num_warps) for a vocabulary (shard) of V: the whole row up to MAX_BLOCK_V, else blocks."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    warps = 8 if block >= 1024 else 4
    return block, warps


def _strides(x):
    return x.stride(0), x.stride(1)


def _softcap(opts):
    return opts.softcap if opts.capped else 1.0


def row_stats(s, t, labels, opts, vocab_start=0):
    """(N, 7) fp32 partial statistics: lse_s, s[y], lse_u, lse_w, E_p[w-u], E_q[u-w], sum s. Reads s, t once."""
    B, T_rows, V = s.shape
    out = torch.empty((B * T_rows, N_PARTIAL), device=s.device, dtype=torch.float32)
    if out.numel():
        block, warps = launch_config(V)
        _hrm_stats_kernel[(B * T_rows,)](
            s, *_strides(s), t, *_strides(t), labels, out, T_rows, V, vocab_start,
            opts.inv_temp, opts.ignore_index, _softcap(opts), SCALED=opts.scaled, SOFTCAP=opts.capped,
            BLOCK_V=block, num_warps=warps)
    return out


def jsd_sums(s, t, labels, lse_uw, opts):
    """(N, 2) fp32 partial sums KL(p||m), KL(q||m) given the final (N, 2) lse_u, lse_w. Reads s, t once."""
    B, T_rows, V = s.shape
    out = torch.empty((B * T_rows, 2), device=s.device, dtype=torch.float32)
    if out.numel():
        block, warps = launch_config(V)
        _hrm_jsd_kernel[(B * T_rows,)](
            s, *_strides(s), t, *_strides(t), labels, lse_uw.contiguous(), out, T_rows, V,
            opts.inv_temp, opts.beta, opts.ignore_index, _softcap(opts), SCALED=opts.scaled,
            SOFTCAP=opts.capped, BLOCK_V=block, num_warps=warps)
    return out


def grad(s, t, labels, final, g, opts, vocab_size, vocab_start=0, ref_grad=False):
    """d loss / d s (N, V) in the dtype of s, and d loss / d t (or None), scaled per row by g (N,) fp32."""
    B, T_rows, V = s.shape
    N = B * T_rows
    ds = torch.empty((N, V), device=s.device, dtype=s.dtype)
    dt = torch.empty((N, V), device=t.device, dtype=t.dtype) if ref_grad else None
    dt_arg = dt if ref_grad else ds  # not written unless REF_GRAD
    if N:
        block, warps = launch_config(V)
        _hrm_grad_kernel[(N,)](
            s, *_strides(s), t, *_strides(t), labels, final.contiguous(), g.contiguous(),
            ds, ds.stride(0), dt_arg, dt_arg.stride(0),
            T_rows, V, vocab_start, opts.hrm, opts.inv_temp, opts.beta, opts.ignore_index,
            opts.label_smoothing, opts.label_smoothing / vocab_size, opts.z_loss, _softcap(opts),
            KIND=opts.kind, SCALED=opts.scaled, SOFTCAP=opts.capped, READ_REF=opts.hrm != 0 or ref_grad,
            REF_GRAD=ref_grad, BLOCK_V=block, num_warps=warps)
    return ds, dt

"""The "triton" backend (the `Backend` protocol of hrmloss/engine/backends.py): launchers for the kernels of
stats.py, jsd.py and grad.py. Allocate outputs, pick block size, warps and the vocabulary split, launch by
keyword; none synchronises with the host.

Grid: one program per row, times `splits` programs along the vocabulary when there are too few rows to
fill the GPU (a few hundred rows of a long vocabulary). The stats and JSD passes then write one partial
row per column range, merged on the device by `stats.merge_partial` (the rules of
`layout.PARTIAL_MERGE`, shared with the vocabulary-parallel merge); the gradient pass needs no merge.
"""
import dataclasses
import functools

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from ..engine.layout import JSD, PARTIAL
from ..engine.stats import merge_partial
from .grad import _hrm_grad_kernel
from .jsd import _hrm_jsd_kernel
from .stats import _hrm_stats_kernel

MAX_BLOCK_V = 2048       # gradient pass: columns per iteration (256 threads, 8 per thread)
READ_THREADS = 256       # reading passes: threads a program (8 warps of 32, 4 wavefronts of 64 on CDNA)
READ_THREAD_ROWS = 1     # reading passes: tile rows (16-byte slices) per thread per iteration
PROGRAMS_PER_SM = 8      # split the vocabulary until rows x splits reaches this many programs per SM (of 256
                         # threads: 64 warps of 32 fill an NVIDIA SM, 32 wavefronts of 64 a CDNA CU)
MIN_SPLIT_BLOCKS = 8     # ... but never into ranges of fewer blocks than this


@dataclasses.dataclass(frozen=True)
class Target:
    """What the launcher knows of the machine the kernels compile for: the backend ("cuda", "hip", or
    "interpreter"), the architecture (compute capability 90, "gfx942"; None for the interpreter) and the
    warp size (32; 64 on CDNA). `ptx`: inline PTX may be used (common._log2), a compile-time constexpr."""
    backend: str
    arch: object
    warp_size: int

    @property
    def ptx(self):
        return self.backend == "cuda"


INTERPRETER = Target("interpreter", None, 32)


@functools.lru_cache(maxsize=None)
def _cuda_target(index):
    p = torch.cuda.get_device_properties(index)
    if torch.version.hip:
        return Target("hip", p.gcnArchName.split(":")[0], getattr(p, "warp_size", 64))
    return Target("cuda", p.major * 10 + p.minor, getattr(p, "warp_size", 32))


def device_target(device):
    """The Target of a device, decided at launch: the interpreter when triton.jit made interpreted
    kernels (TRITON_INTERPRET=1 when they were decorated), else the device's GPU (a cached host query)."""
    if isinstance(_hrm_stats_kernel, InterpretedFunction):
        return INTERPRETER
    if device.type != "cuda":  # another triton backend (an XPU): the portable forms, warps of 32
        return Target(device.type, None, 32)
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


def launch_config(V, warp_size=32):
    """(BLOCK_V, num_warps) of the gradient pass for a vocabulary (shard) of V: the whole row up to
    MAX_BLOCK_V, else blocks of MAX_BLOCK_V; 256 threads a program (128 for blocks under 1024)."""
    block = min(triton.next_power_of_2(V), MAX_BLOCK_V)
    threads = 256 if block >= 1024 else 128
    return block, max(1, threads // warp_size)


def read_config(V, elem_bytes, warp_size=32):
    """(BLOCK_V, ELEMS, num_warps) of the stats and JSD passes: ELEMS columns (16 bytes of the widest input
    dtype) per thread and tile row, READ_THREAD_ROWS tile rows per thread, READ_THREADS threads; smaller
    rows get fewer warps so that a block does not exceed the row."""
    elems = 16 // elem_bytes
    warps = max(1, READ_THREADS // warp_size)
    while warps > 1 and elems * warp_size * warps * READ_THREAD_ROWS > V:
        warps //= 2
    return elems * warp_size * warps * READ_THREAD_ROWS, elems, warps


@functools.lru_cache(maxsize=None)
def _sm_count(device_type, index):
    if device_type == "cuda":
        return torch.cuda.get_device_properties(index).multi_processor_count
    return 1  # the interpreter runs programs one after another


def multiprocessor_count(device):
    """Streaming multiprocessors (CUs on AMD) of a device (a host query, cached per device); 1 for the CPU."""
    index = device.index if device.index is not None else (
        torch.cuda.current_device() if device.type == "cuda" else 0)
    return _sm_count(device.type, index)


def vocab_splits(N, V, block, sms):
    """(splits, columns per split) so that N * splits programs fill `sms` multiprocessors
    (PROGRAMS_PER_SM each), with ranges of at least MIN_SPLIT_BLOCKS blocks; one split when N suffices.
    Columns per split are a whole number of blocks (so a multiple of 16 whatever V)."""
    want = -(-PROGRAMS_PER_SM * sms // max(N, 1))
    most = max(1, V // (MIN_SPLIT_BLOCKS * block))
    splits = max(1, min(want, most))
    per_split = -(-V // splits)
    cols = -(-per_split // block) * block          # a whole number of blocks per range
    return -(-V // cols), cols


def preferred_rows(vocab):
    """The `Backend` protocol's rows per call: any number (one program a row)."""
    return 1


def _rows(name, x):
    """The keyword arguments of a (B, T, V) tensor `name`: its pointer and its two leading strides."""
    return {f"{name}_ptr": x, f"{name}_stride_b": x.stride(0), f"{name}_stride_t": x.stride(1)}


def _elem_bytes(*xs):
    return max(x.element_size() for x in xs)


def _ids(st, labels, topk_ids):
    """(ids tensor, K, K_PAD) for the kernels: a sparse teacher's (N, K) ids when st.rest, else a stand-in
    that is never read."""
    if not st.rest:
        return labels, 1, 1
    return topk_ids.contiguous(), topk_ids.shape[1], triton.next_power_of_2(topk_ids.shape[1])


def row_stats(s, t, labels, params, st, vocab_start=0, topk_ids=None):
    """(N, PARTIAL) fp32 partial statistics. Reads s (and t with a dense reference) once.

    t: (B, T, V_ref), V_ref < V with st.cut; never read without a dense reference (st.has_ref False);
    topk_ids: (N, K) global ids, read when st.rest."""
    B, T_rows, V = s.shape
    N = B * T_rows
    target = device_target(s.device)
    elem_bytes = _elem_bytes(s, t) if st.has_ref else s.element_size()
    block, elems, warps = read_config(V, elem_bytes, target.warp_size)
    splits, cols = vocab_splits(N, V, block, multiprocessor_count(s.device))
    out = torch.empty((N, splits, len(PARTIAL)), device=s.device, dtype=torch.float32)
    ids, K, K_PAD = _ids(st, labels, topk_ids)
    if N:
        _hrm_stats_kernel[(N, splits)](
            **_rows("s", s), **_rows("t", t), y_ptr=labels, ids_ptr=ids, stats_ptr=out, params_ptr=params,
            T_rows=T_rows, V=V, V_ref=t.shape[-1], K=K, vocab_start=vocab_start, split_cols=cols,
            ignore_index=st.ignore_index, SCALED=st.scaled, SOFTCAP=st.capped, HAS_REF=st.has_ref, REST=st.rest,
            CUT=st.cut, K_PAD=K_PAD, BLOCK_V=block, ELEMS=elems, num_warps=warps)
    if splits == 1:
        return out.view(N, len(PARTIAL))
    return merge_partial(out, lambda x: x.amax(1, keepdim=True), lambda x: x.sum(1))


def jsd_sums(s, t, labels, lse_uw, params, st):
    """(N, JSD) fp32 partial sums KL(p||m), KL(q||m) given the final (N, 2) lse_u, lse_w. Reads s, t once."""
    B, T_rows, V = s.shape
    N = B * T_rows
    target = device_target(s.device)
    block, elems, warps = read_config(V, _elem_bytes(s, t), target.warp_size)
    splits, cols = vocab_splits(N, V, block, multiprocessor_count(s.device))
    out = torch.empty((N, splits, len(JSD)), device=s.device, dtype=torch.float32)
    if N:
        _hrm_jsd_kernel[(N, splits)](
            **_rows("s", s), **_rows("t", t), y_ptr=labels, lse_ptr=lse_uw.contiguous(), out_ptr=out,
            params_ptr=params, T_rows=T_rows, V=V, V_ref=t.shape[-1], split_cols=cols, ignore_index=st.ignore_index,
            SCALED=st.scaled, SOFTCAP=st.capped, CUT=st.cut, BLOCK_V=block, ELEMS=elems, PTX=target.ptx,
            num_warps=warps)
    return out.sum(1) if splits > 1 else out.view(N, len(JSD))


def grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad=False, topk_ids=None):
    """d loss / d s (B, T, V) in the dtype of s, and d loss / d t (B, T, V_ref) (or None), scaled per row by
    g (N,) fp32.

    With st.inplace the gradient of s is written into s itself (and s is returned). Without a dense
    reference (st.has_ref False) the divergence's part is coef * q only (off the top-k ids with st.rest):
    the caller adds the term at the ids (hrmloss/engine/sparse.py)."""
    B, T_rows, V = s.shape
    N = B * T_rows
    ds = s if st.inplace else torch.empty((B, T_rows, V), device=s.device, dtype=s.dtype)
    dt = torch.empty((B, T_rows, t.shape[-1]), device=t.device, dtype=t.dtype) if ref_grad else None
    dt_arg = dt if ref_grad else ds  # not written unless REF_GRAD
    ids, K, K_PAD = _ids(st, labels, topk_ids)
    if N:
        target = device_target(s.device)
        block, warps = launch_config(V, target.warp_size)
        splits, cols = vocab_splits(N, V, block, multiprocessor_count(s.device))
        _hrm_grad_kernel[(N, splits)](
            **_rows("s", s), **_rows("t", t), y_ptr=labels, ids_ptr=ids, stats_ptr=final.contiguous(),
            g_ptr=g.contiguous(), params_ptr=params, **_rows("ds", ds), **_rows("dt", dt_arg), T_rows=T_rows, V=V,
            vocab_start=vocab_start, vocab_size=vocab_size, V_ref=t.shape[-1], K=K, split_cols=cols,
            ignore_index=st.ignore_index, KIND=st.kind, SCALED=st.scaled, SOFTCAP=st.capped,
            READ_REF=st.has_ref and (not st.hrm_zero or ref_grad), REF_GRAD=ref_grad, HAS_REF=st.has_ref,
            REST=st.rest, CUT=st.cut, K_PAD=K_PAD, BLOCK_V=block, PTX=target.ptx, num_warps=warps)
    return ds, dt

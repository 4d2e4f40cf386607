"""The backends, registered in one place, and the choice between them.

A backend is a module with the three passes below (the `Backend` protocol); each takes the (B, T, V) views
of `rows.rows_3d`, the flat (N,) labels, the runtime scalars `params` (`layout.PARAMS`) and the
`Structure` of the call, and none synchronises with the host:

    row_stats(s, t, labels, params, st, vocab_start, topk_ids)
                                                          -> (N, PARTIAL) partial row statistics
    jsd_sums(s, t, labels, lse_uw, params, st)            -> (N, JSD) sums, given the final lse_u, lse_w
    grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad, topk_ids)
                                                          -> (ds (N, V) in s's dtype, dt or None)
    preferred_rows(vocab_size)                            -> the rows it runs best in multiples of (chunked.py)

t is (B, T, V_ref): V_ref = V, or fewer columns with st.cut (ref_vocab="truncate"); without a dense
reference (st.has_ref False, a sparse teacher) t is never read and topk_ids (N, K) feeds PARTIAL.lse_rest.

"torch" is plain PyTorch (hrmloss/engine/torch_passes.py, compiled per chunk on large CPU inputs by
torch_compiled.py); "triton" the kernels of hrmloss/kernels (hrmloss/kernels/launch.py).
"""
import importlib
import os
from typing import Protocol

import torch

# name -> module implementing the protocol, imported on first use (triton only when asked for)
REGISTRY = {"torch": "hrmloss.engine.torch_compiled", "triton": "hrmloss.kernels.launch"}


class Backend(Protocol):
    def row_stats(self, s, t, labels, params, st, vocab_start, topk_ids=None): ...

    def jsd_sums(self, s, t, labels, lse_uw, params, st): ...

    def grad(self, s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad, topk_ids=None): ...

    def preferred_rows(self, vocab_size): ...


def get(name) -> Backend:
    """The module of a resolved backend name."""
    return importlib.import_module(REGISTRY[name])


def triton_available():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend, device):
    """"auto" -> "triton" for CUDA tensors when triton imports, else "torch"; a forced choice is checked."""
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton': triton is not installed (pip install \"hrmloss[triton]\"); use "
                         "backend='torch' or 'auto'")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' with tensors on {device.type}: expected CUDA tensors, or "
                         "TRITON_INTERPRET=1 set before triton is first imported")
    return "triton"


def check_dtypes(name, *dtypes):
    """float64 runs on the torch backend only (for gradcheck)."""
    if name == "triton" and torch.float64 in dtypes:
        raise TypeError(f"dtypes {list(dtypes)}: the Triton backend takes float32, bfloat16 or float16 "
                        "(float64 runs on backend='torch')")

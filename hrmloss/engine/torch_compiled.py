"""The "torch" backend (`backends.Backend`): the passes of torch_passes.py, compiled per chunk by `torch.compile`
where that works.

Same three functions and signatures as torch_passes.py, and the same math: each compiled function *is*
torch_passes.row_stats / jsd_sums / grad, applied to one (1, rows, V) chunk, so Inductor fuses the dozen
elementwise passes of the eager chunk (exp, where, sub, sum, ...) into a few vectorised loops over each
row. Eager PyTorch reads and writes every (rows, V) temporary; the compiled chunk keeps them in registers.

When the compiled path is taken (checked per call, nothing happens at import):
- the environment variable HRMLOSS_COMPILE is not "0" (read at every call), `torch.compile` exists and
  has not failed before in this process (the first failure warns once and turns it off);
- the tensors are on the CPU, not already being traced by an outer `torch.compile` and not under a
  Python dispatch mode (a TorchDispatchMode such as a memory tracker);
- the work is at least COMPILE_MIN_ELEMS elements, so small calls (and tests) never pay a compile.
Otherwise every call goes to the eager torch_passes functions.

Shapes are static (`dynamic=False`): every compiled call gets exactly `rows = COMPILED_CHUNK_ELEMS // V`
rows (traced, torch_passes._chunks makes them one chunk), so one compilation per (V, dtype, options) serves
every number of tokens. A sequence whose length is not a multiple of `rows` ends with a chunk shifted
back to overlap its predecessor; the overlapped rows are computed twice with identical results (row
results depend on that row only) and written twice. A sequence shorter than `rows` is one chunk of its
own length (one more compilation). A chunk is 4x the eager one: Inductor keeps most temporaries in
registers but still materialises one fp32 (rows, V) buffer per call, so the chunk sets the peak above
the gradient. On an idle 2-core CPU at N = 2048, V = 32000, fp32, fwd + bwd: 2^24 logits a call gave
1.26 NVs and ~290 ms, 2^23 1.13 NVs and ~240 ms, 2^22 1.06 NVs and ~230 ms (torch.compile of the naive
loss: 1.00 NVs, ~300 ms).

The values of the options (hrm, temperature, ...) are inputs of the compiled chunk (the `params` tensor):
a new value runs the same compiled code. Only the structure (`options.Structure`: kl kind, the T != 1
path, soft cap on or off, ...), V and the dtypes compile once more each.
"""
import os
import warnings

import torch

from . import torch_passes
from .rows import acc_dtype
from .layout import JSD, PARTIAL

COMPILE_MIN_ELEMS = 1 << 22  # below this many logits (16 MiB fp32) the eager path is used
COMPILED_CHUNK_ELEMS = 1 << 22  # logits per compiled call (a 16 MiB fp32 buffer inside the compiled graph)

_state = {"failed": False, "fns": {}}


def compile_enabled():
    """True unless HRMLOSS_COMPILE=0, torch.compile is missing, or it failed earlier in this process."""
    return (os.environ.get("HRMLOSS_COMPILE", "1") != "0" and hasattr(torch, "compile")
            and not _state["failed"])


def compiled_rows(vocab):
    """Rows of one compiled call: COMPILED_CHUNK_ELEMS // vocab, at least 1."""
    return max(1, COMPILED_CHUNK_ELEMS // max(vocab, 1))


def preferred_rows(vocab):
    """The `Backend` protocol's rows per call: those of one compiled call (chunks of whole calls avoid the
    eager path for a short remainder)."""
    return compiled_rows(vocab)


def _use_compiled(s):
    # at least COMPILE_MIN_ELEMS logits, or one full compiled call (whose rows x V fall short of it by less
    # than a row); not under an outer torch.compile (it fuses the eager chunk itself), nor under a Python
    # dispatch mode (a memory tracker, FLOP counter, ...), which Inductor cannot compile through
    V = s.shape[-1]
    return (compile_enabled() and s.device.type == "cpu"
            and s.numel() >= min(COMPILE_MIN_ELEMS, compiled_rows(V) * V)
            and not torch.compiler.is_compiling() and not _python_dispatch_mode_active())


def _python_dispatch_mode_active():
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    return _get_current_dispatch_mode() is not None


def _stats_into(out, s, t, labels, params, st, vocab_start, topk_ids):
    out.copy_(torch_passes.row_stats(s, t, labels, params, st, vocab_start, topk_ids))


def _jsd_into(out, s, t, labels, lse_uw, params, st):
    out.copy_(torch_passes.jsd_sums(s, t, labels, lse_uw, params, st))


def _grad_into(ds_out, dt_out, s, t, labels, final, g, params, st, vocab_start, vocab_size, topk_ids):
    ds, dt = torch_passes.grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, dt_out is not None, topk_ids)
    ds_out.copy_(ds.view_as(ds_out))
    if dt_out is not None:
        dt_out.copy_(dt)


def _compiled(fn):
    fns = _state["fns"]
    if fn not in fns:
        fns[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return fns[fn]


def _uniform_chunks(s):
    """(r0, r1, index, fresh) of equal-size row chunks of s (B, T, V), index selecting s[b:b+1, i:i+rows];
    rows fresh: of the chunk are not in an earlier chunk (all but those it overlaps, for the last)."""
    B, T_rows, V = s.shape
    step = min(T_rows, compiled_rows(V))
    for b in range(B):
        for i0 in range(0, T_rows, step):
            i = min(i0, T_rows - step)  # the last chunk overlaps its predecessor instead of being shorter
            yield b * T_rows + i, b * T_rows + i + step, (slice(b, b + 1), slice(i, i + step)), \
                slice(i0 - i, step)


def _try_chunks(fn, s, chunk_args, after=None):
    """Run the compiled fn(*chunk_args(r0, r1, index)) over the chunks of s, then after(index, fresh) if
    given; False if that failed.

    The first failure (no C++ compiler, an op Inductor cannot lower, ...) warns once and turns the
    compiled path off for the process; the caller then redoes the whole call eagerly, which raises
    again if the error was the caller's.
    """
    try:
        run = _compiled(fn)
        for r0, r1, index, fresh in _uniform_chunks(s):
            run(*chunk_args(r0, r1, index))
            if after is not None:
                after(index, fresh)
        return True
    except Exception as e:  # noqa: BLE001
        _state["failed"] = True
        warnings.warn(f"hrmloss: torch.compile of the torch backend failed ({type(e).__name__}: {e}); "
                      "using eager PyTorch from now on", RuntimeWarning, stacklevel=3)
        return False


def row_stats(s, t, labels, params, st, vocab_start=0, topk_ids=None):
    """(N, PARTIAL) partial statistics, as torch_passes.row_stats."""
    if _use_compiled(s):
        out = torch.empty((s.shape[0] * s.shape[1], len(PARTIAL)), device=s.device, dtype=acc_dtype(s))
        if _try_chunks(_stats_into, s, lambda r0, r1, k: (out[r0:r1], s[k], t[k], labels[r0:r1], params, st,
                                                          vocab_start,
                                                          None if topk_ids is None else topk_ids[r0:r1])):
            return out
    return torch_passes.row_stats(s, t, labels, params, st, vocab_start, topk_ids)


def jsd_sums(s, t, labels, lse_uw, params, st):
    """(N, JSD) partial sums KL(p||m), KL(q||m), as torch_passes.jsd_sums."""
    if _use_compiled(s):
        out = torch.empty((lse_uw.shape[0], len(JSD)), device=s.device, dtype=acc_dtype(s))
        if _try_chunks(_jsd_into, s, lambda r0, r1, k: (out[r0:r1], s[k], t[k], labels[r0:r1],
                                                        lse_uw[r0:r1], params, st)):
            return out
    return torch_passes.jsd_sums(s, t, labels, lse_uw, params, st)


def grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad=False, topk_ids=None):
    """d loss / d s (B, T, V) and d loss / d t (or None), as torch_passes.grad (in s itself with st.inplace).

    In place, each compiled chunk writes a (rows, V) buffer that is copied into s for its fresh rows
    only: the last chunk overlaps its predecessor, whose rows of s already hold their gradient (rows are
    independent, so its wrong results for those rows are dropped)."""
    if _use_compiled(s):
        B, T_rows, V = s.shape
        dt = torch.empty((B * T_rows, t.shape[-1]), device=t.device, dtype=t.dtype) if ref_grad else None
        if st.inplace:
            step = min(T_rows, max(1, COMPILED_CHUNK_ELEMS // max(V, 1)))
            buf = torch.empty((step, V), device=s.device, dtype=s.dtype)
            ds, out, after = s, (lambda r0, r1: buf), (lambda k, fresh: s[k][0, fresh].copy_(buf[fresh]))
        else:
            ds = torch.empty((B, T_rows, V), device=s.device, dtype=s.dtype)
            flat = ds.view(B * T_rows, V)
            out, after = (lambda r0, r1: flat[r0:r1]), None
        chunk_st = st._replace(inplace=False)
        if _try_chunks(_grad_into, s, lambda r0, r1, k: (
                out(r0, r1), dt[r0:r1] if ref_grad else None, s[k], t[k], labels[r0:r1], final[r0:r1],
                g[r0:r1], params, chunk_st, vocab_start, vocab_size, None if topk_ids is None else topk_ids[r0:r1]),
                after):
            return ds, dt
    return torch_passes.grad(s, t, labels, final, g, params, st, vocab_start, vocab_size, ref_grad, topk_ids)

"""Count the global-memory bytes that Triton kernels load and store, by running them in the interpreter.

The count is what the kernels ask of memory (active lanes x element size, loads and stores and
atomics apart); caches are not modelled, so it is the traffic a GPU would see with no reuse.
TRITON_INTERPRET=1 must be set before triton is first imported, and the tensors must be on the CPU.

    import os; os.environ["TRITON_INTERPRET"] = "1"
    from benchmarks.tools.traffic import count_traffic
    with count_traffic() as t:
        loss = my_op(x); loss.backward()
    print(t.loaded, t.stored, t.launches)

Run as a script for a self-check: python -m benchmarks.tools.traffic
"""
import contextlib
import os

import numpy as np


class Traffic:
    def __init__(self):
        self.loaded = 0     # bytes read by tl.load (active lanes only)
        self.stored = 0     # bytes written by tl.store
        self.atomic = 0     # bytes touched by atomics (read-modify-write, counted once)
        self.launches = 0   # kernel launches seen

    @property
    def total(self):
        return self.loaded + self.stored + self.atomic

    def __repr__(self):
        return (f"Traffic(loaded={self.loaded}, stored={self.stored}, atomic={self.atomic}, "
                f"launches={self.launches})")


def _active_bytes(ptrs, mask):
    from triton.runtime.interpreter import _get_np_dtype
    n = int(np.count_nonzero(mask.data)) if mask is not None else ptrs.data.size
    return n * _get_np_dtype(ptrs.get_element_ty()).itemsize


@contextlib.contextmanager
def count_traffic():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is imported")
    import triton.runtime.interpreter as ti

    B = ti.InterpreterBuilder
    t = Traffic()
    saved = {name: getattr(B, name) for name in
             ("create_masked_load", "create_masked_store", "create_atomic_rmw", "create_atomic_cas")
             if hasattr(B, name)}

    def masked_load(self, ptrs, mask, other, *a, **k):
        t.loaded += _active_bytes(ptrs, mask)
        return saved["create_masked_load"](self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        t.stored += _active_bytes(ptrs, mask)
        return saved["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self, rmwOp, ptr, val, mask, *a, **k):
        t.atomic += _active_bytes(ptr, mask)
        return saved["create_atomic_rmw"](self, rmwOp, ptr, val, mask, *a, **k)

    def atomic_cas(self, ptr, cmp, val, *a, **k):
        t.atomic += _active_bytes(ptr, None)
        return saved["create_atomic_cas"](self, ptr, cmp, val, *a, **k)

    GridExecutor = ti.GridExecutor
    saved_call = GridExecutor.__call__

    def call(self, *a, **k):
        t.launches += 1
        return saved_call(self, *a, **k)

    B.create_masked_load = masked_load
    B.create_masked_store = masked_store
    if "create_atomic_rmw" in saved:
        B.create_atomic_rmw = atomic_rmw
    if "create_atomic_cas" in saved:
        B.create_atomic_cas = atomic_cas
    GridExecutor.__call__ = call
    try:
        yield t
    finally:
        for name, fn in saved.items():
            setattr(B, name, fn)
        GridExecutor.__call__ = saved_call


if __name__ == "__main__":
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    x = torch.randn(1000)
    y = torch.empty_like(x)
    with count_traffic() as t:
        _copy_kernel[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
    assert torch.equal(x, y) and t.loaded == 4000 and t.stored == 4000 and t.launches == 1, t
    print("ok", t)

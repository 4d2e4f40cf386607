"""Peak bytes of live tensor storages created while a function runs, tracked at the dispatcher.

A `TorchDispatchMode` sees every aten op (autograd's backward ops included). A storage that first
appears as an op's output is new: its bytes count from that moment until its weakref finalizer runs
(the storage is freed). Storages first seen as an op's input existed before and never count, so the
result is the peak above what was live when tracking started. Allocator caching, process RSS and the
scratch space inside a single kernel play no part.

    with StorageTracker() as tracker:
        loss = f(x); loss.backward()
    tracker.peak   # bytes

A dispatch mode makes torch.compile fall back to eager for the code it watches: use it on eager code.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class StorageTracker(TorchDispatchMode):
    """Tracks live bytes of storages created under it; `peak` and `current` are in bytes."""

    def __init__(self):
        super().__init__()
        self.counted = {}  # storage key -> bytes, for storages created under the tracker and still alive
        self.known = set()  # keys of every live storage seen so far (created here or before)
        self.current = 0
        self.peak = 0

    def _forget(self, key):
        self.known.discard(key)
        self.current -= self.counted.pop(key, 0)

    def _see(self, tensor, created):
        if tensor.is_meta or type(tensor) is not torch.Tensor:
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key not in self.known:
            self.known.add(key)
            weakref.finalize(storage, self._forget, key)
            if created:
                self.counted[key] = 0
        if key in self.counted:  # new, or resized since last seen (resize_, out= into an empty tensor)
            nbytes = storage.nbytes()
            self.current += nbytes - self.counted[key]
            self.counted[key] = nbytes
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for x in tree_leaves((args, kwargs)):
            if isinstance(x, torch.Tensor):
                self._see(x, created=False)
        out = func(*args, **kwargs)
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self._see(x, created=True)
        return out


def peak_bytes(fn):
    """Peak bytes of tensor storages allocated by fn() and alive at the same time (above those before)."""
    with StorageTracker() as tracker:
        fn()
    return tracker.peak

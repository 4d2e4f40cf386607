# The Triton kernels run on CPU tensors under the interpreter, which must be switched on before triton is
# first imported; this file is imported by pytest before any test module.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 (after the environment above)


@pytest.fixture
def no_launch(monkeypatch):
    """Make any backend pass fail loudly, so that errors are proven to come before anything runs."""
    from hrmloss.engine import torch_passes
    from hrmloss.kernels import launch

    def boom(*a, **k):
        raise AssertionError("a backend pass ran before validation")
    for mod in (torch_passes, launch):
        for name in ("row_stats", "jsd_sums", "grad"):
            monkeypatch.setattr(mod, name, boom)


@pytest.fixture
def small_chunks(monkeypatch):
    """The compiled torch path (hrmloss/engine/torch_compiled.py) at any size, with 4-row chunks of V = 96, and
    a clean per-test compile state."""
    from hrmloss.engine import torch_compiled
    monkeypatch.setattr(torch_compiled, "COMPILE_MIN_ELEMS", 0)
    monkeypatch.setattr(torch_compiled, "COMPILED_CHUNK_ELEMS", 4 * 96)
    monkeypatch.setitem(torch_compiled._state, "failed", False)
    monkeypatch.setitem(torch_compiled._state, "fns", {})
    monkeypatch.setenv("HRMLOSS_COMPILE", "1")

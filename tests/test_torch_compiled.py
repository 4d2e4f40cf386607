"""The compiled torch path (hrmloss/engine/torch_compiled.py): same values and gradients as the float64 oracle,
uniform chunks with an overlapped tail, the eager fallback, and the HRMLOSS_COMPILE switch."""
import warnings

import pytest
import torch

import hrmloss
from hrmloss.engine import torch_passes, torch_compiled
from .reference import reference_loss



def _inputs():
    g = torch.Generator().manual_seed(0)
    s = 3 * torch.randn(2, 11, 96, generator=g)  # logits[:, :-1] below: 10 rows a batch, not a multiple of 4
    t = 3 * torch.randn(2, 11, 96, generator=g)
    y = torch.randint(0, 96, (2, 10), generator=g)
    y[0, 3] = y[1, 9] = -100
    return s, t, y


@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_compiled_path_matches_reference(small_chunks, kl):
    s, t, y = _inputs()
    s.requires_grad_()
    loss = hrmloss.hrm_loss(s[:, :-1], t[:, :-1], y, 0.7, kl=kl, temperature=1.5)
    loss.backward()
    s_ref = s.detach().double().requires_grad_()
    ref, *_ = reference_loss(s_ref[:, :-1], t[:, :-1].double(), y, 0.7, kl=kl, temperature=1.5)
    ref.backward()
    assert not torch_compiled._state["failed"] and torch_compiled._state["fns"], "compiled path not taken"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s_ref.grad, rtol=1e-5, atol=1e-7)


def test_compiled_grad_to_the_reference_matches_eager(small_chunks):
    from hrmloss.engine.rows import rows_3d
    from hrmloss.engine.autograd import forward_rows
    from hrmloss.engine.options import LossOptions
    s, t, y = _inputs()
    s, t, flat = s[:, :-1], t[:, :-1], y.reshape(-1)
    opts = LossOptions(hrm=0.7, kl="reverse", backend="torch")
    params, st = opts.params(s.device, torch.float32), opts.structure()
    final = forward_rows(s, t, flat, params, st, "torch")[4]
    s3, t3 = rows_3d(s, t)
    g = torch.linspace(0.5, 1.5, flat.numel())
    got = torch_compiled.grad(s3, t3, flat, final, g, params, st, 0, 96, ref_grad=True)
    want = torch_passes.grad(s3, t3, flat, final, g, params, st, 0, 96, ref_grad=True)
    assert torch_compiled._state["fns"] and not torch_compiled._state["failed"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_uniform_chunks_cover_every_row_once_or_twice():
    s = torch.empty(3, 10, 5)
    rows = torch.zeros(30, dtype=torch.int64)
    saved = torch_compiled.COMPILED_CHUNK_ELEMS
    try:
        torch_compiled.COMPILED_CHUNK_ELEMS = 4 * 5
        chunks = list(torch_compiled._uniform_chunks(s))
    finally:
        torch_compiled.COMPILED_CHUNK_ELEMS = saved
    fresh_rows = torch.zeros(30, dtype=torch.int64)
    for r0, r1, (b, i), fresh in chunks:
        assert r1 - r0 == 4 and s[b, i].shape == (1, 4, 5) and r0 == b.start * 10 + i.start
        rows[r0:r1] += 1
        fresh_rows[r0 + fresh.start:r0 + fresh.stop] += 1
    assert rows.min() == 1 and rows.max() == 2
    assert (fresh_rows == 1).all()  # the in-place backward copies every row exactly once


def _refuse(*args, **kwargs):
    raise RuntimeError("no compiler here")


def test_compile_failure_falls_back_to_eager(small_chunks, monkeypatch):
    s, t, y = _inputs()
    expected = hrmloss.hrm_loss(s[:, :-1], t[:, :-1], y, backend="torch")  # compiled
    monkeypatch.setitem(torch_compiled._state, "fns", {})
    monkeypatch.setattr(torch, "compile", _refuse)
    with pytest.warns(RuntimeWarning, match="torch.compile of the torch backend failed"):
        got = hrmloss.hrm_loss(s[:, :-1], t[:, :-1], y, backend="torch")
    torch.testing.assert_close(got, expected)
    assert not torch_compiled.compile_enabled()


def test_hrmloss_compile_0_never_compiles(small_chunks, monkeypatch):
    monkeypatch.setenv("HRMLOSS_COMPILE", "0")
    monkeypatch.setattr(torch, "compile", _refuse)
    s, t, y = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hrmloss.hrm_loss(s[:, :-1], t[:, :-1], y, backend="torch")


@pytest.mark.parametrize("mode,kl", [("renorm", "jsd"), ("tail", "forward")])
def test_compiled_path_sparse_teacher_and_truncate(small_chunks, mode, kl):
    # the no-reference stats (with the rest mass) and the cut reference through the compiled chunks
    s, t, y = _inputs()
    lps, ids = torch.log_softmax(t[:, :-1], -1).topk(7, -1)
    for ref, kw in ((None, dict(ref_topk=(ids, lps), topk_mode=mode)), (t[:, :-1, :80], dict(ref_vocab="truncate"))):
        x = s.clone().requires_grad_()
        loss = hrmloss.hrm_loss(x[:, :-1], ref, y, 0.7, kl=kl, **kw)
        loss.backward()
        x_ref = s.detach().double().requires_grad_()
        ref64 = reference_loss(x_ref[:, :-1], None if ref is None else ref.double(), y, 0.7, kl=kl, **kw)[0]
        ref64.backward()
        assert not torch_compiled._state["failed"] and torch_compiled._state["fns"], "compiled path not taken"
        torch.testing.assert_close(loss.double(), ref64, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-5, atol=1e-6)

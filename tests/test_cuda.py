"""The Triton kernels compiled for a GPU, on CUDA tensors: the interpreter's cases, and what only a GPU
shows (larger shapes, N x V >= 2^31, the vocabulary split at its real size, bitwise repeatability, capture
of forward + backward in a CUDA graph, the in-place backward's memory).

tests/conftest.py switches the Triton interpreter on for the whole test process, so on a machine with a
GPU the ordinary run (`python -m pytest tests`) reruns this file in a subprocess with TRITON_INTERPRET=0
(`test_compiled_kernels_on_cuda`), where the tests below run; or run it directly:

    TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py -q

Without a GPU everything here skips (torch.cuda.is_available() is False, which needs no driver).
"""
import functools
import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import hrmloss
from . import test_loss, test_options, test_runtime_values
from .harness import check, close, truth

CUDA = torch.cuda.is_available()
COMPILED = os.environ.get("TRITON_INTERPRET") != "1"
ON_GPU = "triton@cuda"  # harness.run: the Triton backend on copies of the inputs on the GPU
needs_gpu = pytest.mark.skipif(not (CUDA and COMPILED),
                               reason="needs a CUDA device and TRITON_INTERPRET=0 (see the module docstring)")


@pytest.mark.skipif(not CUDA or COMPILED, reason="needs a CUDA device; reruns this file with the compiler")
def test_compiled_kernels_on_cuda():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-x"],
                          cwd=pathlib.Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                          text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def _on_gpu(test):
    """The interpreter test `test(backend, **params)`, with its parametrization but the backend's, run on
    the GPU: the same cases through the same checks."""
    marks = [m for m in getattr(test, "pytestmark", [])
             if not (m.name == "parametrize" and m.args[0] == "backend")]

    @functools.wraps(test)
    def on_gpu(**params):
        test(ON_GPU, **params)
    params = [p for name, p in inspect.signature(test).parameters.items() if name != "backend"]
    on_gpu.__signature__ = inspect.Signature(params)
    on_gpu.pytestmark = marks + [needs_gpu]
    return on_gpu


for _module in (test_loss, test_options, test_runtime_values):
    for _name, _test in vars(_module).items():
        # every interpreter test that reaches hrmloss only through harness.run / check
        if _name.startswith("test_") and "backend" in inspect.signature(_test).parameters and \
                "hrm_loss(" not in inspect.getsource(_test) and "HRMLoss(" not in inspect.getsource(_test):
            globals()[_name] = _on_gpu(_test)


def _inputs(shape, dtype=torch.bfloat16, seed=0, scale=2.0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = torch.randn(shape, generator=g, device="cuda", dtype=dtype) * scale
    t = torch.randn(shape, generator=g, device="cuda", dtype=dtype) * scale
    y = torch.randint(0, shape[-1], shape[:-1], generator=g, device="cuda")
    y.view(-1)[::10] = -100
    return s, t, y


@needs_gpu
@pytest.mark.parametrize("shape,dtype", [((4096, 32000), torch.float32), ((2, 1024, 32000), torch.bfloat16),
                                         ((64, 128256), torch.bfloat16), ((8, 262144), torch.bfloat16),
                                         ((1000, 151936), torch.float16)], ids=str)
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_larger_shapes(shape, dtype, kl):
    # few rows of a long vocabulary split over the multiprocessors; the reference runs on the GPU too
    s, t, y = _inputs(shape, dtype)
    check(s, t, y, "triton", atol=1e-2 if dtype != torch.float32 else 2e-5, hrm=0.5, kl=kl,
          temperature=2.0 if kl == "reverse" else 1.0, ref_grad=True)


@needs_gpu
def test_shifted_views_on_the_gpu():
    s, t, y = _inputs((2, 513, 32000))
    check(s[:, :-1], t[:, :-1], y[:, 1:], "triton", atol=1e-2, hrm=0.5, kl="jsd", ref_grad=True, softcap=20.0)


@needs_gpu
def test_more_than_2_31_logits():
    # 16512 x 131072 = 2.16e9 elements: row offsets beyond int32. Rows at both ends and across the
    # 2^31-element boundary are compared with the float64 reference of those rows.
    N, V = 16512, 131072
    s, t, y = _inputs((N, V))
    s.requires_grad_(True)
    w = torch.rand(N, device="cuda")
    loss = hrmloss.hrm_loss(s, t, y, 0.5, reduction="none", backend="triton")
    loss.backward(w)
    edge = (1 << 31) // V
    rows = torch.tensor([0, 1, edge - 1, edge, edge + 1, N - 2, N - 1], device="cuda")
    ref = truth(s[rows].detach(), t[rows], y[rows], hrm=0.5, reduction="none", grad_out=w[rows])
    close(loss[rows].detach(), ref[0], atol=1e-4)
    close(s.grad[rows], ref[4], atol=1e-2 * ref[4].abs().max().item())


@needs_gpu
@pytest.mark.parametrize("shape", [(4096, 32000), (48, 262144)], ids=str)
@pytest.mark.parametrize("kl", ["forward", "jsd"])
def test_bitwise_repeatable(shape, kl):
    s, t, y = _inputs(shape)

    def once():
        x, r = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        out = hrmloss.hrm_loss(x, r, y, 0.5, kl=kl, temperature=1.5, return_components=True)
        out.loss.backward()
        return out.loss, out.kl, x.grad, r.grad
    for a, b in zip(once(), once()):
        assert torch.equal(a, b)


@needs_gpu
@pytest.mark.parametrize("kl,inplace", [("forward", False), ("jsd", False), ("forward", True)])
def test_cuda_graph_captures_forward_and_backward(kl, inplace):
    # no host synchronisation anywhere: a sync inside the capture raises. A tensor-valued hrm, label
    # checks and the mean's denominator all stay on the device.
    N, V = 64, 128256   # few rows: the split path and its merge are captured too
    s, t, y = _inputs((N, V))
    hrm = torch.tensor(0.5, device="cuda")
    base = torch.zeros_like(s, requires_grad=True)

    def step():
        logits = base + s   # a non-leaf, as the in-place backward needs
        loss = hrmloss.hrm_loss(logits, t, y, hrm, kl=kl, inplace_backward=inplace, backend="triton")
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):   # warm up: compile the kernels, fill the caches
            base.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    base.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    s2, t2, y2 = _inputs((N, V), seed=1)
    s.copy_(s2), t.copy_(t2), y.copy_(y2)
    base.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    ref = truth(s2, t2, y2, hrm=0.5, kl=kl)
    close(static_loss.detach(), ref[0], atol=1e-4)
    close(base.grad, ref[4], atol=1e-2 * ref[4].abs().max().item())


@needs_gpu
def test_inplace_backward_on_the_gpu():
    # same gradient bitwise; peak above the inputs: no (N, V) gradient buffer
    N, V, H = 4096, 32000, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    h0 = torch.randn(N, H, generator=g, device="cuda", dtype=torch.bfloat16)
    w0 = torch.randn(V, H, generator=g, device="cuda", dtype=torch.bfloat16) * H ** -0.5
    t = torch.randn(N, V, generator=g, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g, device="cuda")
    nv = N * V * 2
    grads, peaks = {}, {}
    for inplace in (False, True):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        loss = hrmloss.hrm_loss(h @ w.T, t, y, 0.5, inplace_backward=inplace)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        peaks[inplace] = (torch.cuda.max_memory_allocated() - before) / nv
        grads[inplace] = (h.grad, w.grad)
    assert torch.equal(grads[True][0], grads[False][0]) and torch.equal(grads[True][1], grads[False][1])
    assert peaks[False] >= 1.0 and peaks[True] < 0.1, peaks


@needs_gpu
def test_out_of_range_label_is_a_device_assert():
    # checked on the device (no host sync), so the error surfaces at the next synchronisation; a
    # device-side assert leaves the CUDA context unusable, hence a process of its own
    script = ("import torch, hrmloss\n"
              "s = torch.randn(4, 1000, device='cuda'); y = torch.zeros(4, dtype=torch.long, device='cuda')\n"
              "y[1] = 1000\n"
              "hrmloss.hrm_loss(s, s, y, backend='triton')\n"
              "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    # (CUDA prints its own assertion text; the message given to torch._assert_async is the CPU's)
    assert proc.returncode != 0 and ("device-side assert" in proc.stderr or "Assertion" in proc.stderr), \
        proc.stderr[-3000:]


# the data checks of issue 20 on CUDA tensors: a device assert each (no host sync), one process per case
DEVICE_ASSERTS = {
    "num_items negative": "hrmloss.hrm_loss(s, s, y, backend='triton', num_items=torch.tensor(-3.0, device='cuda'))",
    "num_items 0, counted": "hrmloss.hrm_loss(s, s, y, backend='triton', num_items=torch.tensor(0.0, device='cuda'))",
    "token_weights inf": "hrmloss.hrm_loss(s, s, y, backend='triton', token_weights=torch.tensor("
                         "[1.0, float('inf'), 1.0, 1.0], device='cuda'))",
    "ref_topk row all -inf": "hrmloss.hrm_loss(s, None, y, backend='triton', ref_topk=(torch.arange(3, device='cuda')"
                             ".expand(4, 3).contiguous(), torch.full((4, 3), -float('inf'), device='cuda')))",
}


@needs_gpu
@pytest.mark.parametrize("case", sorted(DEVICE_ASSERTS))
def test_issue_20_data_checks_are_device_asserts(case):
    script = ("import torch, hrmloss\n"
              "s = torch.randn(4, 1000, device='cuda'); y = torch.zeros(4, dtype=torch.long, device='cuda')\n"
              f"{DEVICE_ASSERTS[case]}\n"
              "torch.cuda.synchronize()\n")
    proc = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, TRITON_INTERPRET="0"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and ("device-side assert" in proc.stderr or "Assertion" in proc.stderr), \
        proc.stderr[-3000:]


@needs_gpu
@pytest.mark.parametrize("kl", ["forward", "reverse", "jsd"])
def test_all_minus_inf_rows_and_num_items_zero_on_the_gpu(kl):
    s, t = torch.randn(4, 1000, device="cuda"), torch.randn(4, 1000, device="cuda")
    y = torch.zeros(4, dtype=torch.long, device="cuda")
    t[1], s[2] = -float("inf"), -float("inf")
    s.requires_grad_()
    out = hrmloss.hrm_loss(s, t, y, backend="triton", kl=kl, reduction="none", return_components=True)
    out.loss.sum().backward()
    cpu = hrmloss.hrm_loss(s.detach().cpu(), t.cpu(), y.cpu(), backend="torch", kl=kl, reduction="none",
                           return_components=True)
    for a, b in zip(out, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(s.grad).all() and (s.grad[2] == 0).all()
    masked = torch.full_like(y, -100)
    assert hrmloss.hrm_loss(s, t, masked, backend="triton", num_items=torch.tensor(0, device="cuda")).item() == 0.0


def test_the_interpreter_cases_are_here_for_the_gpu():
    # the generated GPU tests exist even without a GPU (they skip then)
    names = {n for n in globals() if n.startswith("test_")}
    for expected in ("test_shapes", "test_options_grid", "test_masked_vocabulary_is_dropped_vocabulary",
                     "test_option_alone_and_combined", "test_tensor_values_equal_numbers",
                     "test_dtypes_fair_to_low_precision", "test_all_ignored_is_zero_not_nan",
                     "test_student_minus_inf_where_reference_finite", "test_ref_logits_gradient"):
        assert expected in names

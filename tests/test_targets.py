"""The launcher's view of the target (hrmloss/kernels/launch.py): the interpreter is detected at launch and
gets the portable forms (no PTX), and the configuration keeps 256 threads a program and the same tiles
whatever the warp size (32 on NVIDIA and RDNA, 64 on CDNA), so that every target compiles the same
per-thread shapes (tests/aot_compile.py compiles them for each)."""
import pytest
import torch

pytest.importorskip("triton")

from hrmloss.kernels import launch  # noqa: E402


def test_the_interpreter_is_detected_at_launch_and_runs_no_ptx():
    t = launch.device_target(torch.device("cpu"))
    assert t is launch.INTERPRETER and not t.ptx


@pytest.mark.parametrize("backend,ptx", [("cuda", True), ("hip", False), ("xpu", False)])
def test_ptx_only_on_nvidia(backend, ptx):
    assert launch.Target(backend, None, 32).ptx is ptx


@pytest.mark.parametrize("V", [512, 4096, 32000, 128256, 262144])
@pytest.mark.parametrize("elem_bytes", [2, 4])
def test_read_config_is_the_same_tile_on_wave32_and_wave64(V, elem_bytes):
    b32, e32, w32 = launch.read_config(V, elem_bytes, 32)
    b64, e64, w64 = launch.read_config(V, elem_bytes, 64)
    assert (b32, e32) == (b64, e64) or V < e64 * 64   # a row shorter than one wavefront's slices
    assert e32 == 16 // elem_bytes
    assert b32 == e32 * 32 * w32 * launch.READ_THREAD_ROWS and b64 == e64 * 64 * w64 * launch.READ_THREAD_ROWS
    if V >= 8192:
        assert 32 * w32 == 64 * w64 == launch.READ_THREADS


@pytest.mark.parametrize("V", [100, 1000, 4096, 128256])
def test_grad_config_threads(V):
    b32, w32 = launch.launch_config(V, 32)
    b64, w64 = launch.launch_config(V, 64)
    assert b32 == b64 == min(1 << (V - 1).bit_length(), launch.MAX_BLOCK_V)
    assert 32 * w32 == (256 if b32 >= 1024 else 128)
    assert 64 * w64 == 32 * w32

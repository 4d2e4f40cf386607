"""Peak live CPU-allocator bytes while a function runs, from the PyTorch profiler's memory events.

Use this for compiled and eager code alike. A TorchDispatchMode-based tracker makes dynamo fall back
to eager for the function it watches (and the fallback sticks), so it measures compiled code wrongly;
process RSS is distorted by the C allocator below ~32 MiB buffers. On CUDA use
torch.cuda.reset_peak_memory_stats() / torch.cuda.max_memory_allocated() instead.

    from benchmarks.tools.peakmem import peak_bytes
    run(); run()                       # warm up (and compile) first
    print(peak_bytes(run) / 2**20, "MiB above what was live before")
"""
import torch
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn):
    """Largest number of bytes allocated on the CPU during fn() beyond what was live when it started."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    deltas = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return peak


if __name__ == "__main__":
    x = torch.randn(1024, 1024)

    def f():
        y = x * 2  # 4 MiB
        z = y + 1  # 4 MiB more
        return z.sum()

    f()
    p = peak_bytes(f)
    assert 8 * 2**20 <= p <= 9 * 2**20, p
    print("ok", p)

"""Sizes, inputs, the float64 reference value and the memory measurement shared by the benchmarks.

The size of a run is the environment variable HRMLOSS_BENCH_SIZE (read when pytest collects):

    tiny    one small shape, one round, forward + backward only: the smoke test (tests/)
    target  N=2048, V=32000 fp32 (the CPU target of the project), more rounds
    cpu     N in {1024, 4096} x V in {32000, 128256}, fp32 and bf16 (default on the CPU)
    cuda    cpu + 16384 x 128256 and 8192 x 262144 bf16 (default when CUDA is available)

HRMLOSS_BENCH_MAX_ELEMS skips logits shapes with more than that many elements (machines short of RAM).
NVs: the bytes of one logits tensor, N * V * element size; memory and traffic are reported in NVs.
"""
import os
import platform

import torch
import torch.nn.functional as F

from .providers import HRM, IGNORE

HIDDEN = 1024
_CPU_SHAPES = [(1024, 32000), (1024, 128256), (4096, 32000), (4096, 128256)]
SIZES = {
    "tiny": dict(shapes=[(64, 512)], dtypes=["float32"], hidden=64, rounds=1, warmup=0,
                 modes=["forward+backward"]),
    "target": dict(shapes=[(2048, 32000)], dtypes=["float32"], hidden=HIDDEN, rounds=7, warmup=1),
    "cpu": dict(shapes=_CPU_SHAPES, dtypes=["float32", "bfloat16"], hidden=HIDDEN, rounds=3, warmup=1),
    "cuda": dict(shapes=_CPU_SHAPES, dtypes=["float32", "bfloat16"], hidden=HIDDEN, rounds=10, warmup=2,
                 extra=[(16384, 128256, "bfloat16"), (8192, 262144, "bfloat16")]),
}


def bench_device():
    """torch.device of the run: HRMLOSS_BENCH_DEVICE, else cuda when available, else cpu."""
    name = os.environ.get("HRMLOSS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bench_size():
    name = os.environ.get("HRMLOSS_BENCH_SIZE") or ("cuda" if bench_device().type == "cuda" else "cpu")
    if name not in SIZES:
        raise ValueError(f"HRMLOSS_BENCH_SIZE={name!r}: expected one of {', '.join(SIZES)}")
    return name, SIZES[name]


def cases():
    """(N, V, dtype name) of the run's size."""
    _, cfg = bench_size()
    out = [(n, v, d) for d in cfg["dtypes"] for n, v in cfg["shapes"]]
    return out + [c for c in cfg.get("extra", []) if c not in out]


def modes():
    """The passes timed: forward, and forward + backward (tiny: the latter only, which runs both)."""
    return bench_size()[1].get("modes", ["forward", "forward+backward"])


def too_large(n, v):
    limit = os.environ.get("HRMLOSS_BENCH_MAX_ELEMS")
    return limit is not None and n * v > int(limit)


def labels(n, v, device):
    """Random labels in [0, v), every 10th token ignored."""
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, v, (n,), generator=g)
    y[::10] = IGNORE
    return y.to(device)


def loss_inputs(n, v, dtype, device):
    """Student s, reference t (N, V) ~ N(0, 2^2) in `dtype`, labels (N,)."""
    g = torch.Generator().manual_seed(0)
    s = (2 * torch.randn(n, v, generator=g)).to(device=device, dtype=dtype)
    t = (2 * torch.randn(n, v, generator=g)).to(device=device, dtype=dtype)
    return s, t, labels(n, v, device)


def linear_inputs(n, v, h, dtype, device):
    """Hidden states h, ht (N, H) and output weights w, wt (V, H), logits ~ N(0, 1); labels (N,)."""
    g = torch.Generator().manual_seed(0)
    make = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    return make(n, h), make(v, h, scale=h ** -0.5), make(n, h), make(v, h, scale=h ** -0.5), labels(n, v, device)


def reference_loss(s, t, y, rows=256, hrm=HRM):
    """The benchmarked loss in float64, in chunks of rows (no float64 copy of the whole logits); hrm = 0: CE."""
    total = torch.zeros((), dtype=torch.float64, device=s.device)
    for i in range(0, s.shape[0], rows):
        sc, tc, yc = s[i:i + rows].double(), t[i:i + rows].double(), y[i:i + rows]
        kl = F.kl_div(F.log_softmax(sc, -1), F.log_softmax(tc, -1), log_target=True, reduction="none")
        total += F.cross_entropy(sc, yc, ignore_index=IGNORE, reduction="sum")
        total += hrm * torch.where(yc != IGNORE, kl.sum(-1), 0.0).sum()
    return (total / (y != IGNORE).sum().clamp(min=1)).item()


def reference_linear_loss(h, w, ht, wt, y, rows=256, hrm=HRM):
    """reference_loss of the logits h @ w.T, ht @ wt.T, formed chunk by chunk in float64."""
    total, n = 0.0, int((y != IGNORE).sum().clamp(min=1))
    for i in range(0, h.shape[0], rows):
        sc, tc = h[i:i + rows].double() @ w.double().T, ht[i:i + rows].double() @ wt.double().T
        total += reference_loss(sc, tc, y[i:i + rows], hrm=hrm) * max(int((y[i:i + rows] != IGNORE).sum()), 1)
    return total / n


def peak_bytes(fn, device):
    """Peak bytes allocated while fn() runs beyond those live when it starts.

    CPU: the PyTorch profiler's allocator events (benchmarks/tools/peakmem.py), which see compiled code
    as it runs (a TorchDispatchMode tracker would make dynamo fall back to eager). CUDA: the caching
    allocator's max_memory_allocated.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from .tools.peakmem import peak_bytes as profiler_peak
    return profiler_peak(fn)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_peak_bandwidth(device):
    """Peak DRAM bandwidth in bytes/s of a CUDA device from its properties (2 transfers per clock), or None."""
    if device.type != "cuda":
        return None
    p = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
    return 2 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def machine_info(device):
    """What the report names the run by."""
    info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
            "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        info["liger_kernel"] = version("liger-kernel")
    except Exception:  # noqa: BLE001 (optional)
        info["liger_kernel"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_peak_bandwidth"] = device_peak_bandwidth(device)
    return info

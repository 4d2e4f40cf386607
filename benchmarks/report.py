"""Turn pytest-benchmark JSON from benchmarks/ into the Performance section: markdown tables and PNG plots.

    python -m benchmarks.report benchmarks/results/*.json --out docs/performance.md --images docs/images

Tables: median time and its ratio to hrmloss's per provider; peak live bytes above the inputs in NVs;
Triton memory traffic in NVs (floor 3, design 5); on CUDA achieved GB/s against the device's peak.
Entries of later files replace same-named entries of earlier ones. Nothing here is typed by hand but
the performance model of docs/design.md §6, quoted.
"""
import argparse
import json
import os
import re
from collections import defaultdict

from .providers import LINEAR_PROVIDERS, LOSS_PROVIDERS

MODES = ("forward+backward", "forward")
OURS = {"loss": "hrmloss", "linear": "hrmloss-linear"}
PROVIDERS = {"loss": LOSS_PROVIDERS, "linear": LINEAR_PROVIDERS}
FLOOR_NVS = {"forward": 2, "forward+backward": 3}  # read s and t (and write the gradient) once
TRAFFIC_MODEL = """\
NVs = bytes of one logits tensor (tokens x vocab x element size). From docs/design.md §6:

| scheme | memory traffic, fwd+bwd |
| --- | --- |
| physical floor: read s once, read t once, write grad once | 3 NVs |
| streaming two passes (online lse forward; recompute in backward, grad_output folded in) | 5 NVs |
| compute grad in forward, scale by grad_output in backward (common in peers) | 7 NVs |
| naive PyTorch (log_softmax both, cross_entropy, kl_div, autograd) | well over 10 NVs |

On H100 SXM (3.35 TB/s) N=16384, V=128256 bf16 is NVs = 4.2 GB: the 3 NVs floor is 3.8 ms, the 5 NVs
design 6.3 ms at full bandwidth. The best public memory-bound CE kernels reach about 90% of peak.
"""


def load(paths):
    """(entries keyed by (kind, provider, case, mode), machine description, file names)."""
    entries, machine, loads = {}, {}, {}
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        machine = dict(data["machine_info"].get("hrmloss_bench", machine))
        loads[os.path.basename(path)] = machine.get("load_avg_1min_at_start")
        for b in data["benchmarks"]:
            e = dict(b["extra_info"])
            if "kind" not in e:
                continue
            e["median"], e["iqr"] = b["stats"]["median"], b["stats"]["iqr"]
            case = (e["n"], e["v"], e.get("hidden"), e["dtype"])
            entries[(e["kind"], e["provider"], case, e["mode"])] = e
    machine["loads"] = loads
    return entries, machine, [os.path.basename(p) for p in paths]


def _case_name(case):
    n, v, h, dtype = case
    return f"{n} x {v}" + (f" (H {h})" if h else "") + f" {dtype}"


def _ms(seconds):
    return f"{seconds * 1e3:.3g}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _by_case(entries, kind, mode):
    out = defaultdict(dict)
    for (k, provider, case, m), e in entries.items():
        if k == kind and m == mode:
            out[case][provider] = e
    return dict(sorted(out.items(), key=lambda kv: (kv[0][3], kv[0][0] * kv[0][1])))


def time_table(entries, kind, mode):
    """Median ms (IQR) per provider, and each provider's time over hrmloss's."""
    cases = _by_case(entries, kind, mode)
    names = [p for p in PROVIDERS[kind] if any(p in c for c in cases.values())]
    ours = OURS[kind]
    rows = []
    for case, got in cases.items():
        base = got.get(ours)
        cells = []
        for p in names:
            e = got.get(p)
            if e is None:
                cells.append("-")
                continue
            cell = f"{_ms(e['median'])} ms (±{_ms(e['iqr'] / 2)})"
            if base is not None and p != ours:
                cell += f", {e['median'] / base['median']:.2f}x"
            cells.append(cell)
        rows.append([_case_name(case)] + cells)
    return _table(["N x V dtype"] + names, rows), names


def memory_table(entries, kind, mode):
    cases = _by_case(entries, kind, mode)
    names = [p for p in PROVIDERS[kind] if any(p in c for c in cases.values())]
    rows = [[_case_name(case)] + [f"{got[p]['peak_nvs']:.2f}" if p in got else "-" for p in names]
            for case, got in cases.items()]
    return _table(["N x V dtype"] + names, rows)


def first_call_table(entries, kind):
    cases = _by_case(entries, kind, "forward+backward")
    names = [p for p in PROVIDERS[kind] if any(p in c for c in cases.values())]
    rows = [[_case_name(case)] + [f"{got[p]['first_call_s']:.1f} s" if p in got else "-" for p in names]
            for case, got in cases.items()]
    return _table(["N x V dtype"] + names, rows)


def traffic_table(entries):
    rows = []
    for mode in MODES:
        for (k, provider, case, m), e in sorted(entries.items(), key=lambda kv: str(kv[0])):
            if k == "traffic" and m == mode:
                rows.append([provider, mode, _case_name(case), f"{e['loaded'] / e['nvs_bytes']:.2f}",
                             f"{(e['stored'] + e['atomic']) / e['nvs_bytes']:.2f}", f"{e['traffic_nvs']:.2f}",
                             str(e["launches"])])
    return _table(["kernels", "pass", "N x V dtype", "read (NVs)", "written (NVs)", "total (NVs)",
                   "launches"], rows) if rows else ""


def bandwidth_table(entries, machine):
    """Achieved GB/s = floor bytes (2 NVs forward, 3 NVs fwd+bwd) / median time, and share of peak."""
    peak = machine.get("gpu_peak_bandwidth")
    rows = []
    for (k, provider, case, mode), e in sorted(entries.items(), key=lambda kv: str(kv[0])):
        if k == "loss":
            gbs = FLOOR_NVS[mode] * e["nvs_bytes"] / e["median"] / 1e9
            rows.append([provider, mode, _case_name(case), f"{gbs:.0f}",
                         f"{gbs * 1e9 / peak:.0%}" if peak else "-"])
    return _table(["provider", "pass", "N x V dtype", "GB/s (floor bytes / time)", "of peak"], rows)


def targets(entries):
    """The CPU targets at N=2048, V=32000 fp32, forward + backward, if that case was measured."""
    got = {p: e for (k, p, case, m), e in entries.items()
           if k == "loss" and case == (2048, 32000, None, "float32") and m == "forward+backward"}
    if "hrmloss" not in got:
        return ""
    ours = got["hrmloss"]
    lines = []
    for p, bound in (("compile", 1.0), ("naive", 0.4)):
        if p in got:
            r = ours["median"] / got[p]["median"]
            lines.append(f"- time hrmloss / {p}: {r:.2f} (target <= {bound}): {'met' if r <= bound else 'NOT met'}")
    if "hrmloss-eager" in got:
        for p in ("compile", "naive"):
            if p in got:
                r = got["hrmloss-eager"]["median"] / got[p]["median"]
                lines.append(f"- time hrmloss with HRMLOSS_COMPILE=0 (eager torch path) / {p}: {r:.2f}")
    lines.append(f"- peak live bytes above the inputs: {ours['peak_nvs']:.2f} NVs (target <= 1.5)"
                 f"{'; naive eager: %.2f NVs' % got['naive']['peak_nvs'] if 'naive' in got else ''}")
    return "\n".join(lines) + "\n"


def plot(entries, kind, mode, images, metric, ylabel, fname, log=True, machine=""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cases = _by_case(entries, kind, mode)
    if not cases:
        return None
    names = [p for p in PROVIDERS[kind] if any(p in c for c in cases.values())]
    x = np.arange(len(cases))
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases)), 4))
    for i, p in enumerate(names):
        vals = [metric(got[p]) if p in got else np.nan for got in cases.values()]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=p)
    ax.set_xticks(x, [_case_name(c).replace(" (", "\n(").replace(" float", "\nfloat").replace(" bfloat", "\nbfloat")
                      for c in cases], fontsize=8)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{kind}, {mode}\n{machine}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(images, fname)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_traffic(entries, images, machine=""):
    """Bars of forward + backward traffic per kernel and dtype, with the 3 NVs floor and 5 NVs design."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    got = sorted((e["provider"], e["dtype"], e["traffic_nvs"]) for (k, _, _, m), e in entries.items()
                 if k == "traffic" and m == "forward+backward")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([f"{p}\n{d}" for p, d, _ in got], [v for _, _, v in got], color="tab:blue")
    for y, label, style in ((3, "floor 3 NVs", ":"), (5, "design 5 NVs", "--")):
        ax.axhline(y, color="k", linestyle=style, linewidth=1, label=label)
    ax.set_ylabel("bytes moved, forward + backward (NVs)")
    ax.set_title(f"Triton kernels, counted in the interpreter\n{machine}", fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(images, "perf_traffic.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render(entries, machine, files, images, rel_images, note=None):
    m = machine
    label = f"{m.get('cpu_model')}, {m.get('cpu_count')} cores" + (f", {m['gpu']}" if m.get("gpu") else "") \
        + f", torch {m.get('torch')}"
    out = ["# Performance\n",
           f"Generated by `python -m benchmarks.report` from {', '.join(files)}; do not edit by hand.\n",
           *([note + "\n"] if note else []),
           f"Machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores ({m.get('torch_threads')} torch threads)"
           + (f", GPU {m['gpu']}" if m.get("gpu") else "") + f"; torch {m.get('torch')}, Liger-Kernel "
           f"{m.get('liger_kernel')}, Python {m.get('python')}. 1-minute load average when each run started "
           f"(other processes shared the machine when it is above 0): "
           f"{', '.join(f'{k}: {v:.1f}' for k, v in m['loads'].items() if v is not None)}.\n",
           "Every provider computes the same loss, CE + 0.5 * forward KL(p || q), T = 1, mean over the "
           "counted tokens (every 10th token ignored), and its value is checked against a float64 "
           "reference before it is timed. Times are pytest-benchmark medians (± half the interquartile "
           "range) of fresh-input rounds; `Nx` is the provider's time over hrmloss's. "
           "`hrmloss` is the auto backend (on the CPU the torch path, compiled per chunk); "
           "`hrmloss-eager` the same with `HRMLOSS_COMPILE=0`; `compile` is `torch.compile(naive)`.\n",
           "Peak memory is the peak of live tensor bytes above what was live before the call (inputs, "
           "and nothing else), in NVs = bytes of one logits tensor: on the CPU from the PyTorch "
           "profiler's allocator events (benchmarks/tools/peakmem.py; a TorchDispatchMode tracker would "
           "turn compiled code back into eager), on CUDA `torch.cuda.max_memory_allocated`. The "
           "gradient of the logits (1 NV) is part of it.\n"]
    tgt = targets(entries)
    if tgt:
        out += ["## CPU targets (N = 2048, V = 32000, fp32, forward + backward)\n", tgt]
    for kind, title in (("loss", "Loss on logits"), ("linear", "Fused linear + loss")):
        for mode in MODES:
            if not _by_case(entries, kind, mode):
                continue
            table, _ = time_table(entries, kind, mode)
            out += [f"## {title}: {mode}\n", "Time:\n", table, "\nPeak live bytes above the inputs (NVs):\n",
                    memory_table(entries, kind, mode)]
            img = plot(entries, kind, mode, images, lambda e: e["median"] * 1e3, "median time (ms)",
                       f"perf_{kind}_{mode.replace('+', '_')}_time.png", machine=label)
            img2 = plot(entries, kind, mode, images, lambda e: e["peak_nvs"], "peak live bytes (NVs)",
                        f"perf_{kind}_{mode.replace('+', '_')}_memory.png", log=False, machine=label)
            out += [f"\n![{kind} {mode} time]({rel_images}/{os.path.basename(img)})\n",
                    f"![{kind} {mode} memory]({rel_images}/{os.path.basename(img2)})\n"]
        if _by_case(entries, kind, "forward+backward"):
            out += ["\nFirst call, forward + backward: includes compilation for the compiled providers (with "
                    "Inductor's on-disk cache as earlier runs on the machine left it):\n",
                    first_call_table(entries, kind)]
    tt = traffic_table(entries)
    if tt:
        out += ["## Memory traffic of the Triton kernels\n",
                "Bytes loaded and stored by the kernels, counted in the Triton interpreter "
                "(benchmarks/tools/traffic.py), in NVs. Ignored tokens (1 in 10) are skipped by hrmloss, "
                "so its counts sit below the 2 (forward) and 5 (forward + backward) NVs of the design. "
                "`liger` is its CE and KL-div modules composed; only their Triton kernels are counted, "
                "not the PyTorch glue between them (log_softmax of both logits, row selection, gradient "
                "sum), so it is a lower bound.\n", tt]
        img = plot_traffic(entries, images, label)
        out += [f"\n![traffic]({rel_images}/{os.path.basename(img)})\n"]
    if any(k[0] == "loss" for k in entries) and machine.get("device") == "cuda":
        out += ["## Achieved bandwidth (CUDA)\n", bandwidth_table(entries, machine)]
    out += ["## GPU traffic model\n", TRAFFIC_MODEL]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files from benchmarks/")
    ap.add_argument("--out", default="docs/performance.md")
    ap.add_argument("--images", default="docs/images")
    ap.add_argument("--note", help="a sentence about the run (e.g. which subset of the shapes was measured)")
    args = ap.parse_args(argv)
    entries, machine, files = load(args.json)
    os.makedirs(args.images, exist_ok=True)
    rel = os.path.relpath(args.images, os.path.dirname(os.path.abspath(args.out)))
    text = render(entries, machine, files, args.images, rel, args.note)
    kept = other_sections(args.out)
    with open(args.out, "w") as f:
        f.write(text + "".join(f"\n{block}\n" for block in kept))
    print(f"wrote {args.out} and plots in {args.images}")


_SECTION = re.compile(r"<!-- ([\w-]+): written by .*? -->.*?<!-- /\1 -->", re.S)


def other_sections(path):
    """The sections of `path` that other commands write between their markers (tests.aot_compile's
    static cost table, benchmarks.gpu's GPU numbers): kept when this report rewrites the file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [m.group(0) for m in _SECTION.finditer(f.read()) if m.group(1) != "performance"]


def replace_section(path, begin, end, section):
    """Put `section` between the markers `begin` and `end` of the file at `path`; when the file lacks them,
    append them with the section (the rest of the file is left alone)."""
    text = open(path).read() if os.path.exists(path) else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1]
    else:
        head, tail = (text.rstrip("\n") + "\n\n" if text else ""), "\n"
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{section.rstrip()}\n{end}{tail}")


if __name__ == "__main__":
    main()

"""Static GPU cost of a Triton kernel, without a GPU: compile it ahead of time for a real target, read the
SASS, and count the machine instructions in its innermost loop per element that each thread handles.

Why: a streaming kernel is fast when DRAM, not instruction issue, is its limit. An H100 SXM issues about
132 SMs x 4 schedulers x 32 lanes x ~1.75 GHz = 2.96e13 thread-instructions/s and copies ~3.0 TB/s
(measured, read + write). So a pass that reads B bytes per vocabulary element can keep DRAM busy only
if its loop costs well under 2.96e13 * B / 3.0e12 ~= 9.9 * B instructions per element; at ~75 % issue
efficiency and 85 % of bandwidth, about 8.7 * B:

    bf16 stats pass (reads s and t: 4 B/element)    <= ~35 instructions/element (target 30)
    fp32 stats pass (8 B/element)                   <= ~70
    bf16 gradient pass (reads s, t, writes ds: 6 B) <= ~52 (target 45)

Calibration on an H100 (Nsight Compute, 16384 x 128256 bf16, triton 3.6): the stats kernel before its
per-thread rewrite ran 7.34 ms at 64 % SM issue and 34 % of DRAM bandwidth, i.e. ~66 instructions issued
per element; this counter gives 56-64 for the same source compiled by triton 3.9 (another compiler
version). The gradient kernel (42.6 here) ran at 86.5 % of DRAM bandwidth. A static count is a proxy:
it ignores latency, occupancy (registers!) and memory-level parallelism. Only a GPU measures time.

    r = loop_report(kernel, signature={"s_ptr": "*bf16", ..., "BLOCK_V": "constexpr"},
                    constexprs={"BLOCK_V": 2048}, num_warps=8, per_iteration=2048)
    r["regs"], r["spill_bytes"], r["per_element"], r["mix"]

Pointer arguments and the integer arguments named in `divisible` are compiled as 16-divisible, as the JIT
does at run time for aligned tensors and strides (this is what lets loads vectorise). Needs the CUDA
tools that ship with triton (ptxas, cuobjdump); TRITON_INTERPRET must be unset in the process.
"""
import collections
import hashlib
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _run(tool, *args):
    return subprocess.run([os.path.join(_BIN, tool), *args], capture_output=True, text=True, check=True).stdout


def _on_cubin(cubin, *args):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return _run("cuobjdump", *args, f.name)


def compile_kernel(fn, signature, constexprs, num_warps, cc=90, divisible=(), options=None, target=None):
    """AOT-compile `fn` for sm_`cc` (or any GPUTarget `target`, e.g. GPUTarget("hip", "gfx942", 64));
    returns the compiled kernel (asm['ptx'], asm['cubin'] on NVIDIA; asm['amdgcn'], asm['hsaco'] on AMD).
    `options`: further compile options (e.g. num_stages)."""
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, sig in signature.items()
             if sig.startswith("*") or n in divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target or GPUTarget("cuda", cc, 32),
                          options=dict(options or {}, num_warps=num_warps))


def sass_instructions(cubin):
    """[(address, text)] of every SASS instruction in the cubin."""
    out = _on_cubin(cubin, "-sass")
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, out.splitlines()) if m]


def resource_usage(cubin):
    """{"REG", "STACK", "LOCAL", "SHARED"} of the cubin's kernel."""
    line = next(l for l in _on_cubin(cubin, "--dump-resource-usage").splitlines() if "REG:" in l)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}


def _opcode(text):
    words = text.split()
    if words[0].startswith("@"):  # predicated: @P0 FADD ...
        words = words[1:]
    return words[0].split(".")[0]


def innermost_loops(instrs):
    """(start, end) address ranges closed by a backward branch and containing no other such range."""
    loops = []
    for addr, text in instrs:
        if _opcode(text) == "BRA":
            target = re.search(r"0x([0-9a-f]+)", text.split("BRA", 1)[1])
            if target and int(target.group(1), 16) <= addr:
                loops.append((int(target.group(1), 16), addr))
    return [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]


def loop_report(fn, signature, constexprs, num_warps, per_iteration, cc=90, divisible=(), options=None):
    """Registers, spills and the innermost loop's instruction count per element of one thread.

    `per_iteration` is the number of vocabulary elements one program handles per loop iteration. With
    several innermost loops the longest is reported (all are listed in `loops`).
    """
    cubin = compile_kernel(fn, signature, constexprs, num_warps, cc, divisible, options).asm["cubin"]
    usage = resource_usage(cubin)
    instrs = sass_instructions(cubin)
    per_thread = per_iteration / (num_warps * 32)
    loops = []
    for a, b in innermost_loops(instrs):
        body = [_opcode(t) for x, t in instrs if a <= x <= b]
        loops.append(dict(instructions=len(body), per_element=len(body) / per_thread,
                          mix=dict(collections.Counter(body).most_common())))
    main = max(loops, key=lambda l: l["instructions"]) if loops else dict(instructions=0, per_element=0, mix={})
    return dict(regs=usage["REG"], spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
                total_instructions=len(instrs), elements_per_thread=per_thread,
                per_element=round(main["per_element"], 1), mix=main["mix"], loops=loops,
                mufu_per_element=round(main["mix"].get("MUFU", 0) / per_thread, 2),
                cubin_sha256=hashlib.sha256(cubin).hexdigest())


def occupancy(regs, num_warps):
    """Fraction of an SM's 64 warps that fit, limited by registers only (65536 a SM, 8-register units)."""
    per_warp = ((regs + 7) // 8 * 8) * 32
    warps = min(64, 65536 // per_warp // num_warps * num_warps)
    return warps / 64

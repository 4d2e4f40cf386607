"""Static GPU cost of a Triton kernel on AMD, without a GPU: the AMDGCN counterpart of tests/sass.py.
Compile ahead of time for a gfx target (triton's own LLVM and lld, no ROCm), read registers and spills
from the kernel's metadata and the vector (VALU) instructions of its innermost loop from the assembly.

Why VALU: a CDNA3 compute unit (MI300X, gfx942) has 4 SIMDs of 16 lanes, so it retires one wave64
VALU instruction a clock, 64 fp32 lane-operations, and reads 5.3 TB/s / (304 CUs x 2.1 GHz) = 8.3 bytes
a clock. A bf16 pass reading two tensors (4 bytes a vocabulary element) gets 2.1 elements a clock per
CU, so it stays DRAM-bound only under 64 / 2.1 = 31 VALU instructions per element at full issue: the
budget is ~30 (a packed v_pk_fma_f32 counts once, for its two elements). In general
    budget = 64 lanes x bytes per element / 8.3 bytes per clock      (bf16 grad, 6 B: ~46; fp32: x 2)
Transcendentals (v_exp_f32, v_log_f32, v_rcp_f32, ...) are counted apart: they issue at a quarter rate.

The loop is found from the comments LLVM writes into the assembly: an innermost loop's header block
carries "=>This Inner Loop Header: Depth=d" and every other block of it "in Loop: Header=BBx_y Depth=d".

    r = loop_report(kernel, signature, constexprs, num_warps=4, per_iteration=2048, arch="gfx942")
    r["vgprs"], r["sgprs"], r["spill_bytes"], r["valu_per_element"], r["mix"]

TRITON_INTERPRET must be unset in the process.
"""
import collections
import hashlib
import re

from triton.backends.compiler import GPUTarget

from .sass import compile_kernel

# gfx9 (CDNA) runs wavefronts of 64; gfx10+ (RDNA) of 32, as triton compiles for them
WARP_SIZE = {"gfx90a": 64, "gfx942": 64, "gfx950": 64, "gfx1100": 32}
TRANSCENDENTAL = re.compile(r"v_(exp|log|rcp|rsq|sqrt|sin|cos)_")
_LABEL = re.compile(r"^(\.LBB(\d+_\d+)|; %bb\.\d+):")
_IN_LOOP = re.compile(r"in Loop: Header=BB(\d+_\d+) Depth=(\d+)")
_INSTR = re.compile(r"^\s+([a-z][a-z0-9_]*)\b")
_META = re.compile(r"^\s*\.(vgpr_count|sgpr_count|agpr_count|vgpr_spill_count|sgpr_spill_count|"
                   r"private_segment_fixed_size):\s+(\d+)", re.M)


def blocks(text):
    """[(label, header of its loop or None, is an innermost loop's header, [mnemonics])] in order. A
    block's loop comments sit on its label's line and the comment-only lines right after it."""
    out = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            notes = [line]
            for nxt in lines[i + 1:]:
                if not nxt.lstrip().startswith(";"):
                    break
                notes.append(nxt)
            notes = " ".join(notes)
            loop = _IN_LOOP.search(notes)
            out.append([m.group(2), loop.group(1) if loop else None, "=>This Inner Loop Header" in notes, []])
        elif out and not line.lstrip().startswith((".", ";")):
            ins = _INSTR.match(line)
            if ins:
                out[-1][3].append(ins.group(1))
    return out


def innermost_loops(text):
    """{header: [mnemonics of the loop's blocks]} for every innermost loop."""
    bbs = blocks(text)
    heads = {b[0] for b in bbs if b[2]}
    loops = {h: [] for h in heads}
    for label, header, _inner, mnemonics in bbs:
        key = label if label in heads else header
        if key in loops:
            loops[key] += mnemonics
    return loops


def resource_usage(text):
    """{"vgpr_count", "sgpr_count", "agpr_count", "vgpr_spill_count", "sgpr_spill_count",
    "private_segment_fixed_size"} of the kernel, from the metadata at the end of the assembly."""
    return {k: int(v) for k, v in _META.findall(text)}


def loop_report(fn, signature, constexprs, num_warps, per_iteration, arch="gfx942", divisible=(), options=None):
    """Registers, spills and the innermost loop's VALU instructions per element of one lane (work item)."""
    warp = WARP_SIZE[arch]
    k = compile_kernel(fn, signature, constexprs, num_warps, divisible=divisible, options=options,
                       target=GPUTarget("hip", arch, warp))
    text = k.asm["amdgcn"]
    usage = resource_usage(text)
    per_thread = per_iteration / (num_warps * warp)
    loops = []
    for body in innermost_loops(text).values():
        valu = [m for m in body if m.startswith("v_")]
        loops.append(dict(instructions=len(body), valu=len(valu), per_element=len(valu) / per_thread,
                          transcendental=sum(1 for m in valu if TRANSCENDENTAL.match(m)),
                          mix=dict(collections.Counter(body).most_common())))
    main = max(loops, key=lambda l: l["valu"]) if loops else dict(
        instructions=0, valu=0, per_element=0, transcendental=0, mix={})
    spills = usage.get("vgpr_spill_count", 0) + usage.get("sgpr_spill_count", 0)
    return dict(regs=usage["vgpr_count"], vgprs=usage["vgpr_count"], sgprs=usage["sgpr_count"],
                agprs=usage.get("agpr_count", 0), spill_bytes=4 * spills + usage.get("private_segment_fixed_size", 0),
                elements_per_thread=per_thread, per_element=round(main["per_element"], 1),
                valu_per_element=round(main["per_element"], 1),
                all_per_element=round(main["instructions"] / per_thread, 1),
                mufu_per_element=round(main["transcendental"] / per_thread, 2), mix=main["mix"], loops=loops,
                cubin_sha256=hashlib.sha256(k.asm["hsaco"]).hexdigest())


def occupancy(vgprs, num_warps, arch="gfx942"):
    """Fraction of a CDNA SIMD's 8 wavefront slots that fit, by VGPRs only (512 a lane, granules of 8);
    RDNA3 (wave32, 1536 VGPRs a lane for 16 slots) alike. A program's wavefronts spread over the SIMDs."""
    slots, file = (8, 512) if WARP_SIZE[arch] == 64 else (16, 1536)
    per_wave = max(8, (vgprs + 7) // 8 * 8)
    return min(slots, file // per_wave) / slots

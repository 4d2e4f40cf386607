"""Compile every kernel of kernels/hrm_loss.py ahead of time for real GPUs (no GPU needed) and report
registers and spills from the cubin. Run in a process where TRITON_INTERPRET is unset:

    python -m tests.aot_compile        # prints one JSON line per compiled variant

Each variant uses the block size and warps that the launcher picks for its V.
"""
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hrmloss._triton import launch_config
from hrmloss.kernels import hrm_loss as K

CCS = (80, 90)
VS = (32000, 131072)
DTYPES = ("fp32", "bf16")
INT_ARGS = {"T_rows", "V", "vocab_start", "vocab_size", "ignore_index", "V_ref", "K"}
FLOAT_ARGS = {"inv_temp", "hrm", "beta", "softcap", "label_smoothing", "smooth_per_class", "z_loss"}
OWN_DTYPE_PTRS = {"s_ptr", "t_ptr", "ds_ptr", "dt_ptr"}  # pointers in the logits' dtype

# constexpr variants per kernel (BLOCK_V comes from the launcher)
_DENSE = dict(HAS_REF=True, REST=False, CUT=False, K_PAD=1)
_TOPK = dict(HAS_REF=False, REST=True, CUT=False, K_PAD=64)  # a sparse teacher of K = 64 ids, rest mass summed
VARIANTS = {
    "_hrm_stats_kernel": [dict(SCALED=False, SOFTCAP=False, **_DENSE), dict(SCALED=True, SOFTCAP=True, **_DENSE),
                          dict(SCALED=False, SOFTCAP=False, **_TOPK),
                          dict(SCALED=True, SOFTCAP=False, **dict(_DENSE, CUT=True))],
    "_hrm_jsd_kernel": [dict(SCALED=True, SOFTCAP=True, CUT=False), dict(SCALED=True, SOFTCAP=False, CUT=True)],
    "_hrm_grad_kernel": [dict(KIND=k, SCALED=True, SOFTCAP=True, READ_REF=True, REF_GRAD=True, **_DENSE)
                         for k in (0, 1, 2)]
    + [dict(KIND=0, SCALED=False, SOFTCAP=False, READ_REF=False, REF_GRAD=False, **_DENSE),
       dict(KIND=0, SCALED=False, SOFTCAP=False, READ_REF=True, REF_GRAD=False, **_DENSE),
       dict(KIND=0, SCALED=False, SOFTCAP=False, READ_REF=False, REF_GRAD=False, **_TOPK),
       dict(KIND=2, SCALED=True, SOFTCAP=False, READ_REF=True, REF_GRAD=True, **dict(_DENSE, CUT=True))],
}


def signature(fn, dtype):
    sig = {}
    for param in fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in OWN_DTYPE_PTRS else \
                ("*i64" if name in ("y_ptr", "ids_ptr") else "*fp32")
        elif "stride" in name:
            sig[name] = "i64"
        elif name in INT_ARGS:
            sig[name] = "i32"
        elif name in FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            raise KeyError(f"no signature rule for argument {name} of {fn.__name__}")
    return sig


def resource_usage(cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    line = next(l for l in out.splitlines() if "REG:" in l)
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL|SHARED):(\d+)", line)}


def main():
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    for (name, variants), cc, V, dtype in itertools.product(VARIANTS.items(), CCS, VS, DTYPES):
        fn = getattr(K, name)
        block, warps = launch_config(V)
        for cx in variants:
            src = ASTSource(fn=fn, signature=signature(fn, dtype), constexprs=dict(cx, BLOCK_V=block))
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=warps))
            print(json.dumps(dict(kernel=name, cc=cc, V=V, dtype=dtype, block=block, warps=warps,
                                  constexprs=cx, ptx_bytes=len(k.asm["ptx"]),
                                  **resource_usage(k.asm["cubin"]))), flush=True)


if __name__ == "__main__":
    main()

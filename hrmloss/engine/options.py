"""The options of one loss call: values (runtime scalars) and structure (what the kernels compile for).

A *value* option (`hrm`, `ce_weight`, `temperature`, `beta`, `label_smoothing`, `z_loss`, `softcap`) is a Python number,
a 0-dim float tensor (on the CPU or on the logits' device) or, under `torch.compile`, a symbolic float.
Values reach the passes as one small tensor, `LossOptions.params` (layout `layout.PARAMS`), so a new value
never recompiles a kernel or a compiled graph. A *structure* option (`kl`, `ignore_index`, ...) and what is
derived from the values' kinds (`Structure`) select code: the kernels' constexprs, the torch path's
branches.

Validation (docs/design.md §4):
- a Python number is checked here, before anything runs (ValueError / TypeError naming it);
- a tensor or symbolic value is checked for its kind here and for its range on the device by
  `check_params`, inside the first pass, without a host sync: a ValueError on the CPU, a device-side
  assert (`torch._assert_async`) on CUDA.
"""
import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Union

import torch

from .layout import KINDS, PARAMS

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
TOPK_MODES = ("renorm", "tail", "renorm_both")   # a sparse teacher's semantics (docs/divergences.md)
REF_VOCABS = ("error", "truncate")  # a reference whose vocabulary size differs from the student's

Value = Union[float, torch.Tensor]


class Range(NamedTuple):
    """lo < x < hi (lo <= x with lo_closed): with a finite lo, also x finite (NaN fails every comparison)."""

    lo: float
    hi: float
    lo_closed: bool
    text: str  # what is expected, for the error message

    def holds(self, x):
        """Python bool for a number, bool tensor for a tensor (x == x is False for NaN)."""
        above = (x >= self.lo) if self.lo_closed else (x > self.lo)
        return (x == x) & above & (x < self.hi)


# The passes compute in float32: a Python number is checked as the float32 it becomes there (1e39 is inf,
# 1e-50 is 0), and a temperature must be a normal float32 (1 / T of a subnormal T overflows, and kernels
# may flush subnormals to zero).
FP32_TINY = float(torch.finfo(torch.float32).tiny)  # the smallest normal float32, ~1.18e-38


def as_float32(x):
    """A Python number rounded to float32 as a cast would (to nearest, ties to even): inf beyond float32's
    range, 0 below half its smallest subnormal. Plain Python arithmetic, so that torch.compile traces it."""
    try:
        x = float(x)
    except OverflowError:  # an int beyond float64
        return math.inf if x > 0 else -math.inf
    if not math.isfinite(x) or x == 0:
        return x
    # float32 keeps 24 significant bits (math.frexp: x = m 2^e, 0.5 <= |m| < 1), down to the
    # subnormals' step 2^-149; a result of 2^128 or more is inf
    step = max(math.frexp(x)[1] - 24, -149)
    r = math.ldexp(round(math.ldexp(x, -step)), step)
    return r if abs(r) < 2.0 ** 128 else math.copysign(math.inf, x)


def _value(default, lo, hi=math.inf, lo_closed=True, text=""):
    return field(default=default, metadata={"range": Range(lo, hi, lo_closed, text)})


def is_dynamic(value):
    """True for a value known only at run time: a tensor, or a float that torch.compile made symbolic."""
    return isinstance(value, (torch.Tensor, torch.SymFloat))


def check_value(name, value, rng):
    """A value option's kind (number, 0-dim float tensor, symbolic float) and a number's range."""
    if is_dynamic(value):
        if isinstance(value, torch.Tensor) and (value.dim() != 0 or not value.dtype.is_floating_point):
            raise TypeError(f"{name}: expected a number or a 0-dim float tensor, got a tensor of shape "
                            f"{tuple(value.shape)} and dtype {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected a real number or a 0-dim float tensor, "
                        f"got {type(value).__name__}")
    value = as_float32(value) if isinstance(value, numbers.Integral) and abs(value) > 2 ** 128 else float(value)
    # (inside a torch.compile region dynamo may trace the number symbolically: the float64 check only)
    as_seen = value if torch.compiler.is_compiling() else as_float32(value)
    if not (rng.holds(value) and rng.holds(as_seen)):
        raise ValueError(f"{name}={value!r}: expected {rng.text} (as the float32 it becomes in the "
                         f"passes: {as_seen!r})")
    return value


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    return value


class Structure(NamedTuple):
    """What the passes compile for (kernel constexprs, torch-path branches): never a value.

    Crosses the custom ops as a list of ints (`list(st)`), so a new field needs no change to them.
    """

    kind: int          # layout.KINDS: forward KL(p||q), reverse KL(q||p), jsd
    scaled: bool       # the T != 1 path: temperature is not the Python number 1 (a tensor always takes it)
    capped: bool       # a soft cap is given
    hrm_zero: bool     # hrm is the Python number 0: the backward need not read the reference
    ignore_index: int
    check: int         # bit i set: PARAMS[i] is a run-time value whose range check_params checks
    inplace: bool      # the backward writes the gradient of the logits into the logits' storage
    has_ref: bool = True   # a dense reference tensor; False: a sparse (top-k) teacher or none, no reference loads
    rest: bool = False     # sparse teacher: also the student's mass off the top-k ids (PARTIAL.lse_rest)
    tail: bool = False     # sparse teacher, topk_mode="tail" (else "renorm")
    renorm_both: bool = False  # sparse teacher, topk_mode="renorm_both": the student renormalised over the ids too
    cut: bool = False      # the reference covers the first V_ref < V columns only (ref_vocab="truncate")


@dataclass(frozen=True)
class LossOptions:
    """Everything of a call but the tensors. Adding an option: a field here (docs/design.md §5)."""

    hrm: Value = _value(1.0, 0.0, text="a finite number >= 0")
    kl: str = "forward"
    beta: Value = _value(0.5, 0.0, 1.0, lo_closed=False, text="0 < beta < 1")
    temperature: Value = _value(1.0, FP32_TINY, text=f"a finite temperature >= {FP32_TINY:.4g} (the smallest "
                                                         "normal float32)")
    ignore_index: int = -100
    reduction: str = "mean"
    backend: str = "auto"
    label_smoothing: Value = _value(0.0, 0.0, 1.0, text="0 <= label_smoothing < 1")
    z_loss: Value = _value(0.0, 0.0, text="a finite z_loss >= 0")
    softcap: Optional[Value] = _value(None, 0.0, lo_closed=False, text="None or a finite softcap > 0")
    inplace_backward: bool = False
    topk_mode: str = "renorm"
    ref_vocab: str = "error"
    ce_weight: Value = _value(1.0, 0.0, text="a finite ce_weight >= 0")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            rng = f.metadata.get("range")
            value = getattr(self, f.name)
            if rng is not None and not (f.name == "softcap" and value is None):
                object.__setattr__(self, f.name, check_value(f.name, value, rng))
        _choice("kl", self.kl, KINDS)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index={self.ignore_index!r}: expected an int")
        object.__setattr__(self, "ignore_index", int(self.ignore_index))
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("backend", self.backend, BACKENDS)
        _choice("topk_mode", self.topk_mode, TOPK_MODES)
        _choice("ref_vocab", self.ref_vocab, REF_VOCABS)
        if not isinstance(self.inplace_backward, bool):
            raise TypeError(f"inplace_backward={self.inplace_backward!r}: expected a bool")

    def check_topk(self):
        """What a sparse teacher (ref_topk) allows: ValueError naming the option otherwise."""
        if self.topk_mode == "renorm" and self.kl == "reverse":
            raise ValueError("kl='reverse' with ref_topk and topk_mode='renorm': KL(q||p~) is infinite (the "
                             "student has mass off the teacher's top-k ids); expected kl='forward' or 'jsd', "
                             "or topk_mode='tail' or 'renorm_both'")
        if self.topk_mode == "tail" and (is_dynamic(self.temperature) or self.temperature != 1.0):
            raise ValueError(f"temperature={self.temperature!r} with topk_mode='tail': the tail mode is exact "
                             "at the temperature of the stored log-probabilities only; expected the number 1.0 "
                             "(or topk_mode='renorm')")

    def values(self):
        """name -> value for every runtime scalar of PARAMS (the placeholder 1.0 for a softcap of None)."""
        return {name: 1.0 if name == "softcap" and self.softcap is None else getattr(self, name)
                for name in PARAMS}

    def structure(self, topk=False, cut=False, ref=True):
        """topk: the reference is a sparse teacher (ref_topk); cut: a dense reference with fewer columns
        than the student (ref_vocab="truncate"); ref=False: no reference at all (the CE family alone)."""
        values = self.values()
        return Structure(
            kind=KINDS.index(self.kl),
            scaled=is_dynamic(self.temperature) or self.temperature != 1.0,
            capped=self.softcap is not None,
            hrm_zero=not is_dynamic(self.hrm) and self.hrm == 0,
            ignore_index=self.ignore_index,
            check=sum(1 << i for i, name in enumerate(PARAMS) if is_dynamic(values[name])),
            has_ref=ref and not topk,
            # the rest outcome matters unless its teacher probability is 0 and the divergence forward
            rest=topk and (self.topk_mode == "tail" or (self.kl == "jsd" and self.topk_mode == "renorm")),
            tail=topk and self.topk_mode == "tail",
            renorm_both=topk and self.topk_mode == "renorm_both",
            cut=cut,
            inplace=self.inplace_backward)

    def params(self, device, dtype):
        """The runtime scalars as one (len(PARAMS),) tensor of `dtype` on `device`.

        Built by device-side arithmetic (zeros + value), never by a host-to-device copy, so it neither
        syncs nor breaks CUDA-graph capture; a CPU 0-dim tensor enters a CUDA op as a host scalar.
        """
        zero = torch.zeros((), device=device, dtype=dtype)
        return torch.stack([(zero + (v.detach() if isinstance(v, torch.Tensor) else v)).to(dtype)
                            for v in self.values().values()])


# num_items (not an option: a per-call argument), checked with the same Range: a number at the call
# (checks.check_num_items), a tensor in the first pass (ops.check_num_items)
NUM_ITEMS_RANGE = Range(0.0, math.inf, True, "a finite number >= 0")

OPTION_NAMES = tuple(f.name for f in dataclasses.fields(LossOptions))


def check_params(params, st):
    """Range-check the run-time values (bits of st.check) of a params tensor, without a host sync on CUDA.

    CPU: ValueError naming the first bad option and its value. CUDA: one `torch._assert_async`.
    """
    if not st.check:
        return
    ranges = {f.name: f.metadata["range"] for f in dataclasses.fields(LossOptions) if "range" in f.metadata}
    names = [name for i, name in enumerate(PARAMS) if st.check >> i & 1]
    oks = [ranges[name].holds(params[PARAMS.index(name)]) for name in names]
    if params.device.type == "cpu":
        for name, ok in zip(names, oks):
            if not bool(ok):
                raise ValueError(f"{name}={params[PARAMS.index(name)].item()!r} (a tensor): "
                                 f"expected {ranges[name].text}")
    else:
        expected = "; ".join(f"{name}: {ranges[name].text}" for name in names)
        torch._assert_async(torch.stack(oks).all(), f"hrmloss: a tensor option is out of range ({expected})")

"""The options of one loss call, validated once and carried as one frozen dataclass."""
import math
import numbers
from dataclasses import dataclass

KL_KINDS = ("forward", "reverse", "jsd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r}: expected a finite number")
    return value


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(map(repr, allowed))}")
    return value


@dataclass(frozen=True)
class LossOptions:
    """Everything but the tensors. `kind` is the KIND constexpr of the kernels (0 fwd, 1 rev, 2 jsd)."""

    hrm: float = 1.0
    kl: str = "forward"
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100
    reduction: str = "mean"
    backend: str = "auto"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("hrm", _real("hrm", self.hrm))
        if self.hrm < 0:
            raise ValueError(f"hrm={self.hrm!r}: expected hrm >= 0")
        _choice("kl", self.kl, KL_KINDS)
        set_("beta", _real("beta", self.beta))
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta={self.beta!r}: expected 0 < beta < 1")
        set_("temperature", _real("temperature", self.temperature))
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature!r}: expected temperature > 0")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index={self.ignore_index!r}: expected an int")
        set_("ignore_index", int(self.ignore_index))
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("backend", self.backend, BACKENDS)

    @property
    def kind(self):
        return KL_KINDS.index(self.kl)

    @property
    def inv_temp(self):
        return 1.0 / self.temperature

    @property
    def scaled(self):
        return self.temperature != 1.0

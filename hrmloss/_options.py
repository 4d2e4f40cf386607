"""The options of one loss call, validated once and carried as one frozen dataclass."""
import ast
import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Optional

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
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: Optional[float] = None

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
        set_("label_smoothing", _real("label_smoothing", self.label_smoothing))
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing!r}: expected 0 <= label_smoothing < 1")
        set_("z_loss", _real("z_loss", self.z_loss))
        if self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss!r}: expected z_loss >= 0")
        if self.softcap is not None:
            set_("softcap", _real("softcap", self.softcap))
            if self.softcap <= 0:
                raise ValueError(f"softcap={self.softcap!r}: expected None or softcap > 0")

    def key(self):
        """The options as one string: how they cross the torch.library op boundary (a constant to dynamo)."""
        return repr(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key):
        return LossOptions(*ast.literal_eval(key))

    @property
    def kind(self):
        return KL_KINDS.index(self.kl)

    @property
    def inv_temp(self):
        return 1.0 / self.temperature

    @property
    def scaled(self):
        return self.temperature != 1.0

    @property
    def capped(self):
        return self.softcap is not None

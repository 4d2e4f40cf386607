"""hrmloss: fused causal-LM cross-entropy + hrm * divergence to a reference, with Triton kernels and a torch path.

The package by role (docs/design.md §3):

    hrmloss/loss.py, linear.py   the public loss functions and modules
    hrmloss/engine/              what a call goes through: checks, options, autograd, custom ops, backends
    hrmloss/kernels/             the Triton kernels and their launcher (the "triton" backend)
    hrmloss/runs/                reading runs: per-position loss, fits, scaling laws, log readers, charts,
                                 the demo and the command line
    hrmloss/integrations/        Hugging Face transformers
"""
from .engine.sharding import inside_forward
from .linear import LinearHRMLoss, linear_hrm_loss
from .loss import HRMLoss, HRMLossOutput, hrm_loss

# Tools for reading runs (hrmloss/runs/), loaded on first use so that `import hrmloss` never imports scipy /
# matplotlib / tqdm: name -> its module in hrmloss.runs.
_LAZY = {
    "PositionLoss": "positions",
    "PowerLawFit": "fits", "CurvePrediction": "fits", "fit_power_law": "fits", "predict_curve": "fits",
    "FLAGS": "fits", "EXPONENT_RANGE": "fits", "smooth": "fits",
    "ScalingLawFit": "scaling", "fit_scaling_law": "scaling",
    "plot_hrm_sweep": "plots", "plot_position_loss": "plots", "plot_test_loss": "plots",
    "plot_pred_vs_real": "plots", "plot_grid": "plots", "plot_pareto": "plots",
    "read_runs": "logs", "report": "reports", "fit_grid": "reports",
}

__all__ = ["HRMLoss", "HRMLossOutput", "LinearHRMLoss", "hrm_loss", "inside_forward", "linear_hrm_loss", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".runs.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

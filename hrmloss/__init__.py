"""hrmloss: fused causal-LM cross-entropy + hrm * KL-to-a-reference, with Triton kernels and a torch path."""
from .linear import LinearHRMLoss, linear_hrm_loss
from .loss import HRMLoss, HRMLossOutput, hrm_loss

# Tools for reading runs, loaded on first use so that `import hrmloss` never imports scipy / matplotlib / tqdm.
_LAZY = {
    "PositionLoss": "analysis", "PowerLawFit": "analysis", "CurvePrediction": "analysis",
    "fit_power_law": "analysis", "predict_curve": "analysis", "fit_scaling_law": "analysis",
    "ScalingLawFit": "analysis",
    "FLAGS": "analysis", "smooth": "analysis",
    "plot_hrm_sweep": "plots", "plot_position_loss": "plots", "plot_test_loss": "plots",
    "plot_pred_vs_real": "plots", "plot_grid": "plots",
    "read_runs": "runlogs", "report": "reports", "fit_grid": "reports",
}

__all__ = ["HRMLoss", "HRMLossOutput", "LinearHRMLoss", "hrm_loss", "linear_hrm_loss", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))

"""hrmloss: fused causal-LM cross-entropy + hrm * KL-to-a-reference, with Triton kernels and a torch path."""
from .linear import LinearHRMLoss, linear_hrm_loss
from .loss import HRMLoss, HRMLossOutput, hrm_loss

__all__ = ["HRMLoss", "HRMLossOutput", "LinearHRMLoss", "hrm_loss", "linear_hrm_loss"]
__version__ = "0.1.0"

"""Per-position (token index) test loss: `PositionLoss` accumulates per-token ce and kl on the tensors'
device, without a host sync per batch; the fits of the curves it gives are in fits.py."""
import numpy as np
import torch


class PositionLoss:
    """Per-position (token index) means of per-token ce and kl, accumulated over batches and steps.

    Feed it the `reduction="none"` components of `hrm_loss` (shape (B, T)) and the mask of counted
    tokens (`labels != ignore_index`, shape (B, T), bool). It keeps, on the tensors' device, for every
    position t:

        ce_sum[t] = sum over counted (b, t) of ce[b, t],  kl_sum[t] likewise,  count[t] = number counted

    with no host synchronisation per `update` (only `compute` copies to the host). Sequences of
    different lengths T may be mixed: the buffers grow to the longest T seen.

    Args:
        dtype: accumulation dtype (default float64; use float32 on devices without float64).
    """

    def __init__(self, dtype=torch.float64):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype={dtype!r}: expected a floating torch.dtype")
        self.dtype = dtype
        self.ce_sum = self.kl_sum = self.count = None

    def _grow(self, length, device):
        if self.count is None:
            self.ce_sum, self.kl_sum, self.count = (torch.zeros(length, dtype=self.dtype, device=device)
                                                    for _ in range(3))
            return
        if self.count.device != device:
            raise ValueError(f"device={device}: expected the device of earlier updates, {self.count.device}")
        extra = length - self.count.numel()
        if extra > 0:  # shape-driven, not data-driven: no sync
            pad = lambda x: torch.cat([x, x.new_zeros(extra)])  # noqa: E731
            self.ce_sum, self.kl_sum, self.count = pad(self.ce_sum), pad(self.kl_sum), pad(self.count)

    def update(self, ce, kl, mask):
        """Add a batch. ce, kl: (B, T) float tensors; mask: (B, T) bool, True where the token counts.

        Values at masked-out tokens are ignored (even if NaN/inf). On CPU tensors a non-finite value
        at a counted token raises ValueError; on other devices it is not checked (that would sync).
        """
        for name, x in (("ce", ce), ("kl", kl), ("mask", mask)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if ce.dim() != 2:
            raise ValueError(f"ce.shape={tuple(ce.shape)}: expected (B, T)")
        for name, x in (("kl", kl), ("mask", mask)):
            if x.shape != ce.shape:
                raise ValueError(f"{name}.shape={tuple(x.shape)}: expected the shape of ce, {tuple(ce.shape)}")
            if x.device != ce.device:
                raise ValueError(f"{name}.device={x.device}: expected the device of ce, {ce.device}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask.dtype={mask.dtype}: expected torch.bool (labels != ignore_index)")
        if not (ce.dtype.is_floating_point and kl.dtype.is_floating_point):
            raise TypeError(f"ce.dtype={ce.dtype}, kl.dtype={kl.dtype}: expected floating tensors")
        ce, kl = (torch.where(mask, x.to(self.dtype), 0.0) for x in (ce, kl))
        if ce.device.type == "cpu" and not bool(torch.isfinite(ce).all() & torch.isfinite(kl).all()):
            raise ValueError("ce/kl: non-finite value at a counted token")
        self._grow(ce.shape[1], ce.device)
        t = ce.shape[1]
        self.ce_sum[:t] += ce.sum(0)
        self.kl_sum[:t] += kl.sum(0)
        self.count[:t] += mask.sum(0).to(self.dtype)
        return self

    def compute(self, hrm=None):
        """Per-position means as float64 numpy arrays (one host copy).

        Returns a dict with "ce", "kl", "count" of shape (T,), and "loss" = ce + hrm * kl when `hrm`
        is given. A position with no counted token has mean NaN.
        """
        if self.count is None:
            raise ValueError("PositionLoss.compute: no update yet")
        ce, kl, count = (x.detach().to("cpu", torch.float64).numpy() for x in (self.ce_sum, self.kl_sum, self.count))
        with np.errstate(invalid="ignore", divide="ignore"):
            out = {"ce": np.where(count > 0, ce / count, np.nan), "kl": np.where(count > 0, kl / count, np.nan),
                   "count": count}
        if hrm is not None:
            out["loss"] = out["ce"] + float(hrm) * out["kl"]
        return out

    def curve(self, key="ce", hrm=None):
        """(positions, means) over the positions with data only, ready for `fit_power_law`.

        positions: the 1-based token indices T with at least one counted token; means: `compute(hrm)[key]`
        there. Positions never counted (a prompt mask, labels that start with -100) have no mean (NaN in
        `compute`) and are left out; `compute()["count"] == 0` says which they are. key: "ce", "kl", or
        "loss" (needs hrm).
        """
        if key not in ("ce", "kl", "loss"):
            raise ValueError(f"key={key!r}: expected 'ce', 'kl' or 'loss'")
        if key == "loss" and hrm is None:
            raise ValueError("key='loss': expected hrm (loss = ce + hrm * kl)")
        out = self.compute(hrm)
        seen = out["count"] > 0
        return np.flatnonzero(seen).astype(np.float64) + 1, out[key][seen]

    def reset(self):
        self.ce_sum = self.kl_sum = self.count = None

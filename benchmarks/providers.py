"""The implementations compared, all computing the same loss (forward KL, hrm = HRM, T = 1):

    loss = (1 / n) sum_{i counted} [ce_i + HRM * KL(p_i || q_i)],   n = number of counted tokens,
    q = softmax(s) (student logits), p = softmax(t) (reference logits), labels == IGNORE not counted.

`loss_provider(name, device)` and `linear_provider(name, device)` return `fn(*inputs) -> scalar loss`,
or raise `Unavailable` with the reason (the benchmark then skips). Nothing heavy is imported here at
module level; each provider imports what it needs when it is built.
"""
import os

import torch
import torch.nn.functional as F

HRM = 0.5
IGNORE = -100

LOSS_PROVIDERS = ("naive", "compile", "hrmloss", "hrmloss-eager", "liger")
LINEAR_PROVIDERS = ("naive-linear", "compile-linear", "hrmloss-linear", "liger-chunked", "liger-flce-CE-only",
                    "cce-CE-only", "gemm-floor")
# linear providers that compute CE alone (hrm = 0: their values are checked against the CE reference), and
# the one that computes no loss at all (the four GEMMs of the fused loss, nothing else: a time floor)
CE_ONLY = ("liger-flce-CE-only", "cce-CE-only")
NO_LOSS = ("gemm-floor",)


class Unavailable(Exception):
    """The provider cannot run here (package missing, wrong device); the message says why."""


def naive_loss(s, t, y):
    """Eager PyTorch: F.cross_entropy + HRM * F.kl_div of two log_softmax, masked like hrm_loss.

    Computed in the dtype of the logits, as a user would write it."""
    live = y != IGNORE
    n = live.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=IGNORE, reduction="sum")
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    return (ce + HRM * torch.where(live, kl, 0.0).sum()) / n


def naive_linear_loss(h, w, ht, wt, y):
    """The logits materialised from hidden states (N, H) and output weights (V, H), then naive_loss."""
    with torch.no_grad():
        t = ht @ wt.T
    return naive_loss(h @ w.T, t, y)


def _fresh_compile(fn):
    # dynamo caches compiled code per code object, shared by every torch.compile(fn) wrapper; start
    # clean so that no earlier shape's entries count against the recompile limit (which would fall
    # back to eager silently) and every provider is compiled for exactly its shape.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _hrmloss(compiled):
    import hrmloss

    def run(s, t, y):
        saved = os.environ.get("HRMLOSS_COMPILE")
        os.environ["HRMLOSS_COMPILE"] = "1" if compiled else "0"
        try:
            return hrmloss.hrm_loss(s, t, y, HRM, ignore_index=IGNORE)
        finally:
            if saved is None:
                del os.environ["HRMLOSS_COMPILE"]
            else:
                os.environ["HRMLOSS_COMPILE"] = saved
    return run


def _liger_triton_usable(device):
    if device.type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("HRMLOSS_BENCH_SIZE") == "tiny"


def _liger_composed():
    """Liger-Kernel's Triton CE module + its KL-div module on log_softmax outputs of the counted rows."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerKLDIVLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not installed ({e})") from e
    if os.environ.get("TRITON_INTERPRET") == "1":
        from .tools import interp_fixes  # noqa: F401 (Liger's kernels need it in the interpreter)
    ce_fn = LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")
    kl_fn = LigerKLDIVLoss(reduction="sum", log_target=True)

    def run(s, t, y):
        live = (y != IGNORE).nonzero()[:, 0]  # KL-div has no ignore_index: keep the counted rows
        n = max(live.numel(), 1)
        lq = F.log_softmax(s.index_select(0, live), -1)
        lp = F.log_softmax(t.index_select(0, live), -1)
        return (ce_fn(s, y) + HRM * kl_fn(lq, lp)) / n
    return run


def loss_provider(name, device):
    """fn(s (N, V), t (N, V), y (N,)) -> loss for one of LOSS_PROVIDERS on `device`."""
    if name == "naive":
        return naive_loss
    if name == "compile":
        return _fresh_compile(naive_loss)
    if name in ("hrmloss", "hrmloss-eager"):
        if name == "hrmloss-eager" and device.type != "cpu":
            raise Unavailable("the eager/compiled choice is the CPU torch path's; CUDA uses Triton")
        return _hrmloss(compiled=name == "hrmloss")
    if name == "liger":
        if not _liger_triton_usable(device):
            raise Unavailable("Liger's CE and KL-div are Triton kernels: CUDA only (interpreter at tiny size)")
        return _liger_composed()
    raise ValueError(f"provider={name!r}: expected one of {LOSS_PROVIDERS}")


class _GemmFloor(torch.autograd.Function):
    """The GEMMs of a fused linear loss and nothing else: forward s = h @ w.T and t = ht @ wt.T, backward
    grad h = ds @ w and grad w = ds.T @ h with ds = s (4 x 2 N H V FLOPs in the input dtype). Returns 0."""

    @staticmethod
    def forward(ctx, h, w, ht, wt):
        s = h @ w.T
        ht @ wt.T
        ctx.save_for_backward(h, w, s)
        return s.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, _):
        h, w, ds = ctx.saved_tensors
        return ds @ w, ds.T @ h, None, None


def _ce_only(factory, device):
    """fn(h, w, ht, wt, y) of a fused linear cross-entropy (Triton: CUDA, or the interpreter at tiny size)."""
    if not _liger_triton_usable(device):
        raise Unavailable("a Triton kernel: CUDA only (the interpreter at the tiny size)")
    return factory()


def _liger_flce():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Unavailable(f"liger-kernel not installed ({e})") from e
    if os.environ.get("TRITON_INTERPRET") == "1":
        from .tools import interp_fixes  # noqa: F401
    fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE)
    return lambda h, w, ht, wt, y: fn(w, h, y)


def _cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Unavailable(f"cut-cross-entropy not installed ({e})") from e
    return lambda h, w, ht, wt, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE)


def linear_provider(name, device, chunk_size=1024):
    """fn(h (N, H), w (V, H), ht (N, H), wt (V, H), y (N,)) -> loss for one of LINEAR_PROVIDERS."""
    if name == "naive-linear":
        return naive_linear_loss
    if name == "compile-linear":
        return _fresh_compile(naive_linear_loss)
    if name == "hrmloss-linear":
        import hrmloss
        if not hasattr(hrmloss, "linear_hrm_loss"):
            raise Unavailable("hrmloss.linear_hrm_loss does not exist in this version")
        return lambda h, w, ht, wt, y: hrmloss.linear_hrm_loss(
            h, w, y, HRM, ref_hidden=ht, ref_weight=wt, ignore_index=IGNORE)
    if name == "liger-chunked":
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})") from e
        # beta = 0 is Liger's forward KL(p || q); hard (CE) and soft (KL) terms are means over counted rows
        fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=HRM, beta=0.0,
                                     ignore_index=IGNORE, temperature=1.0, compiled=True,
                                     chunk_size=chunk_size)
        torch._dynamo.reset()
        return lambda h, w, ht, wt, y: fn(h, w, ht, wt, y)
    if name == "liger-flce-CE-only":
        return _ce_only(_liger_flce, device)
    if name == "cce-CE-only":
        if device.type != "cuda":
            raise Unavailable("Cut Cross-Entropy's kernels are CUDA only")
        return _cce()
    if name == "gemm-floor":
        return lambda h, w, ht, wt, y: _GemmFloor.apply(h, w, ht, wt)
    raise ValueError(f"provider={name!r}: expected one of {LINEAR_PROVIDERS}")

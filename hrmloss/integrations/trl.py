"""TRL: `generalized_jsd_loss`, TRL's function of that name with its signature and semantics, fused.

    from trl.experimental.gkd import GKDTrainer
    from hrmloss.integrations.trl import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = generalized_jsd_loss      # GKD, and the trainers that call it

TRL's loss (trl.experimental.gkd.GKDTrainer.generalized_jsd_loss, TRL 1.16), with q = softmax(s / T) the
student and p = softmax(t / T) the teacher, per token (no T^2 factor):

    beta = 0:       KL(p || q)                                    (a switch to the forward KL)
    beta = 1:       KL(q || p)                                    (a switch to the reverse KL)
    0 < beta < 1:   beta KL(p || m) + (1 - beta) KL(q || m),   m = beta p + (1 - beta) q

(the generalised JSD itself tends to 0 at both ends: the switches are TRL's, kept here). Tokens whose
label is -100 count nowhere. Reductions of the sum S over counted tokens and the vocabulary:

    num_items_in_batch given:   S / num_items_in_batch        (whatever `reduction` says)
    "batchmean":                S / max(counted tokens, 1) with labels; S / student_logits.shape[0] without
    "sum":                      S
    "mean":                     S / (counted tokens x V)      (NaN when no token counts, as in TRL)

It is hrmloss's loss with ce_weight = 0 and hrm = 1 (kl = "forward", "reverse" or "jsd" with that beta),
one fused pass over both logits, fp32 whatever their dtype. TRL's reduction="none" returns the per-entry
(tokens, V) divergence, which no fused loss forms: it is refused (ValueError) rather than approximated.
"""
import torch

from ..loss import hrm_loss

__all__ = ["generalized_jsd_loss"]

IGNORE = -100
REDUCTIONS = ("batchmean", "sum", "mean")


def _generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                          reduction="batchmean", num_items_in_batch=None):
    """TRL's generalized_jsd_loss (module docstring), fused: (..., V) logits, (...) labels or None."""
    if num_items_in_batch is None and reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {', '.join(map(repr, REDUCTIONS))} (TRL's "
                         "per-entry divergence, a (tokens, V) tensor, is not formed by the fused loss; use TRL's "
                         "own function for it)")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta={beta!r}: expected a number with 0 <= beta <= 1")
    kl = "forward" if beta == 0 else "reverse" if beta == 1 else "jsd"
    counted = labels if labels is not None else \
        student_logits.new_zeros(student_logits.shape[:-1], dtype=torch.long)  # every token, any valid label
    opts = dict(hrm=1.0, ce_weight=0.0, kl=kl, beta=beta if kl == "jsd" else 0.5, temperature=temperature,
                ignore_index=IGNORE)
    if num_items_in_batch is not None:
        return hrm_loss(student_logits, teacher_logits, counted, num_items=num_items_in_batch, **opts)
    if reduction == "batchmean" and labels is not None:
        return hrm_loss(student_logits, teacher_logits, counted, **opts)  # / max(count, 1)
    total = hrm_loss(student_logits, teacher_logits, counted, reduction="sum", **opts)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / max(student_logits.shape[0], 1)
    n_tokens = (counted != IGNORE).sum() if labels is not None else counted.numel()
    return total / (n_tokens * student_logits.shape[-1])


# a staticmethod object: callable as a function, and assignable to a trainer class as TRL's is
generalized_jsd_loss = staticmethod(_generalized_jsd_loss)
generalized_jsd_loss.__doc__ = _generalized_jsd_loss.__doc__

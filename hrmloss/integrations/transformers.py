"""Hugging Face transformers: hrmloss as the loss of a `Trainer` (pip install "hrmloss[hf]").

Two entry points:

- `compute_loss_func(**options)`: a drop-in for `Trainer(compute_loss_func=...)`. The Trainer hands it the
  model outputs, the labels and `num_items_in_batch` only, so it computes the student's fused
  cross-entropy family (label smoothing, z-loss, soft cap) from `outputs.logits`, against a teacher only
  when the outputs carry one (`outputs["ref_logits"]`, e.g. from a wrapper model).
- `HRMDistillTrainer`: a `Trainer` that trains the student against a frozen `teacher_model`, or against
  the teacher's top-k log-probabilities stored in the dataset (`ref_topk` columns), with the fused
  projection (`linear_hrm_loss`: the (N, V) logits of the student, and of the teacher, are never
  materialised) when the model exposes its last hidden states and a linear `lm_head`; it logs `ce` and
  `kl` next to the loss.

Labels follow transformers' causal-LM convention: `labels[:, i]` is the token at position i, predicted
from position i - 1 (the loss shifts them; -100 is ignored). Stored top-k data follow the logits:
`teacher_topk_ids[:, i]` / `teacher_topk_logprobs[:, i]` describe the teacher's distribution at
position i (for token i + 1). Both losses divide by `num_items_in_batch` when the Trainer gives it (the
counted tokens of the whole accumulated batch), so gradient accumulation over micro-batches equals one
large batch; the Trainer then does not divide by the accumulation steps.
"""
import torch
from transformers import Trainer

from ..engine.sharding import call_inside
from ..linear import linear_hrm_loss
from ..loss import hrm_loss

__all__ = ["HRMDistillTrainer", "compute_loss_func"]

IGNORE = -100
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")


def _shift(x):
    """Positions 0 .. T-2 (the predictions) of a (B, T, ...) tensor: a view, no copy."""
    return None if x is None else x[:, :-1]


def compute_loss_func(**options):
    """A `Trainer(compute_loss_func=...)` computing hrmloss on `outputs.logits`.

    options: keywords of `hrm_loss` (hrm, kl, temperature, label_smoothing, z_loss, softcap, ...). Without
    `outputs["ref_logits"]` the divergence is off (hrm = 0) and the loss is hrmloss's fused CE (+ z-loss).
    """
    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        ref = outputs.get("ref_logits") if hasattr(outputs, "get") else None
        opts = dict(options) if ref is not None else {**options, "hrm": 0.0}
        return hrm_loss(_shift(logits), _shift(ref if ref is not None else logits.detach()), labels[:, 1:],
                        ignore_index=IGNORE, num_items=num_items_in_batch, **opts)
    return loss


def _projection(model):
    """(base model returning last hidden states, lm_head weight, bias) when the logits are
    lm_head(last_hidden_state), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if not isinstance(head, torch.nn.Linear) or base is model or getattr(model.config, "logit_scale", None):
        return None
    return base, head.weight, head.bias


class HRMDistillTrainer(Trainer):
    """A `Trainer` whose loss is `ce + hrm * kl` against a frozen teacher model or stored top-k data.

    Args (besides the Trainer's):
        teacher_model: a frozen causal LM on the student's inputs (kept in eval mode, no grad), or None:
            then every batch must hold the `teacher_topk_ids` / `teacher_topk_logprobs` columns
            ((B, T, K) ids and log-probs at temperature 1, see the module docstring), and `ref_topk` is used.
        hrm: the divergence's weight.
        loss_options: other keywords of `linear_hrm_loss` / `hrm_loss` (kl, beta, temperature, topk_mode,
            ref_vocab, label_smoothing, z_loss, ...). A model config's `final_logit_softcapping` becomes
            `softcap` unless given.
        fused: use the fused projection when the model allows it (default True); False computes the
            logits with the model's forward and calls `hrm_loss`.

    Logs `ce` and `kl` (each the mean over the counted tokens, like the loss) with the loss.
    """

    def __init__(self, *args, teacher_model=None, hrm=1.0, loss_options=None, fused=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.hrm, self.fused = hrm, fused
        self.loss_options = dict(loss_options or {})
        cap = getattr(getattr(self.model, "config", None), "final_logit_softcapping", None)
        if cap is not None:
            self.loss_options.setdefault("softcap", cap)
        # the Trainer counts num_items_in_batch (labels[..., 1:] != -100 over the accumulated batch) and
        # passes it here; the loss divided by it needs no further division by the accumulation steps
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._components = {"ce": 0.0, "kl": 0.0}  # sums since the last log (tensors: no host sync a step)

    def _student_and_teacher(self, model, inputs):
        """((hidden, weight, bias) or logits of the student; (ref kwargs) of the teacher), all shifted."""
        proj = _projection(model) if self.fused else None
        teacher = {}
        if self.teacher_model is not None:
            with torch.no_grad():
                tproj = _projection(self.teacher_model) if self.fused else None
                if proj is not None and tproj is not None:
                    hidden = call_inside(self.teacher_model, tproj[0], inputs).last_hidden_state
                    teacher = dict(ref_hidden=_shift(hidden), ref_weight=tproj[1], ref_bias=tproj[2])
                else:
                    teacher = dict(ref_logits=_shift(self.teacher_model(**inputs).logits))
        if proj is not None:
            hidden = call_inside(model, proj[0], inputs).last_hidden_state  # FSDP2: inside the root's hooks
            return (_shift(hidden), proj[1], proj[2]), teacher, None
        outputs = model(**inputs)
        return None, teacher, outputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")[:, 1:]
        ids, lps = (inputs.pop(k, None) for k in TOPK_KEYS)
        if self.teacher_model is None and ids is None:
            raise ValueError(f"HRMDistillTrainer: no teacher_model and no {TOPK_KEYS} columns in the batch: "
                             "expected one of them")
        student, teacher, outputs = self._student_and_teacher(model, inputs)
        if ids is not None and self.teacher_model is None:
            teacher = dict(ref_topk=(_shift(ids), _shift(lps)))
        opts = dict(hrm=self.hrm, ignore_index=IGNORE, num_items=num_items_in_batch, return_components=True,
                    **self.loss_options)
        if student is not None:
            hidden, weight, bias = student
            out = linear_hrm_loss(hidden, weight, labels, bias=bias, **teacher, **opts)
        else:
            ref = teacher.pop("ref_logits", None)
            out = hrm_loss(_shift(outputs.logits), ref, labels, **teacher, **opts)
        if model.training:
            for name in self._components:
                self._components[name] = self._components[name] + getattr(out, name).detach()
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's tokens and DDP averages the gradients: undo the average
            loss = loss * self.accelerator.num_processes
        return (loss, outputs if outputs is not None else {"loss": loss}) if return_outputs else loss

    def log(self, logs, *args, **kwargs):
        """Add `ce` and `kl`, averaged over the optimizer steps since the last log, to a training log."""
        if "loss" in logs and self.model.training:
            steps = max(self.state.global_step - getattr(self, "_components_since", 0), 1)
            for name, total in self._components.items():
                logs[name] = float(total) / steps
            self._components = dict.fromkeys(self._components, 0.0)
            self._components_since = self.state.global_step
        return super().log(logs, *args, **kwargs)

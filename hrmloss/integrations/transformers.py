"""Hugging Face transformers: hrmloss as the loss of a `Trainer` (pip install "hrmloss[hf]").

- `compute_loss_func(model=None, **options)`: a drop-in for `Trainer(compute_loss_func=...)`. The Trainer hands it the
  model outputs, the labels and `num_items_in_batch` only, so it computes the student's fused
  cross-entropy family (label smoothing, z-loss, soft cap) from `outputs.logits`, against a teacher only
  when the outputs carry one (`outputs["ref_logits"]`, e.g. from a wrapper model).
- `HRMDistillTrainer`: a `Trainer` that trains the student against a frozen `teacher_model`, or against
  the teacher's top-k log-probabilities stored in the dataset (`ref_topk` columns), with the fused
  projection (`linear_hrm_loss`: the (N, V) logits of the student, and of the teacher, are never
  materialised) when the model exposes its last hidden states and a linear `lm_head`; it logs `ce` and
  `kl` next to the loss. Each model's objective is that of its own logits: what its head does after
  lm_head(h) (`head_transform`: a soft cap, a logit scale) is applied to the student and to the teacher,
  each with its own config, once, fused or not; the first batch checks it (a head that the fused path does
  not reproduce falls back to the model's own logits, with a warning).
- `stored_topk`: the mapping of stored teacher data, hrmloss's `teacher_topk_*` columns or Axolotl's /
  vLLM's `target_token_ids` / `target_logprobs` / `target_mask`, to `ref_topk`.

Labels follow transformers' causal-LM convention: `labels[:, i]` is the token at position i, predicted
from position i - 1 (the loss shifts them; -100 is ignored). Stored top-k data follow the logits:
`teacher_topk_ids[:, i]` / `teacher_topk_logprobs[:, i]` describe the teacher's distribution at
position i (for token i + 1). Both losses divide by `num_items_in_batch` when the Trainer gives it (the
counted tokens of the whole accumulated batch), so gradient accumulation over micro-batches equals one
large batch; the Trainer then does not divide by the accumulation steps.
"""
import warnings
from typing import NamedTuple

import torch
from transformers import Trainer

from ..engine.sharding import call_inside
from ..linear import linear_hrm_loss
from ..loss import hrm_loss

__all__ = ["HRMDistillTrainer", "compute_loss_func", "head_transform", "stored_topk"]

IGNORE = -100
TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_logprobs")
TARGET_KEYS = ("target_token_ids", "target_logprobs", "target_mask")  # Axolotl / vLLM top-k datasets
TEACHER_COLUMNS = TOPK_KEYS + TARGET_KEYS
# the relative error, max |reproduced - model's own| / max(1, max |own|), above which a head is not
# reproduced (by dtype of the model's logits: rounding of the GEMM and of the transform in that dtype)
HEAD_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6}
HEAD_TOLERANCE_LOW = 3e-2  # bf16 / fp16


def _shift(x):
    """Positions 0 .. T-2 (the predictions) of a (B, T, ...) tensor: a view, no copy."""
    return None if x is None else x[:, :-1]


class HeadTransform(NamedTuple):
    """What a causal LM does between lm_head(h) and its logits, read from its config:

        logits = cap tanh(scale lm_head(h) / cap)      (scale: None for 1; cap: None for no cap)

    scale: Granite's 1 / logits_scaling, Cohere's logit_scale; cap: Gemma-2's / Gemma-3's / nanochat's
    final_logit_softcapping."""

    scale: object = None
    cap: object = None


def head_transform(model):
    """The `HeadTransform` of a model by its (text) config: whether a transform is present is structure,
    its value a value. A head doing anything else is caught by the trainer's first-batch check."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def number(name):
        value = getattr(config, name, None)
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    scale = None
    if number("logits_scaling") not in (None, 1):
        scale = 1.0 / number("logits_scaling")
    elif number("logit_scale") not in (None, 1):
        scale = float(number("logit_scale"))
    return HeadTransform(scale, number("final_logit_softcapping"))


def compute_loss_func(model=None, **options):
    """A `Trainer(compute_loss_func=...)` computing hrmloss on `outputs.logits`.

    options: keywords of `hrm_loss` (hrm, kl, temperature, label_smoothing, z_loss, softcap, ...). Without
    `outputs["ref_logits"]` there is no divergence: the loss is hrmloss's fused CE family (+ z-loss).
    `outputs.logits` are the model's final logits, after whatever its head does: a Gemma-2 model has
    capped them already (`final_logit_softcapping`), a Granite model divided them by `logits_scaling`, so
    `softcap` here caps them a second time. model: the model, optional: then a warning says so when its
    config already caps and `softcap` is given.
    """
    if options.get("softcap") is not None and model is not None and head_transform(model).cap is not None:
        warnings.warn(f"compute_loss_func(softcap={options['softcap']!r}): the model's config caps its logits "
                      f"already (final_logit_softcapping={head_transform(model).cap}); softcap caps them again")

    def loss(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"]
        ref = outputs.get("ref_logits") if hasattr(outputs, "get") else None
        return hrm_loss(_shift(logits), _shift(ref), labels[:, 1:], ignore_index=IGNORE,
                        num_items=num_items_in_batch, **options)
    return loss


class _Head(NamedTuple):
    """A model whose logits the fused projection reproduces: base(**inputs).last_hidden_state, the lm_head's
    weight and bias, and the transform after it."""

    base: torch.nn.Module
    weight: torch.Tensor
    bias: object
    transform: HeadTransform

    def projection(self, hidden):
        """(hidden, bias) scaled by the logit scale (scale (h W^T + b) = (scale h) W^T + scale b: no kernel
        change), and the soft cap for the loss, from the (B, T, H) last hidden states."""
        scale, bias = self.transform.scale, self.bias
        if scale is not None:
            hidden = hidden * scale
            bias = None if bias is None else bias * scale
        return hidden, bias, self.transform.cap

    def logits(self, lm_head, hidden):
        """The logits the transform makes of lm_head(hidden) (for the first-batch check): the lm_head module
        is called, so that under FSDP2 its own hooks (or the root's) gather its weight."""
        logits = lm_head(hidden)
        scale, cap = self.transform.scale, self.transform.cap
        logits = logits if scale is None else logits * scale
        return logits if cap is None else torch.tanh(logits / cap) * cap


def _head(model):
    """The model's `_Head` when its logits are a transform of lm_head(last_hidden_state), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    if not isinstance(head, torch.nn.Linear) or base is model:
        return None
    return _Head(base, head.weight, head.bias, head_transform(model))


@torch.no_grad()
def _reproduces(model, head, inputs):
    """Whether head.logits(last hidden states) equal the model's own logits on these inputs (eval mode:
    no dropout; the mode is restored)."""
    training = model.training
    model.eval()
    try:
        own = model(**inputs).logits
        mine = call_inside(model, lambda **kw: head.logits(model.get_output_embeddings(),
                                                           head.base(**kw).last_hidden_state), inputs)
    finally:
        model.train(training)
    tol = HEAD_TOLERANCE.get(own.dtype, HEAD_TOLERANCE_LOW)
    scale = own.float().abs().max().clamp(min=1)
    return mine.shape == own.shape and bool(((mine.float() - own.float()).abs().max() / scale) <= tol)


def stored_topk(batch, labels, target_temperature=1.0):
    """The sparse teacher `ref_topk = (ids, logprobs)` of a batch's stored columns (popped from `batch`),
    shifted like the labels, or None without them. Two layouts, both (B, T, K) and aligned with the logits
    (position i holds the teacher's distribution of the token i + 1):

        teacher_topk_ids, teacher_topk_logprobs      log-probabilities at temperature 1 (hrmloss's own)
        target_token_ids, target_logprobs, target_mask     Axolotl / vLLM: log-probs stored at
            `target_temperature` (Axolotl's kd_temperature; 1 for vLLM's), mask 0 at padding entries

    Mapping of the second: ids = target_token_ids, logprobs = target_logprobs where target_mask, -inf
    (probability 0) elsewhere; with target_temperature T_s != 1 the log-probs become log_softmax over the K
    ids of T_s target_logprobs, the teacher at temperature 1 restricted to its ids, so topk_mode="renorm"
    at a loss temperature T gives softmax(t / T) over the ids, exactly (lp = log softmax(t / T_s) + c).
    With T_s = 1 they are used as stored (topk_mode="tail" needs the teacher's full-vocabulary log-probs).
    Padding entries get ids distinct from the row's others (the K smallest ids the row does not use); a
    position whose every entry is padding must not be counted (its label -100): it then gets a stand-in.
    """
    if TOPK_KEYS[0] in batch:
        ids, lps = (batch.pop(k) for k in TOPK_KEYS)
        for k in TARGET_KEYS:
            batch.pop(k, None)
        return _shift(ids), _shift(lps)
    if TARGET_KEYS[0] not in batch:
        return None
    ids, lps = batch.pop(TARGET_KEYS[0]), batch.pop(TARGET_KEYS[1])
    mask = batch.pop(TARGET_KEYS[2], None)
    ids, lps = _shift(ids).long(), _shift(lps).float()
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else _shift(mask).bool()
    empty = ~mask.any(-1)
    _check_counted(empty & (labels != IGNORE))
    mask = mask | (empty[..., None] & (torch.arange(mask.shape[-1], device=mask.device) == 0))
    lps = torch.where(mask, torch.where(empty[..., None], 0.0, lps), float("-inf"))
    if target_temperature != 1:
        lps = torch.log_softmax(lps * target_temperature, -1)
    return _distinct_padding_ids(ids, mask), lps


def _check_counted(bad):
    """A counted position whose teacher entries are all padding: a ValueError on the CPU, an assert on CUDA."""
    message = ("target_mask: a position with a counted label has no valid teacher entry; expected its label -100 "
               "or at least one target_mask entry set")
    if bad.is_cuda:
        torch._assert_async(~bad.any(), message)
    elif bool(bad.any()):
        raise ValueError(f"{message} (position {tuple(bad.nonzero()[0].tolist())})")


def _distinct_padding_ids(ids, mask):
    """ids with each row's padding entries replaced by the smallest ids its valid entries do not use."""
    K = ids.shape[-1]
    candidates = torch.arange(2 * K, device=ids.device)
    used = ((ids[..., :, None] == candidates) & mask[..., :, None]).any(-2)          # (..., 2K)
    free_rank = torch.where(used, 2 * K, torch.cumsum(~used, -1) - 1)                 # j-th free candidate: j
    slot = torch.cumsum(~mask, -1) - 1                                               # j-th padding entry: j
    pick = (free_rank[..., None, :] == slot[..., :, None]).float().argmax(-1)        # (..., K)
    return torch.where(mask, ids, candidates[pick])


class HRMDistillTrainer(Trainer):
    """A `Trainer` whose loss is `ce + hrm * kl` against a frozen teacher model or stored top-k data.

    Args (besides the Trainer's):
        teacher_model: a frozen causal LM on the student's inputs (kept in eval mode, no grad), or None:
            then every batch must hold the `teacher_topk_ids` / `teacher_topk_logprobs` columns
            ((B, T, K) ids and log-probs at temperature 1, see the module docstring), or Axolotl's / vLLM's
            `target_token_ids` / `target_logprobs` (/ `target_mask`) (`stored_topk` gives the mapping), and
            `ref_topk` is used. The trainer keeps these columns when the Trainer removes unused ones.
        hrm: the divergence's weight.
        loss_options: other keywords of `linear_hrm_loss` / `hrm_loss` (kl, beta, temperature, topk_mode,
            ref_vocab, label_smoothing, z_loss, ...). `softcap` is an extra cap of the student's final
            logits; a model that caps them itself (a config's `final_logit_softcapping`) refuses it.
        fused: use the fused projection when the model allows it (default True); False computes the
            logits with the model's forward and calls `hrm_loss`.
        target_temperature: the temperature at which `target_logprobs` were stored (Axolotl's
            kd_temperature; 1 for vLLM's logprobs).

    Each model's objective is that of its own logits, in both paths: what its head does after lm_head(h)
    (`head_transform`: Granite's logits_scaling, Cohere's logit_scale, Gemma-2's final_logit_softcapping)
    is applied by the fused path to the student and to the teacher, each with its own config, once. On
    the first batch the fused logits of each model are compared with the model's own (one extra forward
    each, once); a model whose head they do not reproduce is computed unfused from then on, with a warning.

    Logs `ce` and `kl` (each the mean over the counted tokens, like the loss) with the loss.
    """

    def __init__(self, *args, teacher_model=None, hrm=1.0, loss_options=None, fused=True, target_temperature=1.0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.target_temperature = target_temperature
        self.teacher_model = teacher_model
        if teacher_model is not None:
            teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.hrm, self.fused = hrm, fused
        self.loss_options = dict(loss_options or {})
        cap = head_transform(self.model).cap
        if self.loss_options.get("softcap") is not None and cap is not None:
            raise ValueError(f"loss_options softcap={self.loss_options['softcap']!r}: the model's config caps its "
                             f"logits already (final_logit_softcapping={cap}) and the trainer applies that cap "
                             "itself; expected no softcap in loss_options")
        # the fused path's heads, None for a model computed unfused; checked on the first batch
        self._heads = {"student": _head(self.model) if fused else None,
                       "teacher": _head(teacher_model) if fused and teacher_model is not None else None}
        self._heads_checked = not any(self._heads.values())
        # the Trainer counts num_items_in_batch (labels[..., 1:] != -100 over the accumulated batch) and
        # passes it here; the loss divided by it needs no further division by the accumulation steps
        self.model_accepts_loss_kwargs = True
        self.loss_is_scaled_for_ga = True
        self._components = {"ce": 0.0, "kl": 0.0}  # sums since the last log (tensors: no host sync a step)

    def _set_signature_columns_if_needed(self):
        """The Trainer keeps only the columns its model's forward takes (remove_unused_columns=True, its
        default): keep the teacher's columns too."""
        super()._set_signature_columns_if_needed()
        self._signature_columns += [k for k in TEACHER_COLUMNS if k not in self._signature_columns]

    def _check_heads(self, model, inputs):
        """Once, on the first batch: keep a fused head only where it reproduces the model's own logits."""
        for name, net in (("student", model), ("teacher", self.teacher_model)):
            head = self._heads[name]
            if head is not None and not _reproduces(net, head, inputs):
                warnings.warn(f"HRMDistillTrainer: the {name}'s logits are not {head.transform} applied to "
                              f"lm_head(last_hidden_state); its loss uses its own logits (unfused)")
                self._heads[name] = None
        self._heads_checked = True

    def _teacher(self, inputs, fused_student):
        """The reference keywords of the teacher model: ref_hidden + ref_weight (+ ref_bias, ref_softcap)
        for the fused projection when both models are fused, else ref_logits (its own final logits)."""
        head = self._heads["teacher"]
        with torch.no_grad():
            if fused_student and head is not None:
                last = call_inside(self.teacher_model, head.base, inputs).last_hidden_state
                hidden, bias, cap = head.projection(last)
                return dict(ref_hidden=_shift(hidden), ref_weight=head.weight, ref_bias=bias, ref_softcap=cap)
            return dict(ref_logits=_shift(self.teacher_model(**inputs).logits))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")[:, 1:]
        topk = stored_topk(inputs, labels, self.target_temperature)  # pops the teacher columns
        if self.teacher_model is None and topk is None:
            raise ValueError(f"HRMDistillTrainer: no teacher_model and no teacher columns in the batch (found "
                             f"{sorted(inputs)}): expected teacher_model=..., or a dataset with the columns "
                             f"{TOPK_KEYS} or {TARGET_KEYS[:2]} (+ {TARGET_KEYS[2]!r}); the trainer keeps them "
                             "with remove_unused_columns=True, so a custom data_collator must pass them on")
        if not self._heads_checked:
            self._check_heads(model, inputs)
        # a wrapped model (DDP, ...) runs its own forward: calling its base directly would bypass the wrapper
        head = self._heads["student"] if model is self.model else None
        teacher = dict(ref_topk=topk) if self.teacher_model is None else \
            self._teacher(inputs, head is not None)
        opts = dict(hrm=self.hrm, ignore_index=IGNORE, num_items=num_items_in_batch, return_components=True,
                    **self.loss_options)
        outputs = None
        if head is not None:
            # FSDP2: the base runs inside the root's hooks (its embeddings, final norm gathered)
            hidden, bias, cap = head.projection(call_inside(model, head.base, inputs).last_hidden_state)
            if cap is not None:
                opts["softcap"] = cap
            out = linear_hrm_loss(_shift(hidden), head.weight, labels, bias=bias, **teacher, **opts)
        else:  # the model's own logits: its head's transform is in them already
            outputs = model(**inputs)
            out = hrm_loss(_shift(outputs.logits), teacher.pop("ref_logits", None), labels, **teacher, **opts)
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

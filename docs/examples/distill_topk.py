"""Distil from a teacher's stored top-k log-probabilities: store them once, train from disk.

    python docs/examples/distill_topk.py --out /tmp/distill-topk     (CPU, about half a minute)

1. A teacher (here a tiny LlamaForCausalLM built from a config and fitted briefly; in practice a large
   model run once over the dataset) scores every sequence; per position its top-K token ids (int32) and
   log-probabilities (float32) are written to disk (safetensors when installed, else numpy .npz).
   K = 64 of V = 128256 stores 2000x less than the full logits.
2. A student trains from those files with `HRMDistillTrainer` (no teacher model in memory):
   loss = CE + hrm * KL(teacher coarsened to its top-K and "the rest" || student), topk_mode="tail";
   the student's logits are never materialised (fused projection).
"""
import argparse
import os

import numpy as np
import torch
import transformers

from hrmloss.integrations.transformers import HRMDistillTrainer

V, T = 96, 16


def tiny_llama(seed, hidden):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def sequences(n, seed):
    """Noisy arithmetic sequences: x_{i+1} = x_i + step (mod V), the step fixed per sequence."""
    g = torch.Generator().manual_seed(seed)
    start, step = torch.randint(0, V, (n, 1), generator=g), torch.randint(1, 5, (n, 1), generator=g)
    ids = (start + step * torch.arange(T)) % V
    noise = torch.rand(n, T, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, V, (n, T), generator=g), ids)


def fit_teacher(ids, steps=60):
    teacher = tiny_llama(0, hidden=64)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = teacher(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher.eval()


def store_topk(teacher, ids, k, path):
    """The teacher's top-k per position, to one file: teacher_topk_ids (n, T, k) int32, _logprobs float32."""
    with torch.no_grad():
        top = torch.log_softmax(teacher(input_ids=ids).logits.float(), -1).topk(k, -1)
    arrays = {"input_ids": ids.numpy().astype(np.int32), "teacher_topk_ids": top.indices.numpy().astype(np.int32),
              "teacher_topk_logprobs": top.values.numpy()}
    try:
        from safetensors.numpy import save_file
        save_file(arrays, path + ".safetensors")
        return path + ".safetensors"
    except ImportError:
        np.savez(path + ".npz", **arrays)
        return path + ".npz"


def load(path):
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(path)
    return dict(np.load(path))


class StoredTopK(torch.utils.data.Dataset):
    """Rows of the stored file: input_ids, labels (= input_ids, the first token masked), the top-k."""

    def __init__(self, arrays):
        self.a = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __len__(self):
        return self.a["input_ids"].shape[0]

    def __getitem__(self, i):
        ids = self.a["input_ids"][i].long()
        labels = ids.clone()
        labels[0] = -100
        return dict(input_ids=ids, labels=labels, teacher_topk_ids=self.a["teacher_topk_ids"][i],
                    teacher_topk_logprobs=self.a["teacher_topk_logprobs"][i])


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="distill-topk")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--steps", type=int, default=40, help="student optimizer steps")
    p.add_argument("--sequences", type=int, default=256)
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    ids = sequences(a.sequences, seed=0)
    path = store_topk(fit_teacher(ids, steps=a.steps), ids, a.k, os.path.join(a.out, "teacher_topk"))
    print(f"stored the teacher's top-{a.k} of {V} per token: {path} ({os.path.getsize(path)} bytes)")

    student = tiny_llama(1, hidden=32)
    args = transformers.TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=32, gradient_accumulation_steps=2, learning_rate=3e-3,
        max_steps=a.steps, logging_steps=max(a.steps // 4, 1), report_to="none", use_cpu=True, save_strategy="no",
        remove_unused_columns=False, disable_tqdm=True)
    trainer = HRMDistillTrainer(model=student, args=args, train_dataset=StoredTopK(load(path)),
                                data_collator=collate, hrm=1.0, loss_options=dict(topk_mode="tail"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        print(f"step {h['step']:3d}  loss {h['loss']:.4f}  ce {h['ce']:.4f}  kl {h['kl']:.4f}")
    first, last = logs[0]["loss"], logs[-1]["loss"]
    assert last < first, (first, last)
    print(f"loss fell from {first:.4f} to {last:.4f}")


if __name__ == "__main__":
    main()

"""SparseGrad with the Hugging Face Trainer: the stock training loop, checkpoints that hold only the adapter.

    python docs/examples/hf_trainer.py                      # MiniLM-L6 on 64 BBC articles, ~30 s on 2 CPU cores
    accelerate launch --multi_gpu --num_processes 2 docs/examples/hf_trainer.py   # 2 processes (gloo on a CPU machine)
    torchrun --nproc_per_node 2 docs/examples/hf_trainer.py                      # the same without accelerate

(``accelerate launch --cpu --num_processes 2`` starts a single process in accelerate 1.15: on a CPU-only machine
use ``--multi_gpu``, which falls back to gloo, or torchrun.)

The model is converted with the core API (here through `prepare_method`, which also freezes everything but the
MLP method, the MLP biases and the head), the optimizer is `sg.create_optimizer`, and `SparseGradTrainer` is a
`transformers.Trainer` whose `save_model` writes the SparseGrad adapter instead of the base weights, so every
`checkpoint-N/` folder holds the adapter plus the optimizer/scheduler/trainer state, and
`resume_from_checkpoint` works.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
from transformers import DataCollatorWithPadding, TrainingArguments

import sparsegrad as sg
from sparsegrad.finetune.data import load_task, make_batches, tokenize
from sparsegrad.finetune.methods import prepare_method
from sparsegrad.finetune.models import load_classifier, quiet_transformers
from sparsegrad.finetune.trainer import SparseGradTrainer


def examples(tokenizer, texts, labels, max_length):
    """A list of unpadded examples; DataCollatorWithPadding pads each batch to its longest text."""
    enc = tokenize(tokenizer, texts, max_length)
    out = []
    for i, ids in enumerate(enc.input_ids):
        item = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels[i]}
        if enc.token_type_ids is not None:
            item["token_type_ids"] = enc.token_type_ids[i]
        out.append(item)
    return out


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="bundled model name or local folder (default minilm)")
    p.add_argument("--max-train", type=int, default=64)
    p.add_argument("--max-eval", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", default="runs/example-hf-trainer")
    args = p.parse_args()
    out = Path(args.output_dir)
    torch.manual_seed(0)

    data = load_task("bbc", seed=0, max_train=args.max_train, max_eval=args.max_eval)
    model, tokenizer = load_classifier(args.model, data.num_labels, label_names=data.label_names)
    train_set = examples(tokenizer, data.train_texts, data.train_labels, args.max_length)
    eval_set = examples(tokenizer, data.eval_texts, data.eval_labels, args.max_length)

    # The training arguments first: under torchrun / accelerate launch they start the process group.
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        num_train_epochs=1, logging_steps=2, save_strategy="steps", save_steps=1,
        eval_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        ddp_broadcast_buffers=False,  # SparseGrad's buffers (base weights, bases) never change: no per-step sync
    )
    world = training_args.world_size
    # Calibrate on two training batches and convert (1 % of each MLP matrix per step; MLP scope). With several
    # processes every rank calibrates on the same batches and rank 0's bases are broadcast (identical supports).
    calibration = make_batches(tokenizer, data.train_texts, data.train_labels, batch_size=args.batch_size,
                               max_length=args.max_length, shuffle=True, seed=0)[:2]
    model.train()
    prepared = prepare_method(model, "sparsegrad", density=0.01, calibration_batches=calibration,
                              calibration_options={"all_reduce_grads": world > 1})
    print(prepared.description)

    steps = -(-len(train_set) // (args.batch_size * world))
    training_args.save_steps = max(1, steps // 2)
    optimizer = sg.create_optimizer(model, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))
    trainer = SparseGradTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
        data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer,
        optimizers=(optimizer, scheduler), compute_metrics=accuracy,
    )
    trainer.train()
    print("eval:", trainer.evaluate())
    if world > 1:  # DDP all-reduces each dense gradient before the top-k: every rank holds the same delta
        import hashlib

        import torch.distributed as dist

        digest = hashlib.sha256(b"".join(
            layer.delta_indices.cpu().numpy().tobytes() + layer.delta_values.detach().cpu().numpy().tobytes()
            for layer in sg.sparsegrad_layers(model).values())).hexdigest()
        digests = [None] * world
        dist.all_gather_object(digests, digest)
        assert len(set(digests)) == 1, digests
        print(f"{world} processes hold identical SparseGrad deltas (sha256 {digest[:12]})")

    # Checkpoints and the final save hold the adapter, never model.safetensors (rank 0 writes; the others wait).
    trainer.save_model(str(out / "final"))
    trainer.accelerator.wait_for_everyone()
    if not trainer.is_world_process_zero():
        return
    for folder in sorted(out.glob("checkpoint-*")) + [out / "final"]:
        names = sorted(f.name for f in folder.iterdir())
        assert "model.safetensors" not in names, names
        print(f"{folder}: {', '.join(names)}")

    # Reload: a fresh base model + the adapter gives the trained model's outputs.
    fresh, _ = load_classifier(args.model, data.num_labels, label_names=data.label_names)
    sg.load_adapter(fresh, out / "final")
    batch = DataCollatorWithPadding(tokenizer)([{k: v for k, v in e.items() if k != "labels"} for e in eval_set[:8]])
    model.eval()
    fresh.eval()
    with torch.no_grad():
        diff = (model(**batch).logits - fresh(**batch).logits).abs().max().item()
    assert diff < 1e-4, diff
    print(f"reloaded adapter reproduces the trained model (max |logit difference| {diff:.2e})")
    with quiet_transformers():
        sg.merge_and_unload(fresh).save_pretrained(str(out / "merged"))
    tokenizer.save_pretrained(str(out / "merged"))
    print(f"merged model: {out / 'merged'}")


if __name__ == "__main__":
    try:
        main()
    finally:  # under torchrun: a process group left to interpreter exit can abort a rank ("terminate called ...")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

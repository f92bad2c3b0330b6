"""SparseGrad under TRL's `SFTTrainer`: instruction tuning of SmolLM2 on the bundled BBC news, adapters not dense
checkpoints, exact resume.

    python docs/examples/trl_sft.py                          # bundled SmolLM2-135M-Instruct, 20 steps
    python docs/examples/trl_sft.py --steps 40 --resume      # continue from the last checkpoint, exactly

What it shows:

* the model is converted with the core API (MLP found by its model type, bases calibrated on two batches of the
  completion loss) and handed to ``SFTTrainer`` with ``optimizers=(sg.create_optimizer(model), None)`` (TRL builds
  the schedule on that optimizer);
* `SparseGradSFTTrainer` (``SparseGradTrainer`` mixed into ``SFTTrainer``) makes every ``checkpoint-N/`` and
  ``save_model`` hold the SparseGrad adapter (``adapter_config.json`` + ``adapter_model.safetensors``) with the
  optimizer, scheduler and RNG state, never the base weights;
* ``--resume`` converts a fresh base with the bases saved by the first run (``bases.safetensors``) and resumes from
  the last checkpoint: the result is the straight run's (tests/test_trl_sft.py checks it bit for bit).

Needs ``pip install trl`` (in the ``finetune`` extra). ``--model DIR`` takes any local causal-LM folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import sparsegrad as sg

INSTRUCTION = "\n\nWhich topic is this article about (business, entertainment, politics, sport or tech)?\nTopic:"


def sft_rows(max_train: int, max_chars: int) -> list[dict[str, str]]:
    """Prompt/completion rows from the bundled BBC news: the article's beginning and the question, then the topic."""
    from sparsegrad.finetune.data import load_task

    data = load_task("bbc", max_train=max_train, max_eval=8)
    return [{"prompt": text[:max_chars] + INSTRUCTION, "completion": " " + data.label_names[label]}
            for text, label in zip(data.train_texts, data.train_labels)]


def calibration_batches(tokenizer, rows: list[dict[str, str]], batch_size: int, steps: int) -> list[dict]:
    """Batches of the completion-only loss SFTTrainer trains (prompt tokens masked with -100), for calibration."""
    batches = []
    for s in range(steps):
        chunk = rows[s * batch_size:(s + 1) * batch_size]
        seqs = []
        for row in chunk:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(row["completion"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            seqs.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in seqs)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches.append({
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in seqs]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in seqs]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in seqs]),
        })
    return batches


def sft_trainer_class():
    from trl import SFTTrainer

    from sparsegrad.finetune.trainer import SparseGradTrainer

    class SparseGradSFTTrainer(SparseGradTrainer, SFTTrainer):
        """TRL's SFTTrainer whose checkpoints and save_model hold the SparseGrad adapter, not the dense model."""

    return SparseGradSFTTrainer


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a local causal-LM folder (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--output-dir", default="runs/trl-sft")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-train", type=int, default=80)
    parser.add_argument("--max-chars", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    args = parser.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    if args.model is None:
        from sparsegrad.finetune.models import smollm2_dir

        args.model = smollm2_dir()
    out = Path(args.output_dir)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = sft_rows(args.max_train, args.max_chars)

    config = sg.SparseGradConfig(density=args.density)  # target_modules=None: the model type's MLP matrices
    if args.resume:
        bases = sg.SparseGradBases.load(out / "bases.safetensors")  # the first run's: a fresh calibration may differ
    else:
        bases = sg.estimate_bases(model, config, calibration_batches(tokenizer, rows, args.batch_size, 2),
                                  progress=False)
        out.mkdir(parents=True, exist_ok=True)
        bases.save(out / "bases.safetensors")
    sg.get_sparsegrad_model(model, config, bases)
    sg.print_trainable_parameters(model)

    sft_args = SFTConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="constant", save_strategy="steps", save_steps=args.save_steps,
        logging_steps=1, report_to=[], seed=0, bf16=False, gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), max_length=256, completion_only_loss=True, disable_tqdm=True,
    )
    trainer = sft_trainer_class()(model=model, args=sft_args, train_dataset=Dataset.from_list(rows),
                                  processing_class=tokenizer,
                                  optimizers=(sg.create_optimizer(model, lr=args.lr), None))
    last = None
    if args.resume:
        checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.rpartition("-")[2]))
        if not checkpoints:
            raise SystemExit(f"--resume: no checkpoint-N folder in {out}")
        last = str(checkpoints[-1])
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out / "adapter"))
    print(f"adapter: {out / 'adapter'} (load it with sg.load_adapter(base_model, path))")
    return out / "adapter"


if __name__ == "__main__":
    main()

"""SparseGrad in a plain PyTorch loop: calibrate, convert, train, save the adapter, reload it, merge.

    python docs/examples/plain_loop.py                      # MiniLM-L6 on 64 BBC articles, ~30 s on 2 CPU cores
    python docs/examples/plain_loop.py --max-train 256 --epochs 2

Only the 12 MLP matrices (1 % of their entries per step, in the rotated basis), the MLP biases and the classifier
head train; the rest of the encoder is frozen. Everything runs offline on bundled data and model.
"""

import argparse
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import sparsegrad as sg
from sparsegrad.finetune.data import load_task, make_batches
from sparsegrad.finetune.models import load_classifier


def accuracy(model, batches):
    model.eval()
    right = total = 0
    with torch.no_grad():
        for batch in batches:
            labels = batch.pop("labels")
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
            batch["labels"] = labels
    model.train()
    return right / total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="bundled model name or local folder (default minilm)")
    p.add_argument("--max-train", type=int, default=64)
    p.add_argument("--max-eval", type=int, default=64)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--output-dir", default="runs/example-plain-loop")
    args = p.parse_args()
    out = Path(args.output_dir)
    torch.manual_seed(0)

    # Data and model: BBC news (5 topics), the bundled MiniLM-L6 with a fresh classification head.
    data = load_task("bbc", seed=0, max_train=args.max_train, max_eval=args.max_eval)
    print(data.summary())
    model, tokenizer = load_classifier(args.model, data.num_labels, label_names=data.label_names)
    train = make_batches(tokenizer, data.train_texts, data.train_labels, batch_size=args.batch_size,
                         max_length=args.max_length, shuffle=True, seed=0)
    evals = make_batches(tokenizer, data.eval_texts, data.eval_labels, batch_size=64, max_length=args.max_length,
                         shuffle=False)

    # 1. What trains: freeze everything except the head and the MLP linears (their weights become SparseGrad
    #    layers below; their biases train densely). Set this BEFORE converting: conversion keeps it.
    mlp = re.compile(sg.BERT_MLP_TARGETS)
    for name, param in model.named_parameters():
        module = name.rpartition(".")[0]
        param.requires_grad_(name.startswith("classifier.") or mlp.fullmatch(module) is not None)

    # 2. Calibrate the HOSVD bases of the MLP weight gradients on two training batches, then convert.
    config = sg.SparseGradConfig(target_modules=sg.BERT_MLP_TARGETS, density=args.density)
    model.train()
    bases = sg.estimate_bases(model, config, train[:2], progress=False)
    for kind, entry in bases.report.items():
        print(f"{kind}: top-{entry['k']} entries hold {entry['energy_topk_rotated']:.2f} of the gradient energy "
              f"in the rotated basis, {entry['energy_topk_original']:.2f} in the original one")
    sg.get_sparsegrad_model(model, config, bases)
    sg.print_trainable_parameters(model)

    # 3. An ordinary training loop; the optimizer does the rotated top-k step for the SparseGrad weights.
    optimizer = sg.create_optimizer(model, lr=args.lr)
    print(f"accuracy before: {accuracy(model, evals):.3f}")
    for epoch in range(args.epochs):
        for step, batch in enumerate(train):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            print(f"epoch {epoch} step {step} loss {loss.item():.4f}")
    print(f"accuracy after:  {accuracy(model, evals):.3f}")
    updated = sum(layer.entries_updated() for layer in sg.sparsegrad_layers(model).values())
    print(f"MLP entries ever updated: {updated:,d} (k per matrix per step: "
          f"{next(iter(sg.sparsegrad_layers(model).values())).k:,d})")

    # 4. Save the adapter (sparse deltas + bases + head and biases), reload it into a fresh base model.
    sg.save_adapter(model, out / "adapter")
    fresh, _ = load_classifier(args.model, data.num_labels, label_names=data.label_names)
    sg.load_adapter(fresh, out / "adapter")
    model.eval()
    fresh.eval()
    batch = {k: v for k, v in evals[0].items() if k != "labels"}
    with torch.no_grad():
        diff = (model(**batch).logits - fresh(**batch).logits).abs().max().item()
    assert diff < 1e-4, diff
    print(f"reloaded adapter reproduces the trained model (max |logit difference| {diff:.2e})")

    # 5. Merge into plain nn.Linear weights and save an ordinary transformers checkpoint.
    merged = sg.merge_and_unload(fresh)
    merged.save_pretrained(str(out / "merged"))
    tokenizer.save_pretrained(str(out / "merged"))
    print(f"adapter: {out / 'adapter'}; merged model: {out / 'merged'} (AutoModelForSequenceClassification)")


if __name__ == "__main__":
    main()

"""Experiment: a periodic refresh of the SparseGrad bases during training (like GaLore's projection refresh).

`benchmarks/concentration.py` shows the bases going stale: after 30 steps of full fine-tuning the pretrained-point
bases keep no more of the gradient energy in the top 1 % than the original basis does, while bases recomputed at
the new point keep far more. This trains MiniLM-L6 on BBC (scope mlp, dynamic support, 1 % per matrix) twice on
the same batches — without refresh, and with a refresh every `--every` steps — and reports held-out accuracy and,
at every refresh point, the top-k energy share of the gradients there under the old and the new bases.

A refresh, for every SparseGrad layer: fold the trained delta into the frozen weight (W0 <- W0 + U_out D U_inᵀ),
clear the delta and its sparse Adam state (its entries belong to the old basis), recompute the bases of each kind
from the dense gradients of `--calib-steps` training batches at the current point (no update), and train on in the
new basis. The product feature that came of it is `sparsegrad finetune --refresh-every N` (`sg.refresh_bases`,
adapters with folded segments); this script keeps the experiment, with the energy shares at each refresh point.

    python benchmarks/refresh.py --epochs 2 --every 16 --calib-steps 2
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import sparsegrad as sg  # noqa: E402
from sparsegrad.bases import factors_from_gram  # noqa: E402
from sparsegrad.finetune.data import load_task, make_batches  # noqa: E402
from sparsegrad.finetune.methods import prepare_method  # noqa: E402
from sparsegrad.finetune.metrics import evaluate  # noqa: E402
from sparsegrad.finetune.models import load_classifier  # noqa: E402
from sparsegrad.finetune.train import linear_schedule  # noqa: E402


def dense_grads(model, layers, batches):
    """Per batch, the dense weight gradient of every SparseGrad layer (dynamic mode: autograd fills .weight.grad)."""
    out = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        out.append({n: layer.weight.grad.detach().float().clone() for n, layer in layers.items()})
    model.zero_grad(set_to_none=True)
    return out


def mean_share(grads, layers, k) -> float:
    vals = [sg.topk_energy_share(layers[n].rotate(g), k[n]) for step in grads for n, g in step.items()]
    return sum(vals) / len(vals)


@torch.no_grad()
def refresh(model, layers, optimizer, grads) -> None:
    grams: dict[str, list[torch.Tensor]] = {}
    for step in grads:
        for name, g in step.items():
            kind = layers[name].kind
            if kind not in grams:
                grams[kind] = [g @ g.T, g.T @ g]
            else:
                grams[kind][0].addmm_(g, g.T)
                grams[kind][1].addmm_(g.T, g)
    new = {kind: (factors_from_gram(a)[0], factors_from_gram(b)[0]) for kind, (a, b) in grams.items()}
    for layer in layers.values():
        layer.sync_weight()
        layer.base_weight.copy_(layer.weight)  # fold: W0 <- W0 + U_out D U_inᵀ
        layer.delta_indices = layer.delta_indices.new_empty(0)
        layer.delta_values = layer.delta_values.new_empty(0)
        layer.u_out, layer.u_in = new[layer.kind]
        layer._merged_key = layer._delta_key()  # weight == base_weight again
        optimizer.state.pop(layer.weight, None)  # the sparse Adam moments belong to the old basis


def run(args, every: int) -> dict:
    data = load_task("bbc", seed=args.seed, max_train=args.max_train, max_eval=400)
    torch.manual_seed(args.seed)
    model, tok = load_classifier("minilm", num_labels=data.num_labels)
    epochs = [make_batches(tok, data.train_texts, data.train_labels, batch_size=16, max_length=128, shuffle=True,
                           seed=args.seed, epoch=e) for e in range(args.epochs)]
    evals = make_batches(tok, data.eval_texts, data.eval_labels, batch_size=64, max_length=128, shuffle=False)
    model.train()
    prep = prepare_method(model, "sparsegrad", density=0.01, calibration_batches=epochs[0][: args.calib_steps],
                          calibration_steps=args.calib_steps)
    model = prep.model
    layers = sg.sparsegrad_layers(model)
    k = {n: layer.k for n, layer in layers.items()}
    optimizer = sg.create_optimizer(model, lr=args.lr)
    total = sum(len(b) for b in epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, 0))
    torch.manual_seed(args.seed + 1)
    step, shares, losses, start = 0, [], [], time.perf_counter()
    for e, batches in enumerate(epochs):
        for i, batch in enumerate(batches):
            if every and step and step % every == 0:
                # gradients of the next calib_steps batches fit the new bases; the batch after them is held out to
                # score old vs new bases (the refresh folds the delta in, so the model's function is unchanged)
                grads = dense_grads(model, layers, batches[i : i + args.calib_steps + 1])
                held = grads[-1:] if len(grads) > args.calib_steps else grads
                old = mean_share(held, layers, k)
                refresh(model, layers, optimizer, grads[: args.calib_steps])
                shares.append((step, old, mean_share(held, layers, k)))
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
    result = evaluate(model, evals)
    return {"every": every, "accuracy": result["eval_accuracy"], "loss": result["eval_loss"], "shares": shares,
            "final_train_loss": sum(losses[-8:]) / len(losses[-8:]), "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--every", type=int, default=16, help="refresh every this many steps")
    p.add_argument("--calib-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-train", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="split, head initialisation, batch order and dropout")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    args = p.parse_args()
    rows = [run(args, 0), run(args, args.every)]
    lines = [f"Command: `python benchmarks/refresh.py --epochs {args.epochs} --every {args.every} --calib-steps "
             f"{args.calib_steps} --lr {args.lr:g} --seed {args.seed}` (MiniLM-L6, BBC {args.max_train} / 400, scope mlp, dynamic, 1 %, "
             f"{args.calib_steps} calibration batches at the start and at each refresh)", "",
             "| bases | held-out accuracy | held-out loss | train loss (last 8 steps) | time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        name = "calibrated once (default)" if not r["every"] else f"refreshed every {r['every']} steps"
        lines.append(f"| {name} | {r['accuracy']:.4f} | {r['loss']:.4f} | {r['final_train_loss']:.4f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "| refresh at step | top-k share on the next (held-out) batch: bases in use (stale) | refreshed bases |", "|---|---|---|"]
    lines += [f"| {s} | {old:.3f} | {new:.3f} |" for s, old, new in rows[1]["shares"]]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()

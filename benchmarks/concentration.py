"""Gradient concentration on real models: where the gradient energy sits, and how stable the top-k support is.

For the MLP weights of a real model on real text (MiniLM-L6 + BBC news, or SmolLM2-135M + Shakespeare), the
gradients of `--calib-steps` calibration batches and `--heldout` other batches are collected at the pretrained point
(no optimizer step). On the held-out gradients G it measures, per matrix, the share of ||G||² that the top-k
entries (k = density · out · in) hold

  * original   in the original basis (what MeProp keeps),
  * shared     in the HOSVD core U_outᵀ G U_in with one (U_out, U_in) pair per kind, shared by all blocks (the paper),
  * per-layer  with a pair per matrix (`basis_sharing="layer"`),

and the Jaccard overlap of the top-k supports of consecutive held-out steps (rotated and original). Then the levers:

  * calibration steps: the shared bases from the first 1, 2, 4, ... calibration steps;
  * drift / refresh: after `--drift-steps` steps of full fine-tuning (AdamW on every parameter), the shares that the
    pretrained-point bases still give, against bases recomputed at the new point (a refresh) from as many batches.

Bases come from the library's own streaming path (Σ G Gᵀ, Σ Gᵀ G, then `factors_from_gram`).

    python benchmarks/concentration.py --model minilm  [--calib-steps 8 --heldout 4 --drift-steps 30]
    python benchmarks/concentration.py --model smollm2 --batch-size 4 --every-nth-block 3 --drift-steps 10
Writes OUT/results.md and OUT/concentration.png (default OUT: runs/concentration-<model>).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

import sparsegrad as sg  # noqa: E402
from sparsegrad.bases import factors_from_gram  # noqa: E402
from sparsegrad.targets import find_targets, kind_of  # noqa: E402


BLOCK_SIDES = (0.1, 0.25, 0.5, 1.0)


def load(args):
    """(model, config, batches) for the chosen real model and its text."""
    if args.model == "minilm":
        from sparsegrad.finetune.data import load_task, make_batches
        from sparsegrad.finetune.models import load_classifier

        data = load_task("bbc", seed=0)
        torch.manual_seed(0)
        model, tok = load_classifier("minilm", num_labels=data.num_labels)
        batches = make_batches(tok, data.train_texts, data.train_labels, batch_size=args.batch_size,
                               max_length=args.max_length, shuffle=True, seed=0)
        cfg = sg.SparseGradConfig(density=args.density, score_steps=0)
    else:
        from sparsegrad.finetune.lm import load_shakespeare, make_lm_batches, pad_token_id
        from sparsegrad.finetune.models import load_causal_lm

        model, tok = load_causal_lm("smollm2")
        need = args.batch_size * (args.calib_steps + args.heldout + args.drift_steps + args.calib_steps)
        data = load_shakespeare(tok, max_length=args.max_length, seed=0, max_train=need)
        batches = make_lm_batches(data.train, batch_size=args.batch_size, pad_id=pad_token_id(tok), shuffle=True)
        layers = list(range(0, model.config.num_hidden_layers, args.every_nth_block))
        cfg = sg.SparseGradConfig(target_modules=sg.LLAMA_MLP_TARGETS, density=args.density, score_steps=0,
                                  layers_to_transform=layers)
    model.train()
    return model, cfg, batches


def collect(model, names: list[str], batches) -> list[dict[str, torch.Tensor]]:
    """The weight gradient of every named module for each batch, one forward+backward per batch, no update."""
    modules = dict(model.named_modules())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        modules[n].weight.requires_grad_(True)
    out = []
    for batch in batches:
        model(**batch).loss.backward()
        out.append({n: modules[n].weight.grad.detach().clone() for n in names})
        for n in names:
            modules[n].weight.grad = None
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n])
    return out


def bases_from(grads: list[dict[str, torch.Tensor]], group: dict[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(U_out, U_in) per group (a kind, or a module name) from the streaming Gram matrices of ``grads``."""
    grams: dict[str, list[torch.Tensor]] = {}
    for step in grads:
        for name, g in step.items():
            key = group[name]
            if key not in grams:
                grams[key] = [g @ g.T, g.T @ g]
            else:
                grams[key][0].addmm_(g, g.T)
                grams[key][1].addmm_(g.T, g)
    return {key: (factors_from_gram(go)[0], factors_from_gram(gi)[0]) for key, (go, gi) in grams.items()}


def share(g: torch.Tensor, k: int, pair=None) -> float:
    return sg.topk_energy_share(g if pair is None else pair[0].T @ g @ pair[1], k)


def block_share(rotated: torch.Tensor, k: int, side: float) -> float:
    """Share of ||rotated||² held by the top-k entries chosen inside the leading (side·out) × (side·in) block of the
    core (the leading singular directions), as a support confined to that block would keep."""
    ro, ri = max(1, round(side * rotated.shape[0])), max(1, round(side * rotated.shape[1]))
    block = rotated[:ro, :ri].reshape(-1).double().square()
    kept = block.topk(min(k, block.numel())).values.sum()
    return float(kept / rotated.double().square().sum())


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = torch.isin(a, b).sum().item()
    return inter / (a.numel() + b.numel() - inter)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--calib-steps", type=int, default=8)
    p.add_argument("--heldout", type=int, default=4)
    p.add_argument("--drift-steps", type=int, default=30)
    p.add_argument("--drift-lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--every-nth-block", type=int, default=1, help="SmolLM2: adapt blocks 0, n, 2n, ...")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if min(args.calib_steps, args.heldout) < 1 or args.heldout < 2 or args.drift_steps < 0:
        p.error("--calib-steps ≥ 1, --heldout ≥ 2 and --drift-steps ≥ 0 are needed")
    out_dir = Path(args.out or f"runs/concentration-{args.model}")
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    model, cfg, batches = load(args)
    c, h, d = args.calib_steps, args.heldout, args.drift_steps
    if len(batches) < 2 * c + h + d:
        raise SystemExit(f"need {2 * c + h + d} batches, the data gives {len(batches)}")
    names = [n for n, _ in find_targets(model, cfg)]
    kind = {n: kind_of(n, cfg) for n in names}
    grads = collect(model, names, batches[: c + h])
    calib, held = grads[:c], grads[c:]
    k = {n: cfg.budget(*held[0][n].shape) for n in names}

    shared = bases_from(calib, kind)
    per_layer = bases_from(calib, {n: n for n in names})
    rows = []
    blocks: dict[float, list[float]] = {}
    for n in names:
        orig = mean(share(s[n], k[n]) for s in held)
        sh = mean(share(s[n], k[n], shared[kind[n]]) for s in held)
        pl = mean(share(s[n], k[n], per_layer[n]) for s in held)
        sup_rot = [sg.topk_indices(shared[kind[n]][0].T @ s[n] @ shared[kind[n]][1], k[n]) for s in held]
        sup_org = [sg.topk_indices(s[n], k[n]) for s in held]
        jr = mean(jaccard(a, b) for a, b in zip(sup_rot, sup_rot[1:]))
        jo = mean(jaccard(a, b) for a, b in zip(sup_org, sup_org[1:]))
        energy = mean(float(s[n].square().sum()) for s in held)
        rows.append((n, tuple(held[0][n].shape), orig, sh, pl, jr, jo, energy))
        rot = [shared[kind[n]][0].T @ s[n] @ shared[kind[n]][1] for s in held]
        for side in BLOCK_SIDES:
            blocks.setdefault(side, []).append(mean(block_share(r, k[n], side) for r in rot))
    total_energy = sum(r[-1] for r in rows)

    steps_curve = []
    m = 1
    while m <= c:
        b = bases_from(calib[:m], kind)
        steps_curve.append((m, mean(share(s[n], k[n], b[kind[n]]) for s in held for n in names)))
        m *= 2
    if steps_curve[-1][0] != c:
        steps_curve.append((c, mean(r[3] for r in rows)))

    drift = None
    if d:
        for pp in model.parameters():
            pp.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=args.drift_lr)
        losses = []
        for batch in batches[c + h : c + h + d]:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        moved_calib = collect(model, names, batches[c + h + d : 2 * c + h + d])
        moved_held = collect(model, names, batches[c : c + h])  # the same held-out batches as before
        fresh = bases_from(moved_calib, kind)
        drift = {
            "losses": (losses[0], losses[-1]),
            "original": mean(share(s[n], k[n]) for s in moved_held for n in names),
            "stale": mean(share(s[n], k[n], shared[kind[n]]) for s in moved_held for n in names),
            "refreshed": mean(share(s[n], k[n], fresh[kind[n]]) for s in moved_held for n in names),
        }
    elapsed = time.perf_counter() - t_start

    lines = [f"# Gradient concentration: {args.model}", "",
             f"Command: `python benchmarks/concentration.py --model {args.model} --density {args.density} "
             f"--calib-steps {c} --heldout {h} --drift-steps {d} --drift-lr {args.drift_lr} --batch-size "
             f"{args.batch_size} --max-length {args.max_length}"
             + (f" --every-nth-block {args.every_nth_block}" if args.model == "smollm2" else "") + "`",
             f"({len(names)} matrices, top {args.density:.2%} of each; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads; {elapsed:.0f} s)", "",
             "## Share of held-out gradient energy in the top-k entries, per matrix", "",
             "| matrix | shape | share of ‖G‖² | original | shared HOSVD | per-layer HOSVD | Jaccard rotated | "
             "Jaccard original |", "|---|---|---|---|---|---|---|---|"]
    for n, shape, orig, sh, pl, jr, jo, e in rows:
        lines.append(f"| {n} | {shape[0]}×{shape[1]} | {e / total_energy:.3f} | {orig:.3f} | {sh:.3f} | {pl:.3f} | "
                     f"{jr:.3f} | {jo:.3f} |")
    lines.append(f"| **mean** | | | **{mean(r[2] for r in rows):.3f}** | **{mean(r[3] for r in rows):.3f}** | "
                 f"**{mean(r[4] for r in rows):.3f}** | **{mean(r[5] for r in rows):.3f}** | "
                 f"**{mean(r[6] for r in rows):.3f}** |")
    for kd in sorted(set(kind.values())):
        sel = [r for r in rows if kind[r[0]] == kd]
        lines.append(f"| mean of {kd} | | | {mean(r[2] for r in sel):.3f} | {mean(r[3] for r in sel):.3f} | "
                     f"{mean(r[4] for r in sel):.3f} | {mean(r[5] for r in sel):.3f} | {mean(r[6] for r in sel):.3f} |")
    lines += ["", "Jaccard: overlap of the top-k supports of consecutive held-out steps (|A∩B| / |A∪B|).", "",
              "## A support confined to the leading block of the core (shared bases)", "",
              "Top-k chosen inside the leading (s·out) × (s·in) block of U_outᵀ G U_in (s = 1: no restriction). At "
              f"s = 0.1 the block holds {0.01 / args.density:.0%} of k entries.", "",
              "| block side s | top-k share (mean over matrices and held-out steps) |", "|---|---|"]
    lines += [f"| {side} | {mean(v):.3f} |" for side, v in blocks.items()]
    lines += ["",
              "## Calibration steps (shared bases from the first m calibration steps)", "",
              "| m | top-k share (mean over matrices and held-out steps) |", "|---|---|"]
    lines += [f"| {m} | {v:.3f} |" for m, v in steps_curve]
    if drift:
        lines += ["", f"## Drift: after {d} steps of full fine-tuning (AdamW lr {args.drift_lr}, loss "
                  f"{drift['losses'][0]:.3f} → {drift['losses'][1]:.3f}), same held-out batches", "",
                  "| basis | top-k share |", "|---|---|",
                  f"| original | {drift['original']:.3f} |",
                  f"| stale: bases from the pretrained point | {drift['stale']:.3f} |",
                  f"| refreshed: bases recomputed from {c} batches at the new point | {drift['refreshed']:.3f} |"]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    x = range(len(rows))
    wd = 0.27
    a1.bar([i - wd for i in x], [r[2] for r in rows], wd, label="original (MeProp)")
    a1.bar(list(x), [r[3] for r in rows], wd, label="shared HOSVD")
    a1.bar([i + wd for i in x], [r[4] for r in rows], wd, label="per-layer HOSVD")
    a1.plot(list(x), [r[5] for r in rows], "k.", label="Jaccard, rotated")
    a1.set_xticks(list(x), [r[0].replace("bert.encoder.layer.", "").replace("model.layers.", "")
                             .replace(".mlp", "").replace(".dense", "") for r in rows], rotation=70, fontsize=7)
    a1.set_ylabel(f"top-{args.density:.0%} energy share")
    a1.set_ylim(0, 1)
    a1.legend(fontsize=7, ncol=4)
    a1.set_title(f"{args.model}: held-out gradients, per matrix")
    a2.plot([m for m, _ in steps_curve], [v for _, v in steps_curve], "o-")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("calibration steps")
    a2.set_ylabel("mean top-k share (shared bases)")
    a2.set_title("calibration steps")
    fig.tight_layout()
    tmp = out_dir / "concentration.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out_dir / "concentration.png")
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'concentration.png'}")


if __name__ == "__main__":
    main()

"""Core measurements on the real bundled MiniLM-L6 with BBC news (batch 16 x 128 tokens).

Parts (all by default, or name some):
  exactness    max abs error of logits / input gradient / bias gradients right after conversion, vs the original
  energy       share of held-out gradient energy in the top-k entries: HOSVD core orientation, the official code's
               orientation, and the original basis (what MeProp keeps)
  calibration  time and peak RSS of streaming Gram calibration vs an explicit stacked HOSVD, each in its own process
  adapter      adapter file size after training vs the dense MLP weights
  merge        inference time of the merged model vs the base model (interleaved forward passes)

    python benchmarks/core_report.py [exactness energy calibration adapter] [--steps 10] [--train-steps 20]
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import sparsegrad as sg


def batches(n: int, *, offset: int = 0, batch_size: int = 16, max_length: int = 128):
    from sparsegrad.finetune.data import load_task, make_batches
    from sparsegrad.finetune.models import load_classifier

    data = load_task("bbc", seed=0)
    model, tok = load_classifier("minilm", num_labels=data.num_labels)
    torch.manual_seed(0)
    model.classifier.reset_parameters()
    out = make_batches(tok, data.train_texts, data.train_labels, batch_size=batch_size, max_length=max_length,
                       shuffle=True, seed=0)
    return model, out[offset:offset + n]


def part_exactness(args) -> None:
    base, bs = batches(3)
    model = copy.deepcopy(base)
    cfg = sg.SparseGradConfig(density=0.01, score_steps=0)
    sg.get_sparsegrad_model(model, cfg, sg.estimate_bases(model, cfg, bs[:2], progress=False))
    batch = bs[2]

    def run(m):
        emb = m.bert.embeddings.word_embeddings(batch["input_ids"]).detach().requires_grad_(True)
        out = m(inputs_embeds=emb, attention_mask=batch["attention_mask"], token_type_ids=batch.get("token_type_ids"),
                labels=batch["labels"])
        out.loss.backward()
        return out.logits.detach(), emb.grad

    logits_ref, gx_ref = run(base)
    logits, gx = run(model)
    ref_modules = dict(base.named_modules())
    bias_err = max(float((l.bias.grad - ref_modules[n].bias.grad).abs().max())
                   for n, l in sg.sparsegrad_layers(model).items())
    print("| quantity | max abs error | max abs value |")
    print("|---|---|---|")
    print(f"| logits | {float((logits - logits_ref).abs().max()):.2e} | {float(logits_ref.abs().max()):.2e} |")
    print(f"| gradient wrt input embeddings | {float((gx - gx_ref).abs().max()):.2e} | {float(gx_ref.abs().max()):.2e} |")
    print(f"| bias gradients (12 MLP linears, original space) | {bias_err:.2e} | "
          f"{max(float(ref_modules[n].bias.grad.abs().max()) for n in sg.sparsegrad_layers(model)):.2e} |")


def part_energy(args) -> None:
    model, bs = batches(2 * args.steps)
    cfg = sg.SparseGradConfig(density=0.01, score_steps=0)
    t0 = time.perf_counter()
    bases = sg.estimate_bases(model, cfg, bs[: args.steps], progress=False)
    calib = time.perf_counter() - t0
    targets = dict((n, m) for n, m in model.named_modules() if n in {t for t, _ in sg.targets.find_targets(model, cfg)})
    sums = {"core": [], "official": [], "original": []}
    per_kind: dict[str, dict[str, list[float]]] = {}
    for batch in bs[args.steps:]:
        model.zero_grad()
        model(**batch).loss.backward()
        for name, mod in targets.items():
            g = mod.weight.grad.float()
            u_out, u_in = bases.factors[sg.targets.kind_of(name, cfg)]
            k = cfg.budget(*g.shape)
            vals = {"core": sg.topk_energy_share(u_out.T @ g @ u_in, k),
                    "official": sg.topk_energy_share(u_out.T @ g @ u_in.T, k) if g.shape[1] == u_in.shape[0] else 0,
                    "original": sg.topk_energy_share(g, k)}
            for key, v in vals.items():
                sums[key].append(v)
                per_kind.setdefault(name.split(".")[-2], {}).setdefault(key, []).append(v)
    mean = {k: sum(v) / len(v) for k, v in sums.items()}
    print(f"calibration: {args.steps} steps of 16x128 in {calib:.1f} s; energy on {args.steps} held-out batches")
    print("| basis | top-1 % energy share (mean over 12 matrices x batches) |")
    print("|---|---|")
    print(f"| original (MeProp) | {mean['original']:.3f} |")
    print(f"| HOSVD core u_outᵀ G u_in (sparsegrad) | {mean['core']:.3f} |")
    print(f"| official code's orientation u_outᵀ G u_inᵀ | {mean['official']:.3f} |")
    for kind, vals in per_kind.items():
        print(f"  {kind}: " + ", ".join(f"{k} {sum(v) / len(v):.3f}" for k, v in vals.items()))


def _calibration_worker(mode: str, steps: int) -> None:
    model, bs = batches(steps)
    cfg = sg.SparseGradConfig(density=0.01, score_steps=0)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if mode == "streaming":
        sg.estimate_bases(model, cfg, bs, progress=False)
    elif mode == "stacked":
        names = [n for n, _ in sg.targets.find_targets(model, cfg)]
        mods = dict(model.named_modules())
        stacks: dict[str, list[torch.Tensor]] = {}
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            mods[n].weight.requires_grad_(True)
        for batch in bs:
            model.zero_grad()
            model(**batch).loss.backward()
            for n in names:
                stacks.setdefault(sg.targets.kind_of(n, cfg), []).append(mods[n].weight.grad.clone())
        for kind, grads in stacks.items():
            t = torch.stack(grads)
            s, o, i = t.shape
            torch.linalg.svd(t.permute(1, 0, 2).reshape(o, s * i), full_matrices=False)
            torch.linalg.svd(t.permute(2, 0, 1).reshape(i, s * o), full_matrices=False)
    elif mode == "none":  # the same forward/backward passes, gradients dropped: the activation-memory floor
        names = [n for n, _ in sg.targets.find_targets(model, cfg)]
        mods = dict(model.named_modules())
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            mods[n].weight.requires_grad_(True)
        for batch in bs:
            model(**batch).loss.backward()
            model.zero_grad(set_to_none=True)
    else:
        raise ValueError(mode)
    elapsed = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "time_s": elapsed, "rss_before_mb": rss0 / 1024, "peak_rss_mb": rss1 / 1024}))


def part_calibration(args) -> None:
    rows = []
    for mode in ("none", "streaming", "stacked"):
        out = subprocess.run([sys.executable, __file__, "--worker", mode, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mb"]
    stack_mb = 2 * args.steps * 6 * 1536 * 384 * 4 / 2**20
    gram_mb = 2 * (1536**2 + 384**2) * 4 / 2**20
    print(f"{args.steps} calibration steps of 16x128, 12 MLP matrices in 2 kinds. Baseline: the same forward/backward "
          f"passes with the gradients dropped, {base:.0f} MB peak RSS. Held by the method: stacked gradients "
          f"{stack_mb:.0f} MB (+ SVD workspace) vs Gram matrices {gram_mb:.0f} MB ({stack_mb / gram_mb:.0f}x less).")
    print("| calibration | time (s) | peak RSS (MB) | over the baseline (MB) |")
    print("|---|---|---|---|")
    for r in rows[1:]:
        print(f"| {r['mode']} | {r['time_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:.0f} |")


def part_adapter(args) -> None:
    model0, bs = batches(args.train_steps + 2)
    dense = sum(m.weight.numel() * m.weight.element_size() for n, m in sg.targets.find_targets(
        model0, sg.SparseGradConfig()))
    print(f"dense MLP weights: {dense / 1e6:.2f} MB (12 matrices, fp32); {args.train_steps} steps at lr 1e-3, "
          "MLP scope (MLP matrices by the method, their biases and the head also train)")
    print("| support | entries ever updated | adapter size (MB) | of dense MLP | deltas (MB) | bases + biases + head (MB) |")
    print("|---|---|---|---|---|---|")
    for support in ("dynamic", "fixed"):
        model = copy.deepcopy(model0)
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("classifier") or (("intermediate.dense" in n or "output.dense" in n)
                                                            and "attention" not in n))
        cfg = sg.SparseGradConfig(density=0.01, support=support, score_steps=1)
        sg.get_sparsegrad_model(model, cfg, sg.estimate_bases(model, cfg, bs[:2], progress=False))
        opt = sg.create_optimizer(model, lr=1e-3)
        for batch in bs[2:]:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
        with tempfile.TemporaryDirectory() as d:
            sg.save_adapter(model, d)
            size = sum(f.stat().st_size for f in Path(d).iterdir())
        layers = sg.sparsegrad_layers(model).values()
        updated = sum(l.entries_updated() for l in layers)
        delta_bytes = sum(l.delta_indices.numel() * 8 for l in layers)
        bases_bytes = size - delta_bytes
        print(f"| {support} | {updated:,d} | {size / 1e6:.2f} | {size / dense:.1%} | {delta_bytes / 1e6:.2f} | "
              f"{bases_bytes / 1e6:.2f} |")


def part_merge(args) -> None:
    import statistics

    base, bs = batches(4)
    model = copy.deepcopy(base)
    cfg = sg.SparseGradConfig(density=0.01, score_steps=0)
    sg.get_sparsegrad_model(model, cfg, sg.estimate_bases(model, cfg, bs[:2], progress=False))
    opt = sg.create_optimizer(model, lr=1e-3)
    model(**bs[2]).loss.backward()
    opt.step()
    merged = sg.merge_and_unload(model).eval()
    base.eval()
    times = {"base": [], "merged": []}
    with torch.no_grad():
        for r in range(12):
            for name, m in (("base", base), ("merged", merged)):
                t0 = time.perf_counter()
                m(**{k: v for k, v in bs[3].items() if k != "labels"})
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
    b, mm = statistics.median(times["base"]), statistics.median(times["merged"])
    print(f"forward of 16x128, 10 interleaved rounds: base {1000 * b:.0f} ms, merged {1000 * mm:.0f} ms, "
          f"ratio {mm / b:.3f}; merged modules: {sorted({type(m).__name__ for n, m in merged.named_modules() if n.endswith('dense')})}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", default=["exactness", "energy", "calibration", "adapter", "merge"])
    p.add_argument("--steps", type=int, default=10, help="calibration steps")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _calibration_worker(args.worker, args.steps)
        return
    print(f"machine: {torch.get_num_threads()} threads, torch {torch.__version__}")
    for part in args.parts:
        print(f"\n## {part}")
        globals()[f"part_{part}"](args)


if __name__ == "__main__":
    main()

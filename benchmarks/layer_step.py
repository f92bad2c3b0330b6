"""Step time of one MLP matrix: SparseGrad (each support mode), MeProp, LoRA (peft), full training, frozen floor.

A step is forward + backward + optimizer step (+ zero_grad) on `tokens` rows with a fixed random output gradient.
Rounds are interleaved (each round times every variant once); the median per variant is reported with its ratio
to full training (nn.Linear + AdamW) and to LoRA (peft, rank r = round(k / (in + out)), the same budget). Usage:

    python benchmarks/layer_step.py --shapes 1536x384,384x1536 --tokens 512,2048,8192 --rounds 10
    python benchmarks/layer_step.py --shapes 11008x4096 --tokens 2048 --rounds 2 --warmup 1
    python benchmarks/layer_step.py --shapes 1536x576,3072x768 --tokens 512,2048,8192,16384 --plot layer_step.png

Shapes are OUTxIN (nn.Linear weight shape). Bases are random orthogonal matrices: the rotated gradient of random
data is not concentrated, so a fixed support spans every row and column (the slowest case for the fixed mode).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparsegrad as sg


def orthogonal(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """A random orthogonal n x n matrix (QR on the device: at 11008 it takes a CPU minute)."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)).to(device))
    return q


def variants(out_f: int, in_f: int, density: float, device: torch.device):
    base = nn.Linear(in_f, out_f)
    k = max(1, round(density * out_f * in_f))
    u_out, u_in = orthogonal(out_f, 1, device), orthogonal(in_f, 2, device)

    def plain():
        layer = nn.Linear(in_f, out_f)
        layer.load_state_dict(base.state_dict())
        layer.to(device)
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-4)

    def frozen():
        layer = nn.Linear(in_f, out_f)
        layer.load_state_dict(base.state_dict())
        layer.weight.requires_grad_(False)
        layer.to(device)
        return layer, torch.optim.AdamW([layer.bias], lr=1e-4)

    def sparse(support, identity=False):
        def build():
            lin = nn.Linear(in_f, out_f)
            lin.load_state_dict(base.state_dict())
            lin.to(device)
            eye_o, eye_i = torch.eye(out_f, device=device), torch.eye(in_f, device=device)
            layer = sg.SparseGradLinear(lin, eye_o if identity else u_out, eye_i if identity else u_in, k=k,
                                        support=support, kind="bench", identity_basis=identity).to(device)
            return layer, sg.create_optimizer(nn.Sequential(layer), lr=1e-4)
        return build

    def lora():
        from peft import LoraConfig, get_peft_model

        rank = max(1, round(k / (in_f + out_f)))
        holder = nn.Sequential()
        holder.add_module("proj", nn.Linear(in_f, out_f))
        holder.proj.load_state_dict(base.state_dict())
        model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"]))
        model.to(device)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    return {
        "nn.Linear + AdamW (full)": plain,
        "LoRA (peft, same budget)": lora,
        "frozen weight (floor)": frozen,
        "SparseGrad dynamic": sparse("dynamic"),
        "SparseGrad fixed": sparse("fixed"),
        "MeProp (identity basis, dynamic)": sparse("dynamic", identity=True),
    }, k


def bench(out_f: int, in_f: int, tokens: int, args) -> list[tuple[str, float, float, float]]:
    device = torch.device(args.device)
    builders, k = variants(out_f, in_f, args.density, device)
    built = {name: b() for name, b in builders.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, in_f, generator=g).to(device)
    gy = torch.randn(tokens, out_f, generator=g).to(device)
    gy[: int(args.padded_share * tokens)] = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in built}
    for r in range(args.warmup + args.rounds):
        for name, (layer, opt) in built.items():
            sync()
            t0 = time.perf_counter()
            layer(x).backward(gy)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    full = statistics.median(times["nn.Linear + AdamW (full)"])
    lora = statistics.median(times["LoRA (peft, same budget)"])
    return k, [(name, statistics.median(ts), statistics.median(ts) / full, statistics.median(ts) / lora)
               for name, ts in times.items()]


def plot(path: str, rows: list[tuple[str, int, str, float, float, float]]) -> None:
    """One panel per shape: each variant's step time relative to full training and to LoRA, against tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r[0] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes), 7), squeeze=False)
    for col, shape in enumerate(shapes):
        sel = [r for r in rows if r[0] == shape]
        for name in dict.fromkeys(r[2] for r in sel):
            pts = sorted((r[1], r[4], r[5]) for r in sel if r[2] == name)
            for row, idx in ((0, 1), (1, 2)):
                axes[row][col].plot([p[0] for p in pts], [p[idx] for p in pts], "o-", label=name)
        for row, ref in ((0, "full (nn.Linear + AdamW)"), (1, "LoRA (peft)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.axhline(1.0, color="k", lw=0.6)
            ax.set_xlabel("tokens per step")
            ax.set_ylabel(f"step time / {ref}")
            ax.set_title(f"{shape}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path + ".tmp", format="png", dpi=100)
    import os

    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1536x384,384x1536", help="comma list of OUTxIN")
    p.add_argument("--tokens", default="2048", help="comma list of token counts per step")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--padded-share", type=float, default=0.0, help="share of token rows with zero output gradient")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tf32", action="store_true", help="let CUDA matmuls use TF32 (every variant's, bases too)")
    p.add_argument("--plot", default=None, help="also write this PNG (ratios against tokens, one panel per shape)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {torch.get_num_threads()} threads"
    print(f"{where}, torch {torch.__version__}, density {args.density:.2%}, "
          f"padded rows {args.padded_share:.0%}, {'TF32 allowed, ' if args.tf32 else ''}{args.rounds} interleaved rounds, medians")
    print("| shape (out x in) | tokens | variant | median step (ms) | / full | / LoRA |")
    print("|---|---|---|---|---|---|")
    table = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.lower().split("x"))
        for tokens in (int(t) for t in args.tokens.split(",")):
            k, rows = bench(out_f, in_f, tokens, args)
            for name, med, to_full, to_lora in rows:
                table.append((f"{out_f}x{in_f}", tokens, name, med, to_full, to_lora))
                print(f"| {out_f}x{in_f} (k={k}) | {tokens} | {name} | {1000 * med:.1f} | {to_full:.2f} | "
                      f"{to_lora:.2f} |", flush=True)
    if args.plot:
        plot(args.plot, table)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

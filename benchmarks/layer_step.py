"""Step time of one MLP matrix: SparseGradLinear (each support mode) vs a plain nn.Linear.

A step is forward + backward + optimizer step (+ zero_grad) on `tokens` rows, with a random target gradient.
Rounds are interleaved (each round times every variant once) and the median per variant is reported, with its
ratio to the plain nn.Linear trained by AdamW. Usage:

    python benchmarks/layer_step.py --out-features 1536 --in-features 384 --tokens 2048 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparsegrad as sg


def orthogonal(n: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed)))
    return q


def variants(out_f: int, in_f: int, density: float, padded_share: float):
    base = nn.Linear(in_f, out_f)
    k = max(1, round(density * out_f * in_f))
    u_out, u_in = orthogonal(out_f, 1), orthogonal(in_f, 2)

    def plain():
        layer = nn.Linear(in_f, out_f)
        layer.load_state_dict(base.state_dict())
        return layer, torch.optim.AdamW(layer.parameters(), lr=1e-4)

    def frozen():
        layer = nn.Linear(in_f, out_f)
        layer.load_state_dict(base.state_dict())
        layer.weight.requires_grad_(False)
        return layer, torch.optim.AdamW([layer.bias], lr=1e-4)

    def sparse(support, identity=False):
        def build():
            lin = nn.Linear(in_f, out_f)
            lin.load_state_dict(base.state_dict())
            eye_o, eye_i = torch.eye(out_f), torch.eye(in_f)
            layer = sg.SparseGradLinear(lin, eye_o if identity else u_out, eye_i if identity else u_in, k=k,
                                        support=support, kind="bench", identity_basis=identity)
            return layer, sg.create_optimizer(nn.Sequential(layer), lr=1e-4)
        return build

    return {
        "nn.Linear + AdamW (full)": plain,
        "frozen weight (floor)": frozen,
        "SparseGrad dynamic": sparse("dynamic"),
        "SparseGrad fixed": sparse("fixed"),
        "MeProp (identity basis, dynamic)": sparse("dynamic", identity=True),
    }, k


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-features", type=int, default=1536)
    p.add_argument("--in-features", type=int, default=384)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--padded-share", type=float, default=0.0, help="share of token rows with zero output gradient")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    builders, k = variants(args.out_features, args.in_features, args.density, args.padded_share)
    built = {name: b() for name, b in builders.items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.in_features, generator=g)
    gy = torch.randn(args.tokens, args.out_features, generator=g)
    gy[: int(args.padded_share * args.tokens)] = 0
    times: dict[str, list[float]] = {name: [] for name in built}

    def step(layer, opt):
        y = layer(x)
        y.backward(gy)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for r in range(args.warmup + args.rounds):
        for name, (layer, opt) in built.items():
            t0 = time.perf_counter()
            step(layer, opt)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    ref = statistics.median(times["nn.Linear + AdamW (full)"])
    print(f"shape {args.out_features}x{args.in_features}, tokens {args.tokens}, k={k} ({args.density:.2%}), "
          f"padded rows {args.padded_share:.0%}, threads {torch.get_num_threads()}, {args.rounds} rounds")
    print("| variant | median step (ms) | ratio to nn.Linear + AdamW |")
    print("|---|---|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {1000 * med:.1f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()

"""Can a fixed-support layer drop its W0 copy? How often fp32 recovery W0' = fl(W - D) misses W0, where
W = fl(W0 + D) is the effective weight and D = U_out · scatter(delta) · U_inᵀ the dense delta the rebuild made.

    python benchmarks/w0_recovery.py --scales 1e-4,1e-3,1e-2

Real MiniLM MLP weights (W0), random orthogonal bases, a random 1 % support with normal values of the given scale
(trained deltas after 32 steps at lr 5e-4 are of order 1e-3 to 1e-2). Prints, per matrix shape and scale, the share
of entries that recovery gets wrong (each would need an exact correction stored to keep adapters bit-exact) and
the bf16 alternative's error (W0 kept as bf16: not exact at all).
"""

from __future__ import annotations

import argparse

import torch

from sparsegrad.layer import rotated_to_weight


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scales", default="1e-4,1e-3,1e-2")
    args = p.parse_args()
    from sparsegrad.finetune.models import load_classifier

    model, _ = load_classifier("minilm", 2)
    layer = model.bert.encoder.layer[0]
    g = torch.Generator().manual_seed(0)
    print("| W0 | scale of delta values | entries with fl(fl(W0 + D) - D) != W0 | max abs error of bf16(W0) |")
    print("|---|---|---|---|")
    for name, w0 in (("intermediate 1536x384", layer.intermediate.dense.weight.detach()),
                     ("output 384x1536", layer.output.dense.weight.detach())):
        o, i = w0.shape
        u_out = torch.linalg.qr(torch.randn(o, o, generator=g))[0].contiguous()
        u_in = torch.linalg.qr(torch.randn(i, i, generator=g))[0].contiguous()
        k = round(0.01 * o * i)
        idx = torch.randperm(o * i, generator=g)[:k].sort().values.to(torch.int32)
        for scale in (float(s) for s in args.scales.split(",")):
            d = rotated_to_weight(idx, scale * torch.randn(k, generator=g), u_out, u_in, (o, i))
            w = w0 + d
            miss = (w - d) != w0
            bf16 = (w0.to(torch.bfloat16).float() - w0).abs().max()
            print(f"| {name} | {scale:g} | {int(miss.sum()):,d} of {o * i:,d} ({miss.float().mean():.2%}) | "
                  f"{float(bf16):.1e} |")


if __name__ == "__main__":
    main()

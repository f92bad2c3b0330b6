"""Drift of SparseGradAdamW's incremental fp32 weight against the exact rebuild and an fp64 one, with the periodic
exact rebuild switched off: one 1536x384 layer, random orthogonal bases, 256 random tokens, lr 1e-3, 100 steps.

    python benchmarks/drift.py
"""

import torch
from torch import nn

import sparsegrad as sg
import sparsegrad.optim as so
from layer_step import orthogonal
torch.manual_seed(0)
o, i, T = 1536, 384, 256
so.EXACT_REBUILD_EVERY = 10**9
lin = nn.Linear(i, o)
layer = sg.SparseGradLinear(lin, orthogonal(o, 1, torch.device('cpu')), orthogonal(i, 2, torch.device('cpu')), k=o * i // 100, support="dynamic", kind="x").train()
opt = sg.SparseGradAdamW([layer.weight], lr=1e-3, sparse_layers=[layer])
g = torch.Generator().manual_seed(0)
for step in range(1, 101):
    layer(torch.randn(T, i, generator=g)).square().mean().backward()
    opt.step(); opt.zero_grad()
    if step in (25, 50, 100):
        w = layer.weight.detach().clone()
        idx, vals = layer._stored_delta()
        d64 = torch.zeros(o * i, dtype=torch.float64); d64[idx.long()] = vals.double()
        w64 = layer.base_weight.double() + layer.u_out.double() @ d64.view(o, i) @ layer.u_in.double().T
        exact = layer._plus_delta(layer.base_weight, layer.delta_indices, layer.delta_values, *layer._rotation())
        print(step, "S", idx.numel(), "max|W_inc-W_exact|", f"{(w - exact).abs().max():.2e}", "max|W_inc-W_fp64|",
              f"{(w.double() - w64).abs().max():.2e}", "max|W_exact-W_fp64|", f"{(exact.double() - w64).abs().max():.2e}",
              "max|dW|", f"{(w64 - layer.base_weight.double()).abs().max():.3f}", "max|W|", f"{w.abs().max():.3f}")

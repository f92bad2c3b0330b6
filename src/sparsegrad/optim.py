"""`SparseGradAdamW`: AdamW for every parameter, plus the paper's dynamic top-k step for SparseGrad weights.

For a dynamic-support `SparseGradLinear`, ``weight.grad`` holds the plain dense gradient G (summed over
micro-batches, all-reduced under DDP). The step rotates it (u_outᵀ G u_in), keeps exactly the k entries of
largest magnitude, and applies a lazy Adam to them: moments and bias correction are kept per entry and touched only
where the gradient is. Moments are stored only for entries that have ever been selected (aligned with the layer's
``delta_indices``), so the state grows with the union of supports, never to a dense out x in pair.

Fixed-support layers train ``delta_values`` (k long) as an ordinary parameter under AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .layer import SparseGradLinear, topk_indices


def _grow_support(support: Tensor, idx: Tensor, tensors: list[Tensor]) -> tuple[Tensor, list[Tensor], Tensor]:
    """Insert the new entries of ``idx`` into the sorted ``support``; zero-extend the aligned ``tensors``.
    Returns (support, tensors, positions of idx in the new support)."""
    n = support.numel()
    pos = torch.searchsorted(support, idx)
    present = pos < n
    present[present.clone()] = support[pos[present]] == idx[present]
    if not bool(present.all()):
        # Merge two sorted index lists without a sort: each old entry moves right by the number of new entries
        # before it, each new entry lands after the old entries before it.
        new = idx[~present]
        size = n + new.numel()
        old_dest = torch.arange(n, device=idx.device) + torch.searchsorted(new, support)
        new_dest = pos[~present] + torch.arange(new.numel(), device=idx.device)
        merged = support.new_empty(size)
        merged[old_dest], merged[new_dest] = support, new
        grown = []
        for t in tensors:
            g = t.new_zeros(size)
            g[old_dest] = t
            grown.append(g)
        support, tensors = merged, grown
        pos = torch.searchsorted(support, idx)
    return support, tensors, pos


def sparse_adam_update(
    values: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    entry_steps: Tensor,
    pos: Tensor,
    grad: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """In place, at positions ``pos`` only: decoupled weight decay, Adam moments, per-entry bias correction."""
    if maximize:
        grad = -grad
    steps = entry_steps[pos] + 1
    entry_steps[pos] = steps
    m = exp_avg[pos].mul_(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq[pos].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg[pos], exp_avg_sq[pos] = m, v
    bias1 = 1 - beta1**steps
    bias2 = 1 - beta2**steps
    denom = (v / bias2).sqrt_().add_(eps)
    new = values[pos]
    if weight_decay:
        new.mul_(1 - lr * weight_decay)
    values[pos] = new - lr * (m / bias1) / denom


class SparseGradAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay) whose dynamic-support SparseGrad weights take the rotated top-k step.

    ``sparse_layers``: the dynamic-support `SparseGradLinear` modules whose ``weight`` is among ``params``.
    Arguments are validated by torch.optim.AdamW; everything else about the optimizer (param_groups, schedulers,
    state_dict) is standard.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, sparse_layers: Iterable[SparseGradLinear] = ()):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._layers: dict[nn.Parameter, SparseGradLinear] = {}
        known = {p for g in self.param_groups for p in g["params"]}
        for layer in sparse_layers:
            if layer.support != "dynamic":
                raise ValueError(f"sparse_layers takes dynamic-support layers; {layer.kind} is {layer.support!r}")
            if layer.weight not in known:
                raise ValueError("a sparse layer's weight is not among the optimizer's params")
            self._layers[layer.weight] = layer

    @torch.no_grad()
    def _sparse_step(self, param: nn.Parameter, layer: SparseGradLinear, group: dict) -> None:
        rotated = layer.rotate(param.grad)
        if not bool(torch.isfinite(rotated).all()):
            raise ValueError(f"non-finite gradient in SparseGrad layer of kind {layer.kind!r}")
        idx = topk_indices(rotated, layer.k)
        grad = rotated.reshape(-1)[idx]
        idx = idx.to(layer.delta_indices.dtype)
        state = self.state[param]
        if not state:  # a layer may arrive with a support already (resumed, loaded): fresh moments for it
            zeros = torch.zeros(layer.delta_indices.numel(), dtype=torch.float32, device=param.device)
            state.update(step=torch.tensor(0.0), exp_avg=zeros, exp_avg_sq=zeros.clone(), entry_steps=zeros.clone())
        elif state["exp_avg"].numel() != layer.delta_indices.numel():
            raise ValueError(
                f"optimizer state holds {state['exp_avg'].numel()} entries but the {layer.kind!r} layer's support "
                f"has {layer.delta_indices.numel()}: restore the model and the optimizer from the same checkpoint"
            )
        state["step"] += 1
        support, (values, m, v, t), pos = _grow_support(
            layer.delta_indices, idx,
            [layer.delta_values.float(), state["exp_avg"], state["exp_avg_sq"], state["entry_steps"]],
        )
        beta1, beta2 = group["betas"]
        sparse_adam_update(values, m, v, t, pos, grad, lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                           weight_decay=group["weight_decay"], maximize=group.get("maximize", False))
        layer.delta_indices = support
        layer.delta_values = values
        state["exp_avg"], state["exp_avg_sq"], state["entry_steps"] = m, v, t
        layer.sync_weight()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stashed = []
        for group in self.param_groups:
            for p in group["params"]:
                layer = self._layers.get(p)
                if layer is not None and p.grad is not None:
                    self._sparse_step(p, layer, group)
                    stashed.append((p, p.grad))
                    p.grad = None  # hidden from AdamW's dense step, restored below
        try:
            super().step()
        finally:
            for p, grad in stashed:
                p.grad = grad
        return loss


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.dim() < 2 or lowered.endswith("bias") or "norm" in lowered


def create_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, betas=(0.9, 0.999),
                     eps: float = 1e-8) -> SparseGradAdamW:
    """One optimizer for every trainable parameter of ``model``.

    Dynamic-support SparseGrad weights take the rotated top-k lazy-Adam step; fixed-support delta values and all
    other trainable parameters (biases, LayerNorm, heads, attention when trained) take AdamW. Weight decay is
    decoupled and skips biases, norms and other 1-D parameters.
    """
    layers = [m for m in model.modules() if isinstance(m, SparseGradLinear)]
    dynamic = [m for m in layers if m.support == "dynamic" and m.weight.requires_grad]
    sparse_weights = {m.weight for m in dynamic}
    decay, no_decay, sparse = [], [], []
    seen: set[nn.Parameter] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or p in seen:
            continue
        seen.add(p)
        if p in sparse_weights:
            sparse.append(p)
        elif name.endswith("delta_values"):
            decay.append(p)
        elif _no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": sparse, "weight_decay": weight_decay, "name": "sparsegrad_dynamic"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return SparseGradAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sparse_layers=dynamic)

"""Mixture-of-experts weights stored as 3-D parameters (transformers 5: Mixtral, Qwen2-MoE, Qwen3-MoE, ...).

An experts module holds, e.g., ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I) and its forward reads
them whole (``self.gate_up_proj[e]`` in eager mode, the whole tensor in grouped_mm). SparseGrad trains each
expert's matrix as its own out x in linear, with bases shared per kind across experts and blocks:

* *unfusing* replaces a 3-D parameter by one child module per expert, ``<experts>.<e>.<param>`` (an nn.Linear,
  later a SparseGradLinear), and a forward pre-hook sets the attribute the forward reads to the stack of their
  current weights (bit-identical to the parameter it replaces; removed again after the forward);
* the stack goes through `_StackExperts`, whose backward hands each expert its slice of the dense gradient: to a
  weight that trains densely (a plain linear, a dynamic-support SparseGrad layer) as it is, to a fixed-support
  layer as the rotated gradient at its support. An expert that no token reached gets no gradient (None; a zero
  gradient under torch.distributed, where every rank must reduce every parameter);
* *fusing* (merge, or the end of a calibration on the base model) puts one 3-D Parameter back in the model's own
  layout.

Before conversion the per-expert matrices are found by name without touching the model (`expert_views`), so
calibration, fingerprints and adapters see the same names ``<experts>.<e>.<param>`` as the converted model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .layer import SparseGradLinear, _mean_over_ranks, topk_indices
from .matrices import LinearView

FUSED_ATTR = "_sparsegrad_fused"  # on an unfused experts module: {param name: number of experts}


class ExpertView(LinearView):
    """Expert ``expert`` of the 3-D parameter ``param_name`` of an experts module, seen as a linear."""

    def __init__(self, module: nn.Module, param_name: str, expert: int):
        super().__init__(module._parameters[param_name].detach()[expert], None, module)
        self.param_name, self.expert = param_name, expert


def is_experts_param(module: nn.Module, tensor: Tensor | None) -> bool:
    """A 3-D parameter of a module whose first dimension is its number of experts."""
    if tensor is None or tensor.dim() != 3:
        return False
    experts = getattr(module, "num_experts", None)
    return experts == tensor.shape[0] or (experts is None and type(module).__name__.endswith("Experts"))


def expert_views(model: nn.Module) -> Iterator[tuple[str, ExpertView]]:
    """(``<experts>.<e>.<param>``, view) for every expert matrix of every still-fused 3-D experts parameter."""
    for name, module in model.named_modules():
        for pname, p in module._parameters.items():
            if is_experts_param(module, p):
                for e in range(p.shape[0]):
                    yield f"{name}.{e}.{pname}" if name else f"{e}.{pname}", ExpertView(module, pname, e)


def check_layout(name: str, module: nn.Module) -> None:
    if getattr(module, "is_transposed", False):
        raise ValueError(f"{name}: the experts store their weights transposed (is_transposed=True); SparseGrad "
                         "supports the (experts, out, in) layout only (narrow target_modules)")


class _StackExperts(torch.autograd.Function):
    """stack(weights of the experts), with each expert's gradient routed to what trains it (see the module doc)."""

    @staticmethod
    def forward(ctx, layers: tuple[nn.Module, ...], *trained: Tensor) -> Tensor:
        ctx.layers = layers
        ctx.via_support = [isinstance(layer, SparseGradLinear) and t is layer.delta_values
                           for layer, t in zip(layers, trained)]
        return torch.stack([layer.weight.detach() for layer in layers])

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Under DDP every rank must give every parameter a gradient and take part in every all-reduce, whichever
        # experts its own tokens reached: there an unreached expert gets a zero gradient instead of None.
        skip_unreached = _world_size() < 2
        grads: list[Tensor | None] = []
        for i, (layer, g, fixed) in enumerate(zip(ctx.layers, grad, ctx.via_support)):
            if not ctx.needs_input_grad[i + 1]:
                grads.append(None)
            elif fixed and layer.support_pending:  # chosen now, from the rotated gradient averaged over the ranks
                grads.append(_support_gradient(layer, g))
            elif skip_unreached and not bool(g.any()):
                grads.append(None)
            else:
                grads.append(_support_gradient(layer, g) if fixed else g)
        return (None, *grads)


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def _support_gradient(layer: SparseGradLinear, grad: Tensor) -> Tensor:
    """The rotated gradient of a fixed-support layer at its support; a pending support is chosen here, from the
    rotated gradient averaged over the ranks (as the layer itself does at its first step)."""
    if layer.support_pending:
        rotated = _mean_over_ranks(layer.rotate(grad))
        layer.delta_indices = topk_indices(rotated, layer.k).to(layer.index_dtype)
    else:
        rotated = layer.rotate(grad)
    return rotated.reshape(-1)[layer.delta_indices].to(layer.delta_values.dtype)


def _trained_tensor(layer: nn.Module) -> Tensor:
    """What the gradient of expert ``layer`` goes to, as in `SparseGradLinear.forward`: the delta values of a
    fixed-support layer that trains them, else the weight (dynamic support; a calibration on the converted model)."""
    if isinstance(_synced(layer), SparseGradLinear) and layer.support == "fixed" and layer.delta_values.requires_grad:
        return layer.delta_values
    return layer.weight


def _stacked_weights(module: nn.Module, pname: str) -> Tensor:
    layers = tuple(getattr(module._modules[str(e)], pname) for e in range(module.__dict__[FUSED_ATTR][pname]))
    trained = [_trained_tensor(layer) for layer in layers]
    if torch.is_grad_enabled() and any(t.requires_grad for t in trained):
        return _StackExperts.apply(layers, *trained)
    return torch.stack([layer.weight.detach() for layer in layers])


def _set_stacks(module: nn.Module, args) -> None:
    for pname in module.__dict__[FUSED_ATTR]:
        object.__setattr__(module, pname, _stacked_weights(module, pname))


def _drop_stacks(module: nn.Module, args, output) -> None:
    for pname in module.__dict__[FUSED_ATTR]:
        module.__dict__.pop(pname, None)


class _Expert(nn.Module):
    """One expert's matrices (children named after the fused parameters they come from)."""


def unfuse(module: nn.Module, pnames: list[str]) -> list[tuple[str, nn.Parameter]]:
    """Replace each 3-D parameter ``pname`` of ``module`` by per-expert nn.Linear children whose weights are views
    of it (no copy), and hook the module so that its forward reads their stack; returns the parameters removed
    (for `fuse`)."""
    removed = []
    fused = module.__dict__.setdefault(FUSED_ATTR, {})
    for pname in pnames:
        param = module._parameters.pop(pname)
        experts = param.shape[0]
        for e in range(experts):
            child = module._modules.get(str(e))
            if child is None:
                child = _Expert()
                module.add_module(str(e), child)
            linear = nn.Linear(param.shape[2], param.shape[1], bias=False, device="meta")
            linear.weight = nn.Parameter(param.detach()[e], requires_grad=param.requires_grad)
            child.add_module(pname, linear)
        fused[pname] = experts
        removed.append((pname, param))
    if _set_stacks not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_set_stacks)
        module.register_forward_hook(_drop_stacks)
    return removed


def fuse(module: nn.Module, weights: dict[str, nn.Parameter]) -> None:
    """Put the 3-D parameters ``weights`` back on an unfused experts module and drop its per-expert children and
    hooks (once no parameter of it stays unfused)."""
    fused = module.__dict__[FUSED_ATTR]
    for pname, param in weights.items():
        module.__dict__.pop(pname, None)
        for e in range(fused.pop(pname)):
            del module._modules[str(e)]._modules[pname]
        module.register_parameter(pname, param)
    if not fused:
        for e in [k for k, m in module._modules.items() if isinstance(m, _Expert) and not m._modules]:
            del module._modules[e]
        for hooks, fn in ((module._forward_pre_hooks, _set_stacks), (module._forward_hooks, _drop_stacks)):
            for key in [k for k, h in hooks.items() if h is fn]:
                del hooks[key]
        del module.__dict__[FUSED_ATTR]


def fuse_trained(module: nn.Module) -> None:
    """Merge: every unfused parameter of ``module`` back as one 3-D Parameter of the experts' current (trained)
    weights, in the model's layout; trainable when its base parameter was."""
    weights = {}
    for pname, experts in module.__dict__[FUSED_ATTR].items():
        layers = [getattr(module._modules[str(e)], pname) for e in range(experts)]
        requires_grad = any(getattr(layer, "base_requires_grad", layer.weight.requires_grad) for layer in layers)
        stacked = torch.stack([_synced(layer).weight.detach() for layer in layers])
        weights[pname] = nn.Parameter(stacked, requires_grad=requires_grad)
    fuse(module, weights)


def _synced(layer: nn.Module) -> nn.Module:
    if isinstance(layer, SparseGradLinear):
        layer.sync_weight()
    return layer


def unfused_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if FUSED_ATTR in m.__dict__]


def selected_experts(model: nn.Module, names: list[str]) -> dict[nn.Module, list[str]]:
    """The experts modules and fused parameter names that the selected matrix ``names`` belong to."""
    views = dict(expert_views(model))
    chosen: dict[nn.Module, list[str]] = {}
    for name in names:
        view = views.get(name)
        if view is not None and view.param_name not in chosen.setdefault(view.source, []):
            chosen[view.source].append(view.param_name)
    return {m: p for m, p in chosen.items() if p}

"""The weight matrices SparseGrad trains, each seen as an out x in linear map.

Three shapes of module hold them in transformers models:

* `nn.Linear` and its subclasses that keep `nn.Linear.forward` (the weight is out x in);
* `FalconLinear`, an nn.Linear subclass whose forward is ``x @ W.T`` then ``+ b``: the same map, but the bias is
  added after the product, so with a bias it rounds differently from `F.linear` (the converted layer does the same);
* GPT-2's `transformers.pytorch_utils.Conv1D`, whose weight is stored transposed (in x out). It is recognised by
  its shape (class name ``Conv1D``, ``nf``/``nx`` attributes, weight nx x nf): the core does not import transformers.

Each is converted through an `nn.Linear` that holds its weight as out x in, and merged back to its own class, so a
merged model has the base's modules and state_dict. Anything else is refused by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import SparseGradLinear

# nn.Linear subclasses with their own forward that computes ``x @ W.T``, then ``+ b`` as a separate op (checked
# against transformers' source): the same map as nn.Linear, rounded like `SparseGradBiasAfterLinear`.
BIAS_AFTER_PRODUCT = frozenset({"FalconLinear"})


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (recognised by its name and shape: weight nx x nf), whose forward is x @ W + b."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


def linear_support(module: nn.Module) -> str | None:
    """Why ``module`` can be converted ('linear', 'bias_after', 'conv1d'), or None when it cannot."""
    if isinstance(module, nn.Linear):
        if type(module).forward is nn.Linear.forward:
            return "linear"
        return "bias_after" if type(module).__name__ in BIAS_AFTER_PRODUCT else None
    if is_conv1d(module):
        return "conv1d"
    return None


def refuse_unsupported(name: str, module: nn.Module) -> None:
    """The one error for a selected module SparseGrad cannot convert."""
    what = type(module).__name__
    if isinstance(module, nn.Linear):
        raise ValueError(f"target_modules matches {name}, a {what}: an nn.Linear subclass with its own forward, "
                         "which SparseGrad cannot prove is x Wᵀ + b (narrow the pattern)")
    raise ValueError(f"target_modules matches {name}, a {what}; SparseGrad converts nn.Linear, its subclasses, "
                     "GPT-2's Conv1D and fused MoE experts (narrow the pattern)")


class LinearView:
    """A selected matrix that is not itself an nn.Linear (a Conv1D, one expert of a fused experts tensor), seen as
    one: ``weight`` is its out x in matrix (a view, detached: for shapes and fingerprints, not for training)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, source: nn.Module):
        self.weight, self.bias, self.source = weight, bias, source


def out_in_weight(module: nn.Module) -> Tensor:
    """The module's weight as an out x in matrix (a view for Conv1D)."""
    return module.weight.T if is_conv1d(module) else module.weight


def as_linear(module: nn.Module) -> nn.Linear:
    """A plain nn.Linear over ``module``'s weight seen as out x in (no copy: for a Conv1D a transposed view, so that
    `F.linear` runs the very product Conv1D's addmm does) and sharing its bias Parameter. No memory is allocated
    for a discarded init."""
    weight = out_in_weight(module)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=module.weight.requires_grad)
    linear.bias = module.bias
    return linear.train(module.training)  # the layer built from it keeps the replaced module's mode


class SparseGradBiasAfterLinear(SparseGradLinear):
    """A SparseGradLinear standing for a `FalconLinear` with a bias: ``x @ W.T`` then ``+ b``, as the module it
    replaces computes, so the converted model's outputs are bit-identical. The fixed-support training step keeps
    the layer's fused product (the same map, rounded once)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.bias is None or (self.support == "fixed" and torch.is_grad_enabled() and self.delta_values.requires_grad):
            return super().forward(x)
        self.sync_weight()
        return F.linear(x, self.weight) + self.bias


def convert(module: nn.Module, u_out: Tensor, u_in: Tensor, **kwargs) -> SparseGradLinear:
    """The SparseGradLinear replacing ``module`` (an nn.Linear, a Linear subclass or a Conv1D); it remembers the
    module's class so that `restore` builds the same kind of module back."""
    how = linear_support(module)
    cls = SparseGradBiasAfterLinear if how == "bias_after" and module.bias is not None else SparseGradLinear
    layer = cls(as_linear(module), u_out, u_in, **kwargs)
    if type(module) is not nn.Linear:
        # not a submodule: an empty shell of the original (its weight removed) to rebuild at merge time
        module._parameters["weight"] = None  # in place: the state_dict keeps its key order at merge time
        layer.__dict__["_merge_shell"] = module
    return layer


def restore(layer: SparseGradLinear) -> nn.Module:
    """The module a SparseGradLinear replaced, holding the trained weight: an nn.Linear, or the original class
    (Conv1D with its transposed layout, FalconLinear, ...). The bias Parameter is shared, not copied."""
    linear = layer.to_linear()
    shell = layer.__dict__.get("_merge_shell")
    if shell is None:
        return linear
    weight = linear.weight.detach()
    shell.weight = nn.Parameter(weight.T.contiguous() if _is_conv1d_shell(shell) else weight,
                                requires_grad=layer.base_requires_grad)
    shell.bias = linear.bias
    return shell


def _is_conv1d_shell(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")

"""Fine-tuning methods, fair by construction: every method trains the same MLP matrices under the same budget.

* ``full``: the target MLP matrices train densely (every entry, every step).
* ``sparsegrad``: HOSVD bases calibrated on a few training batches, then exactly k entries of each rotated matrix
  train per step.
* ``meprop``: the same layer and optimizer with identity bases: top-k of the plain gradient.
* ``lora``: peft LoRA on the same modules, rank matched to the budget.

`METHODS` maps each name to its `Method`; a new baseline is one module plus one line here. Every method is then
optimised by `sg.create_optimizer` (plain AdamW for every non-sparse parameter).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import (
    DEFAULT_HEAD_NAMES,
    DEFAULT_LR,
    SCOPES,
    TRAINED_PARAMS_FILE,
    Method,
    Prepared,
    Setup,
    base_param_name,
    block_indices,
    default_lr,
    default_score_steps,
    default_targets,
    is_head_param,
    lr_help,
    mlp_matrices,
    quiet_peft,
    unwrap_peft,
)
from ..choices import METHOD_NAMES
from .full import Full
from .lora import Lora, lora_delta, lora_modules, lora_rank_for_budget
from .sparse import Sparse

_IMPLEMENTATIONS = (Sparse("sparsegrad", identity=False), Lora(), Sparse("meprop", identity=True), Full())
METHODS: dict[str, Method] = {m.name: m for m in _IMPLEMENTATIONS}
if tuple(METHODS) != METHOD_NAMES:  # the parser offers `choices.METHOD_NAMES` without importing this module
    raise ImportError(f"METHODS {tuple(METHODS)} and choices.METHOD_NAMES {METHOD_NAMES} differ")

PreparedModel = Prepared  # the name before the registry

__all__ = ["DEFAULT_HEAD_NAMES", "DEFAULT_LR", "METHODS", "SCOPES", "TRAINED_PARAMS_FILE", "Method", "Prepared",
           "PreparedModel", "Setup", "base_param_name", "block_indices", "default_lr", "default_score_steps",
           "default_targets", "is_head_param", "lora_delta", "lora_modules", "lora_rank_for_budget", "lr_help",
           "mlp_matrices", "prepare_method", "quiet_peft", "unwrap_peft"]


def method_for(name: str) -> Method:
    """The registered method called ``name`` (ValueError naming the choices otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def prepare_method(model: nn.Module, method: str, **setup: Any) -> Prepared:
    """Set ``model`` up for ``method`` (in place, except that LoRA returns peft's wrapper as ``.model``).

    ``budget_k`` (entries per matrix per step) overrides ``density``. The same budget drives every method: the
    sparse methods train exactly k entries per matrix per step, LoRA gets the rank with r*(in+out) closest to k,
    and ``full`` trains all entries (its k is the matrix size). ``calibration_batches`` are needed by
    ``sparsegrad`` only (the first ``calibration_steps`` of them are used; ``score_steps`` of them are re-run to
    report the top-k energy shares and choose a fixed support, default `default_score_steps`). ``bases``
    (``sparsegrad`` only) skips the calibration and converts with these bases (a resumed run's).
    ``calibration_options`` go to `sg.estimate_bases` (``grad_accum``, ``all_reduce_grads``; with the latter rank
    0's bases are broadcast). ``lora_rank`` overrides the matched rank. ``layers_to_transform`` (block indices)
    restricts the targets to those blocks for every method. An empty ``head_names`` means the model has no task
    head (a causal LM). Build the optimizer with ``sg.create_optimizer(prepared.model, lr=...)`` for every method.
    """
    if setup.get("calibration_options") is None:
        setup.pop("calibration_options", None)
    if "head_names" in setup:
        setup["head_names"] = tuple(setup["head_names"])
    return method_for(method).prepare(model, Setup(**setup))

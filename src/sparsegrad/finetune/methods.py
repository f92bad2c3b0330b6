"""Set up one fine-tuning method on a model, fair by construction.

Four methods train the MLP matrices of a Transformer under comparable conditions:

* ``full``: the target MLP matrices train densely (every entry, every step).
* ``sparsegrad``: HOSVD bases calibrated on a few training batches (`sg.estimate_bases`), then exactly k entries
  of each rotated matrix train per step.
* ``meprop``: the same layer and optimizer with identity bases (`sg.identity_bases`): top-k of the plain
  gradient. The basis is the only difference from ``sparsegrad``.
* ``lora``: peft LoRA on the same modules (the same regex), rank matched to the budget so that
  ``r * (in + out) ~= k`` (rounded, at least 1), ``lora_alpha = r`` (scale 1), no dropout.

Scope (what else trains):

* ``mlp``: only the method's MLP entries, the MLP biases and the classification head; everything else is frozen.
* ``all`` (the paper's protocol): every non-MLP parameter trains normally (embeddings, attention, LayerNorm,
  head), and the MLP matrices train by the method.

The freezing is applied *before* calibration and conversion, so conversion keeps it. Every method is then
optimised by `sg.create_optimizer` (plain AdamW for every non-sparse parameter: LoRA and full get exactly AdamW).
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

import sparsegrad as sg
from sparsegrad.targets import find_targets

METHODS = ("sparsegrad", "meprop", "lora", "full")
SCOPES = ("mlp", "all")
DEFAULT_HEAD_NAMES = ("classifier", "score")

# Default learning rates per (method, scope), for the default run (MiniLM-L6, 512 BBC articles, 32 steps of 16,
# linear decay). MLP scope: picked from a half-decade grid per method on BBC (seed 0, 400 held-out articles; one
# seed, so differences of about 1 pt are noise):
#   sparsegrad 1e-3 0.885 | 3e-3 0.948 | 1e-2 0.935      meprop 1e-3 0.868 | 3e-3 0.938
#   lora (r=3, scale 1) 1e-3 0.413 | 3e-3 0.863 | 1e-2 0.925 (best at the edge of the grid)
#   full (MLP matrices) 1e-4 0.728 | 3e-4 0.933 | 1e-3 0.943
# The tweets pilot (150 steps) preferred the lower of {1e-3, 3e-3} and of {1e-4, 3e-4}: longer runs may want lower
# rates. A validation split carved from bbc's training split (`python benchmarks/sweep.py lr --train-scope mlp`,
# docs/sweeps/lr-bbc-mlp.md) picked sparsegrad 1e-2 and full 3e-4 by one article; on the test split over 3 seeds
# those did worse (sparsegrad diverged on one seed), so the mlp rates above stay.
# "all" scope also trains attention and embeddings densely. Chosen on the validation split
# (`python benchmarks/sweep.py lr --train-scope all`, docs/sweeps/lr-bbc-all.md; bbc, 32 steps): full 5e-5 0.819 |
# 2e-4 0.969 | 5e-4 0.961; lora, meprop, sparsegrad 1e-4 0.87-0.88 | 5e-4 0.969 | 2e-3 0.93-0.95. The earlier
# defaults (full 5e-5, the others 1e-4) under-trained every method in short runs.
DEFAULT_LR = {
    ("sparsegrad", "mlp"): 3e-3,
    ("meprop", "mlp"): 3e-3,
    ("lora", "mlp"): 1e-2,
    ("full", "mlp"): 1e-3,
    ("sparsegrad", "all"): 5e-4,
    ("meprop", "all"): 5e-4,
    ("lora", "all"): 5e-4,
    ("full", "all"): 2e-4,
}


def default_score_steps(support: str) -> int:
    """Calibration batches re-run to score by default: a fixed support is chosen from them (2); with a dynamic one
    they would only report the energy shares, so they are skipped (0) to keep calibration a small part of a run."""
    return 2 if support == "fixed" else 0


def default_lr(method: str, train_scope: str = "mlp") -> float:
    """The default learning rate of a method in a scope (see `DEFAULT_LR`)."""
    try:
        return DEFAULT_LR[(method, train_scope)]
    except KeyError:
        raise ValueError(f"no default learning rate for method {method!r} in scope {train_scope!r}") from None


@dataclass
class PreparedModel:
    """A model set up for one method, and what the setup decided."""

    model: nn.Module
    method: str
    train_scope: str
    k: int
    """Entries per step of one MLP matrix (the mean when the matrices differ; full: all entries)."""
    k_per_matrix: dict[str, int]
    lora_rank: int | None
    lora_alpha: float | None
    calibration_time_s: float
    bases_report: dict[str, Any] | None
    description: str
    target_names: list[str]
    trainable_entries: int
    """Entries that train per step: SparseGrad/MeProp as `sg.count_parameters`, else the trainable numel."""
    total_params: int
    config: sg.SparseGradConfig | None = None
    bases: sg.SparseGradBases | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score_steps(self) -> int:
        """Calibration batches that were re-run to score (0 unless SparseGrad calibrated in this setup)."""
        return int(next(iter((self.bases_report or {}).values()), {}).get("score_steps", 0))

    def as_dict(self) -> dict[str, Any]:
        """The JSON-friendly facts of the setup (no model, no tensors)."""
        return {
            "method": self.method,
            "train_scope": self.train_scope,
            "k": self.k,
            "k_per_matrix": self.k_per_matrix,
            "lora_rank": self.lora_rank,
            "lora_alpha": self.lora_alpha,
            "calibration_time_s": round(self.calibration_time_s, 3),
            "bases_report": self.bases_report,
            "description": self.description,
            "target_modules_matched": self.target_names,
            "trainable_entries": self.trainable_entries,
            "total_params": self.total_params,
        }


def default_targets(model: nn.Module) -> str:
    """`sg.BERT_MLP_TARGETS` when the model has BERT-style MLP linears, `sg.LLAMA_MLP_TARGETS` for LLaMA-style."""
    names = [n for n, _ in model.named_modules()]
    for pattern in (sg.BERT_MLP_TARGETS, sg.LLAMA_MLP_TARGETS):
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    raise ValueError(
        "could not find BERT-style (layer.N.intermediate/output.dense) or LLaMA-style (layers.N.mlp.*_proj) MLP "
        "linears in the model; pass target_modules explicitly"
    )


def is_head_param(name: str, head_names: Iterable[str]) -> bool:
    """A parameter of the task head: one component of its dotted name is a head name (e.g. ``classifier``)."""
    parts = name.split(".")
    return any(h in parts for h in head_names)


def _apply_scope(model: nn.Module, targets: list[tuple[str, nn.Module]], train_scope: str,
                 head_names: Iterable[str]) -> None:
    """Set requires_grad for the scope: the target weights and biases, the head (and in 'all' everything)."""
    target_params = set()
    for _, module in targets:
        target_params.add(module.weight)
        if module.bias is not None:
            target_params.add(module.bias)
    head_names = tuple(head_names)
    found_head = False
    for name, p in model.named_parameters():
        head = is_head_param(name, head_names)
        found_head |= head
        p.requires_grad_(train_scope == "all" or p in target_params or head)
    if train_scope == "mlp" and head_names and not found_head:
        raise ValueError(
            f"no parameter of the model belongs to a head named {list(head_names)}: in 'mlp' scope the task head "
            "must train (pass head_names=...)"
        )


def _trainable_numel(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _total_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def lora_rank_for_budget(k: float, in_features: float, out_features: float) -> int:
    """The LoRA rank whose parameters per matrix, r * (in + out), come closest to k (at least 1)."""
    return max(1, int(round(k / (in_features + out_features))))


def prepare_method(
    model: nn.Module,
    method: str,
    *,
    budget_k: int | None = None,
    density: float | None = 0.01,
    support: str = "dynamic",
    train_scope: str = "mlp",
    target_modules: str | list[str] | None = None,
    calibration_batches: Iterable[Any] | None = None,
    calibration_steps: int | None = 2,
    score_steps: int | None = None,
    head_names: Iterable[str] = DEFAULT_HEAD_NAMES,
    basis_sharing: str = "kind",
    lora_rank: int | None = None,
    layers_to_transform: list[int] | None = None,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    progress: bool = False,
    bases: sg.SparseGradBases | None = None,
    calibration_options: dict[str, Any] | None = None,
) -> PreparedModel:
    """Set ``model`` up for ``method`` (in place, except that LoRA returns peft's wrapper as ``.model``).

    ``budget_k`` (entries per matrix per step) overrides ``density``. The same budget drives every method: the
    sparse methods train exactly k entries per matrix per step, LoRA gets the rank with r*(in+out) closest to k,
    and ``full`` trains all entries (its k is the matrix size). ``calibration_batches`` are needed by
    ``sparsegrad`` only (the first ``calibration_steps`` of them are used; ``score_steps`` of them are re-run
    to report the top-k energy shares and choose a fixed support, default `default_score_steps`). ``support`` applies to the sparse
    methods. ``bases`` (``sparsegrad`` only) skips the calibration and converts with these bases (a resumed run's).
    ``calibration_options`` are passed on to `sg.estimate_bases` (``grad_accum``, ``all_reduce_grads``); with
    ``all_reduce_grads`` rank 0's bases are then broadcast (`sparsegrad.bases.broadcast_bases`) so that every rank
    converts with identical bases. ``lora_rank`` overrides the matched rank. ``layers_to_transform`` (block indices) restricts the targets
    to those blocks for every method. An empty ``head_names`` means the model has no task head (a causal LM): in
    'mlp' scope only the method's MLP entries (and MLP biases) train. The learning rate is not part of the setup:
    build the optimizer with ``sg.create_optimizer(prepared.model, lr=...)`` for every method.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if train_scope not in SCOPES:
        raise ValueError(f"unknown train_scope {train_scope!r}; choose one of {', '.join(SCOPES)}")
    if lora_rank is not None and (not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer, got {lora_rank!r}")
    target_modules = target_modules if target_modules is not None else default_targets(model)
    config = sg.SparseGradConfig(
        target_modules=target_modules,
        k=budget_k,
        density=None if budget_k is not None else density,
        support=support,
        basis_sharing=basis_sharing,
        layers_to_transform=layers_to_transform,
        score_steps=default_score_steps(support) if score_steps is None else score_steps,
    )
    targets = find_targets(model, config)
    target_names = [n for n, _ in targets]
    budgets = {n: config.budget(*m.weight.shape, name=n) for n, m in targets}
    head_names = tuple(head_names)
    _apply_scope(model, targets, train_scope, head_names)
    n_mat = len(targets)
    mean_k = sum(budgets.values()) / n_mat
    budget_text = f"k={round(mean_k)}" + (f" (density {density:g})" if budget_k is None else "")
    scope_text = ("only these, their biases and the head train" if train_scope == "mlp"
                  else "every other parameter trains densely")
    if train_scope == "mlp" and not head_names:
        scope_text = "only these (and their biases) train, the rest of the model is frozen"

    calibration_time = 0.0
    report = None
    lora_r = lora_alpha = None
    k_per_matrix = dict(budgets)
    extra: dict[str, Any] = {}

    if method in ("sparsegrad", "meprop"):
        if method == "sparsegrad":
            if bases is None:
                if calibration_batches is None:
                    raise ValueError("method 'sparsegrad' needs calibration_batches (a few training batches)")
                options = dict(calibration_options or {})
                start = time.perf_counter()
                bases = sg.estimate_bases(model, config, calibration_batches, loss_fn=loss_fn,
                                          steps=calibration_steps, progress=progress, **options)
                if options.get("all_reduce_grads"):
                    from sparsegrad.bases import broadcast_bases

                    bases = broadcast_bases(bases, src=0)
                calibration_time = time.perf_counter() - start
            report = bases.report
            calib_steps = next(iter(report.values()), {}).get("steps")
            basis_text = f"HOSVD bases from {calib_steps} calibration steps" if calib_steps else "given HOSVD bases"
        else:
            bases = sg.identity_bases(model, config)
            basis_text = "identity bases (MeProp: top-k of the plain gradient)"
        sg.get_sparsegrad_model(model, config, bases, keep_requires_grad=True)  # the scope set requires_grad
        trainable, total = sg.count_parameters(model)
        description = (f"{method}: {n_mat} MLP matrices, {budget_text} entries each per step, {support} support, "
                       f"{basis_text}; scope {train_scope}: {scope_text}")
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        shapes = {m.weight.shape[1] + m.weight.shape[0] for _, m in targets}
        mean_in = sum(m.weight.shape[1] for _, m in targets) / n_mat
        mean_out = sum(m.weight.shape[0] for _, m in targets) / n_mat
        lora_r = lora_rank if lora_rank is not None else lora_rank_for_budget(mean_k, mean_in, mean_out)
        lora_alpha = float(lora_r)  # scale alpha / r = 1
        keep = {p for p in model.parameters() if p.requires_grad} - {m.weight for _, m in targets}
        # peft ignores layers_to_transform for a regex: name the chosen modules instead.
        lora_targets = target_names if layers_to_transform is not None else target_modules
        lora_cfg = LoraConfig(r=lora_r, lora_alpha=lora_r, lora_dropout=0.0, target_modules=lora_targets,
                              bias="none", modules_to_save=None)
        with quiet_peft():
            model = get_peft_model(model, lora_cfg)
        for p in keep:  # peft froze everything but LoRA: give back the scope's biases, head (and the rest in 'all')
            p.requires_grad_(True)
        wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
        if len(wrapped) != n_mat:
            raise RuntimeError(f"peft wrapped {len(wrapped)} modules, the target pattern matches {n_mat}")
        k_per_matrix = {n: lora_r * (m.weight.shape[0] + m.weight.shape[1]) for n, m in targets}
        extra["lora_matched_k"] = round(mean_k)
        trainable, total = _trainable_numel(model), _total_numel(model)
        per = sorted(set(k_per_matrix.values()))
        dims = "/".join(str(s) for s in sorted(shapes))
        description = (f"lora: rank {lora_r} (lora_alpha {lora_r}, scale 1.0, no dropout) on {n_mat} MLP matrices: "
                       f"r*(in+out) = {lora_r}*{dims} = {'/'.join(map(str, per))} parameters per matrix, matched to "
                       f"{budget_text}; scope {train_scope}: {scope_text}")
    else:  # full
        k_per_matrix = {n: m.weight.numel() for n, m in targets}
        trainable, total = _trainable_numel(model), _total_numel(model)
        description = (f"full: {n_mat} MLP matrices train densely (every entry every step; the sparse budget would "
                       f"be {budget_text}); scope {train_scope}: {scope_text}")

    k_mean = round(sum(k_per_matrix.values()) / len(k_per_matrix))
    return PreparedModel(
        model=model,
        method=method,
        train_scope=train_scope,
        k=k_mean,
        k_per_matrix=k_per_matrix,
        lora_rank=lora_r,
        lora_alpha=lora_alpha,
        calibration_time_s=calibration_time,
        bases_report=report,
        description=description,
        target_names=target_names,
        trainable_entries=trainable,
        total_params=total,
        config=config,
        bases=bases,
        extra=extra,
    )


@contextlib.contextmanager
def quiet_peft():
    """Hide the FutureWarning peft 0.21 triggers by calling a transformers 5 method deprecated in favour of another
    (``is_gradient_checkpointing``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def base_param_name(name: str) -> str:
    """A parameter or module name as the unwrapped base model spells it (drops peft's ``base_model.model.``
    prefix and ``.base_layer`` component)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".").removesuffix(".base_layer")


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers of a wrapped model, by base-model module name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and "default" in getattr(module, "lora_A", {}):
            out[base_param_name(name)] = module
    return out


@torch.no_grad()
def lora_delta(module: nn.Module) -> torch.Tensor:
    """The merged update B @ A * scale of one peft LoRA layer (adapter "default"), fp32."""
    a = module.lora_A["default"].weight.float()
    b = module.lora_B["default"].weight.float()
    return (b @ a) * float(module.scaling["default"])

"""What every fine-tuning method shares: the `Method` protocol, the setup inputs (`Setup`) and result (`Prepared`),
target selection and the training scope, and the one table of default learning rates.

Scope (what else trains besides the method's MLP entries):

* ``mlp``: only the method's MLP entries, the MLP biases and the task head (a classifier's ``classifier`` /
  ``score``; a causal LM has none); everything else is frozen.
* ``all`` (the paper's protocol): every non-MLP parameter trains normally, the MLP matrices train by the method.

Every method sets ``requires_grad`` on every parameter itself once the model is set up (`apply_scope`), so nothing
depends on what a conversion leaves trainable.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

import sparsegrad as sg
from sparsegrad.io import atomic_write_bytes
from sparsegrad.finetune.choices import DEFAULT_LR, KIND_LABELS, SCOPES, default_lr, lr_help  # noqa: F401 (re-exported)
from sparsegrad.experts import ExpertView
from sparsegrad.matrices import LinearView
from sparsegrad.targets import find_targets, resolve
from sparsegrad.targets import mlp_target_modules as default_targets  # the core's MLP registry, one source

DEFAULT_HEAD_NAMES = sg.CLASSIFICATION_HEADS  # the core's list: one source
TRAINED_PARAMS_FILE = "trained_params.safetensors"

def default_score_steps(support: str) -> int:
    """Calibration batches re-run to score by default: a fixed support is chosen from them (2); with a dynamic one
    they would only report the energy shares, so they are skipped (0) to keep calibration a small part of a run."""
    return 2 if support == "fixed" else 0


@dataclass
class Setup:
    """The inputs of `Method.prepare` (see `sparsegrad.finetune.methods.prepare_method` for their meaning)."""

    budget_k: int | None = None
    density: float | None = 0.01
    support: str = "dynamic"
    train_scope: str = "mlp"
    target_modules: str | list[str] | None = None
    calibration_batches: Iterable[Any] | None = None
    calibration_steps: int | None = 2
    score_steps: int | None = None
    head_names: tuple[str, ...] = DEFAULT_HEAD_NAMES
    basis_sharing: str = "kind"
    lora_rank: int | None = None
    layers_to_transform: list[int] | None = None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    progress: bool = False
    bases: sg.SparseGradBases | None = None
    calibration_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prepared:
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

    @property
    def score_steps(self) -> int:
        """Calibration batches that were re-run to score (0 unless SparseGrad calibrated in this setup)."""
        return int(next(iter((self.bases_report or {}).values()), {}).get("score_steps", 0))


def own_weight(module: Any) -> nn.Parameter:
    """The model's Parameter behind a target `find_targets` returned."""
    if isinstance(module, ExpertView):
        return module.source._parameters[module.param_name]
    return module.source.weight if isinstance(module, LinearView) else module.weight


@dataclass
class Targets:
    """The target MLP matrices of a setup and the texts that describe the budget and the scope."""

    config: sg.SparseGradConfig
    modules: list[tuple[str, nn.Module]]
    budgets: dict[str, int]
    budget_text: str
    scope_text: str

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.modules]

    @property
    def mean_k(self) -> float:
        return sum(self.budgets.values()) / len(self.budgets)

    def weights(self) -> set[nn.Parameter]:
        """The target weights as the model's own Parameters: a view's source weight (Conv1D) or fused 3-D
        parameter (experts), not the detached view."""
        return {own_weight(m) for _, m in self.modules}

    def params(self) -> set[nn.Parameter]:
        """The target weights and biases."""
        return self.weights() | {m.bias for _, m in self.modules if m.bias is not None}

    def refuse_experts(self, method: str) -> None:
        """Methods that train modules (full, lora) cannot take one expert of a fused 3-D experts parameter."""
        experts = [n for n, m in self.modules if isinstance(m, ExpertView)]
        if experts:
            raise ValueError(f"method {method!r} cannot train fused MoE expert matrices ({experts[0]}, ...): use "
                             "sparsegrad or meprop, or narrow --target-modules to the dense MLP linears")


class Method:
    """One way of training the MLP matrices. A new baseline is one subclass in its own module plus one line in
    `sparsegrad.finetune.methods.METHODS`."""

    name: str = ""
    calibrates: bool = False
    """Calibrates bases (SparseGrad): the calibration settings, basis refresh and bases in checkpoints apply."""
    sparse: bool = False
    """Trains k entries per matrix (``support`` applies)."""
    takes_lora_rank: bool = False
    """``lora_rank`` applies."""
    dense: bool = False
    """Trains whole matrices: its adapter is as large as the matrices it trains."""

    def prepare(self, model: nn.Module, setup: Setup) -> Prepared:
        raise NotImplementedError

    def save(self, prepared: Prepared, folder: Path, extra_files: dict[str, bytes]) -> None:
        """Write the adapter files and ``extra_files`` (name -> bytes, e.g. ``task.json``) into ``folder`` (a fresh
        temporary folder); the sidecar files must be covered by the adapter's checksums."""
        raise NotImplementedError

    def load(self, base: nn.Module, folder: Path, *, merge: bool) -> nn.Module:
        """``base`` with the adapter in ``folder`` applied (merged into plain weights with ``merge``)."""
        raise NotImplementedError

    def snapshot(self, prepared: Prepared) -> Any:
        """What `entries_updated` compares against, taken before training (nothing by default)."""
        return None

    def entries_updated(self, prepared: Prepared, snapshot: Any) -> int:
        """Distinct entries of the adapted MLP matrices that training changed."""
        raise NotImplementedError

    def on_step(self, step: int, prepared: Prepared, upcoming: list[Any], optimizer: Any, cfg: Any) -> float | None:
        """Called before each optimizer step with the batches from this one on; returns the seconds of any work it
        did (a basis refresh), else None."""
        return None

    def check(self, cfg: Any) -> None:
        """Refuse settings that do not apply to this method (raise ValueError naming the flag)."""
        if cfg.refresh_every is not None and not self.calibrates:
            raise ValueError(f"refresh_every applies to the sparsegrad method only, not {self.name!r}")
        if cfg.lora_rank is not None and not self.takes_lora_rank:
            raise ValueError("lora_rank applies to the lora method only")
        if getattr(cfg, "layerwise_step", False) and not self.sparse:
            raise ValueError(f"--layerwise-step applies to the sparsegrad and meprop methods only, not {self.name!r}")


# ------------------------------------------------------------------------------------------------- targets, scope
def block_indices(model: nn.Module, every_nth_block: int | None) -> list[int] | None:
    """Blocks 0, n, 2n, ... of the model (``None``: every block)."""
    if every_nth_block is None:
        return None
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError("every_nth_block needs config.num_hidden_layers")
    return list(range(0, n_layers, every_nth_block))


def is_head_param(name: str, head_names: Iterable[str]) -> bool:
    """A parameter of the task head: one component of its dotted name is a head name (e.g. ``classifier``)."""
    parts = name.split(".")
    return any(h in parts for h in head_names)


def apply_scope(model: nn.Module, method_params: set[nn.Parameter], train_scope: str,
                head_names: Iterable[str]) -> None:
    """Set ``requires_grad`` of every parameter: the method's own (``method_params``), the head, and in scope
    'all' everything else too."""
    head_names = tuple(head_names)
    found_head = False
    for name, p in model.named_parameters():
        head = is_head_param(name, head_names)
        found_head |= head
        p.requires_grad_(train_scope == "all" or p in method_params or head)
    if train_scope == "mlp" and head_names and not found_head:
        raise ValueError(
            f"no parameter of the model belongs to a head named {list(head_names)}: in 'mlp' scope the task head "
            "must train (pass head_names=...)"
        )


def select_targets(model: nn.Module, setup: Setup) -> Targets:
    """The SparseGrad config and target matrices of a setup (every method uses the same ones), with the scope
    applied to the unconverted model."""
    if setup.train_scope not in SCOPES:
        raise ValueError(f"unknown train_scope {setup.train_scope!r}; choose one of {', '.join(SCOPES)}")
    if setup.lora_rank is not None and (not isinstance(setup.lora_rank, int) or setup.lora_rank < 1):
        raise ValueError(f"lora_rank must be a positive integer, got {setup.lora_rank!r}")
    config = resolve(sg.SparseGradConfig(
        target_modules=setup.target_modules,
        k=setup.budget_k,
        density=None if setup.budget_k is not None else setup.density,
        support=setup.support,
        basis_sharing=setup.basis_sharing,
        layers_to_transform=setup.layers_to_transform,
        score_steps=default_score_steps(setup.support) if setup.score_steps is None else setup.score_steps,
    ), model)
    modules = find_targets(model, config)
    budgets = {n: config.budget(*m.weight.shape, name=n) for n, m in modules}
    mean_k = sum(budgets.values()) / len(modules)
    budget_text = f"k={round(mean_k)}" + (f" (density {setup.density:g})" if setup.budget_k is None else "")
    if setup.train_scope == "all":
        scope_text = "every other parameter trains densely"
    elif setup.head_names:
        scope_text = "only these, their biases and the head train"
    else:
        scope_text = "only these (and their biases) train, the rest of the model is frozen"
    targets = Targets(config, modules, budgets, budget_text, scope_text)
    apply_scope(model, targets.params(), setup.train_scope, setup.head_names)
    return targets


def trainable_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def total_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def prepared(model: nn.Module, method: "Method", setup: Setup, targets: Targets, k_per_matrix: dict[str, int],
             description: str, trainable: int, total: int, **fields: Any) -> Prepared:
    """The `Prepared` record of a setup (the fields every method fills the same way)."""
    return Prepared(model=model, method=method.name, train_scope=setup.train_scope,
                    k=round(sum(k_per_matrix.values()) / len(k_per_matrix)), k_per_matrix=k_per_matrix,
                    lora_rank=fields.pop("lora_rank", None), lora_alpha=fields.pop("lora_alpha", None),
                    calibration_time_s=fields.pop("calibration_time_s", 0.0),
                    bases_report=fields.pop("bases_report", None), description=description,
                    target_names=targets.names, trainable_entries=trainable, total_params=total,
                    config=targets.config, **fields)


# ------------------------------------------------------------------------------------------------- shared helpers
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


def mlp_matrices(model: nn.Module, target_names: list[str]) -> dict[str, torch.Tensor]:
    """The current weight of every target MLP matrix, by base-model module name (works on peft wrappers,
    converted SparseGrad models and plain models)."""
    base = unwrap_peft(model)
    out = {}
    for name in target_names:
        module = base.get_submodule(name)
        module = getattr(module, "base_layer", module)
        out[name] = module.weight
    return out


def trained_params(model: nn.Module, skip: set[int] = frozenset()) -> dict[str, torch.Tensor]:
    """Every trainable parameter (not in ``skip``), by base-model name, detached contiguous CPU copies."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in skip:
            out[base_param_name(name)] = p.detach().cpu().contiguous().clone()
    return out


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    """Sidecar files (name -> bytes) of an adapter whose own format has no place for them (LoRA, full)."""
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)

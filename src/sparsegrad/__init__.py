"""sparsegrad: SparseGrad fine-tuning of Transformer MLP blocks (Chekalina et al., EMNLP 2024).

Calibrate HOSVD bases of the MLP weight gradients, swap the MLP matrices (found per model type, `MLP_TARGETS`) for
`SparseGradLinear`, train exactly k entries of each rotated weight per step, merge back to the model's own modules. The core imports only torch, safetensors
and tqdm; the fine-tuning product (data, bundled models, baselines, CLI) lives in `sparsegrad.finetune`.
"""

import importlib
import importlib.util

# Where each public name lives. The submodules import torch, so they load on first use (PEP 562): `sparsegrad
# --help` and a usage error then cost no torch import; `sg.get_sparsegrad_model` and `from sparsegrad import X`
# work as before.
_HOME = {
    "adapter": ("load_adapter", "read_adapter", "save_adapter"),
    "bases": ("SparseGradBases", "broadcast_bases", "estimate_bases", "factors_from_gram", "identity_bases"),
    "config": ("BERT_MLP_TARGETS", "LLAMA_MLP_TARGETS", "SparseGradConfig"),
    "layer": ("SparseGradLinear", "topk_energy_share", "topk_indices"),
    "layerwise": ("enable_layerwise_step",),
    "model": ("CLASSIFICATION_HEADS", "count_parameters", "get_sparsegrad_model", "merge_and_unload",
              "print_trainable_parameters", "refresh_bases", "sparsegrad_layers", "training_state_bytes"),
    "optim": ("SparseGradAdamW", "create_optimizer", "sparse_adam_update"),
    "targets": ("MLP_TARGETS", "mlp_target_modules"),
}
_MODULE_OF = {name: module for module, names in _HOME.items() for name in names}

__version__ = "0.1.0"

__all__ = [
    "BERT_MLP_TARGETS",
    "CLASSIFICATION_HEADS",
    "LLAMA_MLP_TARGETS",
    "MLP_TARGETS",
    "SparseGradAdamW",
    "SparseGradBases",
    "SparseGradConfig",
    "SparseGradLinear",
    "broadcast_bases",
    "count_parameters",
    "create_optimizer",
    "enable_layerwise_step",
    "estimate_bases",
    "factors_from_gram",
    "get_sparsegrad_model",
    "identity_bases",
    "load_adapter",
    "merge_and_unload",
    "mlp_target_modules",
    "print_trainable_parameters",
    "read_adapter",
    "refresh_bases",
    "save_adapter",
    "sparse_adam_update",
    "sparsegrad_layers",
    "topk_energy_share",
    "topk_indices",
    "training_state_bytes",
]


def __getattr__(name: str):
    """A public name (or a submodule, `sg.targets`) on first use."""
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULE_OF])

"""sparsegrad: SparseGrad fine-tuning of Transformer MLP blocks (Chekalina et al., EMNLP 2024).

Calibrate HOSVD bases of the MLP weight gradients, swap the MLP matrices (found per model type, `MLP_TARGETS`) for
`SparseGradLinear`, train exactly k entries of each rotated weight per step, merge back to the model's own modules. The core imports only torch, safetensors
and tqdm; the fine-tuning product (data, bundled models, baselines, CLI) lives in `sparsegrad.finetune`.
"""

from .adapter import load_adapter, read_adapter, save_adapter
from .bases import SparseGradBases, broadcast_bases, estimate_bases, factors_from_gram, identity_bases
from .config import BERT_MLP_TARGETS, LLAMA_MLP_TARGETS, SparseGradConfig
from .layer import SparseGradLinear, topk_energy_share, topk_indices
from .model import (
    CLASSIFICATION_HEADS,
    count_parameters,
    get_sparsegrad_model,
    merge_and_unload,
    print_trainable_parameters,
    refresh_bases,
    sparsegrad_layers,
    training_state_bytes,
)
from .optim import SparseGradAdamW, create_optimizer, sparse_adam_update
from .targets import MLP_TARGETS, mlp_target_modules

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

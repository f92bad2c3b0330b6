"""Checks of a run's settings against its files and its model's config.json, before any model loads: the data
files are regular files, the model folder is a model folder, and the budget fits the MLP matrices (``--k`` at most
their entries, ``--lora-rank`` at most their smallest dimension). The same checks run again, exactly, once the
model is loaded (`sparsegrad.config.SparseGradConfig.budget`, `methods.lora`); these only say it sooner, in the
flags' words, and let `compare` refuse a bad setting once instead of in every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import file_problem
from .errors import UsageError
from .model_kind import model_config

_BERT = ("hidden_size", "intermediate_size")
MLP_DIM_KEYS: dict[str, tuple[str, str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "mpnet",
                     "megatron-bert", "data2vec-text", "roberta-prelayernorm", "xlm-roberta-xl", "llama", "mistral",
                     "qwen2", "qwen3", "gemma", "gemma2", "granite", "olmo", "olmo2", "cohere", "smollm3",
                     "helium", "phi", "gpt_neox"), _BERT),
    "distilbert": ("dim", "hidden_dim"),
    "opt": ("hidden_size", "ffn_dim"),
    **dict.fromkeys(("gpt2", "gptj"), ("n_embd", "n_inner")),
    **dict.fromkeys(("t5", "mt5", "umt5"), ("d_model", "d_ff")),
}
"""config.json keys of (hidden size, MLP inner size) of the families whose default MLP targets are all hidden x
inner matrices (the mixture-of-experts families are left to the check after loading)."""


def check_data_file(path: str | None, flag: str) -> None:
    """``--train-file``/``--eval-file`` is a regular file (else: "no such file", "is a directory, ...", "is not a
    regular file (a FIFO)", "is a symlink loop")."""
    problem = None if path is None else file_problem(path)
    if problem is not None:
        raise UsageError(f"{flag} {path}: {problem}")


def mlp_shape(config: dict[str, Any]) -> tuple[int, int] | None:
    """(hidden, inner) of the MLP matrices a config.json describes, or None when its family is not in the table."""
    keys = MLP_DIM_KEYS.get(config.get("model_type"))
    if keys is None:
        return None
    hidden, inner = config.get(keys[0]), config.get(keys[1])
    if inner is None and keys[1] == "n_inner" and isinstance(hidden, int):
        inner = 4 * hidden  # GPT-2 and GPT-J: n_inner null means 4 x n_embd
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, inner)):
        return None
    return hidden, inner


def config_of(model: str | None) -> dict[str, Any]:
    """config.json of a model folder or of a bundled model on disk ({} when there is none to read yet)."""
    from .models import bundled_model_folder

    try:
        folder = bundled_model_folder(model)
    except (OSError, ImportError):  # a bundled package missing: loading the model says so
        return {}
    return model_config(folder) if folder is not None else {}


def check_positions(model: str | None, max_length: int) -> None:
    """``--max-length`` within the model's positions (config.json's ``max_position_embeddings``/``n_positions``),
    as `tasks.base.check_positions` checks on the loaded model."""
    config = config_of(model)
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if isinstance(positions, int) and not isinstance(positions, bool) and max_length > positions:
        raise UsageError(f"--max-length {max_length} exceeds the {positions} positions of {model or 'minilm'} "
                         f"(config.json): give --max-length <= {positions}")


def check_budget(model: str | None, *, k: int | None = None, lora_rank: int | None = None,
                 target_modules: str | None = None) -> None:
    """``--k`` and ``--lora-rank`` fit the default MLP matrices of ``model`` (read from its config.json; nothing is
    checked here for a custom ``--target-modules``, an unknown family or a bundled model not on disk yet)."""
    if target_modules is not None or (k is None and lora_rank is None):
        return
    shape = mlp_shape(config_of(model))
    if shape is None:
        return
    hidden, inner = shape
    where = f"the {hidden}x{inner} MLP matrices of {model or 'minilm'} (config.json)"
    if k is not None and k > hidden * inner:
        raise UsageError(f"--k {k} exceeds the {hidden * inner:,d} entries of {where}: give --k <= "
                         f"{hidden * inner} or a --density")
    if lora_rank is not None and lora_rank > min(hidden, inner):
        raise UsageError(f"--lora-rank {lora_rank} exceeds the smallest dimension ({min(hidden, inner)}) of {where}: "
                         f"give --lora-rank <= {min(hidden, inner)}")


def check_data(cfg: Any) -> None:
    """The data files of ``cfg`` (a FinetuneConfig) read as its task kind reads them before its model, where the
    kind can without one (a classifier's split; a causal LM's examples need its tokenizer)."""
    from .tasks import KINDS

    check = getattr(KINDS[cfg.task_kind], "check_data", None)
    if check is not None and cfg.train_file is not None:
        check(cfg)

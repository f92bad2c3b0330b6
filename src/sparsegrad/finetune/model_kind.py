"""What a model folder holds, read from its config.json without importing torch or transformers: a causal LM or a
model that gets a sequence-classification head (a leaf module: the CLI checks its arguments with it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CAUSAL_LM_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "LMHeadModel")
"""``architectures`` names of causal LMs in config.json (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
ENCODER_MODEL_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                       "mpnet", "camembert", "modernbert", "t5", "mt5", "umt5", "bart", "mbart")
"""Model types that are no causal LM when config.json names no architecture (encoders, encoder-decoders)."""


def model_config(name_or_path: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict ({} when it has none or it is not a JSON object)."""
    try:
        info = json.loads((Path(name_or_path).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def is_causal_lm(name_or_path: str | None) -> bool:
    """True for ``smollm2`` and for a local folder whose config.json names a causal-LM architecture (e.g.
    ``LlamaForCausalLM``, ``GPT2LMHeadModel``, ``MixtralForCausalLM``) or, without ``architectures``, a
    ``model_type`` that is no encoder's (`ENCODER_MODEL_TYPES`)."""
    if name_or_path is None or str(name_or_path) == "minilm":
        return False
    if str(name_or_path) == "smollm2":
        return True
    info = model_config(name_or_path)
    archs = [str(a) for a in info.get("architectures") or []]
    if archs:
        return any(a.endswith(CAUSAL_LM_ARCHITECTURE_SUFFIXES) for a in archs)
    model_type = info.get("model_type")
    return isinstance(model_type, str) and model_type not in ENCODER_MODEL_TYPES


def model_folder_problem(path: str | Path) -> str | None:
    """Why the folder ``path`` is no Hugging Face model folder (it holds no config.json), or None. Checked before
    transformers reads it: without config.json it asks for a tokenizer backend (sentencepiece) instead."""
    folder = Path(path).expanduser()
    if (folder / "config.json").is_file():
        return None
    if (folder / "adapter_config.json").is_file():
        hint = " (it holds adapter_config.json: an adapter; give the base model it was trained on)"
    elif not any(folder.iterdir()):
        hint = " (the folder is empty)"
    else:
        hint = ""
    return f"holds no config.json: not a Hugging Face model folder{hint}"

"""Task kinds: sequence classification (`classify`) and causal language modelling (`causal_lm`). `task_for` picks
the kind of a run, `load_base_model` rebuilds the base model an adapter's task.json names."""

from __future__ import annotations

from typing import Any

from .. import lm
from ..choices import TASK_NAMES
from . import causal_lm, classify
from .base import Task, usage_errors
KINDS = {classify.KIND: classify, causal_lm.KIND: causal_lm}


def is_causal_lm_run(cfg: Any) -> bool:
    """A decoder task, prompt/response columns, or a causal-LM model."""
    if cfg.train_file is None and cfg.task in lm.LM_TASKS:
        return True
    if getattr(cfg, "prompt_column", None) or getattr(cfg, "response_column", None):
        return True
    return lm.is_causal_lm(cfg.model)


def task_for(cfg: Any) -> Task:
    """The task of a run (`FinetuneConfig`)."""
    return causal_lm.CausalLMTask(cfg) if is_causal_lm_run(cfg) else classify.ClassificationTask(cfg)


def kind_of_info(info: dict[str, Any]) -> str:
    """The task kind task.json records (files written before there were kinds are classifiers)."""
    return info.get("model_kind") or classify.KIND


def load_base_model(name: str | None, info: dict[str, Any]):
    """(base model, tokenizer) of an adapter, as its task.json describes it; problems become UsageError."""
    module = KINDS[kind_of_info(info)]
    name = name or info["model"]
    with usage_errors(f"cannot load model {name!r}: "):
        return module.load_model(name, info)


__all__ = ["KINDS", "TASK_NAMES", "Task", "is_causal_lm_run", "kind_of_info", "load_base_model", "task_for"]

"""Causal language modelling: bbc-instruct, shakespeare or prompt/response files (`sparsegrad.finetune.lm`),
scored by held-out loss (perplexity) and, for chat tasks, the exact match of greedy answers."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import lm
from ..selection import carve_lm, lm_learning_check
from .base import check_positions, cost_lines, selection_lines, usage_errors

KIND = "causal-lm"


class CausalLMTask:
    kind = KIND
    untrained_loss_is_reference = True
    learning_check = staticmethod(lm_learning_check)
    head_names: tuple[str, ...] = ()
    default_model = "smollm2"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.name = cfg.task_name

    def load(self, cfg: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """The model first: its tokenizer shapes the examples."""
        name = cfg.model or self.default_model
        with usage_errors(f"cannot load causal LM {name!r}: "):
            model, tokenizer = lm.load_causal_lm(name, dtype=dtype)
        if not lm.is_causal_lm(name) and not type(model).__name__.endswith("ForCausalLM"):
            raise lm.UsageError(f"{name!r} is not a causal LM")
        check_positions(model, cfg.max_length)
        if cfg.train_file is None and cfg.task not in lm.LM_TASKS:
            raise lm.UsageError(f"{name!r} is a causal LM: use --task {' or '.join(lm.LM_TASKS)}, or a "
                                "prompt/response --train-file")
        with usage_errors():
            self.data = lm.load_lm_data(tokenizer, task=cfg.task, train_file=cfg.train_file, eval_file=cfg.eval_file,
                                        prompt_column=cfg.prompt_column, response_column=cfg.response_column,
                                        max_length=cfg.max_length, seed=cfg.seed, eval_fraction=cfg.eval_fraction,
                                        max_train=cfg.max_train, max_eval=cfg.max_eval)
        self.val, self.val_source = [], None
        if cfg.val_fraction and len(self.data.train) > 1:
            self.data.train, self.val, self.val_source = carve_lm(self.data.train, self.data.spare,
                                                                  cfg.val_fraction, cfg.seed)
        self.name = cfg.task_name  # the data's name, or --task-name
        self.tokenizer = tokenizer
        self.pad_id = lm.pad_token_id(tokenizer)
        model.config.use_cache = False  # training; generation turns it back on
        return model, tokenizer

    @property
    def num_train(self) -> int:
        return len(self.data.train)

    val_metrics = ("loss",)
    default_metric_for_best = "loss"

    @property
    def num_val(self) -> int:
        return len(self.val)

    def evaluate_val(self, model: nn.Module) -> dict[str, Any]:
        """Loss and perplexity on the validation examples (spare text, else carved from the training data)."""
        result = lm.evaluate_loss(model, self.val, self.pad_id)
        return {"loss": result["eval_loss"], "perplexity": result["eval_perplexity"]}

    def summary(self) -> str:
        return self.data.summary()

    def train_batches(self, epoch: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return lm.make_lm_batches(self.data.train, batch_size=batch_size, pad_id=self.pad_id, shuffle=True,
                                  seed=self.cfg.seed, epoch=epoch)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """Target tokens: the model's loss is the mean over the shifted labels that are not -100."""
        return int((batch["labels"][:, 1:] != lm.IGNORE_INDEX).sum())

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        result = lm.evaluate_loss(model, self.data.eval, self.pad_id)
        exact, samples = None, []
        if self.data.kind == "chat":
            model.config.use_cache = True
            exact, records = lm.score_generation(model, self.tokenizer, self.data.eval)
            samples = records[:5]
        return {"eval_loss": result["eval_loss"], "eval_perplexity": result["eval_perplexity"],
                "eval_exact_match": exact, "eval_tokens": result["eval_tokens"], "eval_samples": samples}

    def task_info(self) -> dict[str, Any]:
        return {"model_kind": KIND, "data_kind": self.data.kind}

    def describe(self) -> dict[str, Any]:
        train = self.data.train
        return {"model_kind": KIND, "data_kind": self.data.kind, "num_train": len(train),
                "num_eval": len(self.data.eval), "num_val": self.num_val,
                "val_source": self.val_source, "prompt_format": self.data.prompt_format,
                "truncated_examples": self.data.truncated, "duplicates_dropped": self.data.duplicates_dropped,
                "train_tokens_per_step_mean": (sum(len(e.input_ids) for e in train) / max(1, len(train))
                                               * self.cfg.batch_size)}

    def summary_lines(self, m: dict[str, Any]) -> list[str]:
        quality = (f"held-out loss {m['eval_loss']:.4f} (perplexity {m['eval_perplexity']:.2f}) on "
                   f"{m['eval_tokens']:,d} tokens")
        if m.get("eval_exact_match") is not None:
            quality = f"exact match {m['eval_exact_match']:.4f} on {m['num_eval']} held-out examples, " + quality
        blocks = "all blocks" if m.get("layers_to_transform") is None else f"blocks {m['layers_to_transform']}"
        lines = [f"{m['method']} on {m['task']} with {m['model']} ({m['dtype']}, {blocks}; seed {m['seed']}, "
                 f"{m['train_steps']} steps of {m.get('global_batch_size', m['batch_size'])}, lr {m['lr']:g}, "
                 f"scope {m['train_scope']}):", f"  {quality}"]
        lines += [f"  e.g. reference {s['reference']!r}, generated {s['generated']!r}"
                  for s in m.get("eval_samples", [])[:2]]
        costs = cost_lines(m)
        return lines[:2] + selection_lines(m) + costs[:2] + lines[2:] + costs[2:]


def load_model(name: str | None, info: dict[str, Any], dtype: torch.dtype | None = None):
    """(causal LM, tokenizer) as task.json records it (its weight dtype unless ``dtype`` is given)."""
    return lm.load_lm_model(name or "smollm2", info.get("dtype", "float32")) if dtype is None else \
        lm.load_causal_lm(name or "smollm2", dtype=dtype)


def merged_lines(info: dict[str, Any], adapter: Any, output: Any) -> list[str]:
    """What `sparsegrad merge` prints for a causal LM's adapter: what was merged, and how to load it."""
    return [f"merged {info['method']} adapter {adapter} into {info['model']} ({info['task']}) -> {output}",
            f"load it with: AutoModelForCausalLM.from_pretrained({str(output)!r})"]

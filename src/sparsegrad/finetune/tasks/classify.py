"""Sequence classification: bundled tasks (bbc, tweets) or CSV/TSV/JSONL files (`sparsegrad.finetune.data`),
scored by accuracy, macro-F1 and loss against the majority-class baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .. import data as D
from .. import metrics as M
from ..methods import DEFAULT_HEAD_NAMES
from ..models import load_classifier
from ..selection import carve_classification, classifier_learning_check
from .base import check_positions, cost_lines, selection_lines, rows, usage_errors

KIND = "classifier"


class ClassificationTask:
    kind = KIND
    untrained_loss_is_reference = False
    learning_check = staticmethod(classifier_learning_check)
    head_names = DEFAULT_HEAD_NAMES
    default_model = "minilm"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.name = cfg.task_name
        self.data: D.TextClassificationData | None = None

    def load(self, cfg: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """The split first (its labels size the head), then the model; the head is initialised from the seeded
        torch RNG."""
        with usage_errors():
            self.data = load_split(cfg)
            self.val_texts, self.val_labels, self.val_source = carve_validation(self.data, cfg)
        self.name = cfg.task_name  # the data's name, or --task-name
        with usage_errors(f"cannot load model {cfg.model or self.default_model!r}: "):
            model, tokenizer = load_model(cfg.model, self.task_info_of(self.data), dtype)
        check_positions(model, cfg.max_length)
        self.tokenizer = tokenizer
        self.train_enc = D.tokenize(tokenizer, self.data.train_texts, cfg.max_length)
        return model, tokenizer

    @property
    def num_train(self) -> int:
        return len(self.data.train_texts)

    val_metrics = ("loss", "accuracy", "macro_f1")
    default_metric_for_best = "accuracy"  # a lower loss at a few hundred rows rewards confidence, not correctness

    @property
    def num_val(self) -> int:
        return len(self.val_labels)

    def evaluate_val(self, model: nn.Module) -> dict[str, Any]:
        """Loss, accuracy and macro-F1 on the validation split (carved from the training data)."""
        batches = D.make_batches(self.tokenizer, self.val_texts, self.val_labels, batch_size=self.cfg.eval_batch_size,
                                 max_length=self.cfg.max_length, shuffle=False)
        result = M.evaluate(model, batches)
        return {"loss": result["eval_loss"], "accuracy": result["eval_accuracy"], "macro_f1": result["eval_macro_f1"]}

    def summary(self) -> str:
        return self.data.summary()

    def train_batches(self, epoch: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        return D.make_batches(self.tokenizer, self.train_enc, self.data.train_labels, batch_size=batch_size,
                              max_length=self.cfg.max_length, shuffle=True, seed=self.cfg.seed, epoch=epoch)

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        return rows(batch)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        batches = D.make_batches(self.tokenizer, self.data.eval_texts, self.data.eval_labels,
                                 batch_size=self.cfg.eval_batch_size, max_length=self.cfg.max_length, shuffle=False)
        result = M.evaluate(model, batches)
        return {"eval_accuracy": result["eval_accuracy"], "eval_macro_f1": result["eval_macro_f1"],
                "eval_loss": result["eval_loss"],
                "majority_baseline_accuracy": M.majority_baseline(self.data.train_labels, self.data.eval_labels)}

    @staticmethod
    def task_info_of(data: D.TextClassificationData) -> dict[str, Any]:
        return {"num_labels": data.num_labels, "label_names": list(data.label_names)}

    def task_info(self) -> dict[str, Any]:
        return self.task_info_of(self.data)

    def describe(self) -> dict[str, Any]:
        return {"num_train": len(self.data.train_texts), "num_eval": len(self.data.eval_texts),
                "num_val": self.num_val, "val_source": self.val_source,
                **self.task_info(), "duplicates_dropped": self.data.duplicates_dropped}

    def summary_lines(self, m: dict[str, Any]) -> list[str]:
        return [
            f"{m['method']} on {m['task']} (seed {m['seed']}, {m['train_steps']} steps of "
            f"{m.get('global_batch_size', m['batch_size'])}, lr {m['lr']:g}, scope {m['train_scope']}):",
            f"  eval accuracy {m['eval_accuracy']:.4f}, macro-F1 {m['eval_macro_f1']:.4f}, loss {m['eval_loss']:.4f} "
            f"on {m['num_eval']} held-out examples (majority class: {m['majority_baseline_accuracy']:.4f})",
            *selection_lines(m), *cost_lines(m),
        ]


def load_split(cfg: Any, **override: Any) -> D.TextClassificationData:
    """The run's train/eval split: its files, or a bundled task (``override``: e.g. ``max_train=None``)."""
    sizes = {"max_train": cfg.max_train, "max_eval": cfg.max_eval, **override}
    if cfg.train_file is not None:
        data = D.load_files(cfg.train_file, cfg.eval_file, text_column=cfg.text_column, label_column=cfg.label_column,
                            seed=cfg.seed, eval_fraction=cfg.eval_fraction, **sizes)
    else:
        data = D.load_task(cfg.task, seed=cfg.seed, eval_fraction=cfg.eval_fraction, **sizes)
    data.check_trainable(sizes["max_train"])
    return data


def check_data(cfg: Any) -> None:
    """The run's split read as `ClassificationTask.load` reads it, without a model (compare, before its runs)."""
    with usage_errors():
        load_split(cfg)


def carve_validation(data: D.TextClassificationData, cfg: Any) -> tuple[list[str], list[int], str | None]:
    """(val texts, val labels, source) of ``cfg.val_fraction`` (see `selection.carve_classification`); the rows of
    ``data`` outside a ``max_train`` subset are the spare rows. ``data``'s training rows are cut only without them."""
    if not cfg.val_fraction:
        return [], [], None
    spare_t: list[str] = []
    spare_y: list[int] = []
    if cfg.max_train is not None:
        pool = load_split(cfg, max_train=None)
        used = set(data.train_texts)
        spare = [(t, y) for t, y in zip(pool.train_texts, pool.train_labels) if t not in used]
        spare_t, spare_y = [t for t, _ in spare], [y for _, y in spare]
    tr_t, tr_y, val_t, val_y, source = carve_classification(data.train_texts, data.train_labels, spare_t, spare_y,
                                                            cfg.val_fraction, cfg.seed)
    data.train_texts, data.train_labels = tr_t, tr_y
    return val_t, val_y, source


def load_model(name: str | None, info: dict[str, Any], dtype: torch.dtype | None = None):
    """(classifier, tokenizer) for the labels in ``info`` (task.json's ``num_labels``, ``label_names``), weights in
    ``dtype`` (default: task.json's ``dtype``, the weights the adapter was trained on)."""
    dtype = dtype or getattr(torch, info.get("dtype", "float32"))
    return load_classifier(name, info["num_labels"], label_names=info.get("label_names"), dtype=dtype)


def merged_lines(info: dict[str, Any], adapter: Any, output: Any) -> list[str]:
    """What `sparsegrad merge` prints for a classifier's adapter: what was merged, and how to load it."""
    labels = ", ".join(str(n) for n in info.get("label_names") or [])
    return [f"merged {info['method']} adapter {adapter} into {info['model']} ({info.get('num_labels')} labels: "
            f"{labels}) -> {output}",
            f"load it with: AutoModelForSequenceClassification.from_pretrained({str(output)!r})"]

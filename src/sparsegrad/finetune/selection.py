"""Validation-based choices of a run: the validation split, evaluation every N steps, the best step's trained state
(restored before the adapter is written, ``load_best_model_at_end`` in HF terms), early stopping, and the check that
a run learned at all.

The validation split is carved from the training data, never from the eval (test) split, which the loop reads once,
at the end. A classifier's split is stratified; when the run trains on a subset (``max_train``, e.g. the CLI's 512
BBC articles) it comes from the training rows outside that subset, so the training data stay exactly what they were
without validation; otherwise it is cut from the training rows themselves. A causal LM's is a seeded share of its
training examples.

Resume: the evaluation history and the best-so-far state are part of every checkpoint (``best_state.safetensors``
beside the model state), so a resumed run picks and restores the same step as an uninterrupted one; a checkpoint
written before validation existed resumes without a validation split.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import data as D
from .checkpoint import load_trainable_state, trainable_state
from .choices import DEFAULT_VAL_FRACTION, VAL_METRICS  # noqa: F401 (re-exported)
from .errors import UsageError
from .ranking import pick

MAJORITY_MARGIN = 0.01
"""A classifier within this of the majority-class accuracy did not learn."""
F1_RATIO = 0.5
"""... nor one whose macro-F1 is under this share of its accuracy (it predicts a few classes only)."""
TRY_HINT = "try more steps (--epochs, --max-steps), --lr auto, or --train-scope all"


# ------------------------------------------------------------------------------------------------- the split
def val_size(num_train: int, fraction: float, num_classes: int = 1) -> int:
    return max(num_classes, int(round(num_train * fraction)))


def carve_classification(train_texts: list[str], train_labels: list[int], spare_texts: list[str],
                         spare_labels: list[int], fraction: float, seed: int
                         ) -> tuple[list[str], list[int], list[str], list[int], str]:
    """(train texts, train labels, val texts, val labels, source): a stratified, seeded validation split of
    ``val_size`` rows from the spare rows (source ``spare``; training unchanged) when there are enough, else from
    the training rows (source ``train``)."""
    n_classes = len(set(train_labels))
    n_val = val_size(len(train_labels), fraction, n_classes)
    rng = random.Random(f"sparsegrad-val:{seed}")
    if len(spare_labels) >= n_val and len(set(spare_labels)) == n_classes:
        groups = D.shuffled_by_class(range(len(spare_labels)), spare_labels, rng)
        keep = D.take_stratified(groups, n_val)
        return (train_texts, train_labels, [spare_texts[i] for i in keep], [spare_labels[i] for i in keep], "spare")
    tr, va = D.stratified_split(train_labels, fraction, seed=rng.randrange(2**32))
    return ([train_texts[i] for i in tr], [train_labels[i] for i in tr], [train_texts[i] for i in va],
            [train_labels[i] for i in va], "train")


def carve_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded ``fraction`` of ``examples`` (a causal LM's; at least one stays in training)."""
    n_val = min(val_size(len(examples), fraction), len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(f"sparsegrad-val:{seed}").shuffle(order)
    held = set(order[:n_val])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def carve_lm(train: list, spare: Callable[[int], list] | None, fraction: float, seed: int) -> tuple[list, list, str]:
    """(train, val, source) of a causal LM: ``val_size`` examples from ``spare(n)`` (source ``spare``; training
    unchanged) when it has enough, else a seeded carve of ``train`` (source ``train``). Spare text is preferred
    because it is as far from the training text as the held-out split is: Shakespeare chunks carved from the
    training regions share their scenes and speakers (their perplexity was 41 where the held-out regions' was
    57-71; docs/benchmarks.md "shakespeare, scope all")."""
    n_val = val_size(len(train), fraction)
    val = spare(n_val) if spare is not None else []
    if len(val) >= n_val:
        return train, val, "spare"
    kept, val = carve_examples(train, fraction, seed)
    return kept, val, "train"


# ------------------------------------------------------------------------------------------------- selection
@dataclass
class Selection:
    """Evaluations on the validation split during training and the best one's trained state."""

    metric: str
    every: int
    total_steps: int
    patience: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int | None = None
    best_value: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0
    stopped_early_at: int | None = None
    untrained: dict[str, Any] | None = None

    @classmethod
    def of(cls, cfg: Any, task: Any, steps_per_epoch: int, total_steps: int) -> "Selection | None":
        if not cfg.val_fraction or task.num_val == 0:
            return None
        metric = cfg.metric_for_best or task.default_metric_for_best
        if metric not in task.val_metrics:
            raise UsageError(f"metric_for_best {metric!r} does not apply to a {task.kind} run; choose "
                             f"from {', '.join(task.val_metrics)}")
        return cls(metric, cfg.eval_every or steps_per_epoch, total_steps, cfg.early_stopping_patience)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def better(self, scores: dict[str, Any]) -> bool:
        """Whether ``scores`` beat the best so far by `ranking.pick` (the rule ``--lr auto`` ranks rates by: within
        the metric's tie band the lower loss wins; a full tie keeps the earlier step)."""
        best = self.best_scores()
        if not best:
            return True
        new = {"step": math.inf, **scores}
        return pick([best, new], self.metric, "loss", order="step") is new

    def observe(self, step: int, scores: dict[str, Any], model: nn.Module) -> bool:
        """Record the validation ``scores`` at ``step``; keep the state if best. Returns whether to stop early."""
        self.history.append({"step": step, **scores})
        value = float(scores[self.metric])
        if math.isfinite(value) and self.better(scores):
            self.best_step, self.best_value, self.bad_evals = step, value, 0
            self.best_state = trainable_state(model)
            return False
        self.bad_evals += 1
        if self.patience is not None and self.bad_evals >= self.patience and step < self.total_steps:
            self.stopped_early_at = step
            return True
        return False

    def forget_best(self) -> None:
        """A basis refresh folded the delta into the weights: earlier states cannot be restored any more."""
        self.best_step = self.best_value = self.best_state = None
        self.bad_evals = 0

    def restore_best(self, model: nn.Module, last_step: int) -> None:
        if self.best_state is not None and self.best_step != last_step:
            load_trainable_state(model, self.best_state, f"the best step's state (step {self.best_step})")

    def best_scores(self) -> dict[str, Any]:
        return next((h for h in self.history if h["step"] == self.best_step), {})

    # checkpoints: the record goes into trainer_state.json, the best state into its own file
    def record(self) -> dict[str, Any]:
        return {"history": self.history, "best_step": self.best_step, "best_value": self.best_value,
                "bad_evals": self.bad_evals, "untrained": self.untrained}

    def restore(self, record: dict[str, Any] | None, best_state: dict[str, torch.Tensor] | None) -> None:
        if not record:
            return
        self.history = list(record.get("history") or [])
        self.best_step, self.best_value = record.get("best_step"), record.get("best_value")
        self.bad_evals = int(record.get("bad_evals") or 0)
        self.untrained = record.get("untrained")
        self.best_state = best_state

    def metrics(self) -> dict[str, Any]:
        """The metrics.json fields: ``val_*`` of the restored (best) step, the best step and the eval history."""
        best = self.best_scores()
        out = {f"val_{k}": v for k, v in best.items() if k != "step"}
        return {**out, "val_metric_for_best": self.metric, "val_best_step": self.best_step,
                "val_eval_every": self.every, "val_history": self.history,
                "early_stopping_patience": self.patience, "stopped_early_at_step": self.stopped_early_at,
                "val_untrained_loss": (self.untrained or {}).get("loss")}


# ------------------------------------------------------------------------------------------------- did it learn
def lm_learning_check(quality: dict[str, Any], val: dict[str, Any]) -> tuple[bool | None, str]:
    """(did_not_learn, reason) of a causal LM: the best validation loss not below the untrained model's (None when
    there is no validation split)."""
    before, after = val.get("val_untrained_loss"), val.get("val_loss")
    if before is None or after is None:
        return None, "no validation split: the untrained loss is not measured (set --val-fraction > 0)"
    if after >= before:
        return True, f"validation loss {after:.4f} is not below the untrained model's {before:.4f}"
    return False, f"validation loss {after:.4f} < untrained {before:.4f}"


def classifier_learning_check(quality: dict[str, Any], val: dict[str, Any]) -> tuple[bool | None, str]:
    """(did_not_learn, reason) of a classifier: accuracy at most the majority-class rate + `MAJORITY_MARGIN`, or
    macro-F1 under `F1_RATIO` x accuracy."""
    acc, f1, base = quality["eval_accuracy"], quality["eval_macro_f1"], quality["majority_baseline_accuracy"]
    if acc <= base + MAJORITY_MARGIN:
        return True, f"accuracy {acc:.4f} is at or near the majority-class rate {base:.4f}"
    if f1 < F1_RATIO * acc:
        return True, f"macro-F1 {f1:.4f} is under {F1_RATIO:g} x accuracy {acc:.4f} (a few classes predicted only)"
    return False, f"accuracy {acc:.4f} > majority class {base:.4f} + {MAJORITY_MARGIN:g}, macro-F1 {f1:.4f}"


def warning_line(reason: str) -> str:
    return f"sparsegrad: warning: the run did not learn: {reason}; {TRY_HINT}"


def validate(task: Any, model: nn.Module, precision: Any) -> dict[str, Any]:
    """The task's validation scores of ``model`` now (eval mode, no grad; the training mode is restored)."""
    with precision.autocast():
        return task.evaluate_val(model)


def run_metrics(selection: "Selection | None", learning_check: Any, quality: dict[str, Any], val_fraction: float
                ) -> dict[str, Any]:
    """metrics.json's validation and did-not-learn fields; prints the warning when the run did not learn."""
    import sys

    val = selection.metrics() if selection is not None else {}
    did_not_learn, reason = learning_check(quality, val)
    if did_not_learn:
        print(warning_line(reason), file=sys.stderr, flush=True)
    return {"val_fraction": val_fraction, **val, "did_not_learn": did_not_learn, "did_not_learn_reason": reason}

"""The `Task` protocol: what the one training loop (`sparsegrad.finetune.loop`) asks of a task kind.

The loop never asks which kind it runs: it loads the task (model, tokenizer, data), takes seeded batches per
epoch, weighs each micro-batch (``loss_weight``: rows for a classifier, target tokens for a causal LM, so that the
accumulated gradient is the gradient of one larger batch), evaluates, and merges what the task records
(``task_info`` into task.json, ``describe`` into metrics.json) with the run's own fields.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from ..errors import UsageError


class Task(Protocol):
    kind: str
    """``classifier`` or ``causal-lm``: the learning-rate table, task.json and the report columns use it."""
    name: str
    head_names: tuple[str, ...]
    """Parameters that train in scope 'mlp' besides the method's (a classifier's head; none for a causal LM)."""
    default_model: str

    def load(self, cfg: Any, dtype: torch.dtype) -> tuple[nn.Module, Any]:
        """Load the model (weights in ``dtype``) and the data; returns (model, tokenizer)."""

    @property
    def num_train(self) -> int: ...

    val_metrics: tuple[str, ...]
    """The keys of ``evaluate_val`` a best step may be chosen by."""
    default_metric_for_best: str
    """The one of ``val_metrics`` that picks the best step and ``--lr auto``'s rate unless --metric-for-best says."""
    untrained_loss_is_reference: bool
    """The did-not-learn check compares the validation loss with the untrained model's (one extra validation pass
    at step 0); a classifier compares with the majority class instead."""

    def learning_check(self, quality: dict[str, Any], val: dict[str, Any]) -> tuple[bool | None, str]:
        """(did_not_learn, reason) from the held-out ``quality`` and the validation fields ``val``."""

    @property
    def num_val(self) -> int:
        """Examples of the validation split (carved from the training data; 0 without one)."""

    def evaluate_val(self, model: nn.Module) -> dict[str, Any]:
        """Validation scores (``loss`` and the task's ``val_metrics``) of the model as it is now."""

    def summary(self) -> str:
        """One line about the data, logged at the start."""

    def train_batches(self, epoch: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
        """Every training batch of ``epoch``, in a permutation fixed by (seed, epoch)."""

    def loss_weight(self, batch: dict[str, torch.Tensor]) -> float:
        """What the model's mean loss on ``batch`` averages over (rows or target tokens)."""

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Held-out metrics (``eval_*`` keys) of the trained model, on the model's device."""

    def task_info(self) -> dict[str, Any]:
        """The task's fields of task.json (with the run's fields, enough to rebuild the model with `load_model`;
        ``dtype`` there is the dtype of the weights the adapter was trained on)."""

    def describe(self) -> dict[str, Any]:
        """The task's fields of metrics.json (data sizes, labels or prompt format)."""

    def summary_lines(self, metrics: dict[str, Any]) -> list[str]:
        """The CLI's closing lines for a run."""


@contextlib.contextmanager
def usage_errors(prefix: str = ""):
    """Input problems (a bad file, a missing package, an unreadable model folder) become one-line UsageErrors."""
    try:
        yield
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"{prefix}{exc}") from None


def rows(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def check_positions(model: nn.Module, max_length: int) -> None:
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and max_length > max_pos:
        raise UsageError(f"max_length {max_length} exceeds the model's {max_pos} positions")


VAL_SOURCE_WORDS = {"train": "carved from training", "spare": "from data training never sees; training unchanged"}
"""How the summary names a validation split's source (metrics.json ``val_source``)."""


def selection_lines(m: dict[str, Any]) -> list[str]:
    """The validation line (best step restored, early stop, the lr auto pick) of a run's summary."""
    if m.get("val_best_step") is None:
        return []
    source = VAL_SOURCE_WORDS.get(m.get("val_source"), "carved from training")
    line = (f"  validation ({m['num_val']} rows {source}): best {m['val_metric_for_best']} "
            f"{m['val_' + m['val_metric_for_best']]:.4f} at step {m['val_best_step']} (the adapter holds that step)")
    if m.get("stopped_early_at_step"):
        line += f", stopped early at step {m['stopped_early_at_step']}"
    if m.get("lr_search"):
        line += f"; lr auto picked {m['lr_search']['picked_lr']:g} in {m['lr_search']['time_s']:.0f} s"
    return [line]


def cost_lines(m: dict[str, Any]) -> list[str]:
    """The cost lines every run's summary ends with."""
    from ..metrics import human_bytes

    calib = f", calibration {m['calibration_time_s']:.1f} s" if m["calibration_time_s"] else ""
    gpu = f", peak GPU memory {m['peak_gpu_memory_mb']:.0f} MB" if m.get("peak_gpu_memory_mb") else ""
    out = m["output_dir"]
    return [
        f"  median step {m['step_time_median_s']:.3f} s, training {m['train_time_s']:.1f} s{calib}, "
        f"peak RSS {m['peak_rss_mb']:.0f} MB{gpu}, training state "
        f"{human_bytes((m.get('train_state_bytes') or {}).get('total'))}",
        f"  entries per step {m['trainable_entries']:,d}, MLP entries ever updated {m['entries_updated']:,d} of "
        f"{m['mlp_entries']:,d}, adapter {human_bytes(m['adapter_bytes'])}",
        f"  files: {out}/metrics.json, {out}/loss.csv, {out}/adapter/",
    ]

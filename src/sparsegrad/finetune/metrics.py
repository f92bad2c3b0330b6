"""Evaluation and bookkeeping: accuracy, macro-F1, majority baseline, peak RSS, mean ± std.

The metrics are computed by hand (no scikit-learn needed); macro-F1 follows scikit-learn's definition
(unweighted mean of per-class F1 over the classes that occur in the labels or the predictions; a class with no
true or predicted example would get F1 0, but such classes are not averaged).
"""

from __future__ import annotations

import math
import resource
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .choices import REFERENCE_METHOD


def accuracy(labels: Sequence[int], preds: Sequence[int]) -> float:
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    if not labels:
        raise ValueError("accuracy of an empty set")
    return sum(int(a == b) for a, b in zip(labels, preds)) / len(labels)


def macro_f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    """Unweighted mean over classes (those present in labels or predictions) of 2·TP / (2·TP + FP + FN)."""
    if len(labels) != len(preds):
        raise ValueError(f"{len(labels)} labels but {len(preds)} predictions")
    if not labels:
        raise ValueError("macro-F1 of an empty set")
    classes = sorted(set(labels) | set(preds))
    scores = []
    for c in classes:
        tp = sum(1 for y, p in zip(labels, preds) if y == c and p == c)
        fp = sum(1 for y, p in zip(labels, preds) if y != c and p == c)
        fn = sum(1 for y, p in zip(labels, preds) if y == c and p != c)
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return sum(scores) / len(scores)


def majority_baseline(train_labels: Sequence[int], eval_labels: Sequence[int]) -> float:
    """Accuracy on ``eval_labels`` of always predicting the most frequent training class."""
    if not train_labels or not eval_labels:
        raise ValueError("majority baseline needs training and eval labels")
    majority = Counter(train_labels).most_common(1)[0][0]
    return sum(1 for y in eval_labels if y == majority) / len(eval_labels)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Eval mode, no grad: mean cross-entropy over examples, accuracy, macro-F1 and the predictions.

    The model's training mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels: list[int] = []
    preds: list[int] = []
    loss_sum = 0.0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            y = batch["labels"].to(device)
            logits = model(**inputs).logits.float()
            loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            labels.extend(y.tolist())
            preds.extend(logits.argmax(-1).tolist())
    finally:
        model.train(was_training)
    if not labels:
        raise ValueError("evaluation got no examples")
    return {
        "eval_accuracy": accuracy(labels, preds),
        "eval_macro_f1": macro_f1(labels, preds),
        "eval_loss": loss_sum / len(labels),
        "eval_examples": len(labels),
        "predictions": preds,
    }


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def median(values: Sequence[float]) -> float:
    values = sorted(float(v) for v in values)
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_mean_std(values: Sequence[float | None], fmt: str) -> str:
    """'mean ± std' of the values that are not None (just the mean for one value, '—' for none)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:{fmt}} ± {std:{fmt}}" if len(values) > 1 else f"{mean:{fmt}}"


def mean_or_none(values: Sequence[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def write_run_checks(w, all_runs: Sequence[dict], keys: Sequence[str], shared_by_seed: str, failed: Sequence[str],
                     results: dict[str, list[dict]], methods: Sequence[str]) -> tuple[str | None, float | None]:
    """The lines every compare report writes after its data paragraph: a warning if the runs differ in ``keys``
    (else what they share: ``shared_by_seed`` names what runs of one seed also share) and the failed runs.
    Returns the reference method for step-time ratios (LoRA when present) and its mean median step."""
    if all_runs:
        differ = [k for k in keys if len({str(m.get(k)) for m in all_runs}) > 1]
        if differ:
            w(f"**Warning: runs differ in {', '.join(differ)}; the comparison is not like for like.**\n\n")
        else:
            w("All runs share the data, the number of steps and the batch size; runs of one seed also share the "
              f"{shared_by_seed}.\n\n")
    if failed:
        w(f"**Failed runs:** {', '.join(failed)} (see their run.log).\n\n")
    ref_label = REFERENCE_METHOD if REFERENCE_METHOD in results else (methods[0] if methods else None)
    ref_time = mean_or_none([m["step_time_median_s"] for m in results.get(ref_label, [])]) if ref_label else None
    return ref_label, ref_time

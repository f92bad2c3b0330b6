"""Which validation score is the better one: one rule for the best step of a run (`selection`) and the best rate
of ``--lr auto`` (`lr_search`, and benchmarks/quality.py), so that a run never keeps a step by one score and picks
its rate by another.

The highest metric wins (a classifier's accuracy by default, or macro-F1); scores within `METRIC_TIE` of the best
tie, and the lower validation loss breaks the tie, then the earlier point (the lower rate, the earlier step). A
lower-is-better metric (a loss or a perplexity): the lowest value, with no tie band. Not the loss first for a
classifier: on BBC the loss preferred a rate whose runs were unstable across seeds (docs/quality/).
"""

from __future__ import annotations

import math
from typing import Any

METRIC_TIE = 0.005
"""Validation metrics this close tie (one row in 200): the lower validation loss then decides."""
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
"""Metric names (without a ``val_`` / ``eval_`` prefix) where the smaller value is the better one."""


def lower_is_better(metric: str) -> bool:
    """Whether the smaller value of ``metric`` (``loss``, ``val_perplexity``, ``eval_accuracy``, ...) is better."""
    return metric.removeprefix("val_").removeprefix("eval_") in LOWER_IS_BETTER


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pick(points: list[dict[str, Any]], metric: str, loss: str, tie: float = METRIC_TIE, order: str = "lr"
         ) -> dict[str, Any] | None:
    """The best of ``points`` by ``metric`` (the rule above); ``order``: the key that breaks a full tie (lowest
    wins). Points without a finite metric are never picked; None when no point has one."""
    usable = [p for p in points if finite(p.get(metric))]
    if not usable:
        return None
    def loss_of(p: dict[str, Any]) -> float:
        return p[loss] if finite(p.get(loss)) else math.inf
    if lower_is_better(metric):
        return min(usable, key=lambda p: (p[metric], loss_of(p), p[order]))
    best = max(p[metric] for p in usable)
    tied = [p for p in usable if best - p[metric] <= tie + 1e-12]  # 1e-12: 0.940 - 0.935 is 0.00500000001
    return min(tied, key=lambda p: (loss_of(p), p[order]))

"""``--lr auto``: the learning rate chosen on the validation split, per method.

The grid is three half-decades around the method's default (`methods.default_lr`: default / sqrt(10), default,
default x sqrt(10)). Each point is a short run of a quarter of the run's steps (at least one; same data, seed,
calibration and schedule shape, no files written, the test split never read), scored on the validation split.
The highest validation metric wins (a classifier's accuracy, or ``--metric-for-best`` when that is accuracy or
macro-F1; a causal LM has only its loss, and the lowest wins); points within `METRIC_TIE` of the best tie, and the
lower validation loss (then the lower rate) breaks the tie. Not the loss first: on BBC the loss preferred a rate
whose runs were unstable across seeds (docs/quality/). The full run then trains at the pick. Cost: about 3/4 of one
run's training steps more, plus three calibrations and model loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from .errors import TrainingDiverged
from .methods import default_lr

GRID_FACTORS = (10 ** -0.5, 1.0, 10 ** 0.5)
PROBE_SHARE = 4
"""Each grid point trains for 1/PROBE_SHARE of the run's steps."""
RECORD_FILE = "lr_search.json"
METRIC_TIE = 0.005
"""Validation metrics this close tie (one row in 200): the lower validation loss then decides."""
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})
"""Metric names (without a ``val_`` / ``eval_`` prefix) where the smaller value is the better one."""


def lower_is_better(metric: str) -> bool:
    """Whether the smaller value of ``metric`` (``loss``, ``val_perplexity``, ``eval_accuracy``, ...) is better."""
    return metric.removeprefix("val_").removeprefix("eval_") in LOWER_IS_BETTER


def probe_steps(total_steps: int) -> int:
    return max(1, math.ceil(total_steps / PROBE_SHARE))


def grid(center: float) -> list[float]:
    return [float(f"{center * f:.3g}") for f in GRID_FACTORS]


def probe_config(cfg: Any, lr: float) -> Any:
    """The settings of one grid point: this lr, no checkpoints, no early stop, quiet."""
    return dataclasses.replace(cfg, lr=lr, lr_auto=False, save_every=None, stop_after=None, resume=None,
                               early_stopping_patience=None, eval_every=None, progress=False, verbose=False)


def rank_metric(cfg: Any) -> str:
    """The validation metric the grid is ranked by: ``metric_for_best`` when it is a score, else a classifier's
    accuracy; a causal LM's loss (its only validation score)."""
    if cfg.metric_for_best != "loss":
        return cfg.metric_for_best
    return "accuracy" if cfg.task_kind == "classifier" else "loss"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pick(points: list[dict[str, Any]], metric: str, loss: str, tie: float = METRIC_TIE) -> dict[str, Any] | None:
    """The point with the highest ``metric``; points within ``tie`` of the best tie, and the lowest ``loss``, then
    the lowest ``lr``, wins among them. A lower-is-better ``metric`` (a loss or a perplexity, `lower_is_better`):
    the lowest value, with no tie band (then the lowest ``loss``, then ``lr``). Points without a finite metric are
    never picked; None when no point has one. Shared by ``--lr auto`` and benchmarks/quality.py."""
    usable = [p for p in points if _finite(p.get(metric))]
    if not usable:
        return None
    if lower_is_better(metric):
        return min(usable, key=lambda p: (p[metric], p[loss] if _finite(p.get(loss)) else math.inf, p["lr"]))
    best = max(p[metric] for p in usable)
    tied = [p for p in usable if best - p[metric] <= tie + 1e-12]  # 1e-12: 0.940 - 0.935 is 0.00500000001
    return min(tied, key=lambda p: (p[loss] if _finite(p.get(loss)) else math.inf, p["lr"]))


def search(cfg: Any, run_probe: Callable[[Any], dict[str, Any]], log: Callable[..., None] = print
           ) -> tuple[Any, dict[str, Any]]:
    """(cfg with the picked ``lr``, the record metrics.json keeps). ``run_probe(cfg)`` trains one grid point and
    returns its validation metrics."""
    start = time.perf_counter()
    center = default_lr(cfg.method, cfg.train_scope, cfg.task_kind)
    points = []
    for lr in grid(center):
        t0 = time.perf_counter()
        try:
            result = run_probe(probe_config(cfg, lr))
            point = {"lr": lr, **{k: v for k, v in result.items() if k.startswith("val_") and k != "val_history"},
                     "train_steps": result.get("train_steps")}
        except TrainingDiverged as exc:
            point = {"lr": lr, "val_loss": None, "diverged": str(exc).split(":")[0]}
        point["seconds"] = round(time.perf_counter() - t0, 3)
        points.append(point)
        log(f"lr auto: lr {lr:g}: validation loss {point.get('val_loss')}"
            + (f", accuracy {point['val_accuracy']:.4f}" if point.get("val_accuracy") is not None else "")
            + (f", macro-F1 {point['val_macro_f1']:.4f}" if point.get("val_macro_f1") is not None else ""))
    metric = rank_metric(cfg)
    best = pick(points, "val_" + metric, "val_loss") or points[0]  # every point diverged: the lowest rate
    criterion = ("lowest validation loss (ties: lower lr)" if metric == "loss" else
                 f"highest validation {metric} (within {METRIC_TIE:g}: lower validation loss, then lower lr)")
    record = {"grid": points, "picked_lr": best["lr"], "default_lr": center, "probe_share": 1 / PROBE_SHARE,
              "criterion": criterion, "metric": metric, "metric_tie": METRIC_TIE,
              "time_s": round(time.perf_counter() - start, 3)}
    log(f"lr auto: picked lr {best['lr']:g} (default {center:g}; {criterion}) in {record['time_s']:.1f} s")
    return dataclasses.replace(cfg, lr=best["lr"]), record


def read_record(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

"""``--lr auto``: the learning rate chosen on the validation split, per method.

The grid is three half-decades around the method's default (`methods.default_lr`: default / sqrt(10), default,
default x sqrt(10)). Each point is a short run of 1/`choices.LR_AUTO_PROBE_SHARE` of the run's steps (at least
one; same data, seed, calibration and schedule shape, no files written, the test split never read), scored on the
validation split.
The points are ranked by `ranking.pick` on the score each probe kept its best step by (``--metric-for-best``;
by default a classifier's accuracy, a causal LM's loss): the same rule and score as the run's own best step. The
full run then trains at the pick. Cost: 3/`LR_AUTO_PROBE_SHARE` runs' training steps more, plus three calibrations
and model loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from .choices import LR_AUTO_PROBE_SHARE
from .errors import TrainingDiverged
from .methods import default_lr
from .ranking import METRIC_TIE, finite, lower_is_better, pick

GRID_FACTORS = (10 ** -0.5, 1.0, 10 ** 0.5)
RECORD_FILE = "lr_search.json"


def probe_steps(total_steps: int) -> int:
    return max(1, math.ceil(total_steps / LR_AUTO_PROBE_SHARE))


def grid(center: float) -> list[float]:
    return [float(f"{center * f:.3g}") for f in GRID_FACTORS]


def probe_config(cfg: Any, lr: float) -> Any:
    """The settings of one grid point: this lr, no checkpoints, no early stop, quiet."""
    return dataclasses.replace(cfg, lr=lr, lr_auto=False, save_every=None, stop_after=None, resume=None,
                               early_stopping_patience=None, eval_every=None, progress=False, verbose=False)


def ranked_by(points: list[dict[str, Any]]) -> str:
    """The validation metric the grid is ranked by: the one each probe's run chose its best step by
    (``val_metric_for_best``, `selection.Selection`), so the rate and the kept step follow one score; the loss when
    every probe diverged."""
    return next((p["val_metric_for_best"] for p in points if p.get("val_metric_for_best")), "loss")


def grid_edge(points: list[dict[str, Any]], best: dict[str, Any], metric: str) -> str | None:
    """``"highest"`` / ``"lowest"`` when the pick is the grid's end point and it won on its score (not a fallback
    where every point diverged, nor a tie of every point broken by the loss: then the edge says nothing)."""
    scored = [p for p in points if finite(p.get(metric))]
    if len(scored) < 2 or (len({p[metric] for p in scored}) == 1 and not lower_is_better(metric)):
        return None
    if best is points[-1]:
        return "highest"
    return "lowest" if best is points[0] else None


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
    metric = ranked_by(points)
    best = pick(points, "val_" + metric, "val_loss") or points[0]  # every point diverged: the lowest rate
    criterion = ("lowest validation loss (ties: lower lr)" if metric == "loss" else
                 f"highest validation {metric} (within {METRIC_TIE:g}: lower validation loss, then lower lr)")
    edge = grid_edge(points, best, "val_" + metric)
    record = {"grid": points, "picked_lr": best["lr"], "default_lr": center, "probe_share": 1 / LR_AUTO_PROBE_SHARE,
              "criterion": criterion, "metric": metric, "metric_tie": METRIC_TIE, "grid_edge": edge,
              "time_s": round(time.perf_counter() - start, 3)}
    log(f"lr auto: picked lr {best['lr']:g} (default {center:g}; {criterion}) in {record['time_s']:.1f} s")
    if edge:
        beyond = best["lr"] * (GRID_FACTORS[-1] if edge == "highest" else GRID_FACTORS[0])
        log(f"lr auto: note: the pick is the grid's {edge} rate, so the best may lie beyond it (try --lr "
            f"{beyond:.3g} beside it); short probes tend to favour higher rates than a full run's best")
    return dataclasses.replace(cfg, lr=best["lr"]), record


def read_record(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / RECORD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

"""``sparsegrad compare``: methods x seeds on identical data, budget and steps (`run`), one report for every task
kind (`report`)."""

from .report import COLORS, loss_panel, plot_comparison, read_loss, save_figure, write_results_md
from .run import (
    METHOD_LABELS,
    base_method,
    collect,
    common_finetune_args,
    parse_lrs,
    parse_methods,
    parse_seeds,
    run_compare,
)

__all__ = ["COLORS", "METHOD_LABELS", "base_method", "collect", "common_finetune_args", "loss_panel", "parse_lrs", "parse_methods",
           "parse_seeds", "plot_comparison", "read_loss", "run_compare", "save_figure", "write_results_md"]

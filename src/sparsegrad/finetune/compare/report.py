"""``sparsegrad compare`` reports: ``results.md`` and ``comparison.png`` from every run's ``metrics.json``. The
quality columns come from the runs' task kind (classifier: accuracy, macro-F1, loss; causal LM: exact match and
held-out loss, or perplexity); the cost columns are shared."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from sparsegrad.io import atomic_write_bytes

from ..choices import REFERENCE_METHOD
from ..metrics import format_mean_std as _ms
from ..metrics import human_bytes, mean_std, write_run_checks
from ..metrics import mean_or_none as _mean

SEQUENTIAL = "sequential runs, not interleaved: load may differ"
"""compare runs one method after another: their step times were measured under whatever load each met."""

COLORS = {"full": "#4c4c4c", "lora": "#1f77b4", "meprop": "#ff7f0e", "sparsegrad": "#2ca02c",
          "sparsegrad-fixed": "#98df8a", "meprop-fixed": "#ffbb78"}


def is_lm_run(m: dict[str, Any]) -> bool:
    return m.get("model_kind") == "causal-lm"


def run_summary(m: dict[str, Any]) -> str:
    """The one-line result `compare` prints after a run."""
    if not is_lm_run(m):
        return (f"accuracy {m['eval_accuracy']:.4f}, macro-F1 {m['eval_macro_f1']:.4f}, "
                f"median step {m['step_time_median_s']:.3f} s")
    if m.get("eval_exact_match") is not None:
        quality = f"exact match {m['eval_exact_match']:.4f}, held-out loss {m['eval_loss']:.4f}"
    else:
        quality = f"held-out perplexity {m['eval_perplexity']:.3f} (loss {m['eval_loss']:.4f})"
    return f"{quality}, median step {m['step_time_median_s']:.3f} s"


def summary_table(w, results: dict[str, list[dict[str, Any]]], methods: list[str], quality_headers: list[str],
                  quality, ref_label: str, ref_time: float | None) -> None:
    """The per-method summary table: the task kind's quality columns, then the shared cost columns."""
    cols = ["method", "runs", *quality_headers, "lr", "median step (s)", f"step time / {ref_label} (sequential)", "peak RSS (MB)",
            "train state", "entries / step", "entries ever updated", "adapter"]
    w("| " + " | ".join(cols) + " |\n")
    w("|" + "---|" * len(cols) + "\n")
    for label in methods:
        runs = results.get(label, [])
        if not runs:
            w(f"| {label} | 0 |" + " — |" * (len(cols) - 2) + "\n")
            continue
        w(summary_row(label, runs, quality(runs), ref_time))
    w(f"Step times and their ratio come from {SEQUENTIAL} between runs.\n\n")


def summary_row(label: str, runs: list[dict[str, Any]], quality: list[str], ref_time: float | None) -> str:
    """One method's row of the summary table: its quality cells (from the task kind), then the shared cost cells."""
    t = _mean([m["step_time_median_s"] for m in runs])
    ratio = f"{t / ref_time:.2f}" if ref_time and t is not None else "—"
    state = _mean([(m.get("train_state_bytes") or {}).get("total") for m in runs])
    upd = _mean([m["entries_updated"] for m in runs])
    share = upd / runs[0]["mlp_entries"] if upd is not None and runs[0].get("mlp_entries") else None
    updated = f"{upd:,.0f}" + (f" ({100 * share:.2f}%)" if share is not None else "")
    cells = [label, str(len(runs)), *quality, "/".join(f"{x:g}" for x in sorted({m["lr"] for m in runs})),
             _ms([m["step_time_median_s"] for m in runs], ".3f"), ratio,
             f"{_mean([m['peak_rss_mb'] for m in runs]):.0f}", human_bytes(state),
             f"{_mean([m['trainable_entries'] for m in runs]):,.0f}", updated,
             human_bytes(_mean([m["adapter_bytes"] for m in runs]))]
    return "| " + " | ".join(cells) + " |\n"


def spread(results: dict[str, list[dict[str, Any]]], labels: list[str], stds: list[float]) -> list[float] | None:
    """Error bars for bars of these methods: the std over seeds, or none when each method ran one seed."""
    return stds if any(len(results[label]) > 1 for label in labels) else None


def over_seeds(results: dict[str, list[dict[str, Any]]], labels: list[str]) -> str:
    return "mean ± std over seeds" if any(len(results[label]) > 1 for label in labels) else "one seed"


def read_loss(run_dir: str | Path) -> list[float]:
    path = Path(run_dir) / "loss.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def write_results_md(path: Path, results: dict[str, list[dict[str, Any]]], methods: list[str], seeds: list[int],
                     *, command: str | None = None, failed: list[str] | None = None) -> None:
    buf = io.StringIO()
    all_runs = [m for runs in results.values() for m in runs]
    if any(is_lm_run(m) for m in all_runs):  # causal LMs: exact match / loss / perplexity
        write_lm_results_md(path, results, methods, seeds, command=command, failed=failed)
        return
    w = buf.write
    first = all_runs[0] if all_runs else {}
    w(f"# sparsegrad compare: {first.get('task', '?')} with {first.get('model', '?')}\n\n")
    if command:
        w(f"Command:\n\n```\n{command}\n```\n\n")
    if all_runs:
        budget = f"k = {first['budget_k']}" if first.get("budget_k") else f"density {first.get('density')}"
        w(f"Data: {first['num_train']} training / {first['num_eval']} held-out examples, {first['num_labels']} "
          f"classes; majority-class accuracy {first['majority_baseline_accuracy']:.4f}. Each run: "
          f"{first['train_steps']} steps of {first['batch_size']} examples ({first['epochs']} epoch(s)), max length "
          f"{first['max_length']}, scope `{first['train_scope']}`, budget {budget} per MLP matrix "
          f"({first['mlp_matrices']} matrices, {first['mlp_entries']:,d} entries). Seeds: "
          f"{', '.join(map(str, seeds))}.\n\n")
    ref_label, ref_time = write_run_checks(
        w, all_runs, ("num_train", "num_eval", "train_steps", "batch_size", "max_length", "train_scope"),
        "split, the head initialisation, the batch order and the dropout stream", failed, results, methods)
    summary_table(w, results, methods, ["accuracy", "macro-F1", "eval loss"],
                  lambda runs: [_ms([m[key] for m in runs], ".4f")
                                for key in ("eval_accuracy", "eval_macro_f1", "eval_loss")], ref_label, ref_time)
    if REFERENCE_METHOD in results and len(results) > 1:
        ref = {m["seed"]: m for m in results[REFERENCE_METHOD]}
        lines = []
        for label in methods:
            if label == REFERENCE_METHOD or label not in results:
                continue
            diffs = [m["eval_accuracy"] - ref[m["seed"]]["eval_accuracy"] for m in results[label] if m["seed"] in ref]
            if diffs:
                wins = sum(d > 0 for d in diffs)
                lines.append(f"| {label} | {len(diffs)} | {_ms([100 * d for d in diffs], '+.2f')} | {wins}/{len(diffs)} |\n")
        if lines:
            w("Paired by seed, accuracy minus LoRA's (percentage points):\n\n")
            w("| method | pairs | difference | seeds better |\n|---|---|---|---|\n")
            w("".join(lines))
            n_eval = first.get("num_eval", 0)
            if n_eval:
                w(f"\nOne accuracy on {n_eval} examples has a standard error of about "
                  f"{100 * math.sqrt(0.25 / n_eval):.1f} pt at 50% and less near 100%: small gaps are noise.\n")
            w("\n")
    w("## Runs\n\n")
    w("| method | seed | accuracy | macro-F1 | eval loss | final train loss | steps | lr | k | LoRA r | "
      "median step (s) | calibration (s) | peak RSS (MB) | train state | entries ever updated | adapter |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for label in methods:
        for m in results.get(label, []):
            w(f"| {label} | {m['seed']} | {m['eval_accuracy']:.4f} | {m['eval_macro_f1']:.4f} | {m['eval_loss']:.4f} | "
              f"{m['final_train_loss']:.4f} | {m['train_steps']} | {m['lr']:g} | {m['k']} | {m['lora_rank'] or '—'} | "
              f"{m['step_time_median_s']:.3f} | {m['calibration_time_s']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{human_bytes(m['train_state_bytes'].get('total'))} | {m['entries_updated']:,d} | "
              f"{human_bytes(m['adapter_bytes'])} |\n")
    w("\n## Columns\n\n")
    w("- **accuracy, macro-F1, eval loss**: on the held-out examples, mean ± sample std over seeds.\n"
      "- **median step**: one optimizer step (forward, backward, optimizer, zero_grad), median over the steps after "
      "the first; SparseGrad's calibration is listed apart (per run).\n"
      "- **peak RSS**: the whole process (model load, calibration, training, evaluation); each run has its own "
      "process.\n"
      "- **train state**: exact bytes of the trainable parameters, their gradients and the optimizer state at the "
      "last step (`sg.training_state_bytes`).\n"
      "- **entries / step**: what trains per step: SparseGrad/MeProp k per matrix plus biases and head "
      "(`sg.count_parameters`); LoRA and full: the trainable parameter count.\n"
      "- **entries ever updated**: distinct entries of the MLP matrices that training changed (share of all MLP "
      "entries). With dynamic support this grows beyond k per matrix; fixed support keeps it at k; for LoRA it "
      "counts the non-zero entries of the merged update B·A.\n"
      "- **adapter**: bytes of the saved adapter files (SparseGrad stores its bases, one pair per kind, too).\n\n")
    w("![comparison](comparison.png)\n")
    atomic_write_bytes(path, buf.getvalue().encode())


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1 or len(values) <= window:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_comparison(path: Path, results: dict[str, list[dict[str, Any]]], methods: list[str], out_dir: Path) -> None:
    """Six panels: accuracy/macro-F1, median step time, peak RSS, training state, entries, loss curves."""
    if any(is_lm_run(m) for runs in results.values() for m in runs):
        plot_lm_comparison(path, results, methods)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m for m in methods if results.get(m)]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    (ax_q, ax_t, ax_rss), (ax_state, ax_entries, ax_loss) = axes
    x = list(range(len(labels)))
    colors = [COLORS.get(label, "#777777") for label in labels]

    def bars(ax, key_fn, title, ylabel, scale=1.0, log=False):
        means, stds = [], []
        for label in labels:
            vals = [key_fn(m) for m in results[label]]
            vals = [v * scale for v in vals if v is not None]
            mean, std = mean_std(vals) if vals else (math.nan, 0.0)
            means.append(mean)
            stds.append(std)
        ax.bar(x, means, yerr=spread(results, labels, stds), color=colors, capsize=4)
        ax.set_xticks(x, labels, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        return means

    width = 0.38
    for offset, key, name, alpha in ((-width / 2, "eval_accuracy", "accuracy", 1.0),
                                     (width / 2, "eval_macro_f1", "macro-F1", 0.55)):
        means = [mean_std([m[key] for m in results[lab]]) for lab in labels]
        ax_q.bar([i + offset for i in x], [mu for mu, _ in means], width,
                 yerr=spread(results, labels, [s for _, s in means]),
                 color=colors, alpha=alpha, capsize=3, label=name)
    if labels:
        base = results[labels[0]][0].get("majority_baseline_accuracy")
        if base is not None:
            ax_q.axhline(base, color="red", linestyle="--", linewidth=1, label="majority class")
        lows = [min(min(m["eval_accuracy"], m["eval_macro_f1"]) for m in results[lab]) for lab in labels]
        ax_q.set_ylim(max(0.0, min(lows + [base or 1.0]) - 0.1), 1.15)  # room above 1.0: the legend
    ax_q.set_xticks(x, labels, rotation=20)
    ax_q.set_title(f"held-out quality ({over_seeds(results, labels)})")
    ax_q.legend(fontsize=8, loc="upper center", ncol=3)  # above the bars, which end at 1.0
    bars(ax_t, lambda m: m["step_time_median_s"], f"median step time\n({SEQUENTIAL})", "seconds")
    bars(ax_rss, lambda m: m["peak_rss_mb"], "peak RSS of the run's process", "MB")
    bars(ax_state, lambda m: (m.get("train_state_bytes") or {}).get("total"),
         "training state (params + grads + optimizer)", "MiB", scale=1 / 2**20)
    for offset, key, name, alpha in ((-width / 2, "trainable_entries", "entries per step", 1.0),
                                     (width / 2, "entries_updated", "MLP entries ever updated", 0.55)):
        means = [mean_std([m[key] for m in results[lab]])[0] for lab in labels]
        ax_entries.bar([i + offset for i in x], means, width, color=colors, alpha=alpha, label=name)
    ax_entries.set_yscale("log")
    ax_entries.set_xticks(x, labels, rotation=20)
    ax_entries.set_title("budget: per step vs ever updated")
    ax_entries.legend(fontsize=8)
    loss_panel(ax_loss, results, labels, colors)
    save_figure(fig, path)


def loss_panel(ax, results: dict[str, list[dict[str, Any]]], labels: list[str], colors: list[str]) -> None:
    """Training loss per method from each run's loss.csv: mean over seeds, smoothed."""
    for label, color in zip(labels, colors):
        curves = [c for c in (read_loss(m["_dir"]) for m in results[label]) if c]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
        ax.plot(range(1, n + 1), _smooth(mean, max(1, n // 15)), color=color, label=label)
    ax.set_title("training loss (mean over seeds, smoothed)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)


def save_figure(fig, path: Path) -> None:
    """Lay out, write atomically (temp file + rename) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_lm_results_md(path: Path, results: dict[str, list[dict[str, Any]]], methods: list[str], seeds: list[int],
                        *, command: str | None = None, failed: list[str] | None = None) -> None:
    buf = io.StringIO()
    w = buf.write
    all_runs = [m for runs in results.values() for m in runs]
    first = all_runs[0] if all_runs else {}
    chat = first.get("eval_exact_match") is not None
    w(f"# sparsegrad compare: {first.get('task', '?')} with {first.get('model', '?')} (causal LM)\n\n")
    if command:
        w(f"Command:\n\n```\n{command}\n```\n\n")
    if all_runs:
        budget = f"k = {first['budget_k']}" if first.get("budget_k") else f"density {first.get('density')}"
        blocks = ("every block" if first.get("layers_to_transform") is None
                  else f"blocks {', '.join(map(str, first['layers_to_transform']))}")
        what = ("exact match of the greedy answer and loss on the answer tokens" if chat
                else "perplexity (exp of the mean token loss)")
        w(f"Data: {first['num_train']} training / {first['num_eval']} held-out examples ({first.get('data_kind')}), "
          f"max length {first['max_length']}, {first.get('eval_tokens', 0):,d} held-out target tokens; scored by "
          f"{what}. Each run: {first['train_steps']} steps of {first['batch_size']} examples, scope "
          f"`{first['train_scope']}`, {first.get('dtype', 'float32')} weights, MLPs of {blocks} "
          f"({first['mlp_matrices']} matrices, {first['mlp_entries']:,d} entries), budget {budget} per matrix. "
          f"Seeds: {', '.join(map(str, seeds))}.\n\n")
    ref_label, ref_time = write_run_checks(
        w, all_runs, ("num_train", "num_eval", "train_steps", "batch_size", "max_length", "train_scope", "dtype",
                      "every_nth_block"), "split and the batch order", failed, results, methods)
    quality_cols = "exact match | held-out loss (answer tokens) |" if chat else "perplexity | held-out loss |"
    summary_table(w, results, methods, ["exact match", "held-out loss (answer tokens)"] if chat
                  else ["perplexity", "held-out loss"],
                  lambda runs: [_ms([m.get("eval_exact_match") for m in runs], ".4f") if chat
                                else _ms([m.get("eval_perplexity") for m in runs], ".3f"),
                                _ms([m["eval_loss"] for m in runs], ".4f")], ref_label, ref_time)
    if chat and all_runs:
        n = first.get("num_eval", 0)
        if n:
            w(f"One exact-match rate on {n} examples has a standard error of about {100 * math.sqrt(0.25 / n):.1f} "
              "pt at 50%: small gaps are noise.\n\n")
    w("## Runs\n\n")
    w(f"| method | seed | {quality_cols} final train loss | steps | lr | k | LoRA r | median step (s) | "
      "calibration (s) | peak RSS (MB) | train state | entries ever updated | adapter |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for label in methods:
        for m in results.get(label, []):
            q = (f"{m['eval_exact_match']:.4f}" if chat else f"{m['eval_perplexity']:.3f}")
            w(f"| {label} | {m['seed']} | {q} | {m['eval_loss']:.4f} | {m['final_train_loss']:.4f} | "
              f"{m['train_steps']} | {m['lr']:g} | {m['k']} | {m['lora_rank'] or '—'} | "
              f"{m['step_time_median_s']:.3f} | {m['calibration_time_s']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{human_bytes((m.get('train_state_bytes') or {}).get('total'))} | {m['entries_updated']:,d} | "
              f"{human_bytes(m['adapter_bytes'])} |\n")
    if chat:
        w("\n## Sample answers (first held-out examples)\n\n")
        w("| method | seed | reference | generated |\n|---|---|---|---|\n")
        for label in methods:
            for m in results.get(label, []):
                for s in (m.get("eval_samples") or [])[:3]:
                    gen = str(s.get("generated", "")).replace("|", "\\|").replace("\n", " ")[:80]
                    w(f"| {label} | {m['seed']} | {s.get('reference')} | {gen} |\n")
    w("\n## Columns\n\n")
    if chat:
        w("- **exact match**: share of held-out examples whose greedy answer (chat template, generation stopped at "
          "the end-of-turn token) equals the reference after normalisation (lowercase, punctuation dropped, first "
          "word for one-word references).\n"
          "- **held-out loss**: mean cross-entropy per answer token (the answer and its end-of-turn token; the "
          "prompt is masked).\n")
    else:
        w("- **perplexity**: exp of the mean held-out token loss, on chunks from text regions no training chunk "
          "comes from.\n")
    w("- **median step**: one optimizer step (forward, backward, optimizer, zero_grad), median over the steps after "
      "the first; SparseGrad's calibration is listed apart (per run).\n"
      "- **peak RSS**: the whole process; each run has its own process.\n"
      "- **train state**: exact bytes of the trainable parameters, their gradients and the optimizer state at the "
      "last step (`sg.training_state_bytes`).\n"
      "- **entries / step**: SparseGrad/MeProp k per matrix (`sg.count_parameters`); LoRA and full: the trainable "
      "parameter count.\n"
      "- **entries ever updated**: distinct entries of the adapted MLP matrices that training changed.\n"
      "- **adapter**: bytes of the saved adapter files (SparseGrad stores its bases, one pair per kind, too).\n\n")
    w("![comparison](comparison.png)\n")
    atomic_write_bytes(path, buf.getvalue().encode())


def plot_lm_comparison(path: Path, results: dict[str, list[dict[str, Any]]], methods: list[str]) -> None:
    """Four panels: quality (exact match or perplexity), held-out loss, median step time, training loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m for m in methods if results.get(m)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    x = list(range(len(labels)))
    colors = [COLORS.get(label, "#777777") for label in labels]
    chat = bool(labels) and results[labels[0]][0].get("eval_exact_match") is not None

    def bars(ax, key, title, ylabel):
        stats = [mean_std([m[key] for m in results[lab] if m.get(key) is not None]) for lab in labels]
        ax.bar(x, [s[0] for s in stats], yerr=spread(results, labels, [s[1] for s in stats]), color=colors,
               capsize=4)
        ax.set_xticks(x, labels, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    if chat:
        bars(axes[0], "eval_exact_match", "held-out exact match", "share")
        axes[0].set_ylim(0, 1)
    else:
        bars(axes[0], "eval_perplexity", "held-out perplexity", "perplexity")
    bars(axes[1], "eval_loss", "held-out loss per target token", "nats")
    bars(axes[2], "step_time_median_s", f"median step time\n({SEQUENTIAL})", "seconds")
    loss_panel(axes[3], results, labels, colors)
    save_figure(fig, path)

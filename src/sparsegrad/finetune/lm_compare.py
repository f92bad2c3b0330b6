"""``sparsegrad compare`` reports for decoder runs: held-out exact match and loss (chat tasks) or perplexity (plain
LM), with the same cost columns as the classifier report. `compare` calls these when its runs are causal LMs."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from .metrics import format_mean_std as _ms
from .metrics import human_bytes, mean_std, write_run_checks
from .metrics import mean_or_none as _mean


def is_lm_run(m: dict[str, Any]) -> bool:
    return m.get("model_kind") == "causal-lm"


def run_summary(m: dict[str, Any]) -> str:
    """The one-line result `compare` prints after a decoder run."""
    if m.get("eval_exact_match") is not None:
        quality = f"exact match {m['eval_exact_match']:.4f}, held-out loss {m['eval_loss']:.4f}"
    else:
        quality = f"held-out perplexity {m['eval_perplexity']:.3f} (loss {m['eval_loss']:.4f})"
    return f"{quality}, median step {m['step_time_median_s']:.3f} s"


def write_lm_results_md(path: Path, results: dict[str, list[dict[str, Any]]], methods: list[str], seeds: list[int],
                        *, command: str | None = None, failed: list[str] | None = None) -> None:
    from sparsegrad.io import atomic_write_bytes

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
    w(f"| method | runs | {quality_cols} lr | median step (s) | step time / {ref_label} | peak RSS (MB) | "
      "train state | entries / step | entries ever updated | adapter |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for label in methods:
        runs = results.get(label, [])
        if not runs:
            w(f"| {label} | 0 |" + " — |" * 10 + "\n")
            continue
        t = _mean([m["step_time_median_s"] for m in runs])
        ratio = f"{t / ref_time:.2f}" if ref_time and t is not None else "—"
        state = _mean([(m.get("train_state_bytes") or {}).get("total") for m in runs])
        upd = _mean([m["entries_updated"] for m in runs])
        share = upd / runs[0]["mlp_entries"] if upd is not None and runs[0].get("mlp_entries") else None
        updated = f"{upd:,.0f}" + (f" ({100 * share:.2f}%)" if share is not None else "")
        first_q = (_ms([m.get("eval_exact_match") for m in runs], ".4f") if chat
                   else _ms([m.get("eval_perplexity") for m in runs], ".3f"))
        lrs = "/".join(f"{x:g}" for x in sorted({m["lr"] for m in runs}))
        w(f"| {label} | {len(runs)} | {first_q} | {_ms([m['eval_loss'] for m in runs], '.4f')} | {lrs} | "
          f"{_ms([m['step_time_median_s'] for m in runs], '.3f')} | {ratio} | {_mean([m['peak_rss_mb'] for m in runs]):.0f} | "
          f"{human_bytes(state)} | {_mean([m['trainable_entries'] for m in runs]):,.0f} | {updated} | "
          f"{human_bytes(_mean([m['adapter_bytes'] for m in runs]))} |\n")
    w("\n")
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

    from .compare import COLORS, loss_panel, save_figure

    labels = [m for m in methods if results.get(m)]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    x = list(range(len(labels)))
    colors = [COLORS.get(label, "#777777") for label in labels]
    chat = bool(labels) and results[labels[0]][0].get("eval_exact_match") is not None

    def bars(ax, key, title, ylabel):
        stats = [mean_std([m[key] for m in results[lab] if m.get(key) is not None]) for lab in labels]
        ax.bar(x, [s[0] for s in stats], yerr=[s[1] for s in stats], color=colors, capsize=4)
        ax.set_xticks(x, labels, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    if chat:
        bars(axes[0], "eval_exact_match", "held-out exact match", "share")
        axes[0].set_ylim(0, 1)
    else:
        bars(axes[0], "eval_perplexity", "held-out perplexity", "perplexity")
    bars(axes[1], "eval_loss", "held-out loss per target token", "nats")
    bars(axes[2], "step_time_median_s", "median step time", "seconds")
    loss_panel(axes[3], results, labels, colors)
    save_figure(fig, path)

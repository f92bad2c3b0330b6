"""Validation-based choices (`sparsegrad.finetune.selection`, `lr_search`): the validation split, the best step
restored into the adapter, early stopping, ``--lr auto`` and the did-not-learn check, on tiny models."""

import csv
import json
import random
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import CAUSAL_LM, CLASSIFIER, WORDS, losses, make_csv, make_pairs, tiny_model_dir

from sparsegrad.finetune import lr_search, ranking, selection
from sparsegrad.finetune.checkpoint import BEST_FILE, STATE_FILE, latest_checkpoint
from sparsegrad.finetune.errors import TrainingInterrupted, UsageError
from sparsegrad.finetune.loop import finetune
from sparsegrad.finetune.methods import default_lr as methods_default_lr
from sparsegrad.finetune.outputs import load_finetuned
from sparsegrad.finetune.settings import FinetuneConfig
from sparsegrad.finetune.tasks.classify import ClassificationTask, carve_validation, load_split


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("selection")
    return {"model": tiny_model_dir(CLASSIFIER, root / "model", dropout=0.0), "csv": make_csv(root / "train.csv", n=90),
            "lm": tiny_model_dir(CAUSAL_LM, root / "lm"), "pairs": make_pairs(root / "pairs.jsonl", n=30),
            "root": root}


def config(assets, out, **kw):
    base = dict(model=str(assets["model"]), train_file=str(assets["csv"]), method="full", max_length=32,
                batch_size=4, max_steps=4, output_dir=str(out), progress=False, verbose=False)
    return FinetuneConfig(**{**base, **kw})


def metrics(out: Path) -> dict:
    return json.loads((Path(out) / "metrics.json").read_text())


# ------------------------------------------------------------------------------------------------- the split
@pytest.mark.parametrize("max_train", [None, 30])
def test_val_split_is_disjoint_stratified_and_keeps_a_subset_unchanged(assets, tmp_path, max_train):
    cfg = config(assets, tmp_path, val_fraction=0.2, max_train=max_train)
    data = load_split(cfg)
    before = list(data.train_texts)
    val_t, val_y, source = carve_validation(data, cfg)
    assert not set(val_t) & set(data.train_texts) and not set(val_t) & set(data.eval_texts)
    assert len(set(val_t)) == len(val_t) > 0
    if max_train is None:  # cut from the training rows: together they are the rows before
        assert source == "train" and sorted(val_t + data.train_texts) == sorted(before)
    else:  # from the rows outside the subset: training unchanged
        assert source == "spare" and data.train_texts == before and len(val_t) == 6
    train_counts, val_counts = Counter(data.train_labels), Counter(val_y)
    for y in train_counts:  # stratified: each class's share within one row of the fraction
        expected = (train_counts[y] + (val_counts[y] if source == "train" else 0)) * 0.2
        assert abs(val_counts[y] - expected) <= 1, (y, val_counts, train_counts)
    again = carve_validation(load_split(cfg), cfg)
    assert again[0] == val_t  # seeded


def test_causal_lm_val_split_is_disjoint(assets, tmp_path):
    from sparsegrad.finetune.tasks.causal_lm import CausalLMTask

    cfg = FinetuneConfig(model=str(assets["lm"]), train_file=str(assets["pairs"]), max_length=48, val_fraction=0.2)
    task = CausalLMTask(cfg)
    task.load(cfg, torch.float32)
    ids = lambda exs: {tuple(e.input_ids) for e in exs}  # noqa: E731
    assert task.num_val == 5 and not ids(task.val) & ids(task.data.train) and not ids(task.val) & ids(task.data.eval)
    assert task.val_source == "train"  # a pair file has no spare text: the carve comes from training


def test_causal_lm_val_prefers_spare_text():
    train, spare = list(range(40)), list(range(100, 110))
    kept, val, source = selection.carve_lm(train, lambda n: spare[:n], 0.2, seed=0)
    assert (kept, val, source) == (train, spare[:8], "spare")  # training unchanged, the first 8 spare examples
    kept, val, source = selection.carve_lm(train, lambda n: spare[:7], 0.2, seed=0)  # 7 < 8: carve training
    assert source == "train" and len(val) == 8 and len(kept) == 32 and sorted(kept + val) == train
    assert (kept, val) == tuple(selection.carve_examples(train, 0.2, seed=0))
    assert selection.carve_lm(train, None, 0.2, seed=0) == (kept, val, "train")  # no spare text at all


def test_shakespeare_validation_comes_from_regions_training_never_sees(assets):
    from sparsegrad.finetune.tasks.causal_lm import CausalLMTask

    cfg = FinetuneConfig(model=str(assets["lm"]), task="shakespeare", max_length=32, max_train=40, max_eval=8,
                         val_fraction=0.25)
    task = CausalLMTask(cfg)
    task.load(cfg, torch.float32)
    ids = lambda exs: {tuple(e.input_ids) for e in exs}  # noqa: E731
    assert task.val_source == "spare" and task.num_val == 10 and task.num_train == 40  # training keeps all 40
    assert not ids(task.val) & ids(task.data.train) and not ids(task.val) & ids(task.data.eval)
    assert task.describe()["val_source"] == "spare"


# ------------------------------------------------------------------------------------------------- best step
def reloaded_val_scores(assets, out: Path) -> dict:
    """The validation scores of the adapter a run wrote, loaded back on its own."""
    model, _, _ = load_finetuned(out / "adapter")
    cfg = config(assets, out, val_fraction=0.2)
    task = ClassificationTask(cfg)
    task.load(cfg, torch.float32)
    return task.evaluate_val(model)


def test_best_step_is_restored_into_the_adapter(assets, tmp_path):
    """A huge lr makes later steps worse than an earlier one; the adapter must hold the best step's state."""
    out = tmp_path / "run"
    m = finetune(config(assets, out, lr=0.3, eval_every=1, max_steps=6, val_fraction=0.2, metric_for_best="loss"))
    history = m["val_history"]
    assert [h["step"] for h in history] == list(range(1, 7))
    best = min(history, key=lambda h: h["loss"])
    assert m["val_best_step"] == best["step"] and m["val_loss"] == best["loss"]
    assert best["step"] != 6 and history[-1]["loss"] > best["loss"], history  # the check below can fail
    reloaded = reloaded_val_scores(assets, out)
    assert reloaded["loss"] == pytest.approx(best["loss"], rel=1e-5, abs=1e-6)
    assert reloaded["loss"] != pytest.approx(history[-1]["loss"], rel=1e-3)
    assert len(losses(out)) == 6


def test_a_classifier_keeps_the_step_lr_auto_would_rank_first(assets, tmp_path, monkeypatch):
    """By default a classifier's best step is chosen by the score and rule ``--lr auto`` ranks rates by: the highest
    validation accuracy, within 0.005 the lower loss, then the earlier step (written out here, not by the code).
    The tiny model never beats chance, so the accuracies are scripted (the losses and the states are real) to make
    the accuracy's step and the loss's differ."""
    scripted = iter([0.30, 0.50, 0.50, 0.40, 0.45, 0.20])
    real = ClassificationTask.evaluate_val
    monkeypatch.setattr(ClassificationTask, "evaluate_val", lambda self, model: {**real(self, model),
                                                                                  "accuracy": next(scripted)})
    out = tmp_path / "run"
    m = finetune(config(assets, out, lr=0.3, eval_every=1, max_steps=6, val_fraction=0.2))
    monkeypatch.undo()
    history = m["val_history"]
    best = min((h for h in history if h["accuracy"] == 0.50), key=lambda h: (h["loss"], h["step"]))
    by_loss = min(history, key=lambda h: h["loss"])
    assert by_loss["step"] not in (2, 3), history  # the check below can fail
    assert m["val_metric_for_best"] == "accuracy" and m["val_best_step"] == best["step"]
    assert m["val_accuracy"] == 0.50 and m["val_loss"] == best["loss"]
    reloaded = reloaded_val_scores(assets, out)
    assert reloaded["loss"] == pytest.approx(best["loss"], rel=1e-5, abs=1e-6)
    assert reloaded["loss"] != pytest.approx(by_loss["loss"], rel=1e-4)


@pytest.mark.parametrize("first,second,replaced", [
    ({"accuracy": 0.90, "loss": 0.50}, {"accuracy": 0.904, "loss": 0.40}, True),   # a tie: the lower loss
    ({"accuracy": 0.90, "loss": 0.50}, {"accuracy": 0.904, "loss": 0.60}, False),  # a tie, a higher loss
    ({"accuracy": 0.90, "loss": 0.50}, {"accuracy": 0.95, "loss": 0.90}, True),    # beyond the band: the metric
    ({"accuracy": 0.90, "loss": 0.50}, {"accuracy": 0.90, "loss": 0.50}, False),   # a full tie: the earlier step
])
def test_best_step_rule(first, second, replaced):
    sel = selection.Selection("accuracy", every=1, total_steps=2)
    sel.observe(1, first, torch.nn.Linear(1, 1))
    sel.observe(2, second, torch.nn.Linear(1, 1))
    assert sel.best_step == (2 if replaced else 1)
    lm = selection.Selection("loss", every=1, total_steps=2)  # a loss: the lowest, no tie band
    lm.observe(1, {"loss": 0.50}, torch.nn.Linear(1, 1))
    lm.observe(2, {"loss": 0.499}, torch.nn.Linear(1, 1))
    assert lm.best_step == 2


def test_early_stopping_stops(assets, tmp_path):
    out = tmp_path / "run"
    m = finetune(config(assets, out, lr=0.3, eval_every=1, max_steps=12, val_fraction=0.2,
                        early_stopping_patience=2, metric_for_best="loss"))
    stop = m["stopped_early_at_step"]
    assert stop is not None and stop < 12 and m["train_steps"] == stop == len(losses(out))
    tail = [h["loss"] for h in m["val_history"] if h["step"] > m["val_best_step"]]
    assert len(tail) == 2 and all(v >= m["val_loss"] for v in tail)


def test_resume_keeps_the_best_state(assets, tmp_path):
    """The best-so-far state travels in the checkpoint: a resumed run equals an uninterrupted one."""
    kw = dict(lr=0.3, eval_every=1, max_steps=6, val_fraction=0.2, method="lora")
    whole = finetune(config(assets, tmp_path / "whole", **kw))
    with pytest.raises(TrainingInterrupted):
        finetune(config(assets, tmp_path / "cut", stop_after=4, **kw))
    assert (latest_checkpoint(tmp_path / "cut") / BEST_FILE).is_file()
    resumed = finetune(config(assets, None, resume=str(tmp_path / "cut"), output_dir=None, **kw))
    assert resumed["val_history"] == whole["val_history"] and resumed["val_best_step"] == whole["val_best_step"]
    assert losses(tmp_path / "cut") == losses(tmp_path / "whole")
    from helpers import max_param_diff

    assert max_param_diff(tmp_path / "cut", tmp_path / "whole") == 0.0


def test_a_checkpoint_from_before_validation_still_resumes(assets, tmp_path):
    out = tmp_path / "old"
    with pytest.raises(TrainingInterrupted):
        finetune(config(assets, out, stop_after=2, val_fraction=0.0, method="lora"))
    ckpt = latest_checkpoint(out)
    state = json.loads((ckpt / STATE_FILE).read_text())
    for name in ("val_fraction", "eval_every", "metric_for_best", "early_stopping_patience", "lr_auto"):
        state["config"].pop(name)
    state.pop("selection")
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    from sparsegrad.finetune.cli import main

    assert main(["finetune", "--resume", str(out), "--no-progress"]) == 0
    m = metrics(out)
    assert m["train_steps"] == 4 and m["val_fraction"] == 0.0 and "val_history" not in m


# ------------------------------------------------------------------------------------------------- lr auto
def test_a_stop_signal_during_an_lr_auto_probe_saves_nothing_to_resume(assets, tmp_path, monkeypatch):
    """A probe's checkpoint would resume at the probe's rate and length: a signal during the search stops the run
    with a line saying so, and leaves no checkpoint (a signal after the search still saves one, as before)."""
    out = tmp_path / "auto"
    monkeypatch.setenv("SPARSEGRAD_TEST_SIGNAL_AT_STEP", "1:TERM")  # step 1 of the first probe
    with pytest.raises(TrainingInterrupted, match=r"SIGTERM during the learning-rate search .*probe at lr .*step 1 "
                                                  r"of 4.*no checkpoint is saved for a probe") as stopped:
        finetune(config(assets, out, lr_auto=True, method="lora", max_steps=8))
    assert stopped.value.exit_code == 143 and stopped.value.checkpoint is None
    assert latest_checkpoint(out) is None


def test_lr_auto_picks_by_the_validation_metric_and_trains_at_it(assets, tmp_path):
    out = tmp_path / "auto"
    m = finetune(config(assets, out, lr_auto=True, method="lora", max_steps=8))
    record = m["lr_search"]
    grid = record["grid"]
    assert [p["lr"] for p in grid] == [float(f"{record['default_lr'] * f:.3g}") for f in (10 ** -0.5, 1, 10 ** 0.5)]
    assert all(p["train_steps"] == 4 for p in grid)  # half the steps
    top = max(p["val_accuracy"] for p in grid)  # the rule written out: best accuracy, within 0.005 the lower loss
    best = min((p for p in grid if p["val_accuracy"] >= top - 0.005 - 1e-12), key=lambda p: (p["val_loss"], p["lr"]))
    assert record["picked_lr"] == best["lr"] == m["lr"] and record["metric"] == "accuracy"
    assert all(p["val_metric_for_best"] == "accuracy" for p in grid)  # each probe kept its step by that score
    fixed = finetune(config(assets, tmp_path / "fixed", lr=best["lr"], method="lora", max_steps=8))
    assert losses(out) == losses(tmp_path / "fixed") and m["eval_loss"] == fixed["eval_loss"]
    with pytest.raises(UsageError, match="validation split"):
        finetune(config(assets, tmp_path / "x", lr_auto=True, val_fraction=0.0))


def test_lr_pick_ranks_the_metric_first_and_breaks_ties_by_loss():
    pts = [{"lr": 1e-3, "val_accuracy": 0.94, "val_loss": 0.52}, {"lr": 3e-3, "val_accuracy": 0.855, "val_loss": 0.48},
           {"lr": 1e-2, "val_loss": None}]  # a diverged point
    assert ranking.pick(pts, "val_accuracy", "val_loss")["lr"] == 1e-3  # the lower loss does not outrank accuracy
    pts[1]["val_accuracy"] = 0.935  # one row in 200 under the best: a tie, and the lower loss wins
    assert ranking.pick(pts, "val_accuracy", "val_loss")["lr"] == 3e-3
    pts[1]["val_accuracy"] = 0.934
    assert ranking.pick(pts, "val_accuracy", "val_loss")["lr"] == 1e-3
    pts[1].update(val_accuracy=0.94, val_loss=0.52)  # a full tie: the lower rate
    assert ranking.pick(pts, "val_accuracy", "val_loss")["lr"] == 1e-3
    assert ranking.pick(pts, "val_loss", "val_loss")["lr"] == 1e-3  # a causal LM: the lowest loss, then lower lr
    assert ranking.pick([{"lr": 1e-3, "val_loss": None}], "val_accuracy", "val_loss") is None
    assert ranking.pick([{"lr": 1e-3, "val_accuracy": float("nan")}], "val_accuracy", "val_loss") is None


def test_lr_auto_ranks_by_the_score_the_run_keeps_its_step_by(assets, tmp_path):
    """--metric-for-best loss: the probes keep their steps by the loss, and the rate is picked by the loss too."""
    m = finetune(config(assets, tmp_path / "auto", lr_auto=True, method="lora", max_steps=4, metric_for_best="loss"))
    record = m["lr_search"]
    assert record["metric"] == "loss" and m["val_metric_for_best"] == "loss"
    assert record["picked_lr"] == min(record["grid"], key=lambda p: (p["val_loss"], p["lr"]))["lr"]
    assert lr_search.ranked_by([{"lr": 1e-3, "val_loss": None}]) == "loss"  # every probe diverged


@pytest.mark.parametrize("losses_by_point,edge", [((4.3, 4.1, 3.9), "highest"), ((3.9, 4.1, 4.3), "lowest"),
                                                   ((4.3, 3.9, 4.1), None)])
def test_lr_auto_says_when_its_pick_is_the_grid_edge(losses_by_point, edge):
    """A causal LM's probes (loss only): a pick at either end of the grid is recorded and noted in one line with the
    next rate beyond it; an inner pick is not."""
    cfg = FinetuneConfig(method="lora", task="shakespeare", model="smollm2", lr_auto=True)
    rates = lr_search.grid(methods_default_lr("lora", "mlp", "causal-lm"))
    scripted = dict(zip(rates, losses_by_point))
    lines = []
    picked, record = lr_search.search(cfg, lambda c: {"val_loss": scripted[c.lr], "val_metric_for_best": "loss"},
                                      lines.append)
    assert record["grid_edge"] == edge and picked.lr == rates[losses_by_point.index(min(losses_by_point))]
    notes = [line for line in lines if "note:" in line]
    if edge is None:
        assert notes == []
    else:
        beyond = rates[-1] * 10 ** 0.5 if edge == "highest" else rates[0] / 10 ** 0.5
        assert len(notes) == 1 and f"grid's {edge} rate" in notes[0] and f"--lr {beyond:.3g}" in notes[0]


def test_lr_auto_edge_note_is_silent_when_every_point_ties():
    points = [{"lr": lr, "val_accuracy": 0.5484, "val_loss": loss} for lr, loss in ((1e-3, 0.98), (3e-3, 0.99),
                                                                                   (1e-2, 0.97))]
    assert lr_search.grid_edge(points, points[2], "val_accuracy") is None  # the loss broke a tie of every point
    points[2]["val_accuracy"] = 0.6
    assert lr_search.grid_edge(points, points[2], "val_accuracy") == "highest"
    assert lr_search.grid_edge([{"lr": 1e-3, "val_loss": None}], {"lr": 1e-3}, "val_loss") is None  # all diverged


def test_compare_passes_lr_auto_per_method():
    from sparsegrad.finetune.compare.run import parse_lrs

    assert parse_lrs("auto", ["lora", "sparsegrad"]) == {"lora": "auto", "sparsegrad": "auto"}
    assert parse_lrs("lora=auto,full=1e-4", ["lora", "full"]) == {"lora": "auto", "full": 1e-4}


# ------------------------------------------------------------------------------------------------- did it learn
def imbalanced_csv(path: Path, n: int = 60) -> Path:
    rng = random.Random(1)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            y = 0 if i % 5 else 1  # 80 % class 0
            w.writerow([" ".join(rng.choice(WORDS[y]) for _ in range(4)) + f" {i}", ["sport", "business"][y]])
    return path


def test_did_not_learn_fires_on_majority_and_not_on_a_learning_run(assets, tmp_path, capsys):
    flat = finetune(config(assets, tmp_path / "flat", train_file=str(imbalanced_csv(tmp_path / "imb.csv")),
                           lr=1e-9, max_steps=1))
    assert flat["did_not_learn"] is True and flat["eval_accuracy"] <= flat["majority_baseline_accuracy"] + 0.01
    err = capsys.readouterr().err
    assert "did not learn" in err and "--lr auto" in err
    learned = finetune(config(assets, tmp_path / "learn", lr=1e-2, max_steps=30, batch_size=8, train_scope="all"))
    assert learned["eval_accuracy"] > learned["majority_baseline_accuracy"] + 0.2
    assert learned["did_not_learn"] is False and "did not learn" not in capsys.readouterr().err


def test_learning_check_thresholds():
    quality = {"eval_accuracy": 0.5, "eval_macro_f1": 0.2, "majority_baseline_accuracy": 0.3}
    assert selection.classifier_learning_check(quality, {})[0] is True  # macro-F1 < 0.5 x accuracy
    assert selection.classifier_learning_check({**quality, "eval_macro_f1": 0.45}, {})[0] is False
    assert selection.classifier_learning_check({**quality, "eval_accuracy": 0.305, "eval_macro_f1": 0.3}, {})[0]
    assert selection.lm_learning_check({}, {})[0] is None
    assert selection.lm_learning_check({}, {"val_untrained_loss": 2.0, "val_loss": 2.0})[0] is True
    assert selection.lm_learning_check({}, {"val_untrained_loss": 2.0, "val_loss": 1.5})[0] is False


def test_causal_lm_records_validation_and_the_untrained_loss(assets, tmp_path):
    m = finetune(FinetuneConfig(model=str(assets["lm"]), train_file=str(assets["pairs"]), method="lora",
                                max_length=48, batch_size=4, max_steps=3, output_dir=str(tmp_path / "lm"),
                                progress=False, verbose=False, lr=1e-2))
    assert m["num_val"] == 2 and m["val_untrained_loss"] is not None and m["val_loss"] is not None
    assert m["did_not_learn"] is (m["val_loss"] >= m["val_untrained_loss"])
    with pytest.raises(UsageError, match="metric_for_best"):
        finetune(FinetuneConfig(model=str(assets["lm"]), train_file=str(assets["pairs"]), max_length=48,
                                max_steps=1, output_dir=str(tmp_path / "x"), metric_for_best="accuracy",
                                progress=False, verbose=False))

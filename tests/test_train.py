"""finetune(): tiny end-to-end runs of every method, the files they write, reloading, and one real MiniLM/BBC run."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CLASSIFIER, make_csv, tiny_model_dir

from sparsegrad.finetune import metrics as M
from sparsegrad.finetune.cli import main
from sparsegrad.finetune.train import FinetuneConfig, finetune, linear_schedule, load_finetuned

ROOT = Path(__file__).resolve().parents[1]

REQUIRED_KEYS = {
    "method", "task", "seed", "model", "eval_accuracy", "eval_macro_f1", "eval_loss", "majority_baseline_accuracy",
    "train_steps", "epochs", "k", "lora_rank", "density", "support", "train_scope", "lr", "batch_size", "max_length",
    "step_time_median_s", "train_time_s", "calibration_time_s", "peak_rss_mb", "train_state_bytes",
    "trainable_entries", "entries_updated", "adapter_bytes", "bases_report",
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model_dir(CLASSIFIER, root / "model"), make_csv(root / "train.csv")


def _cfg(tiny, out, **kw):
    model, train = tiny
    base = dict(model=str(model), train_file=str(train), max_length=32, batch_size=8, max_steps=3,
                output_dir=str(out), progress=False, verbose=False, density=0.05)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("method,support", [("sparsegrad", "dynamic"), ("sparsegrad", "fixed"), ("meprop", "dynamic"),
                                            ("lora", "dynamic"), ("full", "dynamic")])
def test_finetune_writes_files_and_reloads(tiny, tmp_path, method, support):
    out = tmp_path / "run"
    m = finetune(_cfg(tiny, out, method=method, support=support))
    saved = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(saved)
    assert saved["method"] == method and saved["train_steps"] == 3 and saved["seed"] == 0
    with open(out / "loss.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and all(float(r["loss"]) > 0 for r in rows)
    assert (out / "adapter" / "task.json").is_file()
    assert saved["adapter_bytes"] > 0 and saved["peak_rss_mb"] > 0
    assert set(saved["train_state_bytes"]) == {"params", "grads", "optimizer_state", "bookkeeping", "total"}
    assert saved["train_state_bytes"]["total"] > 0
    assert 0 <= saved["eval_accuracy"] <= 1 and saved["num_eval"] == 12
    assert abs(saved["majority_baseline_accuracy"] - 1 / 3) < 1e-9
    n_mat, k = saved["mlp_matrices"], saved["k"]
    if method in ("sparsegrad", "meprop"):
        assert saved["trainable_entries"] < saved["total_params"]
        bound = n_mat * k * (1 if support == "fixed" else 3)
        assert 0 < saved["entries_updated"] <= bound
        assert (out / "adapter" / "adapter_config.json").is_file()
    elif method == "lora":
        assert saved["lora_rank"] >= 1 and (out / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "adapter" / "trained_params.safetensors").is_file()  # head + MLP biases
    else:
        assert saved["entries_updated"] > n_mat * 64 * 32 // 2  # dense: nearly every entry moves
    assert (saved["bases_report"] is not None) == (method == "sparsegrad")
    assert m["eval_loss"] == saved["eval_loss"]

    # Rebuilding from the adapter (merged into a plain model) reproduces the evaluation.
    model, tok, info = load_finetuned(out / "adapter")
    assert info["method"] == method and info["num_labels"] == 3
    assert not any("lora" in n or "delta" in n for n, _ in model.named_parameters())
    from sparsegrad.finetune.data import load_files, make_batches

    data = load_files(tiny[1], seed=0)
    batches = make_batches(tok, data.eval_texts, data.eval_labels, batch_size=64, max_length=32, shuffle=False)
    again = M.evaluate(model, batches)
    assert again["eval_accuracy"] == saved["eval_accuracy"]
    assert abs(again["eval_loss"] - saved["eval_loss"]) < 1e-4


@pytest.mark.parametrize("support", ["dynamic", "fixed"])
def test_basis_refresh_run_saves_folded_segments_that_reload_exactly(tiny, tmp_path, support):
    out = tmp_path / "refresh"
    m = finetune(_cfg(tiny, out, support=support, max_steps=5, refresh_every=2))
    assert m["refreshed_at_steps"] == [2, 4] and m["refresh_time_s"] > 0
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["version"] == 2 and meta["folded_segments"] == 2
    model, tok, _ = load_finetuned(out / "adapter")
    from sparsegrad.finetune.data import load_files, make_batches

    data = load_files(tiny[1], seed=0)
    batches = make_batches(tok, data.eval_texts, data.eval_labels, batch_size=64, max_length=32, shuffle=False)
    again = M.evaluate(model, batches)
    assert again["eval_accuracy"] == m["eval_accuracy"] and abs(again["eval_loss"] - m["eval_loss"]) < 1e-6


def test_epochs_and_max_steps(tiny, tmp_path):
    # 48 training rows / batch 16 = 3 steps per epoch
    m = finetune(_cfg(tiny, tmp_path / "a", method="full", max_steps=None, epochs=2, batch_size=16))
    assert m["train_steps"] == 6 and m["epochs"] == 2
    m = finetune(_cfg(tiny, tmp_path / "b", method="full", max_steps=4, batch_size=16))
    assert m["train_steps"] == 4 and m["epochs"] == 2  # max_steps overrides epochs
    assert len((tmp_path / "b" / "loss.csv").read_text().strip().splitlines()) == 5


def test_learning_happens(tiny, tmp_path):
    m = finetune(_cfg(tiny, tmp_path / "learn", method="full", train_scope="all", max_steps=36, lr=1e-2))
    assert m["eval_accuracy"] > m["majority_baseline_accuracy"]
    losses = [float(r.split(",")[1]) for r in (tmp_path / "learn" / "loss.csv").read_text().split()[1:]]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_schedule_and_metrics():
    f = linear_schedule(10, 2)
    assert [round(f(s), 4) for s in (0, 1, 2, 9)] == [round(1 / 3, 4), round(2 / 3, 4), 1.0, 0.125]
    g = linear_schedule(4, 0)
    assert [g(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    y, p = [0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 2, 0, 2]
    assert M.accuracy(y, p) == 5 / 7
    sklearn = pytest.importorskip("sklearn.metrics")
    assert abs(M.macro_f1(y, p) - sklearn.f1_score(y, p, average="macro")) < 1e-12
    assert abs(M.macro_f1([0, 1, 1], [0, 0, 2]) - sklearn.f1_score([0, 1, 1], [0, 0, 2], average="macro")) < 1e-12
    assert M.majority_baseline([1, 1, 0], [1, 0, 0, 0]) == 0.25
    assert M.mean_std([1.0, 3.0]) == (2.0, 2 ** 0.5)


@pytest.mark.slow
def test_real_minilm_bbc_through_cli(tmp_path, capsys):
    out = tmp_path / "bbc"
    code = main(["finetune", "--max-train", "32", "--max-length", "64", "--max-eval", "32", "--no-progress",
                 "--output-dir", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eval accuracy" in printed and "majority class" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert REQUIRED_KEYS <= set(m)
    assert m["task"] == "bbc" and m["model"] == "minilm" and m["method"] == "sparsegrad"
    assert m["num_train"] == 32 and m["num_eval"] == 32 and m["train_steps"] == 2 and m["num_labels"] == 5
    assert m["k"] == round(0.01 * 1536 * 384) and m["mlp_matrices"] == 12
    assert m["command"].startswith("sparsegrad finetune")
    # dynamic support by default: no scoring re-run, so calibration is only the 2 gradient passes
    assert m["score_steps"] == 0 and "energy_topk_rotated" not in next(iter(m["bases_report"].values()))
    assert m["calibration_steps"] == 2 and next(iter(m["bases_report"].values()))["steps"] == 2
    assert len((out / "loss.csv").read_text().strip().splitlines()) == 3
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_plain_loop_example(tiny, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "examples" / "plain_loop.py"), "--model", str(tiny[0]),
         "--max-train", "16", "--max-eval", "8", "--max-length", "32", "--output-dir", str(tmp_path / "ex")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reloaded adapter reproduces the trained model" in proc.stdout
    assert (tmp_path / "ex" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "ex" / "merged" / "config.json").is_file()

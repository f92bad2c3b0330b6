"""The one training loop, over the matrix of runs (`helpers.RUNS`: task kind x method x support): every feature
works for every task kind. Each property is checked against another run of the same loop that must agree with it
(metamorphic tests): a reload reproduces the run's evaluation, a resumed run equals an uninterrupted one bit for
bit, two micro-batches equal one batch twice the size, two processes equal one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    CAUSAL_LM,
    CLASSIFIER,
    RUNS,
    finetune_argv,
    losses,
    max_param_diff,
    run_id,
    task_data,
    tiny_model_dir,
)

from sparsegrad.finetune import lm
from sparsegrad.finetune.cli import main
from sparsegrad.finetune.errors import UsageError
from sparsegrad.finetune.outputs import load_finetuned
from sparsegrad.finetune.settings import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
IDS = [run_id(r) for r in RUNS]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Per kind: a tiny model folder without dropout (so that batch shapes cannot change the function) and a
    training file."""
    root = tmp_path_factory.mktemp("engine")
    out = {}
    for kind in (CLASSIFIER, CAUSAL_LM):
        (root / kind).mkdir()
        out[kind] = (tiny_model_dir(kind, root / kind / "model", dropout=0.0), task_data(kind, root / kind))
    return out


def argv_of(assets, run, out, **flags):
    kind, method, support = run
    model, data = assets[kind]
    return finetune_argv(kind, model, data, method, support, output_dir=out, **flags)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def exactly_reproducible(run) -> bool:
    """Runs whose weights two batch layouts reproduce within rounding: SparseGrad's calibrated bases are
    eigenvectors of nearly degenerate Gram matrices on these random tiny models (their trailing columns are
    arbitrary up to rounding) and a dynamic top-k can flip a near tie, so those runs compare losses only."""
    _, method, support = run
    return method in ("lora", "full") or (method == "meprop" and support == "fixed")


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_round_trip(assets, tmp_path, run):
    """The run writes its files; the adapter reloads onto the base and reproduces the run's held-out loss."""
    kind = run[0]
    out = tmp_path / "run"
    assert main(argv_of(assets, run, out)) == 0
    m = metrics(out)
    assert m["train_steps"] == 4 and len(losses(out)) == 4 and m["entries_updated"] > 0
    assert m["device"] == "cpu" and m["peak_gpu_memory_mb"] is None and m["peak_rss_mb"] > 0
    info = json.loads((out / "adapter" / "task.json").read_text())
    assert info["method"] == run[1] and info.get("model_kind", CLASSIFIER) == kind
    model, tok, _ = load_finetuned(out / "adapter")
    if kind == CLASSIFIER:
        from sparsegrad.finetune.tasks.classify import ClassificationTask

        task = ClassificationTask(FinetuneConfig(model=str(assets[kind][0]), train_file=str(assets[kind][1]),
                                                 max_length=32))
        task.load(task.cfg, torch.float32)
        again = task.evaluate(model)
        assert again["eval_accuracy"] == m["eval_accuracy"]
    else:
        data = lm.load_lm_data(tok, train_file=str(assets[kind][1]), max_length=48)
        again = lm.evaluate_loss(model, data.eval, lm.pad_token_id(tok))
        assert again["eval_tokens"] == m["eval_tokens"]
    assert again["eval_loss"] == pytest.approx(m["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_resume_equals_uninterrupted(assets, tmp_path, run):
    """Stopped after step 2 with a checkpoint, then resumed: the same loss sequence and adapter, bit for bit."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(argv_of(assets, run, whole, save_every=2)) == 0
    assert main(argv_of(assets, run, cut, save_every=2, stop_after=2)) == 0  # exit 0 at --stop-after
    assert not (cut / "metrics.json").exists() and (cut / "checkpoints" / "step-2").is_dir()
    assert main(["finetune", "--resume", str(cut), "--no-progress"]) == 0
    assert losses(cut) == losses(whole)
    assert max_param_diff(whole, cut) == 0.0
    assert metrics(cut)["resumed_from_step"] == 2


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_accumulation_equals_larger_batch(assets, tmp_path, run):
    """2 micro-batches of 2 == one batch of 4 (the gradient of the mean loss over the same examples: rows for a
    classifier, target tokens for a causal LM)."""
    accum, whole = tmp_path / "accum", tmp_path / "whole"
    assert main(argv_of(assets, run, accum, batch_size=2, grad_accum=2)) == 0
    assert main(argv_of(assets, run, whole, batch_size=4)) == 0
    assert metrics(accum)["global_batch_size"] == 4 and metrics(accum)["grad_accum"] == 2
    assert losses(accum) == pytest.approx(losses(whole), abs=5e-5)
    if exactly_reproducible(run):
        assert max_param_diff(accum, whole) < 1e-6


def test_two_processes_equal_one(assets, tmp_path):
    """Every run of the matrix in one 2-process torchrun launch (gloo): 2 ranks x batch 2 == 1 process x batch 4;
    the ranks end bit-identical (the rank digest)."""
    runs = {run_id(r): argv_of(assets, r, tmp_path / "ddp" / run_id(r), batch_size=2) for r in RUNS}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), json.dumps(runs)], capture_output=True, text=True, timeout=1500, env=env,
                          cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for run in RUNS:
        ddp, one = tmp_path / "ddp" / run_id(run), tmp_path / "one" / run_id(run)
        assert main(argv_of(assets, run, one, batch_size=4)) == 0
        m = metrics(ddp)
        assert m["world_size"] == 2 and m["ranks_identical"] is True and m["global_batch_size"] == 4
        assert losses(ddp) == pytest.approx(losses(one), abs=5e-5), run
        if exactly_reproducible(run):
            assert max_param_diff(ddp, one) < 1e-6, run


@pytest.mark.parametrize("run", RUNS, ids=IDS)
def test_refusals(assets, run):
    """Settings that do not apply to a method are refused with one line, for every task kind."""
    kind, method, support = run
    model, data = assets[kind]
    cfg = dict(model=str(model), train_file=str(data), method=method, support=support)
    if method != "sparsegrad":
        with pytest.raises(UsageError, match="refresh_every applies to the sparsegrad method only"):
            FinetuneConfig(**cfg, refresh_every=2).validate()
    else:  # a refresh does not go with checkpoints yet (checkpoints do not hold refreshed bases)
        with pytest.raises(UsageError, match="--refresh-every does not work with --save-every yet"):
            FinetuneConfig(**cfg, refresh_every=2, save_every=2).validate()
    if method != "lora":
        with pytest.raises(UsageError, match="lora_rank applies to the lora method only"):
            FinetuneConfig(**cfg, lora_rank=2).validate()
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda: CUDA is not available"):
            main_raises(["finetune", "--model", str(model), "--train-file", str(data), "--max-length", "32",
                         "--device", "cuda"])


def main_raises(argv):
    from sparsegrad.finetune.cli import build_parser

    args = build_parser().parse_args(argv)
    args.func(args, "sparsegrad " + " ".join(argv))


def test_nonfinite_and_signals_for_a_causal_lm(assets, tmp_path, monkeypatch, capsys):
    """The decoder path has the classifier's reliability features: a NaN loss stops the run (or is skipped with
    --on-nonfinite skip), and SIGTERM saves a checkpoint that resumes to the uninterrupted result."""
    run = (CAUSAL_LM, "sparsegrad", "dynamic")
    monkeypatch.setenv("SPARSEGRAD_TEST_NAN_AT_STEP", "2")
    assert main(argv_of(assets, run, tmp_path / "nan")) == 1
    assert "training loss is nan at step 2" in capsys.readouterr().err
    assert not (tmp_path / "nan" / "adapter").exists()
    assert main(argv_of(assets, run, tmp_path / "skip", on_nonfinite="skip")) == 0
    assert metrics(tmp_path / "skip")["skipped_steps"] == [2]
    monkeypatch.setenv("SPARSEGRAD_TEST_NAN_AT_STEP", "3:grad")
    assert main(argv_of(assets, run, tmp_path / "grad")) == 1
    assert "a gradient is not finite" in capsys.readouterr().err
    monkeypatch.delenv("SPARSEGRAD_TEST_NAN_AT_STEP")
    monkeypatch.setenv("SPARSEGRAD_TEST_SIGNAL_AT_STEP", "2:TERM")
    assert main(argv_of(assets, run, tmp_path / "term")) == 143
    assert (tmp_path / "term" / "checkpoints" / "step-2").is_dir()
    monkeypatch.delenv("SPARSEGRAD_TEST_SIGNAL_AT_STEP")
    assert main(["finetune", "--resume", str(tmp_path / "term"), "--no-progress"]) == 0
    assert main(argv_of(assets, run, tmp_path / "whole")) == 0
    assert losses(tmp_path / "term") == losses(tmp_path / "whole")


@pytest.mark.parametrize("kind", [CLASSIFIER, CAUSAL_LM])
def test_target_modules_and_layers_to_transform(assets, tmp_path, kind):
    """--target-modules REGEX and --layers-to-transform LIST choose the adapted matrices, for every method."""
    model, data = assets[kind]
    target = r".*\.intermediate\.dense" if kind == CLASSIFIER else r"model\.layers\.\d+\.mlp\.down_proj"
    for method in ("sparsegrad", "lora", "full"):
        out = tmp_path / method
        assert main(finetune_argv(kind, model, data, method, "dynamic", steps=1, output_dir=out,
                                  target_modules=target, layers_to_transform="1")) == 0
        m = metrics(out)
        assert m["mlp_matrices"] == 1 and m["layers_to_transform"] == [1], method
        info = json.loads((out / "adapter" / "task.json").read_text())
        assert info["layers_to_transform"] == [1]
        load_finetuned(out / "adapter")  # reloads
    with pytest.raises(UsageError, match="not a regular expression"):
        FinetuneConfig(target_modules="(").validate()
    with pytest.raises(UsageError, match="layers_to_transform or every_nth_block, not both"):
        FinetuneConfig(layers_to_transform=[0], every_nth_block=2).validate()


@pytest.mark.parametrize("kind", [CLASSIFIER, CAUSAL_LM])
def test_bfloat16_and_refresh_for_both_kinds(assets, tmp_path, kind):
    """--dtype bfloat16 (on the CPU: bf16 weights, fp32 deltas) and --refresh-every work for every task kind."""
    import math

    model, data = assets[kind]
    bf16 = tmp_path / "bf16"
    assert main(finetune_argv(kind, model, data, "sparsegrad", "dynamic", steps=2, output_dir=bf16,
                              dtype="bfloat16")) == 0
    assert metrics(bf16)["dtype"] == "bfloat16" and all(math.isfinite(v) for v in losses(bf16))
    reloaded, _, _ = load_finetuned(bf16 / "adapter", merge=False)
    assert json.loads((bf16 / "adapter" / "task.json").read_text())["dtype"] == "bfloat16"  # the trained weights
    assert next(reloaded.parameters()).dtype == torch.bfloat16
    refresh = tmp_path / "refresh"
    assert main(finetune_argv(kind, model, data, "sparsegrad", "dynamic", steps=3, output_dir=refresh,
                              refresh_every=2)) == 0
    assert metrics(refresh)["refreshed_at_steps"] == [2]
    load_finetuned(refresh / "adapter")

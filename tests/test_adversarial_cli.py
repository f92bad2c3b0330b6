"""The CLI cases of the adversarial review (shared/reference/review/adversarial.md, issue 12) and their neighbours,
as one table: each case sets up files, runs `sparsegrad` (in process: what escapes `main` is what a user would see as
a traceback), and asserts the exit code, a fragment of the one-line message and the files on disk afterwards. The
crash cases SIGKILL a real subprocess at a chosen point (`SPARSEGRAD_TEST_KILL_AT`, see sparsegrad.io.fault_point).

The `before` column is the review's verdict for the same case; docs/reliability.md counts both columns."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from helpers import CLASSIFIER, finetune_argv, task_data, tiny_model_dir

import sparsegrad.io as sio
from sparsegrad.finetune.cli import main
from sparsegrad.finetune.divergence import DivergenceGuard

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny model folder, its training file, and one finished SparseGrad and one LoRA run (copied per case)."""
    root = tmp_path_factory.mktemp("adv")
    model = tiny_model_dir(CLASSIFIER, root / "model", dropout=0.0)
    data = task_data(CLASSIFIER, root)
    runs = {}
    for method in ("sparsegrad", "lora"):
        runs[method] = root / f"run-{method}"
        assert main(argv(model, data, runs[method], method=method)) == 0
    return {"model": model, "data": data, "runs": runs}


def argv(model, data, out, method="sparsegrad", steps=2, **flags):
    args = finetune_argv(CLASSIFIER, model, data, method, "dynamic", steps=steps, output_dir=out, **flags)
    if "k" in flags:  # --k instead of the helper's --density
        i = args.index("--density")
        del args[i:i + 2]
    return args


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


@dataclass
class Case:
    id: str
    before: str  # the review's verdict ("" for a neighbour it did not try)
    run: Callable[[dict, Path], list[str]]  # -> argv, after setting up files under the case folder
    code: int
    message: str  # a fragment of stderr ("" for none expected)
    after: Callable[[dict, Path], None]  # asserts the files on disk
    env: dict | None = None


def copy_run(b, w, method="sparsegrad", name="run"):
    dst = w / name
    shutil.copytree(b["runs"][method], dst)
    return dst


# ------------------------------------------------------------------------------------------------- setups
def merge_into_run(b, w):
    run = copy_run(b, w)
    (run / "NOTES.txt").write_text("mine")
    return ["merge", "--adapter", str(run / "adapter"), "--output", str(run), "--overwrite"]


def run_intact(b, w):
    run = w / "run"
    assert {"adapter/adapter_config.json", "adapter/task.json", "metrics.json", "loss.csv", "NOTES.txt"} <= tree(run)
    assert (run / "NOTES.txt").read_text() == "mine"


def merge_dot(b, w):
    run = copy_run(b, w)
    (run / "NOTES.txt").write_text("mine")
    os.chdir(w)
    return ["merge", "--adapter", str(run / "adapter"), "--output", ".", "--overwrite"]


def merge_inside_adapter(b, w):
    run = copy_run(b, w)
    return ["merge", "--adapter", str(run / "adapter"), "--output", str(run / "adapter" / "merged")]


def merge_into_model(b, w):
    run = copy_run(b, w)
    return ["merge", "--adapter", str(run / "adapter"), "--model", str(b["model"]), "--output", str(b["model"]),
            "--overwrite"]


def merge_over_user_folder(b, w):
    run = copy_run(b, w)
    (w / "mine").mkdir()
    (w / "mine" / "thesis.tex").write_text("x")
    return ["merge", "--adapter", str(run / "adapter"), "--output", str(w / "mine"), "--overwrite"]


def merge_twice(b, w):
    run = copy_run(b, w)
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(w / "merged")]) == 0
    return ["merge", "--adapter", str(run / "adapter"), "--output", str(w / "merged"), "--overwrite"]


def merged_ok(b, w):
    names = tree(w / "merged")
    assert {"config.json", "model.safetensors", sio.MARKER_NAME} <= names
    assert not [n for n in os.listdir(w) if n.startswith(".merged.")]  # no temporary folder left


def edit_json(path: Path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=2))


def merge_edited(file, change, method="sparsegrad"):
    def setup(b, w):
        run = copy_run(b, w, method)
        edit_json(run / "adapter" / file, change)
        return ["merge", "--adapter", str(run / "adapter"), "--output", str(w / "merged")]
    return setup


def no_merged(b, w):
    assert not (w / "merged").exists()


def fresh_into_checkpoints(b, w):
    assert main(argv(b["model"], b["data"], w / "run", save_every=1)) == 0
    return argv(b["model"], b["data"], w / "run")


def checkpoints_kept(b, w):
    assert {"checkpoints/step-1", "checkpoints/step-2"} <= tree(w / "run")


def fresh_overwrite(b, w):
    assert main(argv(b["model"], b["data"], w / "run", save_every=1)) == 0
    (w / "run" / "checkpoints" / "step-2" / "mine.txt").write_text("x")  # a user's file inside a step folder
    return argv(b["model"], b["data"], w / "run", overwrite=True)


def user_checkpoints(b, w):
    (w / "run" / "checkpoints").mkdir(parents=True)
    (w / "run" / "checkpoints" / "my_model_v3.bin").write_text("weights")
    return argv(b["model"], b["data"], w / "run")


def user_file_kept(b, w):
    assert (w / "run" / "checkpoints" / "my_model_v3.bin").read_text() == "weights"
    assert (w / "run" / "adapter" / "task.json").is_file()


def locked(b, w):
    lock = sio.lock_folder(w / "run")
    locked.held = lock  # released by the after-check
    return argv(b["model"], b["data"], w / "run")


def lock_released(b, w):
    locked.held.release()
    assert not (w / "run" / "metrics.json").exists()


def all_skipped(b, w):
    return argv(b["model"], b["data"], w / "run", method="full", steps=1, on_nonfinite="skip")


def strict_metrics_no_adapter(b, w):
    text = (w / "run" / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["skipped_steps"] == [1]
    assert not (w / "run" / "adapter").exists()


def nothing(b, w):
    pass


def no_folder(name):
    def check(b, w):
        assert not (w / name).exists(), tree(w / name)
    return check


CASES = [
    Case("merge-output-is-run-dir-overwrite", "data loss", merge_into_run, 2, "contains --adapter", run_intact),
    Case("merge-output-dot", "raw traceback", merge_dot, 2, "is the current folder", run_intact),
    Case("merge-output-inside-adapter", "", merge_inside_adapter, 2, "lies inside --adapter", no_folder("run/adapter/merged")),
    Case("merge-output-is-model", "", merge_into_model, 2, "is --model", nothing),
    Case("merge-over-user-folder-overwrite", "", merge_over_user_folder, 2, "not a merged model written by sparsegrad",
         lambda b, w: tree(w / "mine") == {"thesis.tex"} or pytest.fail(tree(w / "mine"))),
    Case("merge-over-own-merged-overwrite", "ok", merge_twice, 0, "", merged_ok),
    Case("merge-task-json-labels-reversed", "accepts bad input",
         merge_edited("task.json", lambda d: d["label_names"].reverse()), 2, "was edited or replaced", no_merged),
    Case("merge-task-json-missing-model", "raw traceback",
         merge_edited("task.json", lambda d: d.pop("model")), 2, "'model' must be a string, got None (the file was "
         "edited)", no_merged),
    Case("merge-adapter-config-edited", "accepts bad input",
         merge_edited("adapter_config.json", lambda d: d.update(identity_basis=True)), 2, "edited", no_merged),
    Case("merge-lora-task-json-edited", "",
         merge_edited("task.json", lambda d: d["label_names"].reverse(), "lora"), 2, "was edited or replaced",
         no_merged),
    Case("merge-lora-config-edited", "",
         merge_edited("adapter_config.json", lambda d: d.update(lora_alpha=100), "lora"), 2, "was edited or replaced",
         no_merged),
    Case("fresh-run-into-checkpoints", "data loss", fresh_into_checkpoints, 2, "--resume", checkpoints_kept),
    Case("fresh-run-overwrite-user-file-in-step", "", fresh_overwrite, 2, "mine.txt",
         lambda b, w: (w / "run" / "checkpoints" / "step-2" / "mine.txt").is_file() or pytest.fail()),
    Case("users-own-checkpoints-folder", "data loss", user_checkpoints, 0, "", user_file_kept),
    Case("output-dir-empty-string", "accepts bad input", lambda b, w: (os.chdir(w), argv(b["model"], b["data"], ""))[1],
         2, "--output-dir is empty", lambda b, w: tree(w) == set() or pytest.fail(tree(w))),
    Case("output-dir-under-a-file", "", lambda b, w: ((w / "f").write_text("x"), argv(b["model"], b["data"], w / "f" / "r"))[1],
         2, "is a file, not a folder", lambda b, w: (w / "f").read_text() == "x" or pytest.fail()),
    Case("output-dir-is-model", "", lambda b, w: argv(b["model"], b["data"], b["model"]), 2, "is --model", nothing),
    Case("second-writer-locked", "raw traceback", locked, 2, f"in use by another sparsegrad process (PID {os.getpid()})",
         lock_released),
    Case("k-larger-than-matrices", "raw traceback", lambda b, w: argv(b["model"], b["data"], w / "run", k=100000000),
         2, "exceeds", no_folder("run")),
    Case("every-step-skipped", "accepts bad input", all_skipped, 1, "every one of the 1 steps was skipped",
         strict_metrics_no_adapter, env={"SPARSEGRAD_TEST_NAN_AT_STEP": "1"}),
    Case("calibrate-output-dir-is-file", "raw traceback",
         lambda b, w: ((w / "f").write_text("x"), ["calibrate", "--model", str(b["model"]), "--train-file",
                                                   str(b["data"]), "--output-dir", str(w / "f")])[1],
         2, "is a file", lambda b, w: (w / "f").read_text() == "x" or pytest.fail()),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_case(case, base, tmp_path, capsys, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(tmp_path)
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    args = case.run(base, work)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == case.code, err
    assert case.message in err
    if case.code != 0:
        assert "Traceback" not in err and err.count("sparsegrad: error:") == 1
    case.after(base, work)


# ------------------------------------------------------------------------------------------------- neighbours
def test_debug_shows_the_traceback(base, tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        main(["--debug", *argv(base["model"], base["data"], tmp_path / "run", k=100000000)])


def test_divergence_guard_rule():
    guard = DivergenceGuard()
    fired = [guard.observe(i, loss) for i, loss in enumerate([1.1, 1.0, 0.9, 50.0, 20.0, 11.0, 5.0], start=1)]
    assert fired == [False, False, False, False, False, True, False] and guard.diverged_at == 6
    calm = DivergenceGuard()
    assert not any(calm.observe(i, v) for i, v in enumerate([1.0, 1.0, 1.0, 50.0, 2.0, 50.0, 50.0], start=1))
    resumed = DivergenceGuard()
    resumed.replay([1.1, float("nan"), 1.0, 0.9, 50.0, 20.0])  # a NaN (skipped) step neither counts nor resets
    assert resumed.observe(7, 11.0) and resumed.diverged_at == 7


def test_divergence_stops_the_run(base, tmp_path, capsys, monkeypatch):
    """--lr 1e3 (full, the review's case 222): stopped with one line, exit 1, no adapter; with skip: a warning and
    metrics.json records it."""
    import sparsegrad.finetune.divergence as div

    monkeypatch.setattr(div, "FACTOR", 1.01)  # the tiny model's loss rises less than 10x; the rule is the same
    monkeypatch.setattr(div, "PATIENCE", 1)
    monkeypatch.setattr(div, "BASELINE_STEPS", 1)
    code = main(argv(base["model"], base["data"], tmp_path / "stop", method="full", steps=4, lr=1e3))
    err = capsys.readouterr().err
    assert code == 1 and "the training loss diverged" in err and "No adapter was written" in err
    assert not (tmp_path / "stop").exists()  # the failed run leaves no folder it created
    code = main(argv(base["model"], base["data"], tmp_path / "skip", method="full", steps=4, lr=1e3,
                     on_nonfinite="skip"))
    err = capsys.readouterr().err
    assert code == 0 and "sparsegrad: warning: the training loss diverged" in err
    record = json.loads((tmp_path / "skip" / "metrics.json").read_text())["divergence"]
    assert record["diverged_at_step"] >= 2


def test_warnings_are_one_line(capsys):
    import warnings

    from sparsegrad.finetune.cli import one_line_warnings

    with one_line_warnings():
        warnings.warn("something odd\n  on two lines", UserWarning)
    assert capsys.readouterr().err == "sparsegrad: warning: something odd on two lines\n"


# ------------------------------------------------------------------------------------------------- crashes
@pytest.mark.parametrize("point", ["dir:before-swap", "dir:after-swap", "dir:mid-remove"])
def test_sigkill_while_replacing_the_adapter(base, tmp_path, point):
    """A second run into a folder with an adapter, SIGKILLed during the swap (the review's case 240): the old or
    the new adapter is at run/adapter, loadable; the next run recovers the leftovers and finishes."""
    run = copy_run(base, tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "SPARSEGRAD_TEST_KILL_AT": point, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sparsegrad", *argv(base["model"], base["data"], run, seed=1)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (run / "adapter" / "task.json").is_file() and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert main(argv(base["model"], base["data"], run, seed=1)) == 0
    assert not [n for n in os.listdir(run) if n.startswith(".adapter.")]
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]) == 0

"""The CLI cases of the adversarial review (shared/reference/review/adversarial.md, issue 12) and their neighbours,
as one table: each case sets up files, runs `sparsegrad` (in process: what escapes `main` is what a user would see as
a traceback), and asserts the exit code, the one-line message (a whole line of stderr when it starts with
``sparsegrad``, else a fragment) and the files on disk afterwards. The crash cases SIGKILL a real process at a
chosen point (`SPARSEGRAD_TEST_KILL_AT`, see sparsegrad.io.fault_point): one started as ``python -m sparsegrad``,
the others forked from this process (a real process and a real SIGKILL, without importing torch again).

The `before` column is the review's verdict (and case number) for the same case; docs/reliability.md's table is
printed from this one: ``python tests/test_adversarial_cli.py``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
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
    before: str  # the review's verdict and case number ("" for a neighbour it did not try)
    run: Callable[[dict, Path], list[str]]  # -> argv, after setting up files under the case folder
    code: int
    message: str  # a whole line of stderr if it starts with "sparsegrad" ({w}: the case folder, {model}, {ro}, ...),
    #               else a fragment of it ("" for none expected)
    after: Callable[[dict, Path], None]  # asserts the files on disk
    env: dict | None = None
    mount: bool = False  # needs the read-only and the 64 KiB tmpfs mounts


def expected(case: Case, b: dict, w: Path) -> str:
    return case.message.format(w=w, model=b["model"], data=b["data"], name=b["data"].parent.name,
                               ro=b.get("ro"), small=b.get("small"), pid=os.getpid())


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


class Payload:
    """Pickled, it would create the file ``path`` when unpickled (a malicious adapter_model.bin)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def merge_pickled_lora(b, w):
    run = copy_run(b, w, "lora")
    (run / "adapter" / "adapter_model.safetensors").unlink()
    torch.save({"x": Payload(w / "PWNED")}, run / "adapter" / "adapter_model.bin")
    return ["merge", "--adapter", str(run / "adapter"), "--output", str(w / "merged")]


def payload_not_run(b, w):
    assert not (w / "PWNED").exists() and not (w / "merged").exists()


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


def data_rows(b) -> list[str]:
    return b["data"].read_text().splitlines()


def csv_file(name, lines):
    """A setup writing ``lines(b)`` (the lines of a CSV) to the case folder; argv trains on it."""
    def setup(b, w, **flags):
        (w / name).write_text("\n".join(lines(b)) + "\n")
        return argv(b["model"], w / name, w / "run", **flags)
    return setup


def numbered_labels(b):
    """The topics as numbers, every other row spelling its label as a float: '0.0', '1', '2.0', '0', ..."""
    ids = {"sport": 0, "business": 1, "arts": 2}
    rows = [line.rsplit(",", 1) for line in data_rows(b)[1:]]
    return ["text,label"] + [f"{t},{ids[y]}.0" if i % 2 == 0 else f"{t},{ids[y]}" for i, (t, y) in enumerate(rows)]


def three_number_classes(b, w):
    task = json.loads((w / "run" / "adapter" / "task.json").read_text())
    assert task["label_names"] == ["0", "1", "2"] and task["num_labels"] == 3


def special_file(kind):
    """A setup whose --train-file (or --eval-file) is a directory, a FIFO, a symlink loop or a broken symlink."""
    def setup(b, w):
        names = {"dir": "adir", "fifo": "fifo.csv", "loop": "loop.csv", "dangling": "gone.csv", "eval-dir": "adir"}
        path = w / names[kind]
        if kind in ("dir", "eval-dir"):
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "loop":
            path.symlink_to(path.name)
        else:
            path.symlink_to("nowhere.csv")
        if kind == "eval-dir":
            return argv(b["model"], b["data"], w / "run", eval_file=path)
        return argv(b["model"], path, w / "run")
    return setup


def model_folder(kind):
    def setup(b, w):
        if kind == "empty":
            (w / "empty").mkdir()
            return argv(w / "empty", b["data"], w / "run")
        run = copy_run(b, w)
        return argv(run / "adapter", b["data"], w / "out")
    return setup


def compare_argv(b, w, *extra, methods="full,lora"):
    return ["compare", "--methods", methods, "--seeds", "0", "--model", str(b["model"]), "--train-file",
            str(b["data"]), "--max-length", "32", "--max-steps", "1", "--batch-size", "4", "--no-progress",
            "--output-dir", str(w / "cmp"), *map(str, extra)]


def on_mount(which, target, command="finetune"):
    """A setup writing onto the read-only (``ro``) or the 64 KiB (``small``) tmpfs."""
    def setup(b, w):
        out = Path(b[which]) / target if target else Path(b[which])
        if command == "merge":
            return ["merge", "--adapter", str(copy_run(b, w) / "adapter"), "--output", str(out)]
        if command == "calibrate":
            return ["calibrate", "--model", str(b["model"]), "--train-file", str(b["data"]), "--max-length", "32",
                    "--output-dir", str(out), "--no-progress"]
        return argv(b["model"], b["data"], out)
    return setup


def mount_empty(which):
    def check(b, w):
        assert not os.listdir(b[which]), os.listdir(b[which])
    return check


CASES = [
    Case("merge-output-is-run-dir-overwrite", "data loss #100", merge_into_run, 2,
         "sparsegrad: error: --output {w}/run contains --adapter {w}/run/adapter: writing there could replace the "
         "input; "
         "choose a separate folder", run_intact),
    Case("merge-output-dot", "raw traceback #101", merge_dot, 2,
         "sparsegrad: error: --output . is the current folder, one of its parents, the home folder or the root: it "
         "would be replaced whole; give a new folder", run_intact),
    Case("merge-output-inside-adapter", "", merge_inside_adapter, 2,
         "sparsegrad: error: --output {w}/run/adapter/merged lies inside --adapter {w}/run/adapter: writing there "
         "could "
         "replace the input; choose a separate folder", no_folder("run/adapter/merged")),
    Case("merge-output-is-model", "", merge_into_model, 2,
         "sparsegrad: error: --output {model} is --model {model}: writing there could replace the input; choose a "
         "separate folder", nothing),
    Case("merge-over-user-folder-overwrite", "", merge_over_user_folder, 2,
         "sparsegrad: error: --output {w}/mine is not a merged model written by sparsegrad: refusing to replace it, "
         "even "
         "with --overwrite; choose a new folder",
         lambda b, w: tree(w / "mine") == {"thesis.tex"} or pytest.fail(tree(w / "mine"))),
    Case("merge-over-own-merged-overwrite", "ok", merge_twice, 0, "", merged_ok),
    Case("merge-task-json-labels-reversed", "accepts bad input #151",
         merge_edited("task.json", lambda d: d["label_names"].reverse()), 2,
         "sparsegrad: error: cannot load adapter {w}/run/adapter: {w}/run/adapter/task.json was edited or replaced "
         "after "
         "saving (its checksum differs from adapter_config.json); restore it or save the adapter again", no_merged),
    Case("merge-task-json-missing-model", "raw traceback #156",
         merge_edited("task.json", lambda d: d.pop("model")), 2,
         "sparsegrad: error: {w}/run/adapter/task.json: 'model' must be a string, got None (the file was "
         "edited)", no_merged),
    Case("merge-adapter-config-edited", "accepts bad input #115",
         merge_edited("adapter_config.json", lambda d: d.update(identity_basis=True)), 2,
         "sparsegrad: error: cannot load adapter {w}/run/adapter: {w}/run/adapter/adapter_model.safetensors holds "
         "bases but "
         "adapter_config.json records identity_basis=true; the config was edited", no_merged),
    Case("merge-task-json-num-labels-a-string", "raw traceback #153",
         merge_edited("task.json", lambda d: d.update(num_labels="3")), 2,
         "sparsegrad: error: cannot load model '{model}': num_labels must be an integer of at least 2, got '3'",
         no_merged),
    Case("merge-lora-pickled-bin-weights", "raw traceback #161", merge_pickled_lora, 2,
         "sparsegrad: error: cannot load adapter {w}/run/adapter: {w}/run/adapter holds no adapter_model.safetensors: "
         "sparsegrad reads LoRA weights from safetensors only (never a pickled .bin)", payload_not_run),
    Case("merge-lora-task-json-edited", "",
         merge_edited("task.json", lambda d: d["label_names"].reverse(), "lora"), 2,
         "sparsegrad: error: cannot load adapter {w}/run/adapter: {w}/run/adapter/task.json was edited or replaced "
         "after "
         "sparsegrad wrote it (checksum differs); restore it or write the folder again", no_merged),
    Case("merge-lora-config-edited", "",
         merge_edited("adapter_config.json", lambda d: d.update(lora_alpha=100), "lora"), 2,
         "sparsegrad: error: cannot load adapter {w}/run/adapter: {w}/run/adapter/adapter_config.json was edited or "
         "replaced "
         "after sparsegrad wrote it (checksum differs); restore it or write the folder again", no_merged),
    Case("fresh-run-into-checkpoints", "data loss #72", fresh_into_checkpoints, 2,
         "sparsegrad: error: {w}/run/checkpoints holds the checkpoints of another run (up to step-2): continue it with "
         "`sparsegrad finetune --resume {w}/run`, or pass --overwrite to delete them and start "
         "afresh", checkpoints_kept),
    Case("fresh-run-overwrite-user-file-in-step", "", fresh_overwrite, 2,
         "sparsegrad: error: refusing to delete {w}/run/checkpoints: it holds files sparsegrad did not write "
         "(step-2/mine.txt); move them away first (a fresh run cannot start over the checkpoints in "
         "{w}/run/checkpoints)",
         lambda b, w: (w / "run" / "checkpoints" / "step-2" / "mine.txt").is_file() or pytest.fail()),
    Case("users-own-checkpoints-folder", "data loss #71", user_checkpoints, 0, "", user_file_kept),
    Case("output-dir-empty-string", "accepts bad input #68",
         lambda b, w: (os.chdir(w), argv(b["model"], b["data"], ""))[1], 2,
         "sparsegrad: error: --output-dir is empty: give a folder "
         "name", lambda b, w: tree(w) == set() or pytest.fail(tree(w))),
    Case("output-dir-under-a-file", "", lambda b, w: ((w / "f").write_text("x"), argv(b["model"], b["data"], w / "f" / "r"))[1],
         2, "sparsegrad: error: --output-dir {w}/f/r: {w}/f is a file, not a folder",
         lambda b, w: (w / "f").read_text() == "x" or pytest.fail()),
    Case("output-dir-is-model", "", lambda b, w: argv(b["model"], b["data"], b["model"]), 2,
         "sparsegrad: error: --output-dir {model} is --model {model}: writing there could replace the input; choose a "
         "separate folder", nothing),
    Case("second-writer-locked", "raw traceback #246", locked, 2,
         "sparsegrad: error: --output-dir {w}/run is in use by another sparsegrad process (PID {pid}); wait for it "
         "to finish, "
         "stop it, or choose another folder", lock_released),
    Case("k-larger-than-matrices", "raw traceback #47",
         lambda b, w: argv(b["model"], b["data"], w / "run", k=100000000),
         2, "sparsegrad: error: --k 100000000 exceeds the 2,048 entries of the 32x64 MLP matrices of {model} "
         "(config.json): give --k <= 2048 or a --density", no_folder("run")),
    Case("k-larger-than-a-custom-target", "",
         lambda b, w: argv(b["model"], b["data"], w / "run", k=100000000, target_modules=r".*intermediate\.dense"),
         2, "sparsegrad: error: k=100000000 exceeds the 64x32=2048 entries of bert.encoder.layer.0.intermediate.dense",
         no_folder("run")),  # after loading, before calibration (select_targets)
    Case("calibrate-k-larger-than-matrices", "",
         lambda b, w: ["calibrate", "--model", str(b["model"]), "--train-file", str(b["data"]), "--max-length", "32",
                       "--k", "100000000", "--output-dir", str(w / "cal"), "--no-progress"], 2,
         "sparsegrad: error: --k 100000000 exceeds the 2,048 entries of the 32x64 MLP matrices of {model} "
         "(config.json): give --k <= 2048 or a --density", no_folder("cal")),
    Case("lora-rank-100000", "accepts bad input #59",
         lambda b, w: argv(b["model"], b["data"], w / "run", method="lora", lora_rank=100000), 2,
         "sparsegrad: error: --lora-rank 100000 exceeds the smallest dimension (32) of the 32x64 MLP matrices of "
         "{model} (config.json): give --lora-rank <= 32", no_folder("run")),
    Case("lora-rank-over-a-custom-target", "",
         lambda b, w: argv(b["model"], b["data"], w / "run", method="lora", lora_rank=33,
                           target_modules=r".*intermediate\.dense"), 2,
         "sparsegrad: error: lora_rank 33 exceeds the smallest dimension of bert.encoder.layer.0.intermediate.dense "
         "(64x32): choose a rank <= 32", no_folder("run")),
    Case("max-length-over-the-positions", "", lambda b, w: [*argv(b["model"], b["data"], w / "run"), "--max-length",
                                                           "128"], 2,
         "sparsegrad: error: --max-length 128 exceeds the 64 positions of {model} (config.json): give --max-length "
         "<= 64", no_folder("run")),
    Case("labels-1-and-1.0-one-class", "accepts bad input #3", csv_file("mixed.csv", numbered_labels), 0,
         "sparsegrad: warning: {w}/mixed.csv: labels that spell one number are read as one class: '0.0'/'0' -> '0'; "
         "'1'/'1.0' -> '1'; '2.0'/'2' -> '2'", three_number_classes),
    Case("csv-row-with-an-extra-field", "accepts bad input #10",
         csv_file("extra.csv", lambda b: data_rows(b) + ["goal match team,sport,extra"]), 2,
         "sparsegrad: error: {w}/extra.csv line 62: the row has more fields than the header (3 fields, the header "
         "has 2 columns); quote a text that holds the delimiter", no_folder("run")),
    Case("csv-row-with-a-missing-field", "",
         csv_file("short.csv", lambda b: data_rows(b) + ["goal match team"]), 2,
         "sparsegrad: error: {w}/short.csv line 62: the row has fewer fields than the header (1 field, the header "
         "has 2 columns)", no_folder("run")),
    Case("csv-header-names-label-twice", "accepts bad input #9",
         csv_file("dup.csv", lambda b: ["text,label,label"] + [r + ",x" for r in data_rows(b)[1:]]), 2,
         "sparsegrad: error: {w}/dup.csv line 1: the header names the label column 'label' 2 times; rename all but "
         "one", no_folder("run")),
    Case("text-column-is-label-column", "unclear message #39",
         lambda b, w: argv(b["model"], b["data"], w / "run", text_column="label", label_column="label"), 2,
         "sparsegrad: error: --text-column and --label-column are both 'label': they must be two different columns",
         no_folder("run")),
    Case("prompt-column-is-response-column", "",
         lambda b, w: argv(b["model"], b["data"], w / "run", prompt_column="q", response_column="q"), 2,
         "sparsegrad: error: --prompt-column and --response-column are both 'q': they must be two different columns",
         no_folder("run")),
    Case("max-train-1-leaves-one-class", "accepts bad input #61",
         lambda b, w: argv(b["model"], b["data"], w / "run", max_train=1), 2,
         "sparsegrad: error: {name}: the training subset of max_train=1 rows has a single class only ('arts'); "
         "classification needs at least two different labels", no_folder("run")),
    Case("train-file-is-a-directory", "unclear message #20", special_file("dir"), 2,
         "sparsegrad: error: --train-file {w}/adir: is a directory, not a regular file", no_folder("run")),
    Case("eval-file-is-a-directory", "unclear message #38", special_file("eval-dir"), 2,
         "sparsegrad: error: --eval-file {w}/adir: is a directory, not a regular file", no_folder("run")),
    Case("train-file-is-a-fifo", "unclear message #34", special_file("fifo"), 2,
         "sparsegrad: error: --train-file {w}/fifo.csv: is not a regular file (a FIFO)", no_folder("run")),
    Case("train-file-is-a-symlink-loop", "ok #26", special_file("loop"), 2,
         "sparsegrad: error: --train-file {w}/loop.csv: is a symlink loop", no_folder("run")),
    Case("train-file-is-a-broken-symlink", "", special_file("dangling"), 2,
         "sparsegrad: error: --train-file {w}/gone.csv: is a broken symlink (to nowhere.csv)", no_folder("run")),
    Case("model-is-an-empty-folder", "unclear message #74", model_folder("empty"), 2,
         "sparsegrad: error: --model {w}/empty holds no config.json: not a Hugging Face model folder (the folder is "
         "empty)", no_folder("run")),
    Case("model-is-an-adapter-folder", "unclear message #76", model_folder("adapter"), 2,
         "sparsegrad: error: --model {w}/run/adapter holds no config.json: not a Hugging Face model folder (it holds "
         "adapter_config.json: an adapter; give the base model it was trained on)", no_folder("out")),
    Case("compare-k-refused-before-any-run", "unclear message #91", lambda b, w: compare_argv(b, w, "--k", 100000000),
         2, "sparsegrad: error: --k 100000000 exceeds the 2,048 entries of the 32x64 MLP matrices of {model} "
         "(config.json): give --k <= 2048 or a --density", no_folder("cmp")),
    Case("compare-max-length-refused-before-any-run", "unclear message #91",
         lambda b, w: [*compare_argv(b, w), "--max-length", "128"], 2,
         "sparsegrad: error: --max-length 128 exceeds the 64 positions of {model} (config.json): give --max-length "
         "<= 64", no_folder("cmp")),
    Case("compare-bad-data-refused-before-any-run", "",
         lambda b, w: ((w / "x.csv").write_text(b["data"].read_text() + "a,b,c\n"),
                       [a if a != str(b["data"]) else str(w / "x.csv") for a in compare_argv(b, w)])[1], 2,
         "sparsegrad: error: {w}/x.csv line 62: the row has more fields than the header (3 fields, the header has 2 "
         "columns); quote a text that holds the delimiter", no_folder("cmp")),
    Case("compare-lr-for-a-method-not-run", "accepts bad input #90",
         lambda b, w: compare_argv(b, w, "--lr", "lora=1e-3", methods="full"), 2,
         "sparsegrad: error: --lr names 'lora', which is not in --methods (full)", no_folder("cmp")),
    Case("output-dir-on-a-read-only-mount", "raw traceback #70", on_mount("ro", ""), 2,
         "sparsegrad: error: --output-dir {ro} cannot be written: the file system is read-only ({ro})",
         mount_empty("ro"), mount=True),
    Case("output-dir-under-a-read-only-mount", "", on_mount("ro", "run"), 2,
         "sparsegrad: error: --output-dir {ro}/run cannot be written: the file system is read-only ({ro})",
         mount_empty("ro"), mount=True),
    Case("merge-output-on-a-read-only-mount", "", on_mount("ro", "merged", "merge"), 2,
         "sparsegrad: error: --output {ro}/merged cannot be written: the file system is read-only ({ro})",
         mount_empty("ro"), mount=True),
    Case("calibrate-output-dir-on-a-read-only-mount", "", on_mount("ro", "cal", "calibrate"), 2,
         "sparsegrad: error: --output-dir {ro}/cal cannot be written: the file system is read-only ({ro})",
         mount_empty("ro"), mount=True),
    Case("adapter-does-not-fit-a-64-KiB-disk", "raw traceback #228", on_mount("small", "run"), 1,
         "sparsegrad: error: cannot write {small}/run/adapter/task.json: the disk is full (No space left on device); "
         "nothing was half-written and the previous version, if any, is intact", mount_empty("small"), mount=True),
    *[Case(f"lr-1e3-diverges-{method}", f"accepts bad input #{number}",
           lambda b, w, method=method: argv(b["model"], b["data"], w / "run", method=method, steps=4, lr=1e3), 1,
           "over 10 x its start (1.096, the lowest of the first 3 steps) for 3 steps in a row at step 4: lower the "
           "learning rate (now 1000) or check the data; --on-nonfinite skip skips such steps instead. No adapter was "
           "written", no_folder("run")) for method, number in (("sparsegrad", 221), ("full", 222))],
    Case("every-step-skipped", "accepts bad input #225", all_skipped, 1,
         "sparsegrad: error: every one of the 1 steps was skipped (--on-nonfinite skip): nothing trained, no adapter "
         "written (metrics.json records the run); lower the learning rate (now 0.001) or check the data",
         strict_metrics_no_adapter, env={"SPARSEGRAD_TEST_NAN_AT_STEP": "1"}),
    Case("calibrate-output-dir-is-file", "raw traceback #85",
         lambda b, w: ((w / "f").write_text("x"), ["calibrate", "--model", str(b["model"]), "--train-file",
                                                   str(b["data"]), "--output-dir", str(w / "f")])[1],
         2, "sparsegrad: error: --output-dir {w}/f is a file, not a folder",
         lambda b, w: (w / "f").read_text() == "x" or pytest.fail()),
]


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """A read-only tmpfs and a 64 KiB one (root ignores permission bits: only a read-only mount refuses root's
    writes); skipped where mounting is not allowed."""
    root = tmp_path_factory.mktemp("mounts")
    made = []
    for name, options in (("ro", "ro,size=64k"), ("small", "size=64k")):
        (root / name).mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(root / name)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            for path in made:
                subprocess.run(["umount", str(path)])
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        made.append(root / name)
    yield {"ro": root / "ro", "small": root / "small"}
    for path in made:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_case(case, base, tmp_path, capsys, monkeypatch, request):
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(tmp_path)
    for key, value in (case.env or {}).items():
        monkeypatch.setenv(key, value)
    if case.mount:
        base = {**base, **request.getfixturevalue("mounts")}
    args = case.run(base, work)
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == case.code, err
    message = expected(case, base, work)
    assert (message in err.splitlines()) if message.startswith("sparsegrad") else (message in err), err
    if case.code != 0:
        assert "Traceback" not in err and err.count("sparsegrad: error:") == 1
    case.after(base, work)


# ------------------------------------------------------------------------------------------------- neighbours
def test_debug_shows_the_traceback(base, tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        main(["--debug", *argv(base["model"], base["data"], tmp_path / "run", k=100000000)])


def test_divergence_guard_rule():
    review = DivergenceGuard()  # the review's case 221 (--lr 1e3, 4 steps): it explodes from step 2 on
    assert [review.observe(i, v) for i, v in enumerate([1.1, 697.3, 5025.3, 575.2], start=1)] == [False] * 3 + [True]
    assert review.start == 1.1 and review.diverged_at == 4
    guard = DivergenceGuard()
    fired = [guard.observe(i, loss) for i, loss in enumerate([1.1, 1.0, 0.9, 50.0, 20.0, 9.5, 5.0], start=1)]
    assert fired == [False, False, False, False, False, True, False] and guard.diverged_at == 6  # 10 x 0.9
    calm = DivergenceGuard()
    assert not any(calm.observe(i, v) for i, v in enumerate([1.0, 1.0, 1.0, 50.0, 2.0, 50.0, 50.0], start=1))
    near_zero = DivergenceGuard()  # fits from the start: a wobble below 1 nat is no divergence
    assert not any(near_zero.observe(i, v) for i, v in enumerate([0.01, 0.5, 0.6, 0.7, 0.8], start=1))
    resumed = DivergenceGuard()
    resumed.replay([1.1, float("nan"), 1.0, 0.9, 50.0, 20.0])  # a NaN (skipped) step neither counts nor resets
    assert resumed.observe(7, 9.5) and resumed.diverged_at == 7


def test_divergence_stops_the_run(base, tmp_path, capsys, monkeypatch):
    """--lr 1e3 (full, the review's case 222): stopped with one line, exit 1, no adapter; with skip: a warning and
    metrics.json records it."""
    import sparsegrad.finetune.divergence as div

    monkeypatch.setattr(div, "FACTOR", 1.01)  # the tiny model's loss rises less than 10x; the rule is the same
    monkeypatch.setattr(div, "PATIENCE", 1)
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


def test_compare_names_each_failed_runs_error(base, tmp_path, capsys):
    """Runs that fail (here in their own argument parsing, so that the two real subprocesses end at once) are
    listed at the end with their own error line from run.log, not only counted."""
    from sparsegrad.finetune import compare

    common = compare_argv(base, tmp_path)[5:-2]  # the shared finetune flags
    code = compare.run_compare(["full", "sparsegrad"], [0], common, tmp_path / "cmp", lrs={"full": float("nan")},
                               sparsegrad_args=["--score-steps", "-1"])
    err = capsys.readouterr().err.splitlines()
    assert code == 1 and err[-3:] == [
        "2 run(s) failed:",
        "  full seed 0: sparsegrad finetune: error: argument --lr: expected a positive number, got 'nan'",
        "  sparsegrad seed 0: sparsegrad finetune: error: argument --score-steps: expected an integer >= 0, got "
        "'-1'"]


# ------------------------------------------------------------------------------------------------- crashes
def killed_run(args: list[str], point: str, exec_: bool) -> int:
    """Run ``sparsegrad ARGS`` in a real process SIGKILLed at ``point``; returns its exit status (-9 when killed).
    ``exec_``: ``python -m sparsegrad`` (the console path, ~3 s of imports); else a fork of this process."""
    if exec_:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), sio.KILL_ENV: point, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "sparsegrad", *args], env=env, capture_output=True, text=True,
                              timeout=300)
        return proc.returncode
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            os.environ[sio.KILL_ENV] = point
            code = main(args)
        finally:
            os._exit(code)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"the child did not reach {point} in 300 s")


@pytest.mark.parametrize("point,exec_", [("dir:before-swap", True), ("dir:after-swap", False),
                                         ("dir:mid-remove", False)])
def test_sigkill_while_replacing_the_adapter(base, tmp_path, point, exec_):
    """A second run into a folder with an adapter, SIGKILLed during the swap (the review's case 240): the old or
    the new adapter is at run/adapter, loadable; the next run recovers the leftovers and finishes."""
    run = copy_run(base, tmp_path)
    old = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert killed_run(argv(base["model"], base["data"], run, seed=1), point, exec_) == -signal.SIGKILL
    assert (run / "adapter" / "task.json").is_file()
    now = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert (now == old) == (point == "dir:before-swap")  # the old adapter before the exchange, the new one after
    assert main(argv(base["model"], base["data"], run, seed=1)) == 0
    assert not [n for n in os.listdir(run) if n.startswith(".adapter.")]
    assert main(["merge", "--adapter", str(run / "adapter"), "--output", str(tmp_path / "merged")]) == 0


# ------------------------------------------------------------------------------------------------- the docs' table
def markdown_table() -> str:
    """docs/reliability.md's table of these cases: the counts by the review's verdict (every case passes now, so
    every one is 'ok' after), then per case the verdict before, exit code and message (W/ is the case folder, MODEL
    the tiny model folder)."""
    before = Counter(case.before.split(" #")[0] or "not tried by the review (neighbour)" for case in CASES)
    rows = [f"{len(CASES)} cases. Before (the review's verdict for the same case): "
            + ", ".join(f"{verdict} {n}" for verdict, n in before.most_common()) + f". After: ok {len(CASES)}.", "",
            "| case | review's verdict (case #) | exit | message (one line of stderr) |", "|---|---|---|---|"]
    for case in CASES:
        message = case.message.format(w="W", model="MODEL", data="W/train.csv", name="NAME", ro="RO", small="SMALL",
                                      pid="PID")
        rows.append(f"| {case.id} | {case.before or 'neighbour'} | {case.code} | `{message or '(none)'}` |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())

"""The `sparsegrad` CLI: one-line errors with exit status 2, help, merge, calibrate, and a tiny compare."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import CLASSIFIER, make_csv, tiny_model_dir

from sparsegrad.finetune.cli import main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinycli")
    return tiny_model_dir(CLASSIFIER, root / "model"), make_csv(root / "train.csv")


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--method", "dora"], "invalid choice: 'dora'"),
    (["finetune", "--k", "10", "--density", "0.01"], "sparsegrad: error: give --k or --density, not both"),
    (["finetune", "--density", "0"], "density must be in (0, 1]"),
    (["finetune", "--density", "1.5"], "density must be in (0, 1]"),
    (["finetune", "--density", "abc"], "expected a number in (0, 1]"),
    (["finetune", "--k", "-3"], "expected a positive integer"),
    (["finetune", "--batch-size", "0"], "expected a positive integer"),
    (["finetune", "--lr", "-1"], "expected a positive number"),
    (["finetune", "--warmup-ratio", "1"], "expected a number in [0, 1)"),
    (["finetune", "--seed", "-1"], "expected an integer in [0, 2**32)"),
    (["finetune", "--train-file", "/nonexistent/train.csv"], "sparsegrad: error: --train-file /nonexistent/train.csv: no such file"),
    (["finetune", "--eval-file", "x.csv"], "sparsegrad: error: --eval-file needs --train-file"),
    (["finetune", "--task", "bbc", "--train-file", "x.csv"], "sparsegrad: error: give --task or --train-file, not both"),
    (["finetune", "--task", "imdb"], "invalid choice: 'imdb'"),
    (["finetune", "--model", "/nonexistent/model"], "sparsegrad: error: --model /nonexistent/model: neither"),
    (["finetune", "--method", "full", "--lora-rank", "4"], "sparsegrad: error: --lora-rank applies to --method lora"),
    (["finetune", "--train-scope", "attention"], "invalid choice: 'attention'"),
    (["finetune", "--score-steps", "-1"], "expected an integer >= 0"),
    (["finetune", "--method", "lora", "--score-steps", "1"], "sparsegrad: error: --score-steps applies to --method sparsegrad only"),
    (["calibrate", "--score-steps", "two"], "expected an integer >= 0"),
    (["finetune", "--method", "full", "--refresh-every", "4"], "--refresh-every applies to --method sparsegrad only"),
    (["finetune", "--refresh-every", "4", "--save-every", "2"], "--refresh-every does not work with --save-every"),
    (["finetune", "--refresh-every", "0"], "expected a positive integer"),
    (["calibrate", "--refresh-every", "4"], "unrecognized arguments: --refresh-every"),  # not offered
    (["finetune", "--task-name", "news"], "sparsegrad: error: --task-name names a --train-file run"),
    (["finetune", "--method", "full", "--basis-sharing", "layer"], "--basis-sharing applies to --method sparsegrad only"),
    (["compare", "--basis-sharing", "block"], "invalid choice: 'block'"),
    (["merge", "--adapter", "/nonexistent/adapter", "--output", "x"], "sparsegrad: error: --adapter /nonexistent/adapter: no such folder"),
    (["merge", "--output", "x"], "the following arguments are required: --adapter"),
    (["compare", "--methods", "full,dora"], "sparsegrad: error: unknown method 'dora' in --methods"),
    (["compare", "--seeds", "0,x"], "sparsegrad: error: --seeds must be a comma list of integers"),
    (["compare", "--seeds", "0,-2"], "sparsegrad: error: --seeds must be integers in [0, 2**32)"),
    (["compare", "--methods", "lora,lora"], "sparsegrad: error: --methods names a method twice"),
    (["compare", "--lr", "fast"], "sparsegrad: error: --lr: 'fast' is not a number"),
    (["compare", "--lr", "dora=1e-3"], "sparsegrad: error: --lr: expected method=value pairs"),
    (["calibrate", "--k", "5", "--density", "0.1"], "sparsegrad: error: give --k or --density, not both"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_inputs_exit_2_with_one_line(capsys, argv, message):
    code, err = _err(capsys, argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv,first_line", [
    (["finetune", "--method", "sparsgrad"], "sparsegrad finetune: error: argument --method: invalid choice: "
     "'sparsgrad' (choose from 'sparsegrad', 'lora', 'meprop', 'full') (did you mean 'sparsegrad'?)"),
    (["finetune", "--densty", "0.1"], "sparsegrad: error: unrecognized arguments: --densty 0.1 (did you mean "
     "'--density'?)"),
    (["comapre"], "sparsegrad: error: argument COMMAND: invalid choice: 'comapre' (choose from 'finetune', "
     "'calibrate', 'merge', 'compare', 'generate') (did you mean 'compare'?)"),
])
def test_a_usage_error_is_its_line_then_where_the_help_is(capsys, argv, first_line):
    code, err = _err(capsys, argv)
    assert code == 2
    assert err.splitlines()[0] == first_line
    assert err.splitlines()[1].startswith("see `sparsegrad") and len(err.splitlines()) == 2


def test_help_and_usage_errors_import_no_torch():
    probe = ("import sys\nfrom sparsegrad.finetune.cli import main\nfor argv in (['--help'], ['finetune', '--help'], "
             "['calibrate', '--help'], ['finetune', '--k', '0']):\n    try:\n        main(argv)\n    except SystemExit:"
             "\n        pass\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', "
             "'numpy'))\nprint('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout


def test_calibrate_help_offers_only_what_calibrate_takes(capsys):
    assert main(["calibrate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--refresh-every" not in out and "--every-nth-block" not in out and "--layers-to-transform" not in out
    assert "--calibration-steps" in out and "--target-modules" in out


def test_a_generic_file_name_takes_its_folder_name(tmp_path):
    from sparsegrad.finetune.settings import FinetuneConfig

    train = make_csv((tmp_path / "support-tickets").mkdir() or tmp_path / "support-tickets" / "train.csv")
    assert FinetuneConfig(train_file=str(train)).resolved_output_dir().name == "sparsegrad-support-tickets-s0"
    assert FinetuneConfig(train_file=str(train), task_label="tickets").task_name == "tickets"
    other = make_csv(tmp_path / "reviews.csv")
    assert FinetuneConfig(train_file=str(other)).task_name == "reviews"


def test_bad_file_contents_exit_2(capsys, tmp_path, tiny):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,a\nworld,b\n")
    code, err = _err(capsys, ["finetune", "--train-file", str(bad), "--model", str(tiny[0]), "--max-length", "32"])
    assert code == 2 and "sparsegrad: error:" in err and "no text column 'text'" in err
    assert len(err.strip().splitlines()) == 1
    code, err = _err(capsys, ["finetune", "--train-file", str(tiny[1]), "--model", str(tiny[0]), "--max-length", "100"])
    assert code == 2 and "--max-length 100 exceeds the 64 positions of" in err  # from config.json, before loading
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _err(capsys, ["finetune", "--train-file", str(tiny[1]), "--model", str(tiny[0]), "--max-length", "32",
                              "--output-dir", str(blocker / "run")])
    assert code == 2 and "is a file, not a folder" in err  # the pre-flight, before any model loads


def test_help_and_no_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "compare" in out and "merge" in out and "calibrate" in out
    assert main(["finetune", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--task", "--train-file", "--method", "--density", "--k", "--support", "--train-scope",
                 "--epochs", "--max-steps", "--batch-size", "--lr", "--seed", "--max-length", "--calibration-steps",
                 "--output-dir", "--max-train", "--max-eval", "--warmup-ratio", "--weight-decay", "--no-progress"):
        assert flag in out
    assert main([]) == 2


def test_python_m_sparsegrad():
    proc = subprocess.run([sys.executable, "-m", "sparsegrad", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "sparsegrad" in proc.stdout and "compare" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sparsegrad", "finetune", "--density", "2"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "density must be in (0, 1]" in proc.stderr


def test_finetune_merge_calibrate(tiny, tmp_path, capsys):
    model_dir, train = tiny
    out = tmp_path / "run"
    code = main(["finetune", "--model", str(model_dir), "--train-file", str(train), "--method", "lora",
                 "--max-length", "32", "--batch-size", "8", "--max-steps", "3", "--density", "0.05",
                 "--no-progress", "--output-dir", str(out)])
    assert code == 0
    assert "eval accuracy" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_length"] == 32 and metrics["num_train"] + metrics["num_val"] == 48  # a train file: all rows (less validation)

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--output", str(merged)]) == 0
    printed = capsys.readouterr().out  # the classifier's lines (the task kind's merged_lines)
    assert "(3 labels: arts, " in printed and "AutoModelForSequenceClassification.from_pretrained(" in printed
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(str(merged))
    assert plain.config.num_labels == 3 and plain.config.id2label[0] == "arts"
    from sparsegrad.finetune.train import load_finetuned

    rebuilt, _, _ = load_finetuned(out / "adapter")
    ids = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(input_ids=ids).logits, rebuilt(input_ids=ids).logits, atol=1e-5)
    code, err = _err(capsys, ["merge", "--adapter", str(out / "adapter"), "--output", str(merged)])
    assert code == 2 and "exists and is not empty" in err

    cal = tmp_path / "cal"
    assert main(["calibrate", "--model", str(model_dir), "--train-file", str(train), "--max-length", "32",
                 "--batch-size", "8", "--calibration-steps", "2", "--no-progress", "--output-dir", str(cal)]) == 0
    printed = capsys.readouterr().out
    assert "rotated" in printed and "original" in printed
    import sparsegrad as sg

    bases = sg.SparseGradBases.load(cal / "bases.safetensors")
    assert len(bases.kinds()) == 2
    report = json.loads((cal / "report.json").read_text())["report"]
    assert all(e["energy_topk_rotated"] > e["energy_topk_original"] for e in report.values())


def test_compare_tiny(tiny, tmp_path, capsys):
    model_dir, train = tiny
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora,sparsegrad", "--seeds", "0", "--model", str(model_dir), "--train-file",
            str(train), "--max-length", "32", "--batch-size", "8", "--max-steps", "3", "--density", "0.05",
            "--lr", "lora=2e-3", "--score-steps", "1", "--basis-sharing", "layer", "--refresh-every", "2",
            "--output-dir", str(out)]
    assert main(argv) == 0
    results = (out / "results.md").read_text()
    assert (out / "comparison.png").stat().st_size > 10_000
    assert "| lora | 1 |" in results and "| sparsegrad | 1 |" in results
    assert "sparsegrad compare --methods lora,sparsegrad" in results
    assert "step time / lora (sequential)" in results and "not interleaved: load may differ" in results
    for label in ("lora", "sparsegrad"):
        m = json.loads((out / f"{label}-s0" / "metrics.json").read_text())
        assert m["train_steps"] == 3 and m["num_train"] + m["num_val"] == 48
    assert json.loads((out / "lora-s0" / "metrics.json").read_text())["lr"] == 2e-3
    # --score-steps reaches the SparseGrad run only (LoRA would refuse it)
    sparse = json.loads((out / "sparsegrad-s0" / "metrics.json").read_text())
    assert sparse["score_steps"] == 1 and sparse["basis_sharing"] == "layer"
    assert sparse["refresh_every"] == 2 and sparse["refreshed_at_steps"] == [2]
    assert len(sparse["bases_report"]) == sparse["mlp_matrices"]  # one basis pair per matrix
    assert json.loads((out / "lora-s0" / "metrics.json").read_text())["score_steps"] == 0
    capsys.readouterr()
    assert main(argv) == 0  # resumable: both runs are skipped
    assert capsys.readouterr().out.count("skipped") == 2


def test_sparsegrad_warnings_print_as_one_line(capsys):
    import io
    import warnings

    from sparsegrad.finetune import cli, data

    cli.show_warning(UserWarning("dropped 6 eval texts"), UserWarning, data.__file__, 630)
    assert capsys.readouterr().err == "sparsegrad: warning: dropped 6 eval texts\n"
    other = io.StringIO()
    cli.show_warning(FutureWarning("old api"), FutureWarning, warnings.__file__, 1, file=other)  # not ours
    assert "FutureWarning: old api" in other.getvalue()  # Python's own format, with its source

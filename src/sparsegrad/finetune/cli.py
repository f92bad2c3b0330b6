"""sparsegrad: fine-tune the MLP blocks of a Transformer (a classifier or a causal LM) with SparseGrad, LoRA, MeProp
or full training.

Everything runs offline on bundled data and models (MiniLM-L6 on BBC news or tweet sentiment, SmolLM2-135M), or on
your own CSV/TSV/JSONL files and local model folders (BERT-, LLaMA-, GPT-2-, T5-, Mixtral-style and the other
families of `sparsegrad.MLP_TARGETS`).

examples:
  sparsegrad finetune                                   # SparseGrad, 1% per MLP matrix, MiniLM on BBC (~75 s on 2 CPU cores)
  sparsegrad finetune --method lora --task tweets
  sparsegrad finetune --train-file data/train.csv --eval-file data/dev.csv --text-column sentence
  sparsegrad merge --adapter runs/sparsegrad-bbc-s0/adapter --output merged-bbc
  sparsegrad compare --methods full,lora,meprop,sparsegrad --seeds 0,1,2
  sparsegrad finetune --model smollm2 --task bbc-instruct --every-nth-block 3 --max-steps 30 --batch-size 4
  sparsegrad finetune --model ./my-gpt2 --train-file pairs.jsonl       # a local causal LM on prompt/response pairs
  sparsegrad generate --model smollm2 --adapter runs/sparsegrad-bbc-instruct-s0/adapter --task bbc-instruct

Run `sparsegrad COMMAND --help` for the flags of a command.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import os
import re
import shlex
import sys
import warnings
from pathlib import Path
from typing import Sequence

# Only light modules here (no torch, no transformers): `--help` and a usage error answer at once. The commands
# import the engine when they run.
from sparsegrad import __version__
from sparsegrad.config import BERT_MLP_TARGETS, SUPPORT_MODES
import sparsegrad.io as sio

from .bundled import BUNDLED_MODELS
from .choices import (
    BASIS_SHARING_CHOICES,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    LM_TASKS,
    METHOD_HELP,
    METHOD_NAMES,
    NONFINITE_CHOICES,
    SCOPES,
    TASK_NAMES,
    lr_help,
)
from . import preflight
from .data import check_columns, file_task_name
from .errors import TrainingDiverged, TrainingInterrupted, UsageError
from .model_kind import is_causal_lm, model_folder_problem
from .choices import DEFAULT_VAL_FRACTION, LR_AUTO_PROBE_SHARE, VAL_METRICS

PROG = "sparsegrad"
METHOD_CHOICES = METHOD_NAMES
TASK_CHOICES = tuple(TASK_NAMES)
DECODER_TASKS = tuple(LM_TASKS)
CALIBRATION_FLAGS = ("score_steps", "basis_sharing", "refresh_every")  # for methods that calibrate only
DEFAULT_MAX_TRAIN = 512
DEFAULT_MAX_EVAL = 400
DEFAULT_MAX_EVAL_LM = 100


CLIError = UsageError  # the name before errors.py: a bad input, printed as `sparsegrad: error: ...`, exit status 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error prints its one line first (with the nearest choice or flag for a mistyped
    one), then where the help is, instead of the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}{nearest_hint(message, self)}\nsee `{self.prog} --help`\n")


class RaisingParser(Parser):
    """`Parser` that raises its usage error as a UsageError (a command line checked from inside another command)."""

    def error(self, message: str):
        raise UsageError(f"{message}{nearest_hint(message, self)}")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """The flags of ``parser`` and of its commands."""
    out = []
    for action in parser._actions:
        out += action.option_strings
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                out += option_strings(sub)
    return out


def nearest_hint(message: str, parser: argparse.ArgumentParser) -> str:
    """' (did you mean X?)' for an argparse error about an invalid choice or an unknown flag, when one is near."""
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        wrong, options = choice.group(1), re.findall(r"'([^']*)'", choice.group(2))
    else:
        unknown = re.search(r"unrecognized arguments: (\S+)", message)
        if unknown is None:
            return ""
        wrong = unknown.group(1).split("=", 1)[0]
        options = option_strings(parser)  # argparse reports them from the top parser: every command's flags
    near = difflib.get_close_matches(wrong, options, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


# ------------------------------------------------------------------------------------------------- arguments
def _number(cast, ok, expected: str, out_of_range: str | None = None):
    """An argparse type: ``cast`` the text, then require ``ok(value)``; errors say what was expected."""
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{out_of_range or 'expected ' + expected}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_count_or_all = _number(int, lambda v: v >= 0, "a non-negative integer (0 = all)")  # 0 means 'all'
_seed = _number(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)")
_density = _number(float, lambda v: 0.0 < v <= 1.0, "a number in (0, 1]", "density must be in (0, 1]")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a positive number")  # NaN fails the test too
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_non_negative_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
_ratio = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")
LR_AUTO_HELP = (f"auto: pick it on the validation split from 3 rates around the default, each a run of "
                f"1/{LR_AUTO_PROBE_SHARE} of the steps (about {1 + 3 / LR_AUTO_PROBE_SHARE:g}x the training steps)")


def _lr_or_auto(text: str):
    return "auto" if text == "auto" else _positive_float(text)


def _add_selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("validation and selection",
                             "A validation split carved from the training data (never the eval split, read once at "
                             "the end) picks the best step, stops early and chooses --lr auto.")
    g.add_argument("--val-fraction", type=_ratio, default=None,
                   help="validation rows as a share of the training rows, stratified and seeded; taken from training "
                        "rows outside --max-train when there are any (shakespeare: chunks of text regions training "
                        "never reads) (default 0.1; 0 = no validation)")
    g.add_argument("--eval-every", type=_positive_int, default=None, metavar="STEPS",
                   help="evaluate on the validation split every STEPS steps (default: each epoch and the last step); "
                        "the best evaluation's state is what the adapter holds")
    g.add_argument("--metric-for-best", choices=VAL_METRICS, default=None,
                   help="validation score that picks the best step and --lr auto's rate (default: accuracy for a "
                        "classifier, within 0.005 the lower loss; causal LMs: loss only)")
    g.add_argument("--early-stopping-patience", type=_positive_int, default=None, metavar="EVALS",
                   help="stop after EVALS validation evaluations without a better score (default: never)")


def _block_list(text: str) -> list[int]:
    try:
        blocks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of block indices, got {text!r}") from None
    if not blocks or any(b < 0 for b in blocks):
        raise argparse.ArgumentTypeError(f"expected a comma list of block indices >= 0, got {text!r}")
    return blocks


def sg_targets_hint() -> str:
    return BERT_MLP_TARGETS.replace("%", "%%")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument("--model", default=None,
                   help="bundled model name (minilm; smollm2, a causal LM) or a local model folder (default: the "
                        "bundled MiniLM-L6)")
    g.add_argument("--task", choices=TASK_CHOICES, default=None,
                   help="bundled task: bbc (BBC news, 5 topics) or tweets (sentiment, 2 classes) for classifiers; "
                        "bbc-instruct (topic word as a chat answer) or shakespeare (language modelling) for causal "
                        "LMs; default bbc, or bbc-instruct with a causal LM")
    g.add_argument("--train-file", default=None, help="your own training data (.csv, .tsv, .jsonl) instead of --task")
    g.add_argument("--task-name", default=None, metavar="NAME",
                   help="what outputs and reports call a --train-file run (default: the file's name, or its "
                        "folder's for a generic one like train.csv)")
    g.add_argument("--eval-file", default=None,
                   help="held-out data; without it a stratified 20%% of --train-file is held out")
    g.add_argument("--text-column", default="text", help="text column of the files (default: text)")
    g.add_argument("--label-column", default="label", help="label column of the files (default: label)")
    g.add_argument("--prompt-column", default=None,
                   help="causal LMs: prompt column of a prompt/response --train-file (default: prompt)")
    g.add_argument("--response-column", default=None,
                   help="causal LMs: response column of a prompt/response --train-file (default: response)")
    g.add_argument("--max-train", type=_count_or_all, default=None,
                   help=f"use a stratified subset of this many training examples; 0 = all (default: "
                        f"{DEFAULT_MAX_TRAIN} for bundled tasks, all rows of a --train-file)")
    g.add_argument("--max-eval", type=_count_or_all, default=None,
                   help=f"evaluate on at most this many held-out examples; 0 = all (default: {DEFAULT_MAX_EVAL} "
                        f"for bundled classifier tasks, {DEFAULT_MAX_EVAL_LM} for bundled decoder tasks, all for "
                        "files)")
    g.add_argument("--max-length", type=_positive_int, default=128, help="tokens per example (default 128)")
    g.add_argument("--seed", type=_seed, default=0, help="seed of the split, the head, the shuffle, dropout (default 0)")


def _add_budget_args(p: argparse.ArgumentParser, *, calibrate: bool = False) -> None:
    """The budget flags; `calibrate` gets those that shape the bases only (it estimates them on every block, once)."""
    g = p.add_argument_group("budget")
    g.add_argument("--density", type=_density, default=None,
                   help="entries of each MLP matrix that train per step, as a share in (0, 1] (default 0.01); "
                        "LoRA gets the rank with r*(in+out) closest to it")
    g.add_argument("--k", type=_positive_int, default=None, help="entries per MLP matrix per step (instead of --density)")
    g.add_argument("--calibration-steps", type=_positive_int, default=2,
                   help="SparseGrad: how many training batches the bases (the rotation) are estimated from before "
                        "training (default 2; 4 let the top 1%% of entries hold about 0.01 more of the gradient "
                        "energy and take twice as long, docs/benchmarks.md)")
    g.add_argument("--score-steps", type=_non_negative_int, default=None,
                   help="SparseGrad: once the bases are known, re-run this many calibration batches to measure the "
                        "gradient energy the top-k entries hold (rotated vs original basis) and, with --support "
                        "fixed, to choose the fixed entries (default: " + (
                            "2)" if calibrate else "2 with --support fixed, 0 (no measurement) with dynamic)"))
    g.add_argument("--basis-sharing", choices=BASIS_SHARING_CHOICES, default=None,
                   help="SparseGrad: one basis pair per kind of MLP matrix shared by all blocks (kind, the paper; "
                        "default) or one pair per matrix (layer)")
    if not calibrate:
        g.add_argument("--refresh-every", type=_positive_int, default=None,
                       help="SparseGrad: every N steps recalibrate the bases at the current point (on the next "
                            "--calibration-steps batches), fold the trained delta into the frozen weight and train on in "
                            "the new bases; the adapter keeps every folded segment (default: calibrate once)")
        g.add_argument("--every-nth-block", type=_positive_int, default=None,
                       help="adapt the MLPs of blocks 0, n, 2n, ... only (default: every block; the paper's LLaMA "
                            "runs use 3)")
        g.add_argument("--layers-to-transform", type=_block_list, default=None, metavar="LIST",
                       help="adapt the blocks of this comma list only, e.g. 0,3,6 (instead of --every-nth-block)")
    g.add_argument("--target-modules", default=None, metavar="REGEX",
                   help="the module names to adapt, a regex that must match a whole name (default: the model's "
                        "MLP matrices, e.g. " + sg_targets_hint() + "), for every method")


def _add_train_args(p: argparse.ArgumentParser, *, compare: bool) -> None:
    g = p.add_argument_group("training")
    if not compare:
        g.add_argument("--support", choices=SUPPORT_MODES, default="dynamic",
                       help="sparse methods: re-choose the top-k entries every step (dynamic, the paper) or once "
                            "(fixed: exactly k entries ever change)")
    g.add_argument("--train-scope", choices=SCOPES, default="mlp",
                   help="mlp: only the MLP method, the MLP biases and the head train (default); all: every other "
                        "parameter trains densely too (the paper's protocol)")
    g.add_argument("--epochs", type=_positive_int, default=1, help="passes over the training data (default 1)")
    g.add_argument("--max-steps", type=_positive_int, default=None,
                   help="total optimizer steps; overrides --epochs (runs as many epochs as needed)")
    g.add_argument("--batch-size", type=_positive_int, default=16,
                   help="examples per step (default 16); per process and micro-batch with torchrun or --grad-accum")
    if compare:
        g.add_argument("--lr", default=None,
                       help="learning rate for every method (e.g. 1e-3) or per method "
                            "(e.g. full=1e-4,sparsegrad=1e-3); methods not named use their default")
    else:
        g.add_argument("--lr", type=_lr_or_auto, default=None, help=lr_help() + "; " + LR_AUTO_HELP)
    g.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="decoupled weight decay (default 0)")
    g.add_argument("--warmup-ratio", type=_ratio, default=0.0,
                   help="share of the steps with a linear LR warmup, then linear decay to 0 (default 0)")
    g.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                   help="bfloat16: on a GPU bf16 autocast for the matmuls (weights, bases, deltas, optimizer state "
                        "stay fp32), on the CPU bf16 weights (bases and deltas stay fp32); default float32")
    if not compare:
        g.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                       help="auto: the GPU when there is one (default); under torchrun each process takes its local "
                            "GPU (NCCL) or the CPU (gloo)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(parser_class: type[Parser] = Parser) -> argparse.ArgumentParser:
    intro, examples = __doc__.split("\nexamples:\n")
    parser = parser_class(prog=PROG, description=intro, epilog="examples:\n" + examples,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    ft = sub.add_parser("finetune", help="one fine-tune (writes metrics.json, loss.csv, adapter/)",
                        description="Fine-tune a model with one method and evaluate it: a sequence classifier (an "
                                    "encoder such as the bundled MiniLM, or T5) or a causal LM (SmolLM2, a local "
                                    "LLaMA/GPT-2/Mixtral folder, ...), recognised from the folder's config.json. "
                                    "With no flags: "
                                    "SparseGrad (1% of each MLP matrix per step) on MiniLM-L6, 512 BBC articles, "
                                    "1 epoch, evaluated on 400 held-out articles.")
    ft.add_argument("--method", choices=METHOD_CHOICES, default="sparsegrad",
                    help=METHOD_HELP)
    _add_data_args(ft)
    _add_budget_args(ft)
    _add_train_args(ft, compare=False)
    _add_selection_args(ft)
    ft.add_argument("--lora-rank", type=_positive_int, default=None,
                    help="LoRA rank (default: matched to the budget, r*(in+out) ~= k)")
    ft.add_argument("--output-dir", default=None, help="where files go (default runs/<method>-<task>-s<seed>)")
    ft.add_argument("--overwrite", action="store_true",
                    help="a fresh run into an --output-dir holding another run's checkpoints deletes them (only "
                         "files sparsegrad wrote) instead of refusing; to continue that run use --resume")
    rel = ft.add_argument_group(
        "scale-out and reliability",
        "Several processes: `torchrun --nproc_per_node N -m sparsegrad finetune ...` (gloo on CPU, NCCL with one GPU "
        "per process); each optimizer step is a global batch of --batch-size x N x --grad-accum examples. "
        "Ctrl-C or SIGTERM saves a checkpoint and stops (exit status 130 / 143); see docs/reliability.md.")
    rel.add_argument("--grad-accum", type=_positive_int, default=1, metavar="N",
                     help="micro-batches per optimizer step: gradients of N batches of --batch-size are summed before "
                          "the step (SparseGrad's top-k is taken after), as one batch N times larger (default 1)")
    rel.add_argument("--save-every", type=_positive_int, default=None, metavar="STEPS",
                     help="write a checkpoint into OUTPUT_DIR/checkpoints/step-N every STEPS steps (the last 2 are "
                          "kept; default: only when stopped by Ctrl-C or SIGTERM)")
    rel.add_argument("--resume", default=None, metavar="OUTPUT_DIR",
                     help="continue the interrupted run in OUTPUT_DIR from its latest checkpoint, with its settings "
                          "(the loss sequence equals an uninterrupted run's)")
    rel.add_argument("--on-nonfinite", choices=NONFINITE_CHOICES, default="stop",
                     help="a NaN/inf loss or gradient: stop with an error (default) or skip the step with a warning; "
                          "no adapter with non-finite values is ever written")
    rel.add_argument("--layerwise-step", action="store_true",
                     help="dynamic sparsegrad/meprop: each layer takes its optimizer step inside the backward and "
                          "frees its dense gradient at once (less peak memory, the same weights); not with "
                          "--grad-accum, torchrun, --on-nonfinite skip or --refresh-every")
    rel.add_argument("--stop-after", type=_positive_int, default=None, help=argparse.SUPPRESS)  # tests: interrupt
    ft.set_defaults(func=cmd_finetune)

    cal = sub.add_parser("calibrate", help="compute and save the SparseGrad bases, print the energy report",
                         description="Estimate the HOSVD bases of the MLP weight gradients on a few training "
                                     "batches, save them (bases.safetensors) and report the share of gradient energy "
                                     "the top-k entries hold in the rotated vs the original basis.")
    _add_data_args(cal)
    _add_budget_args(cal, calibrate=True)
    cal.add_argument("--support", choices=SUPPORT_MODES, default="dynamic",
                     help="fixed also stores a support per matrix, chosen from the calibration gradients")
    cal.add_argument("--batch-size", type=_positive_int, default=16, help="examples per batch (default 16)")
    cal.add_argument("--output-dir", default=None, help="where bases.safetensors goes (default runs/calibrate-<task>-s<seed>)")
    cal.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: the GPU when there is one")
    cal.add_argument("--no-progress", action="store_true", help="no progress bars")
    cal.set_defaults(func=cmd_calibrate)

    mg = sub.add_parser("merge", help="adapter + base -> plain transformers model folder",
                        description="Rebuild the fine-tuned classifier from an adapter folder written by "
                                    "`sparsegrad finetune` and save it as a plain transformers model (weights, config "
                                    "with the label names, tokenizer), loadable with from_pretrained alone.")
    mg.add_argument("--adapter", required=True, help="the adapter folder (e.g. runs/sparsegrad-bbc-s0/adapter)")
    mg.add_argument("--output", required=True, help="the folder to write the merged model into")
    mg.add_argument("--model", default=None, help="base model (default: the one recorded in the adapter's task.json)")
    mg.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    mg.set_defaults(func=cmd_merge)

    cp = sub.add_parser("compare", help="methods x seeds, one subprocess each; results.md + comparison.png",
                        description="Run every method with every seed on identical data, budget and steps, each in "
                                    "its own process (so peak RSS is honest), skipping runs that already have "
                                    "metrics.json; then write results.md and comparison.png.")
    cp.add_argument("--methods", default="full,lora,meprop,sparsegrad,sparsegrad-fixed",
                    help="comma list of full, lora, meprop, sparsegrad, sparsegrad-fixed, meprop-fixed "
                         "(default: full,lora,meprop,sparsegrad,sparsegrad-fixed)")
    cp.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    _add_data_args(cp)
    _add_budget_args(cp)
    _add_train_args(cp, compare=True)
    _add_selection_args(cp)
    cp.add_argument("--output-dir", default=None, help="where runs and reports go (default runs/compare-<task>)")
    cp.add_argument("--overwrite", action="store_true", help="rerun runs that already have metrics.json")
    cp.set_defaults(func=cmd_compare)

    gen = sub.add_parser("generate", help="greedy answers of a causal LM, base or base + adapter",
                         description="Greedy decoding with the chat template: answer --prompt, or --num-examples "
                                     "held-out examples of --task (with the reference answers, the exact match and "
                                     "the held-out loss on them). With --adapter the fine-tuned model (merged).")
    gen.add_argument("--model", default=None,
                     help="causal LM: smollm2 or a local folder (default: the adapter's base, else smollm2)")
    gen.add_argument("--adapter", default=None, help="an adapter folder written by `sparsegrad finetune`")
    what = gen.add_mutually_exclusive_group()
    what.add_argument("--prompt", default=None, help="one user message to answer")
    what.add_argument("--task", choices=DECODER_TASKS, default=None,
                      help="answer held-out examples of a decoder task (default: the adapter's task)")
    gen.add_argument("--num-examples", type=_positive_int, default=2, help="held-out examples with --task (default 2)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=None,
                     help="tokens to generate (default: 32 for --prompt and shakespeare, the longest reference "
                          "answer + 2 for bbc-instruct)")
    gen.add_argument("--max-length", type=_positive_int, default=None,
                     help="prompt truncation of --task examples (default: the adapter's, else 256)")
    gen.add_argument("--seed", type=int, default=0, help="seed of the task's split (default 0)")
    gen.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: the GPU when there is one")
    gen.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                     help="weight dtype without --adapter (default float32)")
    gen.set_defaults(func=cmd_generate)
    return parser


# ------------------------------------------------------------------------------------------------- helpers
def _check_data_args(args: argparse.Namespace) -> None:
    if args.task is not None and args.train_file is not None:
        raise UsageError("give --task or --train-file, not both")
    if args.eval_file is not None and args.train_file is None:
        raise UsageError("--eval-file needs --train-file")
    if args.task_name is not None and args.train_file is None:
        raise UsageError("--task-name names a --train-file run (bundled tasks keep their names)")
    for flag in ("train_file", "eval_file"):
        preflight.check_data_file(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.train_file is not None:
        with usage_error():
            check_columns(args.text_column, args.label_column, ("--text-column", "--label-column"))
            check_columns(args.prompt_column or "prompt", args.response_column or "response",
                          ("--prompt-column", "--response-column"))
    _check_model_arg(args.model)
    if args.train_file is None and args.task is None:
        args.task = "bbc-instruct" if is_causal_lm(args.model) else "bbc"
    bundled = args.train_file is None
    if args.max_train is None:
        args.max_train = DEFAULT_MAX_TRAIN if bundled else 0
    if args.max_eval is None:
        args.max_eval = (DEFAULT_MAX_EVAL_LM if args.task in DECODER_TASKS else DEFAULT_MAX_EVAL) if bundled else 0


def _task_name(args: argparse.Namespace) -> str:
    return args.task or args.task_name or file_task_name(args.train_file)


@contextlib.contextmanager
def usage_error():
    """A ValueError of a check becomes the UsageError the CLI prints as one line."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_model_arg(model: str | None, bundled=BUNDLED_MODELS) -> None:
    if model is None or model in bundled:
        return
    if not Path(model).is_dir():
        raise UsageError(f"--model {model}: neither a bundled model ({', '.join(bundled)}) nor an existing "
                         "model folder (hub names are not downloaded)")
    problem = model_folder_problem(model)
    if problem is not None:
        raise UsageError(f"--model {model} {problem}")


def _check_method_args(args: argparse.Namespace, method: str) -> None:
    """Flags that apply to some methods only."""
    from .methods import METHODS

    if getattr(args, "lora_rank", None) is not None and not METHODS[method].takes_lora_rank:
        raise UsageError("--lora-rank applies to --method lora only")
    for flag in CALIBRATION_FLAGS:
        if getattr(args, flag) is not None and not METHODS[method].calibrates:
            raise UsageError(f"--{flag.replace('_', '-')} applies to --method sparsegrad only (the other methods do "
                             "not calibrate)")


def _check_budget_args(args: argparse.Namespace) -> None:
    if args.k is not None and args.density is not None:
        raise UsageError("give --k or --density, not both")
    if args.k is None and args.density is None:
        args.density = 0.01


def _finetune_config(args: argparse.Namespace, command: str | None = None):
    from .settings import FinetuneConfig

    return FinetuneConfig(
        method=args.method, task=args.task, train_file=args.train_file, eval_file=args.eval_file,
        text_column=args.text_column, label_column=args.label_column, model=args.model,
        density=args.density if args.k is None else None, k=args.k, support=args.support,
        train_scope=args.train_scope, epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, seed=args.seed,
        max_length=args.max_length, calibration_steps=args.calibration_steps, score_steps=args.score_steps,
        basis_sharing=args.basis_sharing or "kind", refresh_every=args.refresh_every, max_train=args.max_train or None, max_eval=args.max_eval or None, lora_rank=args.lora_rank,
        every_nth_block=args.every_nth_block, layers_to_transform=args.layers_to_transform,
        target_modules=args.target_modules, prompt_column=args.prompt_column,
        response_column=args.response_column, dtype=args.dtype, device=args.device,
        output_dir=args.output_dir, progress=not args.no_progress, command=command,
        grad_accum=args.grad_accum, save_every=args.save_every, resume=args.resume,
        on_nonfinite=args.on_nonfinite, layerwise_step=args.layerwise_step,
        stop_after=args.stop_after, overwrite=args.overwrite,
        task_label=args.task_name, **_selection_fields(args),
    )


def _selection_fields(args: argparse.Namespace) -> dict:
    return {"val_fraction": DEFAULT_VAL_FRACTION if args.val_fraction is None else args.val_fraction,
            "eval_every": args.eval_every, "metric_for_best": args.metric_for_best,
            "early_stopping_patience": args.early_stopping_patience,
            "lr": None if args.lr == "auto" else args.lr, "lr_auto": args.lr == "auto"}


# Flags of `finetune` whose value is not a FinetuneConfig field of the same name.
_FLAG_FIELDS = {"no_progress": ("progress",), "task_name": ("task_label",), "k": ("k", "density"), "density": ("k", "density")}


def _explicit_fields(command: str) -> set[str]:
    """FinetuneConfig fields set by a flag written on the command line (not left at its default)."""
    sub = build_parser()._subparsers._group_actions[0].choices["finetune"]
    options = {opt: action.dest for action in sub._actions for opt in action.option_strings}
    fields: set[str] = set()
    for token in shlex.split(command)[2:]:
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name not in options:  # argparse also takes unique prefixes
            matches = [o for o in options if o.startswith(name)]
            name = matches[0] if len(matches) == 1 else name
        if name in options:
            dest = options[name]
            fields.update(_FLAG_FIELDS.get(dest, (dest,)))
    return fields


def _resume_finetune_config(args: argparse.Namespace, command: str):
    """--resume: the interrupted run's settings, with the flags written on this command line on top (finetune then
    refuses any that differ from the run's, except --save-every, --on-nonfinite, --no-progress)."""
    import dataclasses

    from .settings import resume_config

    saved = resume_config(args.resume)
    given = _finetune_config(args, command)
    explicit = _explicit_fields(command) - {"resume", "progress", "command"}
    return dataclasses.replace(saved, **{f: getattr(given, f) for f in explicit if hasattr(given, f)},
                               progress=not args.no_progress, command=command, resume=args.resume)


# ------------------------------------------------------------------------------------------------- commands
def cmd_finetune(args: argparse.Namespace, command: str) -> int:
    from .distributed import env_world_size
    from .loop import finetune
    from .tasks import task_for

    cfg = checked_finetune_config(args, command)
    m = finetune(cfg)
    if env_world_size() > 1 and os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 prints the summary
    print()
    print("\n".join(task_for(cfg).summary_lines(m)))
    return 0


def checked_finetune_config(args: argparse.Namespace, command: str):
    """The run's FinetuneConfig, after every check `finetune` can make before a model loads (flags, data files,
    the model folder, the budget against its config.json)."""
    _check_data_args(args)
    _check_budget_args(args)
    _check_method_args(args, args.method)
    cfg = _resume_finetune_config(args, command) if args.resume is not None else _finetune_config(args, command)
    cfg.validate()
    preflight.check_budget(cfg.model, k=cfg.k, lora_rank=cfg.lora_rank, target_modules=cfg.target_modules)
    preflight.check_positions(cfg.model, cfg.max_length)
    return cfg


def check_finetune_argv(argv: list[str]):
    """`checked_finetune_config` of one `sparsegrad finetune` command line (compare's runs, before any starts);
    a bad flag is a UsageError here, not an exit."""
    args = build_parser(RaisingParser).parse_args(argv)
    return checked_finetune_config(args, " ".join(shlex.quote(a) for a in [PROG, *argv]))


def cmd_calibrate(args: argparse.Namespace, command: str) -> int:
    from .loop import calibrate

    _check_data_args(args)
    _check_budget_args(args)
    if args.score_steps is None:
        args.score_steps = 2
    args.basis_sharing = args.basis_sharing or "kind"
    out_dir = Path(args.output_dir) if args.output_dir is not None else Path("runs") / (
        f"calibrate-{_task_name(args)}-s{args.seed}")
    check_output_folder(out_dir, {"--model": args.model, "--train-file": args.train_file})
    preflight.check_budget(args.model, k=args.k, target_modules=args.target_modules)
    preflight.check_positions(args.model, args.max_length)
    report, path, seconds = calibrate(
        model=args.model, task=args.task, train_file=args.train_file, eval_file=args.eval_file,
        text_column=args.text_column, label_column=args.label_column, max_train=args.max_train or None,
        max_length=args.max_length, batch_size=args.batch_size, seed=args.seed,
        density=args.density if args.k is None else None, k=args.k, support=args.support,
        basis_sharing=args.basis_sharing, calibration_steps=args.calibration_steps, score_steps=args.score_steps,
        target_modules=args.target_modules, output_dir=out_dir, progress=not args.no_progress,
        prompt_column=args.prompt_column,
        response_column=args.response_column, device=args.device,
    )
    print(f"\nbases of {len(report)} kinds from {args.calibration_steps} steps in {seconds:.1f} s -> {path}")
    if args.score_steps == 0:
        return 0
    print(f"share of the gradient energy in the top-k entries (k per matrix), on {args.score_steps} batches:")
    print(f"  {'kind':<48} {'modules':>7} {'k':>8} {'rotated':>8} {'original':>8}")
    for kind, entry in report.items():
        print(f"  {kind:<48} {entry['modules']:>7} {entry.get('k', 0):>8} "
              f"{entry.get('energy_topk_rotated', float('nan')):>8.4f} "
              f"{entry.get('energy_topk_original', float('nan')):>8.4f}")
    print(f"report: {out_dir / 'report.json'}")
    return 0


def check_output_folder(out_dir: Path, inputs: dict) -> None:
    """The pre-flight of calibrate and compare's --output-dir, before any model loads: not empty, not a file, not
    an input, writable."""
    sio.check_output_path(str(out_dir), "--output-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} is a file, not a folder")
    sio.check_separate(out_dir, "--output-dir", inputs)
    sio.check_writable(out_dir, "--output-dir")


def cmd_merge(args: argparse.Namespace, command: str) -> int:
    """Checked before any model loads: --output is not empty, not the current folder or a parent, neither is nor
    contains nor lies inside --adapter or --model, and is writable; an existing --output is replaced (with
    --overwrite) only if sparsegrad wrote it as a merged model. Written beside and swapped in (fsynced), after the
    merged weights are checked finite."""
    from .models import quiet_transformers
    from .outputs import load_finetuned
    from .tasks import KINDS, kind_of_info

    adapter = Path(args.adapter)
    if not adapter.is_dir():
        raise UsageError(f"--adapter {adapter}: no such folder")
    output = sio.check_output_path(args.output, "--output", replaced_whole=True)
    _check_model_arg(args.model)
    sio.check_separate(output, "--output", {"--adapter": adapter, "--model": args.model})
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise UsageError(f"--output {output} exists and is not empty (pass --overwrite to replace a merged model "
                         "sparsegrad wrote there)")
    if output.is_dir() and any(output.iterdir()) and not sio.is_ours(output, "merged"):
        raise UsageError(f"--output {output} is not a merged model written by sparsegrad: refusing to replace it, "
                         "even with --overwrite; choose a new folder")
    sio.check_writable(output, "--output")
    model, tokenizer, info = load_finetuned(adapter, args.model, merge=True)
    with sio.atomic_directory(output, owner="merged") as tmp, quiet_transformers():  # load_finetuned checked it finite
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    print("\n".join(KINDS[kind_of_info(info)].merged_lines(info, adapter, output)))
    return 0


def cmd_compare(args: argparse.Namespace, command: str) -> int:
    from . import compare

    _check_data_args(args)
    _check_budget_args(args)
    methods = compare.parse_methods(args.methods)
    seeds = compare.parse_seeds(args.seeds)
    lrs = compare.parse_lrs(args.lr, [compare.base_method(m) for m in methods])
    task = _task_name(args)
    out_dir = Path(args.output_dir) if args.output_dir is not None else Path("runs") / f"compare-{task}"
    check_output_folder(out_dir, {"--model": args.model, "--train-file": args.train_file})
    common = compare.common_finetune_args(args)
    sparsegrad_only = [arg for flag in CALIBRATION_FLAGS if getattr(args, flag) is not None
                       for arg in ("--" + flag.replace("_", "-"), str(getattr(args, flag)))]
    return compare.run_compare(methods, seeds, common, out_dir, lrs=lrs, overwrite=args.overwrite, command=command,
                               sparsegrad_args=sparsegrad_only, check=check_compare_runs)


def check_compare_runs(runs: list[list[str]]) -> None:
    """Before compare starts any run: every run's command line passes finetune's checks (`check_finetune_argv`),
    and the shared data reads (`preflight.check_data`), so one bad setting is one line, not a failure per run."""
    configs = [check_finetune_argv(argv) for argv in runs]
    if configs:  # every run reads the same data
        preflight.check_data(configs[0])


def cmd_generate(args: argparse.Namespace, command: str) -> int:
    from .generate import run_generate

    if args.adapter is not None and not Path(args.adapter).is_dir():
        raise UsageError(f"--adapter {args.adapter}: no such folder")
    _check_model_arg(args.model, bundled=("smollm2",))
    if args.prompt is None and args.task is None and args.adapter is None:
        raise UsageError("give --prompt or --task")
    if args.adapter is not None and args.dtype is not None:
        raise UsageError("--dtype comes from the adapter; leave it out with --adapter")
    run_generate(model=args.model, adapter=args.adapter, prompt=args.prompt, task=args.task,
                 num_examples=args.num_examples, max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                 seed=args.seed, dtype=args.dtype, device=args.device)
    return 0


# ------------------------------------------------------------------------------------------------- entry
_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """`warnings.showwarning` for the CLI: sparsegrad's own warnings as one line each (no source line); other
    libraries' as Python prints them."""
    if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
        print(f"{PROG}: warning: {message}", file=file or sys.stderr)
    else:
        (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input, 1 failed run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.showwarning = show_warning
    parser = build_parser()
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, message already printed)
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_help()
        return 2
    command = " ".join(shlex.quote(a) for a in [PROG, *argv])
    with one_line_warnings():
        try:
            return args.func(args, command)
        except TrainingInterrupted as exc:  # a checkpoint was saved: 130 (SIGINT), 143 (SIGTERM), 0 (--stop-after)
            if os.environ.get("RANK", "0") == "0":
                print(f"{PROG}: {exc}", file=sys.stderr)
            return exc.exit_code
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:
            code = exit_code(exc)
            if code is None or debug:
                raise
            print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
            return code


BAD_INPUT = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, KeyError)
"""Errors that mean a bad input (a flag, a file, an edited adapter): exit status 2. SafetyError is a ValueError."""
RUNTIME = (TrainingDiverged, sio.WriteFailed, OSError, RuntimeError, MemoryError)
"""Errors of a run that could not finish (diverged, disk full, out of memory): exit status 1."""


def exit_code(exc: BaseException) -> int | None:
    """2 for a bad input, 1 for a failed run, None for what is neither (a bug: its traceback is shown)."""
    if isinstance(exc, (TrainingDiverged, sio.WriteFailed)):  # before ValueError/OSError: they are runtime
        return 1
    if isinstance(exc, BAD_INPUT):
        return 2
    if isinstance(exc, RUNTIME):
        return 1
    return None


def one_line(exc: BaseException) -> str:
    """The error's message on one line (a KeyError's repr quotes the key: say which key is missing)."""
    text = f"missing key {exc.args[0]!r}" if isinstance(exc, KeyError) and exc.args else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    return text if isinstance(exc, (UsageError, TrainingDiverged, sio.SafetyError, sio.WriteFailed)) \
        else f"{text} ({type(exc).__name__}; --debug shows where)"


@contextlib.contextmanager
def one_line_warnings():
    """Python warnings as ``sparsegrad: warning: ...``, one line each, without the source line."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

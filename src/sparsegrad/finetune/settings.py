"""Every setting of one fine-tuning run (`FinetuneConfig`), its validation, and the settings a resume takes.

Choices come from the registries (`methods.METHODS`, `methods.SCOPES`, `sparsegrad.config.SUPPORT_MODES`, the task
names of `tasks`), never typed again.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from sparsegrad.config import SUPPORT_MODES

from .choices import BASIS_SHARING_CHOICES, DEVICE_CHOICES, DTYPE_CHOICES, NONFINITE_CHOICES
from .checkpoint import STATE_FILE, checkpoints_dir, latest_checkpoint
from .data import file_task_name
from .errors import UsageError
from .methods import METHODS, SCOPES, default_lr
from .choices import DEFAULT_VAL_FRACTION, VAL_METRICS
from .tasks import is_causal_lm_run

PER_INVOCATION = frozenset({"output_dir", "progress", "verbose", "command", "resume", "stop_after", "overwrite"})
"""Settings of one command line, never taken from the interrupted run."""
RESUME_MAY_CHANGE = PER_INVOCATION | {"save_every", "on_nonfinite", "device"}
"""Settings a resumed run may change; every other setting must equal the interrupted run's."""


@dataclass
class FinetuneConfig:
    """Every setting of one fine-tuning run (the CLI's ``sparsegrad finetune`` flags)."""

    method: str = "sparsegrad"
    task: str | None = "bbc"
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    model: str | None = None
    density: float | None = 0.01
    k: int | None = None
    support: str = "dynamic"
    train_scope: str = "mlp"
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0
    seed: int = 0
    max_length: int = 128
    calibration_steps: int = 2
    score_steps: int | None = None
    """Calibration batches re-run once the bases are known (energy report; a fixed support is chosen from them).
    None: 2 with a fixed support, 0 with a dynamic one (where the re-run only reports)."""
    refresh_every: int | None = None
    """SparseGrad: every this many steps, recalibrate the bases at the current point on the next
    ``calibration_steps`` training batches (no update), fold the trained delta into the frozen weight and train on
    in the new bases (`sparsegrad.refresh_bases`); the adapter then holds every folded segment. None: calibrate
    once, at the start."""
    max_train: int | None = None
    max_eval: int | None = None
    eval_fraction: float = 0.2
    eval_batch_size: int = 64
    lora_rank: int | None = None
    basis_sharing: str = "kind"
    every_nth_block: int | None = None
    """Adapt the MLPs of blocks 0, n, 2n, ... only (None: every block)."""
    layers_to_transform: list[int] | None = None
    """Adapt the MLPs of these blocks only (instead of every_nth_block)."""
    target_modules: str | None = None
    """A regex of the module names to adapt (full match; default: the model's MLP matrices), for every method."""
    prompt_column: str | None = None
    """Decoders: prompt column of a prompt/response --train-file (default "prompt"); setting it selects the
    decoder path."""
    response_column: str | None = None
    dtype: str = "float32"
    """bfloat16: on a GPU, bf16 autocast for the model's matmuls (weights, SparseGrad bases and deltas and the
    optimizer state stay fp32); on the CPU, bf16 weights (SparseGrad bases and deltas stay fp32)."""
    device: str = "auto"
    """auto: the GPU when there is one; cpu; cuda. Under torchrun each rank takes the GPU of its local rank when
    CUDA is available (NCCL), else the CPU (gloo)."""
    output_dir: str | None = None
    progress: bool = True
    verbose: bool = True
    command: str | None = None
    """The command line that started the run (recorded in metrics.json)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: the step's gradient is summed over ``grad_accum`` batches of
    ``batch_size`` (per process) before the optimizer (and SparseGrad's top-k) sees it."""
    save_every: int | None = None
    """Write a checkpoint into ``output_dir/checkpoints/step-N`` every this many steps (the last 2 are kept)."""
    resume: str | None = None
    """An output folder of an interrupted run: continue from its latest checkpoint (same settings required)."""
    on_nonfinite: str = "stop"
    """A non-finite loss or gradient: ``stop`` (raise TrainingDiverged) or ``skip`` the step with a warning."""
    layerwise_step: bool = False
    """Dynamic SparseGrad/MeProp weights step inside the backward, one layer at a time (`sparsegrad.layerwise`)."""
    stop_after: int | None = None
    """Testing: stop after this many steps with a checkpoint, as an interruption would (exit code 0)."""
    overwrite: bool = False
    """A fresh run into an ``output_dir`` holding another run's checkpoints deletes them (only if sparsegrad wrote
    every file there) instead of refusing."""
    val_fraction: float = DEFAULT_VAL_FRACTION
    """A validation split of this share of the training rows (`selection`; 0: none), evaluated every
    ``eval_every`` steps; the best evaluation's trained state is restored before the adapter is written."""
    eval_every: int | None = None
    """Steps between validation evaluations (None: once per epoch; always at the last step)."""
    metric_for_best: str | None = None
    """The validation score that picks the best step and ``--lr auto``'s rate: loss (lower is better), accuracy or
    macro_f1 (None: the task's own, a classifier's accuracy, a causal LM's loss)."""
    early_stopping_patience: int | None = None
    """Stop after this many validation evaluations in a row without a better score (None: never)."""
    lr_auto: bool = False
    """Choose the learning rate on the validation split (`lr_search`) before the run; ``lr`` then holds the pick."""
    task_label: str | None = None
    """``--task-name``: what outputs and reports call a ``train_file`` run (default `data.file_task_name`)."""

    def validate(self) -> None:
        """Raise UsageError naming the first bad setting."""
        for name, choices in (("method", tuple(METHODS)), ("train_scope", SCOPES), ("support", SUPPORT_MODES),
                              ("basis_sharing", BASIS_SHARING_CHOICES), ("dtype", DTYPE_CHOICES),
                              ("device", DEVICE_CHOICES), ("on_nonfinite", NONFINITE_CHOICES)):
            value = getattr(self, name)
            if value not in choices:
                near = difflib.get_close_matches(str(value), choices, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}{hint}")
        if self.k is not None and not _positive_int(self.k):
            raise UsageError(f"k must be a positive integer, got {self.k!r}")
        if self.k is None:
            if self.density is None:
                raise UsageError("set a budget: density or k")
            if not 0.0 < float(self.density) <= 1.0:
                raise UsageError(f"density must be in (0, 1], got {self.density!r}")
        if self.train_file is None and self.eval_file is not None:
            raise UsageError("an eval file needs a train file too")
        if self.train_file is None and self.task is None:
            raise UsageError("give a task or a train file")
        for name in ("epochs", "batch_size", "max_length", "calibration_steps", "eval_batch_size", "grad_accum"):
            if not _positive_int(getattr(self, name)):
                raise UsageError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("max_steps", "max_train", "max_eval", "lora_rank", "save_every", "stop_after", "refresh_every",
                     "every_nth_block"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.layers_to_transform is not None:
            if self.every_nth_block is not None:
                raise UsageError("give layers_to_transform or every_nth_block, not both")
            if (not isinstance(self.layers_to_transform, list) or not self.layers_to_transform
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                               for i in self.layers_to_transform)):
                raise UsageError(f"layers_to_transform must be a non-empty list of block indices >= 0, got "
                                 f"{self.layers_to_transform!r}")
        if self.target_modules is not None:
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise UsageError(f"target_modules {self.target_modules!r} is not a regular expression ({exc})") from None
        if self.score_steps is not None and not (_positive_int(self.score_steps) or self.score_steps == 0):
            raise UsageError(f"score_steps must be an integer >= 0, got {self.score_steps!r}")
        try:
            METHODS[self.method].check(self)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.max_length < 8:
            raise UsageError(f"max_length must be at least 8, got {self.max_length}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UsageError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise UsageError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UsageError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        self.validate_selection()
        if (self.resume is not None and self.output_dir is not None
                and Path(self.output_dir).resolve() != Path(self.resume).resolve()):
            raise UsageError(f"output_dir {self.output_dir} differs from resume {self.resume}: a resumed run writes "
                             "into the folder it resumes (leave --output-dir out)")

    def validate_selection(self) -> None:
        if isinstance(self.val_fraction, bool) or not 0.0 <= self.val_fraction < 1.0:
            raise UsageError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        for name in ("eval_every", "early_stopping_patience"):
            value = getattr(self, name)
            if value is not None and not _positive_int(value):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.metric_for_best is not None and self.metric_for_best not in VAL_METRICS:
            raise UsageError(f"metric_for_best must be one of {', '.join(VAL_METRICS)}, got {self.metric_for_best!r}")
        if not self.val_fraction and (self.lr_auto or self.early_stopping_patience is not None):
            raise UsageError(f"{'lr auto' if self.lr_auto else 'early_stopping_patience'} needs a validation split "
                             "(val_fraction > 0)")

    @property
    def task_name(self) -> str:
        if self.train_file is None:
            return str(self.task)
        return self.task_label or file_task_name(self.train_file)

    @property
    def task_kind(self) -> str:
        return "causal-lm" if is_causal_lm_run(self) else "classifier"

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.method, self.train_scope, self.task_kind)

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        if self.resume is not None:
            return Path(self.resume)
        fixed = "-fixed" if self.support == "fixed" and METHODS[self.method].sparse else ""
        return Path("runs") / f"{self.method}{fixed}-{self.task_name}-s{self.seed}"


def _positive_int(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def resume_config(output_dir: str | os.PathLike) -> FinetuneConfig:
    """The settings of the interrupted run whose latest checkpoint is in ``output_dir`` (``resume`` set)."""
    out = Path(output_dir)
    if not out.is_dir():
        raise UsageError(f"--resume {out}: no such folder")
    path = latest_checkpoint(out)
    if path is None:
        raise UsageError(f"--resume {out}: no checkpoint in {checkpoints_dir(out)} (a run writes one every "
                         "--save-every steps and when Ctrl-C or SIGTERM stops it)")
    damaged = f"the checkpoint is damaged: delete {path} to resume from the one before it, if any"
    try:
        saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["config"]
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot resume from {path}: {STATE_FILE} is not valid JSON ({exc}); {damaged}") from None
    except (OSError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot resume from {path}: {STATE_FILE} holds no run settings ({exc!r}); "
                         f"{damaged}") from None
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    saved.setdefault("val_fraction", 0.0)  # a checkpoint from before validation splits: its run had none
    cfg = FinetuneConfig(**{k: v for k, v in saved.items() if k in names and k not in PER_INVOCATION})
    return dataclasses.replace(cfg, resume=str(out))  # save_every and on_nonfinite carry over unless given again

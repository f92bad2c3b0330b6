"""The fine-tuning loop, in plain sight: data, model, method, optimizer, schedule, loop, evaluation, files.

``finetune(FinetuneConfig(...))`` (or ``finetune(method="lora", max_steps=10, ...)``) runs one fine-tune of a
sequence classifier and writes into ``output_dir``:

* ``metrics.json``: quality (accuracy, macro-F1, loss, majority baseline), cost (median step time, train time,
  calibration time, peak RSS, exact training-state bytes), budget (k, LoRA rank, entries per step, entries ever
  updated, adapter bytes) and every setting of the run;
* ``loss.csv``: ``step,loss``, one row per optimizer step;
* ``adapter/``: what training changed (SparseGrad/MeProp: `sg.save_adapter`; LoRA: peft ``save_pretrained`` plus
  the other trained parameters; full: the trained parameters as safetensors) and ``task.json`` (method, base model,
  labels), enough for `load_finetuned` and ``sparsegrad merge`` to rebuild the model.

Every file is written atomically (temp file + rename; the adapter folder is built beside and renamed into place).

Scale-out and reliability (see docs/reliability.md): under ``torchrun --nproc_per_node N`` the loop trains with
DistributedDataParallel, each rank on its shard of every global batch (`distributed`); ``grad_accum`` sums the
gradients of several micro-batches per step; ``save_every`` writes checkpoints into ``output_dir/checkpoints/`` and
``resume`` continues from the latest one with the same loss sequence as an uninterrupted run (`checkpoint`);
SIGINT/SIGTERM save a checkpoint and stop (`TrainingInterrupted`); a non-finite loss or gradient stops the run
(``on_nonfinite="stop"``) or skips the step (``"skip"``), and no adapter with non-finite values is ever written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

import sparsegrad as sg
from sparsegrad.model import CONFIG_ATTR
from sparsegrad.io import atomic_directory, atomic_write_bytes, read_safetensors

from . import metrics as M
from .methods import (
    METHODS,
    SCOPES,
    base_param_name,
    default_lr,
    lora_delta,
    lora_modules,
    prepare_method,
    quiet_peft,
    unwrap_peft,
)

TASK_FILE = "task.json"
TRAINED_PARAMS_FILE = "trained_params.safetensors"
SUPPORTS = ("dynamic", "fixed")


class UsageError(ValueError):
    """A bad input (flag, file, model path): the CLI reports it as one line and exits with status 2."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingInterrupted(RuntimeError):
    """Training stopped early (SIGINT, SIGTERM, or ``stop_after``) after saving a checkpoint. ``exit_code`` is what
    the CLI exits with: 130 (SIGINT), 143 (SIGTERM), 0 (``stop_after``)."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


NONFINITE_CHOICES = ("stop", "skip")
RESUME_MAY_CHANGE = frozenset({"output_dir", "progress", "verbose", "command", "resume", "stop_after", "save_every",
                               "on_nonfinite"})
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
    prompt_column: str | None = None
    """Decoders: prompt column of a prompt/response --train-file (default "prompt"); setting it selects the
    decoder path."""
    response_column: str | None = None
    dtype: str = "float32"
    """Decoders: weight dtype, float32 or bfloat16 (SparseGrad bases and deltas stay fp32)."""
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
    stop_after: int | None = None
    """Testing: stop after this many steps with a checkpoint, as an interruption would (exit code 0)."""

    def validate(self) -> None:
        """Raise UsageError naming the first bad setting."""
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.train_scope not in SCOPES:
            raise UsageError(f"unknown train scope {self.train_scope!r}; choose one of {', '.join(SCOPES)}")
        if self.support not in SUPPORTS:
            raise UsageError(f"unknown support {self.support!r}; choose one of {', '.join(SUPPORTS)}")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1):
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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "max_train", "max_eval", "lora_rank", "save_every", "stop_after", "refresh_every"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.score_steps is not None and (isinstance(self.score_steps, bool) or not isinstance(self.score_steps, int)
                                             or self.score_steps < 0):
            raise UsageError(f"score_steps must be an integer >= 0, got {self.score_steps!r}")
        if self.refresh_every is not None:
            if self.method != "sparsegrad":
                raise UsageError(f"refresh_every applies to the sparsegrad method only, not {self.method!r}")
            clash = [flag for flag, on in (("--grad-accum", self.grad_accum != 1),
                                           ("--save-every", self.save_every is not None),
                                           ("--resume", self.resume is not None),
                                           ("--stop-after", self.stop_after is not None)) if on]
            if clash:
                raise UsageError(f"--refresh-every does not work with {', '.join(clash)} yet: checkpoints do not "
                                 "hold refreshed bases, and a refresh recalibrates on whole batches")
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
        if self.basis_sharing not in ("kind", "layer"):
            raise UsageError(f"basis_sharing must be 'kind' or 'layer', got {self.basis_sharing!r}")
        if self.every_nth_block is not None and (isinstance(self.every_nth_block, bool)
                                                 or not isinstance(self.every_nth_block, int)
                                                 or self.every_nth_block < 1):
            raise UsageError(f"every_nth_block must be a positive integer, got {self.every_nth_block!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UsageError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.on_nonfinite not in NONFINITE_CHOICES:
            raise UsageError(f"on_nonfinite must be one of {', '.join(NONFINITE_CHOICES)}, got {self.on_nonfinite!r}")
        if (self.resume is not None and self.output_dir is not None
                and Path(self.output_dir).resolve() != Path(self.resume).resolve()):
            raise UsageError(f"output_dir {self.output_dir} differs from resume {self.resume}: a resumed run writes "
                             "into the folder it resumes (leave --output-dir out)")

    @property
    def task_name(self) -> str:
        return Path(self.train_file).stem if self.train_file is not None else str(self.task)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.method, self.train_scope)

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        if self.resume is not None:
            return Path(self.resume)
        method = self.method + ("-fixed" if self.support == "fixed" and self.method in ("sparsegrad", "meprop") else "")
        return Path("runs") / f"{method}-{self.task_name}-s{self.seed}"


# ------------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (``transformers.set_seed`` covers all three)."""
    import transformers

    random.seed(seed)
    torch.manual_seed(seed)
    transformers.set_seed(seed)


def load_data(cfg: FinetuneConfig):
    """The task's train/eval split (bundled task or user files); input problems become UsageError."""
    from .data import load_files, load_task

    try:
        if cfg.train_file is not None:
            return load_files(cfg.train_file, cfg.eval_file, text_column=cfg.text_column,
                              label_column=cfg.label_column, seed=cfg.seed, eval_fraction=cfg.eval_fraction,
                              max_train=cfg.max_train, max_eval=cfg.max_eval)
        return load_task(cfg.task, seed=cfg.seed, eval_fraction=cfg.eval_fraction, max_train=cfg.max_train,
                         max_eval=cfg.max_eval)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(str(exc)) from None


def load_model(name_or_path: str | None, num_labels: int, label_names: list[str] | None = None):
    """(classifier, tokenizer); a missing or unreadable model becomes UsageError."""
    from .models import load_classifier

    try:
        return load_classifier(name_or_path, num_labels, label_names=label_names)
    except (ValueError, OSError, ModuleNotFoundError) as exc:
        raise UsageError(f"cannot load model {name_or_path or 'minilm'!r}: {exc}") from None


def linear_schedule(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup over ``warmup_steps`` (never 0), then linear decay to 0 after the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def mlp_matrices(model: nn.Module, target_names: list[str]) -> dict[str, torch.Tensor]:
    """The current weight of every target MLP matrix, by base-model module name (works on peft wrappers,
    converted SparseGrad models and plain models)."""
    base = unwrap_peft(model)
    out = {}
    for name in target_names:
        module = base.get_submodule(name)
        module = getattr(module, "base_layer", module)
        out[name] = module.weight
    return out


def start_optimization(prepared, cfg, lr: float, total_steps: int, warmup_steps: int):
    """After `prepare_method`, shared by the classifier and decoder loops: reset the seeds (the same dropout stream
    for every method from here on: calibration and LoRA's init consumed RNG draws), keep the full method's starting
    MLP weights (to count the entries training changes), and build the optimizer (AdamW for everything dense, the
    lazy sparse Adam for dynamic SparseGrad weights) and the linear schedule.
    Returns (initial MLP weights or None, optimizer, scheduler)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    initial = None
    if cfg.method == "full":
        initial = {n: w.detach().clone() for n, w in mlp_matrices(prepared.model, prepared.target_names).items()}
    optimizer = sg.create_optimizer(prepared.model, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    return initial, optimizer, scheduler


@torch.no_grad()
def count_entries_updated(prepared, initial: dict[str, torch.Tensor] | None) -> int:
    """Distinct entries of the adapted MLP matrices that training changed."""
    model = prepared.model
    if prepared.method in ("sparsegrad", "meprop"):
        return sum(layer.entries_updated() for layer in sg.sparsegrad_layers(model).values())
    if prepared.method == "lora":
        return sum(int(torch.count_nonzero(lora_delta(m))) for m in lora_modules(model).values())
    current = mlp_matrices(model, prepared.target_names)
    return sum(int(torch.count_nonzero(current[n] != initial[n])) for n in prepared.target_names)


def _trained_params(model: nn.Module, skip: set[int] = frozenset()) -> dict[str, torch.Tensor]:
    """Every trainable parameter (not in ``skip``), by base-model name, detached contiguous CPU copies."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in skip:
            out[base_param_name(name)] = p.detach().cpu().contiguous().clone()
    return out


def _write_adapter_files(prepared, folder: Path) -> None:
    model = prepared.model
    if prepared.method in ("sparsegrad", "meprop"):
        sg.save_adapter(model, folder)
    elif prepared.method == "lora":
        model.save_pretrained(str(folder))
        lora_params = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        extra = _trained_params(model, lora_params)
        if extra:
            atomic_write_bytes(folder / TRAINED_PARAMS_FILE, st_save(extra, metadata={"format": "pt"}))
    else:
        atomic_write_bytes(folder / TRAINED_PARAMS_FILE, st_save(_trained_params(model), metadata={"format": "pt"}))


def save_trained(prepared, adapter_dir: Path, task_info: dict[str, Any]) -> int:
    """Write the adapter (and ``task.json``) into a fresh folder beside ``adapter_dir``, then rename it into place.
    Returns the adapter's size in bytes (its files, not counting ``task.json`` and peft's README)."""
    adapter_dir = Path(adapter_dir)
    with atomic_directory(adapter_dir) as tmp:
        _write_adapter_files(prepared, tmp)
        atomic_write_bytes(tmp / TASK_FILE, (json.dumps(task_info, indent=2) + "\n").encode())
    return sum(f.stat().st_size for f in adapter_dir.iterdir()
               if f.is_file() and f.name not in (TASK_FILE, "README.md"))


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_loss_csv(path: Path, losses: list[float]) -> None:
    buf = io.StringIO()
    buf.write("step,loss\n")
    for i, loss in enumerate(losses, start=1):
        buf.write(f"{i},{loss:.6f}\n")
    atomic_write_bytes(path, buf.getvalue().encode())


# ------------------------------------------------------------------------------------------------- the run
def finetune(config: FinetuneConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Run one fine-tune; returns the metrics dict that is also written to ``output_dir/metrics.json``.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0 evaluates and writes the files, and every rank
    returns rank 0's metrics. Raises `TrainingInterrupted` (after saving a checkpoint) on SIGINT/SIGTERM or at
    ``stop_after``, `TrainingDiverged` on a non-finite loss or gradient with ``on_nonfinite="stop"``.
    """
    cfg = dataclasses.replace(config or FinetuneConfig(), **overrides)
    cfg.validate()
    from .lm import block_indices, finetune_lm, is_decoder_run

    if is_decoder_run(cfg):  # causal LMs: decoder tasks, prompt/response files (the loop is in lm.py)
        _check_decoder_settings(cfg)
        return finetune_lm(cfg)
    if cfg.dtype != "float32":
        raise UsageError("--dtype applies to decoder runs only")
    from .distributed import DistributedSetupError, setup_distributed

    try:
        ctx = setup_distributed()
    except DistributedSetupError as exc:
        raise UsageError(str(exc)) from None
    return _finetune_classifier(cfg, ctx, block_indices)  # a process group it started is left for the next run


def _check_decoder_settings(cfg: FinetuneConfig) -> None:
    """The decoder loop (lm.py) trains in one process without accumulation or checkpoints: refuse those settings."""
    from .distributed import env_world_size

    asked = [flag for flag, on in (("--grad-accum", cfg.grad_accum != 1), ("--save-every", cfg.save_every is not None),
                                   ("--resume", cfg.resume is not None), ("--stop-after", cfg.stop_after is not None),
                                   ("--on-nonfinite skip", cfg.on_nonfinite != "stop"),
                                   ("--refresh-every", cfg.refresh_every is not None)) if on]
    if asked:
        raise UsageError(f"{', '.join(asked)}: classifier runs only for now; decoder runs train in one process "
                         "without gradient accumulation or checkpoints")
    if env_world_size() > 1:
        raise UsageError("decoder runs train in one process: start them without torchrun")


def resume_config(output_dir: str | os.PathLike) -> FinetuneConfig:
    """The settings of the interrupted run whose latest checkpoint is in ``output_dir`` (``resume`` set)."""
    from .checkpoint import STATE_FILE, checkpoints_dir, latest_checkpoint

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
    per_invocation = {"output_dir", "progress", "verbose", "command", "resume", "stop_after"}
    cfg = FinetuneConfig(**{k: v for k, v in saved.items() if k in names and k not in per_invocation})
    return dataclasses.replace(cfg, resume=str(out))  # save_every and on_nonfinite carry over unless given again


def _load_resume(cfg: FinetuneConfig, world: int):
    """The latest checkpoint of ``cfg.resume``, checked against this run's settings and world size."""
    from .checkpoint import CheckpointError, load_checkpoint

    resume_config(cfg.resume)  # the folder and a readable checkpoint exist
    from .checkpoint import latest_checkpoint

    path = latest_checkpoint(cfg.resume)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from None
    saved = ckpt.state.get("config") or {}
    diffs = [f"{name}={getattr(cfg, name)!r} (the interrupted run had {saved[name]!r})"
             for name in sorted(saved) if name not in RESUME_MAY_CHANGE and hasattr(cfg, name)
             and saved[name] != getattr(cfg, name)]
    if diffs:
        raise UsageError(f"cannot resume {cfg.resume}: settings differ from the interrupted run: {'; '.join(diffs)}. "
                         f"`sparsegrad finetune --resume {cfg.resume}` alone takes the run's settings")
    if ckpt.state.get("world_size") != world:
        raise UsageError(f"cannot resume {cfg.resume}: it was trained by {ckpt.state.get('world_size')} process(es), "
                         f"this is {world}; resume with the same number (torchrun --nproc_per_node "
                         f"{ckpt.state.get('world_size')}, or no torchrun for 1)")
    if cfg.method == "sparsegrad" and ckpt.bases is None:
        raise UsageError(f"cannot resume from {path}: it holds no bases.safetensors (the checkpoint is incomplete)")
    return ckpt


def _state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes (identical on every rank iff the tensors are)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _resume_hint(out_dir: Path, world: int) -> str:
    launcher = f"torchrun --nproc_per_node {world} -m sparsegrad" if world > 1 else "sparsegrad"
    return f"{launcher} finetune --resume {out_dir}"


def _finetune_classifier(cfg: FinetuneConfig, ctx, block_indices) -> dict[str, Any]:
    from .checkpoint import (
        EXIT_CODES,
        CheckpointError,
        FaultInjection,
        StopSignals,
        checkpoints_dir,
        clear_checkpoints,
        latest_checkpoint,
        load_trainable_state,
        nonfinite_tensors,
        rng_state,
        save_checkpoint,
        set_rng_state,
        trainable_state,
    )
    from .distributed import micro_to, no_sync_unless, scaled_loss_fn, step_micro_batches, wrap_ddp

    main = ctx.is_main
    log = print if cfg.verbose and main else (lambda *a, **k: None)
    progress = cfg.progress and main
    lr = cfg.resolved_lr()
    out_dir = cfg.resolved_output_dir()
    try:  # fail now, not after training, when the output folder cannot be made
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc}") from None
    resume = _load_resume(cfg, ctx.world) if cfg.resume is not None else None
    if cfg.refresh_every is not None and ctx.world > 1:
        raise UsageError("--refresh-every trains in one process for now: start it without torchrun")
    wall_start = time.perf_counter()

    # 1. Seeds, data, model. The classifier head is initialised from the seeded torch RNG.
    seed_everything(cfg.seed)
    data = load_data(cfg)
    log(data.summary())
    model, tokenizer = load_model(cfg.model, data.num_labels, data.label_names)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_length > max_pos:
        raise UsageError(f"max_length {cfg.max_length} exceeds the model's {max_pos} positions")
    if ctx.device.type != "cpu":
        model.to(ctx.device)

    # 2. Batches: tokenised once, dynamically padded; a seeded shuffle per epoch. One batch is one optimizer step of
    #    batch_size x processes x grad_accum examples, cut into this rank's micro-batches in the loop.
    from .data import make_batches, tokenize

    global_batch = cfg.batch_size * ctx.world * cfg.grad_accum
    train_enc = tokenize(tokenizer, data.train_texts, cfg.max_length)
    eval_batches = make_batches(tokenizer, data.eval_texts, data.eval_labels, batch_size=cfg.eval_batch_size,
                                max_length=cfg.max_length, shuffle=False) if main else []

    def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        return make_batches(tokenizer, train_enc, data.train_labels, batch_size=global_batch,
                            max_length=cfg.max_length, shuffle=True, seed=cfg.seed, epoch=epoch)

    steps_per_epoch = math.ceil(len(data.train_texts) / global_batch)
    if cfg.max_steps is not None:  # max_steps overrides epochs: as many epochs as it takes, the last cut short
        total_steps = cfg.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = cfg.epochs * steps_per_epoch
        epochs = cfg.epochs
    warmup_steps = int(round(cfg.warmup_ratio * total_steps))

    # 3. The method. Calibration batches are the first training batches of epoch 0 (dropout on, as in training);
    #    with several processes or micro-batches each calibration step is a whole global batch, its gradient
    #    accumulated and averaged over the ranks. A resumed run takes the bases from its checkpoint.
    first_epoch = epoch_batches(0)
    model.train()
    calibration, calib_loss, calib_options = None, None, None
    if cfg.method == "sparsegrad" and resume is None:
        if ctx.world == 1 and cfg.grad_accum == 1:
            calibration = first_epoch[: cfg.calibration_steps]
        else:
            calibration = [mb for b in first_epoch[: cfg.calibration_steps]
                           for mb in step_micro_batches(b, ctx.rank, ctx.world, cfg.grad_accum, keep_empty=True)]
            calib_loss = scaled_loss_fn(ctx.device)
            calib_options = {"grad_accum": cfg.grad_accum, "all_reduce_grads": ctx.enabled}
    prepared = prepare_method(
        model, cfg.method, budget_k=cfg.k, density=cfg.density if cfg.k is None else None, support=cfg.support,
        train_scope=cfg.train_scope, calibration_batches=calibration, loss_fn=calib_loss,
        calibration_options=calib_options, bases=resume.bases if resume is not None else None,
        calibration_steps=cfg.calibration_steps, score_steps=cfg.score_steps, basis_sharing=cfg.basis_sharing,
        lora_rank=cfg.lora_rank, layers_to_transform=block_indices(model, cfg.every_nth_block), progress=progress,
    )
    model = prepared.model
    log(prepared.description)
    log(f"trainable entries per step: {prepared.trainable_entries:,d} of {prepared.total_params:,d} "
        f"({100 * prepared.trainable_entries / prepared.total_params:.4f}%)")
    if ctx.enabled or cfg.grad_accum > 1:
        log(f"global batch {global_batch} = {cfg.batch_size} per micro-batch x {ctx.world} process(es) x "
            f"{cfg.grad_accum} micro-batch(es) per step")
    # 4. Seeds, optimizer (AdamW for everything dense; the lazy sparse Adam for dynamic SparseGrad weights), schedule.
    initial, optimizer, scheduler = start_optimization(prepared, cfg, lr, total_steps, warmup_steps)

    # 5. Where to start: a fresh run, or the checkpoint's trained state, optimizer, schedule, RNG and position.
    losses: list[float] = []
    step_times: list[float] = []
    skipped: list[int] = []
    state_bytes: dict[str, int] = {}
    step = 0
    train_time_before = 0.0
    calibration_time = prepared.calibration_time_s
    if resume is not None:
        try:
            load_trainable_state(model, resume.tensors, str(resume.path))
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"cannot resume from {resume.path}: {exc}") from None
        set_rng_state(resume.rng_states[ctx.rank])
        saved = resume.state
        step = int(saved["step"])
        losses = [math.nan if v is None else float(v) for v in saved["losses"]]
        step_times = [float(v) for v in saved["step_times"]]
        skipped = [int(v) for v in saved.get("skipped_steps", [])]
        train_time_before = float(saved.get("train_time_s", 0.0))
        calibration_time = float(saved.get("calibration_time_s", calibration_time))
        state_bytes = dict(saved.get("train_state_bytes") or {})
        log(f"resuming from {resume.path}: step {step} of {total_steps}")
    elif main and clear_checkpoints(out_dir):
        log(f"removed the checkpoints of an earlier run in {checkpoints_dir(out_dir)} (this run starts afresh)")
    train_model = wrap_ddp(model, ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    refreshes: dict[int, float] = {}  # step -> seconds the basis refresh took there
    faults = FaultInjection.from_env()

    def save(reason: str) -> Path:
        rngs = ctx.gather(rng_state())
        if main:
            record = {
                "step": step, "epoch": step // steps_per_epoch, "step_in_epoch": step % steps_per_epoch,
                "total_steps": total_steps, "steps_per_epoch": steps_per_epoch, "world_size": ctx.world,
                "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "global_batch_size": global_batch,
                "losses": [None if math.isnan(v) else v for v in losses], "step_times": step_times,
                "skipped_steps": skipped, "train_time_s": train_time_before + time.perf_counter() - train_start,
                "calibration_time_s": calibration_time, "reason": reason, "train_state_bytes": state_bytes,
                "config": dataclasses.asdict(cfg),
            }
            try:
                save_checkpoint(out_dir, step, model=model, optimizer=optimizer, scheduler=scheduler,
                                bases=prepared.bases if cfg.method == "sparsegrad" else None, rng_states=rngs,
                                state=record)
            except CheckpointError as exc:
                raise TrainingDiverged(str(exc)) from None
        ctx.barrier()
        return checkpoints_dir(out_dir) / f"step-{step}"

    # 6. The loop.
    bar = tqdm(total=total_steps, initial=step, desc=f"{cfg.method} {data.name}", unit="step", disable=not progress,
               dynamic_ncols=True)
    train_start = time.perf_counter()
    train_model.train()
    start_epoch, start_in_epoch = divmod(step, steps_per_epoch)
    with StopSignals(verbose=main) as signals:
        for epoch in range(start_epoch, epochs):
            if step >= total_steps:
                break
            batches = first_epoch if epoch == 0 else epoch_batches(epoch)
            first = start_in_epoch if epoch == start_epoch else 0
            for position, batch in enumerate(batches[first:], start=first):
                if step >= total_steps:
                    break
                if cfg.refresh_every and step and step % cfg.refresh_every == 0:
                    # Basis refresh: recalibrate at the current point on the next batches (they are then trained
                    # on as usual), fold the delta into the frozen weight, continue in the new bases.
                    r0 = time.perf_counter()
                    fresh = sg.estimate_bases(model, getattr(model, CONFIG_ATTR),
                                              batches[position:position + cfg.calibration_steps], progress=False)
                    sg.refresh_bases(model, fresh, optimizer)
                    refreshes[step] = round(time.perf_counter() - r0, 3)
                t0 = time.perf_counter()
                step_lr = optimizer.param_groups[0]["lr"]
                micros = step_micro_batches(batch, ctx.rank, ctx.world, cfg.grad_accum)
                loss_sum, loss_bad = 0.0, False
                for i, mb in enumerate(micros):
                    with no_sync_unless(train_model, last=i == len(micros) - 1):
                        loss = train_model(**micro_to(mb, ctx.device)).loss
                        loss = faults.poison_loss(loss, step + 1, ctx.rank)
                        if mb.rows:
                            value = float(loss.detach())
                            loss_bad |= not math.isfinite(value)
                            loss_sum += value * mb.rows
                        (loss if mb.scale == 1.0 else loss * mb.scale).backward()
                faults.poison_grad(model, step + 1, ctx.rank)
                grad_bad = not _grads_finite(trainable)
                if ctx.enabled:  # the global mean loss, and whether any rank saw a non-finite value
                    loss_sum, n_bad_loss, n_bad_grad = ctx.all_sum([loss_sum, float(loss_bad), float(grad_bad)])
                    loss_bad, grad_bad = n_bad_loss > 0, n_bad_grad > 0
                step_loss = loss_sum / next(iter(batch.values())).shape[0]
                if loss_bad or grad_bad:
                    what = f"training loss is {step_loss}" if loss_bad else "a gradient is not finite (NaN or inf)"
                    if cfg.on_nonfinite == "stop":
                        bar.close()
                        last = latest_checkpoint(out_dir)
                        kept = (f"; the last checkpoint ({last.name}) is intact: resume with "
                                f"`{_resume_hint(out_dir, ctx.world)} --on-nonfinite skip`" if last is not None else "")
                        raise TrainingDiverged(
                            f"{what} at step {step + 1}: lower the learning rate (now {lr:g}) or check the data; "
                            f"--on-nonfinite skip skips such steps instead. No adapter was written{kept}")
                    if main:
                        print(f"sparsegrad: warning: {what} at step {step + 1}: step skipped (no update)",
                              file=sys.stderr, flush=True)
                    skipped.append(step + 1)
                    step_loss = math.nan
                else:
                    optimizer.step()
                if step == total_steps - 1:  # exact training state at the last step (before zero_grad)
                    state_bytes = sg.training_state_bytes(model, optimizer)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_times.append(time.perf_counter() - t0)
                losses.append(step_loss)
                step += 1
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{step_lr:.2e}")
                bar.update(1)
                faults.maybe_signal(step, ctx.rank)
                stop = signals.requested
                if ctx.enabled:  # every rank stops at the same step
                    stop = ctx.all_sum([float(stop)])[0] > 0
                asked = cfg.stop_after is not None and step == cfg.stop_after and step < total_steps
                if stop or asked:
                    bar.close()
                    path = save("signal" if stop else "stop_after")
                    hint = _resume_hint(out_dir, ctx.world)
                    if stop:
                        name = signal_name(signals.signum)
                        code = EXIT_CODES.get(signals.signum, 143)
                        raise TrainingInterrupted(f"interrupted by {name} after step {step} of {total_steps}; "
                                                  f"checkpoint saved in {path}. Resume with: {hint}", code, path)
                    raise TrainingInterrupted(f"stopped after step {step} of {total_steps} (--stop-after); checkpoint "
                                              f"saved in {path}. Resume with: {hint}", 0, path)
                if cfg.save_every and step % cfg.save_every == 0:
                    save("save_every")
    bar.close()
    train_time = train_time_before + time.perf_counter() - train_start
    if ctx.enabled:  # DDP keeps the ranks in step by construction; check it rather than trust it
        digests = ctx.gather(_state_digest(trainable_state(model)))
        if len(set(digests)) != 1:
            raise TrainingDiverged(f"the {ctx.world} processes ended training with different parameters "
                                   f"(digests {[d[:12] for d in digests]}): this is a bug, please report it")

    # 7. Evaluation (rank 0; eval mode, no grad, batches of 64) and files: adapter (+ task.json), loss.csv,
    #    metrics.json. Nothing with a non-finite value is written.
    peak_rss = ctx.gather(M.peak_rss_mb()) if not main else None
    metrics: dict[str, Any] | None = None
    if main:
        eval_start = time.perf_counter()
        result = M.evaluate(model, eval_batches)
        eval_time = time.perf_counter() - eval_start
        majority = M.majority_baseline(data.train_labels, data.eval_labels)
        entries_updated = count_entries_updated(prepared, initial)
        mlp_entries = sum(w.numel() for w in mlp_matrices(model, prepared.target_names).values())
        bad = nonfinite_tensors(trainable_state(model))
        if bad:
            raise TrainingDiverged(f"the trained parameters hold non-finite values ({bad[:3]}): no adapter written; "
                                   f"lower the learning rate (now {lr:g})")
        task_info = {
            "format": "sparsegrad-finetune-task",
            "method": cfg.method,
            "model": cfg.model or "minilm",
            "task": data.name,
            "num_labels": data.num_labels,
            "label_names": list(data.label_names),
            "train_scope": cfg.train_scope,
            "support": cfg.support,
            "max_length": cfg.max_length,
            "lora_rank": prepared.lora_rank,
            "lora_alpha": prepared.lora_alpha,
            "target_modules": prepared.config.target_modules if prepared.config else None,
        }
        adapter_dir = out_dir / "adapter"
        adapter_bytes = save_trained(prepared, adapter_dir, task_info)
        write_loss_csv(out_dir / "loss.csv", losses)
        finite = [v for v in losses if math.isfinite(v)]
        tail = finite[-max(1, min(10, len(finite) // 4)):]
        peak_rss = ctx.gather(M.peak_rss_mb())
        metrics = {
            "method": cfg.method,
            "task": data.name,
            "seed": cfg.seed,
            "model": cfg.model or "minilm",
            "eval_accuracy": result["eval_accuracy"],
            "eval_macro_f1": result["eval_macro_f1"],
            "eval_loss": result["eval_loss"],
            "majority_baseline_accuracy": majority,
            "train_steps": step,
            "epochs": epochs,
            "steps_per_epoch": steps_per_epoch,
            "k": prepared.k,
            "lora_rank": prepared.lora_rank,
            "lora_alpha": prepared.lora_alpha,
            "density": cfg.density if cfg.k is None else None,
            "budget_k": cfg.k,
            "support": cfg.support,
            "train_scope": cfg.train_scope,
            "lr": lr,
            "weight_decay": cfg.weight_decay,
            "warmup_ratio": cfg.warmup_ratio,
            "warmup_steps": warmup_steps,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "world_size": ctx.world,
            "global_batch_size": global_batch,
            "distributed_backend": ctx.backend,
            "max_length": cfg.max_length,
            "max_steps": cfg.max_steps,
            "calibration_steps": cfg.calibration_steps if cfg.method == "sparsegrad" else 0,
            "score_steps": prepared.score_steps,
            "basis_sharing": cfg.basis_sharing if cfg.method == "sparsegrad" else None,
            "refresh_every": cfg.refresh_every,
            "refreshed_at_steps": sorted(refreshes),
            "refresh_time_s": round(sum(refreshes.values()), 3),
            "num_train": len(data.train_texts),
            "num_eval": len(data.eval_texts),
            "num_labels": data.num_labels,
            "label_names": list(data.label_names),
            "duplicates_dropped": data.duplicates_dropped,
            "step_time_median_s": M.median(step_times[1:] if len(step_times) > 1 else step_times),
            "step_time_first_s": step_times[0] if step_times else None,
            "train_time_s": train_time,
            "calibration_time_s": calibration_time,
            "eval_time_s": eval_time,
            "wall_time_s": time.perf_counter() - wall_start,
            "peak_rss_mb": peak_rss[0],
            "peak_rss_mb_per_rank": peak_rss,
            "train_state_bytes": state_bytes,
            "trainable_entries": prepared.trainable_entries,
            "total_params": prepared.total_params,
            "mlp_matrices": len(prepared.target_names),
            "mlp_entries": mlp_entries,
            "entries_updated": entries_updated,
            "adapter_bytes": adapter_bytes,
            "final_train_loss": sum(tail) / len(tail) if tail else None,
            "skipped_steps": skipped,
            "on_nonfinite": cfg.on_nonfinite,
            "save_every": cfg.save_every,
            "resumed_from_step": resume.step if resume is not None else None,
            "ranks_identical": True if ctx.enabled else None,
            "description": prepared.description,
            "bases_report": prepared.bases_report,
            "torch_threads": torch.get_num_threads(),
            "versions": _versions(),
            "output_dir": str(out_dir),
            "command": cfg.command,
        }
        write_json(out_dir / "metrics.json", metrics)
    return ctx.broadcast(metrics)


def signal_name(signum: int | None) -> str:
    import signal as _signal

    try:
        return _signal.Signals(signum).name
    except (ValueError, TypeError):
        return "a signal"


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "sparsegrad": sg.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


# ------------------------------------------------------------------------------------------------- reloading
def read_task(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(adapter_dir) / TASK_FILE
    if not Path(adapter_dir).is_dir():
        raise UsageError(f"adapter directory not found: {adapter_dir}")
    if not path.is_file():
        raise UsageError(f"{path} is missing: not an adapter written by `sparsegrad finetune`")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != "sparsegrad-finetune-task":
        raise UsageError(f"{path} is not a sparsegrad task file")
    return info


def _load_named(model: nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise UsageError(f"{what} holds parameters the base model lacks: {unknown[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise UsageError(f"{what}: {name} is {tuple(value.shape)}, the base has {tuple(params[name].shape)}")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise UsageError(f"{what}: {name} holds NaN or inf; the adapter is unusable")
            params[name].copy_(value.to(params[name].dtype))


def load_finetuned(adapter_dir: str | os.PathLike, model: str | None = None, *, merge: bool = True):
    """(model, tokenizer, task info) rebuilt from an adapter folder written by `finetune`.

    ``model`` overrides the base model recorded in ``task.json``. With ``merge`` the result is a plain
    transformers model (SparseGrad and LoRA merged into the weights) that ``save_pretrained`` writes as an
    ordinary checkpoint.
    """
    adapter_dir = Path(adapter_dir)
    info = read_task(adapter_dir)
    if info.get("model_kind") == "causal-lm":
        from .lm import load_lm_model

        base, tokenizer = load_lm_model(model or info["model"], info.get("dtype", "float32"))
    else:
        base, tokenizer = load_model(model or info["model"], info["num_labels"], info.get("label_names"))
    method = info["method"]
    try:
        if method in ("sparsegrad", "meprop"):
            sg.load_adapter(base, adapter_dir)
            result = sg.merge_and_unload(base) if merge else base
        elif method == "lora":
            from peft import PeftModel

            extra = adapter_dir / TRAINED_PARAMS_FILE
            if extra.is_file():
                _load_named(base, read_safetensors(extra, "trained parameters")[0], str(extra))
            with quiet_peft():
                wrapped = PeftModel.from_pretrained(base, str(adapter_dir))
            result = wrapped.merge_and_unload() if merge else wrapped
        elif method == "full":
            tensors, _ = read_safetensors(adapter_dir / TRAINED_PARAMS_FILE, "trained parameters")
            _load_named(base, tensors, str(adapter_dir / TRAINED_PARAMS_FILE))
            result = base
        else:
            raise UsageError(f"{adapter_dir / TASK_FILE}: unknown method {method!r}")
    except (ValueError, FileNotFoundError) as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"cannot load adapter {adapter_dir}: {exc}") from None
    except Exception as exc:  # peft and safetensors raise their own types for damaged files
        if type(exc).__name__ not in ("SafetensorError", "HeaderTooLarge", "KeyError", "RuntimeError"):
            raise
        raise UsageError(f"cannot load adapter {adapter_dir}: {type(exc).__name__}: {str(exc)[:300]} (the adapter "
                         "files are damaged or come from another model)") from None
    result.eval()
    return result, tokenizer, info


# ------------------------------------------------------------------------------------------------- calibration
def calibrate(*, model: str | None = None, task: str | None = "bbc", train_file: str | None = None,
              eval_file: str | None = None, text_column: str = "text", label_column: str = "label",
              max_train: int | None = None, max_length: int = 128, batch_size: int = 16, seed: int = 0,
              density: float | None = 0.01, k: int | None = None, support: str = "dynamic",
              basis_sharing: str = "kind", calibration_steps: int = 2, score_steps: int = 2,
              target_modules: str | None = None, output_dir: str | os.PathLike = "runs/calibrate",
              progress: bool = True) -> tuple[dict[str, Any], Path, float]:
    """Estimate the SparseGrad bases on the first ``calibration_steps`` training batches (the batches `finetune`
    would use), save ``bases.safetensors`` and ``report.json`` into ``output_dir``.
    Returns (report, bases path, seconds)."""
    from .data import make_batches
    from .methods import default_targets

    cfg = FinetuneConfig(task=task, train_file=train_file, eval_file=eval_file, text_column=text_column,
                         label_column=label_column, model=model, max_train=max_train, max_length=max_length,
                         batch_size=batch_size, seed=seed, density=density, k=k, support=support,
                         basis_sharing=basis_sharing, calibration_steps=calibration_steps, progress=progress)
    cfg.validate()
    seed_everything(seed)
    data = load_data(cfg)
    net, tokenizer = load_model(model, data.num_labels, data.label_names)
    batches = make_batches(tokenizer, data.train_texts, data.train_labels, batch_size=batch_size,
                           max_length=max_length, shuffle=True, seed=seed, epoch=0)[:calibration_steps]
    try:
        sg_cfg = sg.SparseGradConfig(target_modules=target_modules or default_targets(net), k=k,
                                     density=None if k is not None else density, support=support,
                                     basis_sharing=basis_sharing, score_steps=score_steps)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    net.train()
    start = time.perf_counter()
    bases = sg.estimate_bases(net, sg_cfg, batches, progress=progress)
    seconds = time.perf_counter() - start
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases.save(out / "bases.safetensors")
    write_json(out / "report.json", {"model": model or "minilm", "task": data.name, "seed": seed,
                                     "calibration_steps": len(batches), "batch_size": batch_size,
                                     "config": sg_cfg.to_dict(), "seconds": seconds, "report": bases.report})
    return bases.report, out / "bases.safetensors", seconds

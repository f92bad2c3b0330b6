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
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

import sparsegrad as sg
from sparsegrad.io import atomic_write_bytes, read_safetensors

from . import metrics as M
from .methods import (
    METHODS,
    SCOPES,
    base_param_name,
    default_lr,
    lora_delta,
    lora_modules,
    prepare_method,
    unwrap_peft,
)

TASK_FILE = "task.json"
TRAINED_PARAMS_FILE = "trained_params.safetensors"
SUPPORTS = ("dynamic", "fixed")


class UsageError(ValueError):
    """A bad input (flag, file, model path): the CLI reports it as one line and exits with status 2."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


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
    calibration_steps: int = 4
    max_train: int | None = None
    max_eval: int | None = None
    eval_fraction: float = 0.2
    eval_batch_size: int = 64
    lora_rank: int | None = None
    basis_sharing: str = "kind"
    output_dir: str | None = None
    progress: bool = True
    verbose: bool = True
    command: str | None = None
    """The command line that started the run (recorded in metrics.json)."""

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
        for name in ("epochs", "batch_size", "max_length", "calibration_steps", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "max_train", "max_eval", "lora_rank"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length < 8:
            raise UsageError(f"max_length must be at least 8, got {self.max_length}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a positive number, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UsageError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UsageError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 < self.eval_fraction < 1.0:
            raise UsageError(f"eval_fraction must be in (0, 1), got {self.eval_fraction!r}")
        if self.basis_sharing not in ("kind", "layer"):
            raise UsageError(f"basis_sharing must be 'kind' or 'layer', got {self.basis_sharing!r}")

    @property
    def task_name(self) -> str:
        return Path(self.train_file).stem if self.train_file is not None else str(self.task)

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else default_lr(self.method, self.train_scope)

    def resolved_output_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
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
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.tmp-", dir=adapter_dir.parent))
    try:
        _write_adapter_files(prepared, tmp)
        atomic_write_bytes(tmp / TASK_FILE, (json.dumps(task_info, indent=2) + "\n").encode())
        old = None
        if adapter_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{adapter_dir.name}.old-", dir=adapter_dir.parent))
            os.replace(adapter_dir, old / "adapter")
        os.replace(tmp, adapter_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
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
    """Run one fine-tune; returns the metrics dict that is also written to ``output_dir/metrics.json``."""
    cfg = dataclasses.replace(config or FinetuneConfig(), **overrides)
    cfg.validate()
    log = print if cfg.verbose else (lambda *a, **k: None)
    lr = cfg.resolved_lr()
    out_dir = cfg.resolved_output_dir()
    wall_start = time.perf_counter()

    # 1. Seeds, data, model. The classifier head is initialised from the seeded torch RNG.
    seed_everything(cfg.seed)
    data = load_data(cfg)
    log(data.summary())
    model, tokenizer = load_model(cfg.model, data.num_labels, data.label_names)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and cfg.max_length > max_pos:
        raise UsageError(f"max_length {cfg.max_length} exceeds the model's {max_pos} positions")

    # 2. Batches: tokenised once, dynamically padded; a seeded shuffle per epoch.
    from .data import make_batches, tokenize

    train_enc = tokenize(tokenizer, data.train_texts, cfg.max_length)
    eval_batches = make_batches(tokenizer, data.eval_texts, data.eval_labels, batch_size=cfg.eval_batch_size,
                                max_length=cfg.max_length, shuffle=False)

    def epoch_batches(epoch: int) -> list[dict[str, torch.Tensor]]:
        return make_batches(tokenizer, train_enc, data.train_labels, batch_size=cfg.batch_size,
                            max_length=cfg.max_length, shuffle=True, seed=cfg.seed, epoch=epoch)

    steps_per_epoch = math.ceil(len(data.train_texts) / cfg.batch_size)
    if cfg.max_steps is not None:  # max_steps overrides epochs: as many epochs as it takes, the last cut short
        total_steps = cfg.max_steps
        epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = cfg.epochs * steps_per_epoch
        epochs = cfg.epochs
    warmup_steps = int(round(cfg.warmup_ratio * total_steps))

    # 3. The method. Calibration batches are the first training batches of epoch 0 (dropout on, as in training).
    first_epoch = epoch_batches(0)
    model.train()
    prepared = prepare_method(
        model, cfg.method, budget_k=cfg.k, density=cfg.density if cfg.k is None else None, support=cfg.support,
        train_scope=cfg.train_scope,
        calibration_batches=first_epoch[: cfg.calibration_steps] if cfg.method == "sparsegrad" else None,
        calibration_steps=cfg.calibration_steps, basis_sharing=cfg.basis_sharing, lora_rank=cfg.lora_rank,
        progress=cfg.progress,
    )
    model = prepared.model
    log(prepared.description)
    log(f"trainable entries per step: {prepared.trainable_entries:,d} of {prepared.total_params:,d} "
        f"({100 * prepared.trainable_entries / prepared.total_params:.4f}%)")
    # Same dropout stream for every method from here on (calibration and LoRA's init consumed RNG draws).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    initial = None
    if cfg.method == "full":
        initial = {n: w.detach().clone() for n, w in mlp_matrices(model, prepared.target_names).items()}

    # 4. Optimizer (AdamW for everything dense; the lazy sparse Adam for dynamic SparseGrad weights), schedule.
    optimizer = sg.create_optimizer(model, lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))

    # 5. The loop.
    losses: list[float] = []
    step_times: list[float] = []
    state_bytes: dict[str, int] = {}
    step = 0
    bar = tqdm(total=total_steps, desc=f"{cfg.method} {data.name}", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    train_start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for batch in first_epoch if epoch == 0 else epoch_batches(epoch):
            if step >= total_steps:
                break
            t0 = time.perf_counter()
            step_lr = optimizer.param_groups[0]["lr"]
            loss = model(**batch).loss
            if not torch.isfinite(loss.detach()):
                bar.close()
                raise TrainingDiverged(
                    f"training loss is {float(loss.detach())} at step {step + 1}: lower the learning rate "
                    f"(now {lr:g})"
                )
            loss.backward()
            optimizer.step()
            if step == total_steps - 1:  # exact training state at the last step (before zero_grad)
                state_bytes = sg.training_state_bytes(model, optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
            step += 1
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{step_lr:.2e}")
            bar.update(1)
    bar.close()
    train_time = time.perf_counter() - train_start

    # 6. Evaluation (eval mode, no grad, batches of 64).
    eval_start = time.perf_counter()
    result = M.evaluate(model, eval_batches)
    eval_time = time.perf_counter() - eval_start
    majority = M.majority_baseline(data.train_labels, data.eval_labels)
    entries_updated = count_entries_updated(prepared, initial)
    mlp_entries = sum(w.numel() for w in mlp_matrices(model, prepared.target_names).values())

    # 7. Files: adapter (+ task.json), loss.csv, metrics.json.
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
    tail = losses[-max(1, min(10, len(losses) // 4)):]
    metrics: dict[str, Any] = {
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
        "max_length": cfg.max_length,
        "max_steps": cfg.max_steps,
        "calibration_steps": cfg.calibration_steps if cfg.method == "sparsegrad" else 0,
        "num_train": len(data.train_texts),
        "num_eval": len(data.eval_texts),
        "num_labels": data.num_labels,
        "label_names": list(data.label_names),
        "duplicates_dropped": data.duplicates_dropped,
        "step_time_median_s": M.median(step_times[1:] if len(step_times) > 1 else step_times),
        "step_time_first_s": step_times[0] if step_times else None,
        "train_time_s": train_time,
        "calibration_time_s": prepared.calibration_time_s,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - wall_start,
        "peak_rss_mb": M.peak_rss_mb(),
        "train_state_bytes": state_bytes,
        "trainable_entries": prepared.trainable_entries,
        "total_params": prepared.total_params,
        "mlp_matrices": len(prepared.target_names),
        "mlp_entries": mlp_entries,
        "entries_updated": entries_updated,
        "adapter_bytes": adapter_bytes,
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "description": prepared.description,
        "bases_report": prepared.bases_report,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
        "output_dir": str(out_dir),
        "command": cfg.command,
    }
    write_json(out_dir / "metrics.json", metrics)
    return metrics


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
            params[name].copy_(value.to(params[name].dtype))


def load_finetuned(adapter_dir: str | os.PathLike, model: str | None = None, *, merge: bool = True):
    """(model, tokenizer, task info) rebuilt from an adapter folder written by `finetune`.

    ``model`` overrides the base model recorded in ``task.json``. With ``merge`` the result is a plain
    transformers model (SparseGrad and LoRA merged into the weights) that ``save_pretrained`` writes as an
    ordinary checkpoint.
    """
    adapter_dir = Path(adapter_dir)
    info = read_task(adapter_dir)
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
    result.eval()
    return result, tokenizer, info

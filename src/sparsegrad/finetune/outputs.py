"""The run folder: the adapter (+ ``task.json``), ``loss.csv``, ``metrics.json``, and rebuilding a fine-tuned model
from an adapter folder (`load_finetuned`). Every file goes through `sparsegrad.io` (temp file + rename; the adapter
folder is built beside and renamed into place)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsegrad as sg
from sparsegrad.io import atomic_directory, atomic_write_bytes

from .errors import UsageError
from .methods import METHODS, Method, Prepared
from .tasks import load_base_model

TASK_FILE = "task.json"
TASK_FORMAT = "sparsegrad-finetune-task"


def save_trained(prepared: Prepared, method: Method, adapter_dir: Path, task_info: dict[str, Any]) -> int:
    """Write the adapter (and ``task.json``) into a fresh folder beside ``adapter_dir``, then rename it into place.
    Returns the adapter's size in bytes (its files, not counting ``task.json`` and peft's README)."""
    adapter_dir = Path(adapter_dir)
    with atomic_directory(adapter_dir) as tmp:
        method.save(prepared, tmp)
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


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "sparsegrad": sg.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


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
    if not isinstance(info, dict) or info.get("format") != TASK_FORMAT:
        raise UsageError(f"{path} is not a sparsegrad task file")
    return info


def load_finetuned(adapter_dir: str | os.PathLike, model: str | None = None, *,
                   merge: bool = True) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, task info) rebuilt from an adapter folder written by `finetune`.

    ``model`` overrides the base model recorded in ``task.json``. With ``merge`` the result is a plain
    transformers model (SparseGrad and LoRA merged into the weights) that ``save_pretrained`` writes as an
    ordinary checkpoint.
    """
    adapter_dir = Path(adapter_dir)
    info = read_task(adapter_dir)
    method = METHODS.get(info.get("method"))
    if method is None:
        raise UsageError(f"{adapter_dir / TASK_FILE}: unknown method {info.get('method')!r}")
    base, tokenizer = load_base_model(model, info)
    try:
        result = method.load(base, adapter_dir, merge=merge)
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

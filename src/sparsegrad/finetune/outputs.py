"""The run folder: the adapter (+ ``task.json``), ``loss.csv``, ``metrics.json``, and rebuilding a fine-tuned model
from an adapter folder (`load_finetuned`). Every file goes through `sparsegrad.io` (temp file + rename; the adapter
folder is built beside and renamed into place)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

import sparsegrad as sg
import sparsegrad.io as sio
from sparsegrad.adapter import CONFIG_NAME, check_finite_weights, read_adapter_file
from sparsegrad.io import atomic_write_bytes

from .checkpoint import KEEP, clear_checkpoints
from .errors import UsageError
from .methods import METHODS, Method, Prepared
from .tasks import load_base_model

TASK_FILE = "task.json"
TASK_FORMAT = "sparsegrad-finetune-task"


OUTPUT_OPTION = "--output-dir"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@contextlib.contextmanager
def run_folder(raw: str | os.PathLike, ctx: Any, *, fresh: bool, overwrite: bool,
               inputs: dict[str, str | None], need_bytes: int, log: Callable[..., None]) -> Iterator[Path]:
    """The pre-flight of a run, before any model is loaded, and the run folder held for the whole run.

    Rank 0: `sio.prepare_output_folder` (not empty, not an input nor inside one, writable with ``need_bytes`` free,
    created marked ours, locked against a second writer, leftovers of killed writers recovered), then, for a
    ``fresh`` run, the earlier run's checkpoints (refused without ``overwrite``, see `clear_checkpoints`). Every
    rank gets rank 0's refusal as a `UsageError`. A run that fails leaves no folder it created and left empty."""
    refusal, lock = None, None
    if ctx.is_main:
        try:
            lock = sio.prepare_output_folder(raw, OUTPUT_OPTION, kind="run", inputs=inputs, need_bytes=need_bytes)
            for line in lock.recovered:
                log(f"sparsegrad: {line}")
            if fresh and clear_checkpoints(lock.folder, overwrite=overwrite):
                log(f"removed the checkpoints of an earlier run in {lock.folder / 'checkpoints'} (--overwrite)")
        except (ValueError, sio.WriteFailed) as exc:  # SafetyError, CheckpointError
            refusal = str(exc)
            if lock is not None:
                _drop_if_empty(lock)
    refusal = ctx.broadcast(refusal)
    if refusal is not None:
        raise UsageError(refusal)
    if lock is None:  # another rank: rank 0 holds the folder
        yield Path(raw)
        return
    try:
        yield lock.folder
    except BaseException:
        _drop_if_empty(lock)
        raise
    finally:
        lock.release()


def _drop_if_empty(lock: sio.FolderLock) -> None:
    """Remove a run folder this run created when it holds nothing but its markers (a failed run leaves no empty
    folder; a checkpoint or anything else keeps it)."""
    if lock.created and all(c.name in (sio.MARKER_NAME, sio.LOCK_NAME) for c in lock.folder.iterdir()):
        with contextlib.suppress(sio.NotOursError, OSError):
            sio.remove_ours(lock.folder, "run")
    lock.release()


def estimate_run_bytes(model: str | None, method: Method, save_every: int | None) -> int:
    """A rough lower bound of what a run writes, for the free-space pre-flight: the base's weight files (a local
    folder; bundled models are small) stand for the trained state, a dense method's adapter is that large, the
    others' a tenth; each checkpoint holds the state and two Adam moments, ``KEEP`` + 1 of them at a time."""
    folder = Path(model) if model is not None else None
    if folder is None or not folder.is_dir():
        return 0
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    trained = weights if method.dense else weights // 10
    return trained + (3 * trained * (KEEP + 1) if save_every else 0)


def save_trained(prepared: Prepared, method: Method, adapter_dir: Path, task_info: dict[str, Any]) -> int:
    """Write the adapter and ``task.json`` into a fresh folder beside ``adapter_dir`` and swap it into place
    (`sio.atomic_directory`: a crash leaves the old or the new adapter). The folder is marked ours with the sha256 of
    every file, and ``task.json`` is covered by the adapter's own checksums too (SparseGrad), so an edit is refused
    on load. An existing ``adapter_dir`` is replaced only if sparsegrad wrote it (an unmarked adapter of an older
    version is recognised by its layout). Returns the adapter's size in bytes (without ``task.json``, the marker and
    peft's README)."""
    adapter_dir = Path(adapter_dir)
    task_bytes = (json.dumps(task_info, indent=2) + "\n").encode()
    with sio.atomic_directory(adapter_dir, owner="adapter", checksums=True, replace=_replace_mode(adapter_dir)) as tmp:
        method.save(prepared, tmp, {TASK_FILE: task_bytes})
    return sum(f.stat().st_size for f in adapter_dir.iterdir()
               if f.is_file() and f.name not in (TASK_FILE, "README.md", sio.MARKER_NAME))


def _replace_mode(adapter_dir: Path) -> str:
    """"any" only for an unmarked adapter of an older sparsegrad (its exact layout: adapter_config.json + task.json
    and nothing but files); otherwise "ours"."""
    if adapter_dir.is_dir() and not adapter_dir.is_symlink() and sio.read_marker(adapter_dir) is None:
        names = {c.name for c in adapter_dir.iterdir()}
        if {"adapter_config.json", TASK_FILE} <= names and all(c.is_file() for c in adapter_dir.iterdir()):
            return "any"
    return "ours"


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN and inf become null), atomically; recorded in the folder's marker when it is ours."""
    sio.atomic_write_json(path, data)
    _record(path)


def _record(path: Path) -> None:
    if sio.is_ours(path.parent):
        sio.record_ours(path.parent, path.name)


def write_loss_csv(path: Path, losses: list[float]) -> None:
    buf = io.StringIO()
    buf.write("step,loss\n")
    for i, loss in enumerate(losses, start=1):
        buf.write(f"{i},{loss:.6f}\n")
    atomic_write_bytes(path, buf.getvalue().encode())
    _record(path)


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "sparsegrad": sg.__version__}
    for name in ("transformers", "peft"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


def read_task(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``task.json`` of an adapter folder written by `finetune`, checked against the adapter's checksums (the
    SparseGrad adapter config records it; LoRA and full adapters carry the sha256 of every file in their folder
    marker): an edited ``task.json`` or ``adapter_config.json`` is refused with one line."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise UsageError(f"adapter directory not found: {adapter_dir}")
    path = adapter_dir / TASK_FILE
    if not path.is_file():
        raise UsageError(f"{path} is missing: not an adapter written by `sparsegrad finetune`")
    try:  # its checksum is checked when the adapter loads, after the adapter's own, more specific checks
        info = sio.read_json_object(path, "a sparsegrad task file", TASK_FORMAT)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"adapter {adapter_dir}: {exc}") from None
    for key in ("method", "model", "task"):
        if not isinstance(info.get(key), str):
            raise UsageError(f"{path}: {key!r} must be a string, got {info.get(key)!r} (the file was edited)")
    return info


def _verify_marked_files(adapter_dir: Path) -> None:
    """After the method loaded the adapter (whose own checks give the most specific messages): every file the folder
    marker has a checksum for, ``task.json`` included, is unchanged: LoRA's and full's only fingerprint. A SparseGrad
    adapter has its own (its config records ``task.json``; `sg.load_adapter` checks it)."""
    if _has_checksums(adapter_dir) and not (TASK_FILE in (_json_or_empty(adapter_dir / CONFIG_NAME)
                                                           .get("extra_files") or {})):
        sio.verify_ours(adapter_dir)


def _has_checksums(folder: Path) -> bool:
    marker = sio.read_marker(folder)
    return marker is not None and isinstance(marker.get("sha256"), dict)


def _json_or_empty(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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
        _verify_marked_files(adapter_dir)
        check_finite_weights(result, f"adapter {adapter_dir}")  # PEFT's safe_merge check, for every method
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

"""Checkpoints and exact resume of the training loop (every task kind and method), and stop signals.

``OUTPUT_DIR/checkpoints/step-N/`` holds everything the loop needs to continue as if it had never stopped:

* ``model_state.safetensors``: what trains (every parameter with ``requires_grad``, by name) plus each SparseGrad
  layer's delta (``delta_indices``, ``delta_values``; the support). A dynamic layer's dense effective weight is not
  saved: it is rebuilt from the frozen base and the delta, bit for bit;
* ``bases.safetensors`` (SparseGrad only): the calibrated bases, fixed supports and report, so a resumed run does
  not calibrate again;
* ``optimizer.pt``: the optimizer's and the LR scheduler's ``state_dict`` (read back with ``weights_only=True``);
* ``best_state.safetensors`` (runs with a validation split, once a best step is known): the trained state of the
  best validation step so far (`selection`), restored at the end; checkpoints without it load as before;
* ``rng_state.pt``: the Python and torch (and CUDA) RNG states of every rank;
* ``trainer_state.json`` (written last): the step, the data position (epoch, step within the epoch), the loss and
  step-time history, the world size and batch shape, and the run's settings.

A checkpoint is built in a temporary folder beside and swapped into place (`sio.atomic_directory`), so ``step-N`` is
complete or absent; every folder carries a ``.sparsegrad`` ownership marker, and the last `KEEP` checkpoints are
kept (only marked ``step-N`` folders are ever pruned).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

import sparsegrad as sg
import sparsegrad.io as sio
from sparsegrad.delta import nonfinite_tensors, restore_delta, trainable_state
from sparsegrad.io import atomic_write_bytes, read_safetensors

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model_state.safetensors"
BASES_FILE = "bases.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
BEST_FILE = "best_state.safetensors"
FORMAT = "sparsegrad-finetune-checkpoint"
VERSION = 1
KEEP = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")



class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, corrupt, or from another run's settings)."""


# ------------------------------------------------------------------------------------------------- model state
def load_trainable_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load `trainable_state` tensors back into a model set up the same way (`sparsegrad.delta.restore_delta`:
    every tensor must find its place); a refusal is a `CheckpointError`."""
    try:
        restore_delta(model, tensors, where)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


# ------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------------- files
def checkpoints_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / CHECKPOINTS


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (``step-N`` folders) under ``output_dir/checkpoints``, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def clear_checkpoints(output_dir: str | os.PathLike, *, overwrite: bool = False) -> bool:
    """A fresh run into ``output_dir``: an earlier run's checkpoints must never be resumed into, nor silently lost.
    Without ``overwrite`` a folder holding ``step-N`` checkpoints is refused (the message says ``--resume``); with it
    they are removed, but only if sparsegrad can prove it wrote every file in ``checkpoints/`` (`sio.remove_ours`);
    a user's own files there are never deleted. Returns whether something was removed."""
    root = checkpoints_dir(output_dir)
    if not root.exists():
        return False
    found = list_checkpoints(output_dir)
    if found and not overwrite:
        raise CheckpointError(
            f"{root} holds the checkpoints of another run (up to {found[-1][1].name}): continue it with `sparsegrad "
            f"finetune --resume {output_dir}`, or pass --overwrite to delete them and start afresh")
    ours = sio.is_ours(root, CHECKPOINTS)
    if not found and not ours:
        return False  # a folder of the user's that happens to be called checkpoints/: not ours to touch
    try:  # the whole folder when it is ours, else (made by the user) only our step-N folders inside it
        for path in [root] if ours else [p for _, p in found]:
            sio.remove_ours(path, CHECKPOINTS if ours else "checkpoint")
    except sio.NotOursError as exc:
        raise CheckpointError(f"{exc} (a fresh run cannot start over the checkpoints in {root})") from None
    return True


def save_checkpoint(output_dir: str | os.PathLike, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, bases: sg.SparseGradBases | None, rng_states: list[dict[str, Any]],
                    state: dict[str, Any], keep: int = KEEP,
                    best_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``output_dir/checkpoints/step-<step>`` atomically and keep the last ``keep`` checkpoints. The folders
    are marked ours (``checkpoints/`` as a "checkpoints" folder when this tool made it, each ``step-N`` as a
    "checkpoint"); pruning deletes only marked ``step-N`` folders that hold nothing foreign."""
    tensors = trainable_state(model)
    bad = nonfinite_tensors(tensors)
    if bad:
        raise CheckpointError(f"refusing to write a checkpoint with non-finite values in {bad[:3]}")
    root = checkpoints_dir(output_dir)
    sio.make_owned_dir(root, CHECKPOINTS)
    sio.recover_leftovers(root)  # what writers killed half-way left (only theirs, only if they are dead)
    final = root / f"step-{step}"
    # the same step written again (a resumed run) is swapped in
    with sio.atomic_directory(final, owner="checkpoint", replace=_step_replace_mode(final)) as tmp:
        atomic_write_bytes(tmp / MODEL_FILE, st_save(tensors, metadata={"format": FORMAT}))
        if bases is not None:
            bases.save(tmp / BASES_FILE)
        if best_state is not None:
            atomic_write_bytes(tmp / BEST_FILE, st_save(best_state, metadata={"format": FORMAT}))
        _torch_save(tmp / OPTIMIZER_FILE, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()})
        _torch_save(tmp / RNG_FILE, {"ranks": rng_states})
        record = {"format": FORMAT, "version": VERSION, **state}
        atomic_write_bytes(tmp / STATE_FILE, (json.dumps(record, indent=1) + "\n").encode())
    for _, path in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        if sio.is_ours(path, "checkpoint"):
            with contextlib.suppress(sio.NotOursError):  # a user's file put inside: the folder stays
                sio.remove_ours(path, "checkpoint")
    return final


def _step_replace_mode(final: Path) -> str:
    """A ``step-N`` of an older version (no marker, our exact layout) may be replaced; anything else only if ours."""
    if final.is_dir() and sio.read_marker(final) is None and (final / STATE_FILE).is_file() \
            and {c.name for c in final.iterdir()} <= {MODEL_FILE, BASES_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE}:
        return "any"
    return "ours"


def _torch_save(path: Path, obj: Any) -> None:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign pickles raise many types
        raise CheckpointError(f"{path} is corrupt ({type(exc).__name__}: {str(exc)[:200]}); delete {path.parent} to "
                              "resume from the checkpoint before it, if any, or start again") from None


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng_states: list[dict[str, Any]]
    bases: sg.SparseGradBases | None = None
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check one ``step-N`` folder."""
    path = Path(path)
    state_file = path / STATE_FILE
    try:
        state = json.loads(state_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{state_file} is missing: not a complete checkpoint") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{state_file} is not valid JSON ({exc}); the checkpoint is corrupt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{state_file} is not a sparsegrad finetune checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint format version {state.get('version')!r} is not supported (this is "
                              f"{VERSION})")
    try:
        tensors, _ = read_safetensors(path / MODEL_FILE, "checkpoint model state")
    except (ValueError, FileNotFoundError) as exc:
        raise CheckpointError(str(exc)) from None
    bases = None
    if (path / BASES_FILE).is_file():
        try:
            bases = sg.SparseGradBases.load(path / BASES_FILE)
        except (ValueError, FileNotFoundError) as exc:
            raise CheckpointError(f"checkpoint bases: {exc}") from None
    best_state = None
    if (path / BEST_FILE).is_file():
        try:
            best_state, _ = read_safetensors(path / BEST_FILE, "checkpoint best state")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    opt = _torch_load(path / OPTIMIZER_FILE)
    rng = _torch_load(path / RNG_FILE)
    if not isinstance(opt, dict) or "optimizer" not in opt or "scheduler" not in opt:
        raise CheckpointError(f"{path / OPTIMIZER_FILE} does not hold an optimizer and a scheduler state")
    if not isinstance(rng, dict) or not rng.get("ranks"):
        raise CheckpointError(f"{path / RNG_FILE} holds no RNG state")
    return Checkpoint(path=path, state=state, tensors=tensors, optimizer=opt["optimizer"],
                      scheduler=opt["scheduler"], rng_states=list(rng["ranks"]), bases=bases, best_state=best_state)


# ------------------------------------------------------------------------------------------------- signals
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopSignals:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step (it then saves a checkpoint);
    a second signal aborts at once (KeyboardInterrupt). Handlers are installed only in the main thread."""

    def __init__(self, verbose: bool = True) -> None:
        self.signum: int | None = None
        self.verbose = verbose
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\nsparsegrad: got {signal.Signals(signum).name}: saving a checkpoint after this step "
                  "(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

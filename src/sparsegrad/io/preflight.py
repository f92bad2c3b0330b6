"""The checks a command runs on its output folder before any heavy work: a sensible path, separate from the
inputs, writable with enough free space; then `prepare_output_folder` creates, locks and cleans it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import DISK_ERRNOS, NotWritableError, PathRelationError, SafetyError
from .locks import FolderLock, lock_folder
from .ownership import make_owned_dir
from .recovery import recover_leftovers


def check_output_path(raw: str | os.PathLike, option: str, *, replaced_whole: bool = False) -> Path:
    """An output path as the user gave it: refuses an empty one (``''`` would mean the current folder) and, when
    the folder will be replaced whole, the current folder, one of its parents, the home folder or the root."""
    if raw is None or not str(raw).strip():
        raise SafetyError(f"{option} is empty: give a folder name")
    path = Path(raw)
    if replaced_whole:
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve() \
                or resolved == Path(resolved.anchor):
            raise PathRelationError(f"{option} {raw} is the current folder, one of its parents, the home folder or "
                                    "the root: it would be replaced whole; give a new folder")
    return path


def check_writable(folder: str | os.PathLike, option: str = "output folder", need_bytes: int = 0) -> None:
    """Before any heavy work: ``folder`` (or, if it does not exist yet, its nearest existing parent) is a folder
    this process can create files in, with at least ``need_bytes`` free. Raises `NotWritableError` (one line)."""
    folder = Path(folder)
    probe_in = folder
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise NotWritableError(f"{option} {folder}: {probe_in} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".sg-write-probe-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        reason = DISK_ERRNOS.get(exc.errno, exc.strerror)
        raise NotWritableError(f"{option} {folder} cannot be written: {reason} ({probe_in})") from None
    free = shutil.disk_usage(probe_in).free
    if need_bytes and free < need_bytes:
        raise NotWritableError(f"{option} {folder}: about {_mb(need_bytes)} needed, {_mb(free)} free on "
                               f"{probe_in}; free space or choose another folder")


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def check_separate(output: str | os.PathLike, option: str, inputs: Mapping[str, str | os.PathLike | None]) -> None:
    """Refuse an output path that equals, contains or lies inside an input (``inputs``: option name -> path;
    None entries are skipped). Paths are compared resolved (symlinks followed)."""
    out = Path(output).resolve()
    for name, raw in inputs.items():
        if raw is None:
            continue
        inp = Path(raw).resolve()
        if out == inp:
            relation = "is"
        elif out in inp.parents:
            relation = "contains"
        elif inp in out.parents:
            relation = "lies inside"
        else:
            continue
        raise PathRelationError(f"{option} {output} {relation} {name} {raw}: writing there could replace the input; "
                                "choose a separate folder")


def prepare_output_folder(raw: str | os.PathLike, option: str, *, kind: str = "run",
                          inputs: Mapping[str, str | os.PathLike | None] | None = None,
                          need_bytes: int = 0) -> FolderLock:
    """All the pre-flight of a command that writes into an output folder, in order, before any heavy work:
    `check_output_path`, `check_separate` against ``inputs``, `check_writable` (``need_bytes``), then create the
    folder marked ours as ``kind`` when it does not exist (`make_owned_dir`), take its lock (`lock_folder`) and
    clean what killed writers left in it (`recover_leftovers`). Returns the held lock (use it as a context manager,
    or call ``release``); ``lock.created`` says whether the folder is new (a failed run may then `remove_ours` it),
    ``lock.recovered`` lists the recovery's actions."""
    folder = check_output_path(raw, option)
    check_separate(folder, option, inputs or {})
    check_writable(folder, option, need_bytes)
    created = make_owned_dir(folder, kind)
    lock = lock_folder(folder, option)
    lock.created = created
    lock.recovered = recover_leftovers(folder)
    return lock

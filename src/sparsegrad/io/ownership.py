"""Ownership: a ``.sparsegrad`` marker file lists what the tool wrote into a folder (`mark_ours`, `record_ours`,
optionally with checksums for `verify_ours`); `remove_ours` deletes only a folder it can prove it wrote whole."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .checksums import file_sha256
from .errors import EditedError, NotOursError, disk_errors
from .files import atomic_write_json
from .fs import fsync_dir
from .markers import BOOKKEEPING_NAMES, MARKER_NAME, TOOL, read_tool_json


def tree_names(root: Path) -> list[str]:
    """Relative POSIX paths of every file and folder under ``root`` (markers and the lock excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            if rel == Path(".") and name in BOOKKEEPING_NAMES:
                continue
            out.append((rel / name).as_posix())
    return sorted(out)


def mark_ours(folder: str | os.PathLike, kind: str, files: Iterable[str] | None = None, *,
              checksums: bool = False) -> None:
    """Write the ownership marker into ``folder``: it was made by this tool, as a ``kind`` folder (e.g. "run",
    "adapter", "merged", "checkpoint"), holding ``files`` (relative paths; default: what it holds now). With
    ``checksums`` the sha256 of every file is recorded too, for `verify_ours`."""
    folder = Path(folder)
    names = tree_names(folder) if files is None else sorted(set(files))
    marker: dict[str, Any] = {"tool": TOOL, "kind": kind, "version": 1, "files": names}
    if checksums:
        marker["sha256"] = {n: file_sha256(folder / n) for n in names if (folder / n).is_file()}
    atomic_write_json(folder / MARKER_NAME, marker)


def verify_ours(folder: str | os.PathLike, names: Iterable[str] | None = None) -> None:
    """Every file whose checksum the marker of ``folder`` records (or only ``names``) is there, unchanged; else
    `EditedError` naming the first that is missing or differs. `NotOursError` if the folder has no checksums."""
    folder = Path(folder)
    marker = read_marker(folder)
    recorded = marker.get("sha256") if marker else None
    if not isinstance(recorded, dict):
        raise NotOursError(f"{folder} holds no sparsegrad checksums (it was not written by sparsegrad, or before "
                           "they existed)")
    for name in sorted(recorded) if names is None else names:
        path = folder / name
        if name not in recorded:
            raise EditedError(f"{path} is not among the files sparsegrad wrote into {folder}")
        if not path.is_file():
            raise EditedError(f"{path} is missing: {folder} is incomplete")
        if file_sha256(path) != recorded[name]:
            raise EditedError(f"{path} was edited or replaced after sparsegrad wrote it (checksum differs); "
                              "restore it or write the folder again")


def record_ours(folder: str | os.PathLike, *names: str) -> None:
    """Add ``names`` (relative paths this tool wrote into an owned folder, e.g. a run's ``loss.csv``) to its
    marker, so that `remove_ours` may delete them (and, if it keeps checksums, `verify_ours` check them). Raises
    `NotOursError` if the folder is not ours."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        raise NotOursError(f"{folder} has no sparsegrad marker: it was not made by this tool")
    marker["files"] = sorted({*marker.get("files", []), *names})
    if isinstance(marker.get("sha256"), dict):  # the earlier files keep their recorded checksums
        marker["sha256"].update({n: file_sha256(folder / n) for n in names if (folder / n).is_file()})
    atomic_write_json(folder / MARKER_NAME, marker)


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ownership marker of ``folder``, or None when there is none (or it is not ours)."""
    return read_tool_json(Path(folder) / MARKER_NAME)


def is_ours(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether ``folder`` carries this tool's marker (of ``kind``, when given)."""
    marker = read_marker(folder)
    return marker is not None and (kind is None or marker.get("kind") == kind)


def make_owned_dir(folder: str | os.PathLike, kind: str) -> bool:
    """Create ``folder`` (and its parents) and mark it ours; an existing folder is left as it is and is not marked
    (the tool did not make it). Returns whether it was created."""
    folder = Path(folder)
    with disk_errors(folder):
        if folder.is_dir():
            return False
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:
            return False
        mark_ours(folder, kind, [])
        fsync_dir(folder.parent)
    return True


def foreign_entries(folder: str | os.PathLike) -> list[str]:
    """What under ``folder`` this tool cannot prove it wrote: entries outside its marker's file list that are not
    themselves folders marked ours (checked the same way). Everything, when the folder has no marker."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None:
        return tree_names(folder) or ["(no sparsegrad marker)"]
    listed = set(marker.get("files") or [])
    foreign: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        for name in list(dirnames):
            sub = (rel / name).as_posix()
            if sub in listed:
                continue
            dirnames.remove(name)  # not listed: acceptable only as a folder of ours, checked on its own
            child = Path(dirpath) / name
            inner = foreign_entries(child) if not child.is_symlink() and is_ours(child) else [""]
            foreign += [f"{sub}/{x}" for x in inner]
        for name in filenames:
            if rel == Path(".") and name in BOOKKEEPING_NAMES:
                continue
            if (rel / name).as_posix() not in listed:
                foreign.append((rel / name).as_posix())
    return foreign


def remove_ours(folder: str | os.PathLike, kind: str | None = None) -> None:
    """Delete ``folder`` if this tool can prove it wrote all of it (its marker, of ``kind`` when given, lists every
    entry, or the entry is a folder of ours); otherwise raise `NotOursError` naming what is foreign and delete
    nothing. The marker goes last, so a crash half-way leaves a folder that is still provably ours."""
    folder = Path(folder)
    if not folder.exists():
        return
    if folder.is_symlink() or not folder.is_dir():
        raise NotOursError(f"refusing to delete {folder}: it is not a folder made by sparsegrad")
    marker = read_marker(folder)
    if marker is None or (kind is not None and marker.get("kind") != kind):
        what = "it has no sparsegrad marker" if marker is None else f"it is a {marker.get('kind')} folder"
        raise NotOursError(f"refusing to delete {folder}: {what}, so sparsegrad cannot prove it wrote it")
    refuse_foreign(folder, "delete")
    _remove_marked_tree(folder)


def refuse_foreign(folder: Path, doing: str) -> None:
    """`NotOursError` naming the first few `foreign_entries` of ``folder``, if any: sparsegrad will not ``doing``
    (delete, replace) a folder holding files it did not write."""
    foreign = foreign_entries(folder)
    if foreign:
        raise NotOursError(f"refusing to {doing} {folder}: it holds files sparsegrad did not write "
                           f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them away first")


def _remove_marked_tree(folder: Path) -> None:
    """Delete a folder checked by `foreign_entries`, never following a symlink; its marker goes last."""
    marker = folder / MARKER_NAME
    for dirpath, dirnames, filenames in os.walk(folder, topdown=False):
        for name in filenames:
            if Path(dirpath) / name != marker:
                (Path(dirpath) / name).unlink()
        for name in dirnames:
            p = Path(dirpath) / name
            p.unlink() if p.is_symlink() else p.rmdir()
    with contextlib.suppress(FileNotFoundError):
        marker.unlink()
    folder.rmdir()
    fsync_dir(folder.parent)

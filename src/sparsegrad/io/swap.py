"""The steps of a folder swap: the swap marker a new folder carries until it is in place, the swap itself
(``renameat2(RENAME_EXCHANGE)``, or two renames where the file system cannot), and the removal of a replaced
folder in an order that a crash half-way leaves recognisable to `recover_leftovers`."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from .faults import fault_point
from .fs import RENAME_EXCHANGE, fsync_dir, renameat2, umask
from .markers import SWAP_MARKER_NAME, TOOL


def swap_marker(tmp: Path, final: Path, complete: bool) -> dict[str, Any]:
    return {"tool": TOOL, "final": final.name, "swap": tmp.name, "pid": os.getpid(), "host": socket.gethostname(),
            "complete": complete}


def write_small(path: Path, obj: dict[str, Any]) -> None:
    """A marker: written and fsynced in place (its folder is not yet visible at its final name)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 & ~umask())
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def swap_in(tmp: Path, final: Path) -> Path | None:
    """Put the complete folder ``tmp`` at ``final``; returns where the old folder now is (None if there was none)."""
    parent = final.parent
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(parent)
        return None
    if renameat2(tmp, final, RENAME_EXCHANGE):
        fsync_dir(parent)  # final is the new folder (its swap marker names tmp); tmp holds the old one
        return tmp
    old = parent / tmp.name.replace(".tmp-", ".old-", 1)
    os.rename(final, old)
    fsync_dir(parent)
    fault_point("dir:between-renames")
    try:
        os.rename(tmp, final)
    except BaseException:
        os.rename(old, final)  # put the old folder back before reporting the error
        raise
    fsync_dir(parent)
    return old


def remove_folder(folder: Path) -> None:
    """Remove a temporary or replaced folder, its swap marker and then its name last: a crash half-way leaves a
    leftover that `recover_leftovers` still recognises (by that marker, or by the one in the new folder)."""
    children = sorted(folder.iterdir(), key=lambda c: (c.name == SWAP_MARKER_NAME, c.name))
    for i, child in enumerate(children):
        if i == 1:
            fault_point("dir:mid-remove")
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    folder.rmdir()
    fsync_dir(folder.parent)

"""Clean-up after writers killed half-way: `recover_leftovers` rolls back or removes ``.NAME.tmp-*``,
``.NAME.old-*`` and ``.NAME.sg<pid>-*.tmp``, only when a marker proves this tool made them and their writer is dead."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .fs import fsync_dir
from .markers import SWAP_MARKER_NAME, read_tool_json
from .swap import remove_folder

_LEFTOVER_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<id>[A-Za-z0-9_]+)$")
_LEFTOVER_FILE = re.compile(r"^\.(?P<name>.+)\.sg(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


def pid_alive(pid: Any, host: Any) -> bool:
    """Whether the writer that left a marker may still be running (another host: assume so)."""
    if host != socket.gethostname():
        return True
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_leftovers(folder: str | os.PathLike, names: Iterable[str] | None = None) -> list[str]:
    """Clean up after writers killed half-way in ``folder`` (for the final names ``names``; default all) and return
    one line per action. Only what a marker or the exact layout proves this tool made, and whose writer is no
    longer running (PID and host in the marker or name), is touched:

    * ``.NAME.tmp-X`` whose swap marker names itself: a new folder never swapped in: removed; or, when it is
      complete, ``NAME`` is missing and ``.NAME.old-X`` exists (the two-rename fallback killed between its
      renames), renamed to ``NAME``;
    * ``.NAME.tmp-X`` / ``.NAME.old-X`` when the swap marker inside ``NAME`` names ``.NAME.tmp-X``: the replaced old
      folder: removed;
    * ``.NAME.old-X`` holding only ``NAME`` (the layout of sparsegrad <= 0.x) while ``NAME`` is missing: put back;
    * a stale swap marker inside ``NAME``: removed; ``.NAME.sg<pid>-*.tmp`` files of a dead process: removed.

    Anything else is left alone, however it is named."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    wanted = set(names) if names is not None else None
    actions: list[str] = []
    groups: dict[str, dict[str, Path]] = {}
    for child in folder.iterdir():
        m = _LEFTOVER_DIR.match(child.name)
        if m and child.is_dir() and not child.is_symlink() and (wanted is None or m["name"] in wanted):
            groups.setdefault(m["name"], {})[child.name] = child
            continue
        m = _LEFTOVER_FILE.match(child.name)
        if (m and child.is_file() and not child.is_symlink() and (wanted is None or m["name"] in wanted)
                and not pid_alive(int(m["pid"]), socket.gethostname())):
            child.unlink()
            actions.append(f"removed {child} (a temporary file of a killed writer)")
            continue
        if wanted is None and child.is_dir() and (child / SWAP_MARKER_NAME).is_file():
            groups.setdefault(child.name, {})  # a stale swap marker, nothing beside it
    for name in sorted(set(groups) | (wanted or set())):
        actions += _recover_one(folder / name, groups.get(name, {}))
    if actions:
        fsync_dir(folder)
    return actions


def _recover_one(final: Path, leftovers: dict[str, Path]) -> list[str]:
    actions = []
    for path in sorted(leftovers.values(), key=lambda p: ".old-" in p.name):  # new folders first
        own = read_tool_json(path / SWAP_MARKER_NAME)
        if own is not None and own.get("swap") == path.name:  # a new folder: never swapped in
            if pid_alive(own.get("pid"), own.get("host")):
                continue  # its writer is still at work
            moved_aside = path.name.replace(".tmp-", ".old-", 1) in leftovers
            if not final.exists() and own.get("complete") and moved_aside:
                os.rename(path, final)
                actions.append(f"restored {final} from the complete new folder {path.name}")
            else:
                remove_folder(path)
                actions.append(f"removed {path} (a new folder that was never swapped in)")
            continue
        swap = read_tool_json(final / SWAP_MARKER_NAME) if final.is_dir() else None
        tmp_name = path.name.replace(".old-", ".tmp-", 1)
        if swap is not None and swap.get("swap") == tmp_name:  # the old folder this swap replaced
            if not pid_alive(swap.get("pid"), swap.get("host")):
                remove_folder(path)
                actions.append(f"removed {path} (the old folder replaced by {final.name})")
        elif ".old-" in path.name and not final.exists() and [c.name for c in path.iterdir()] == [final.name]:
            os.rename(path / final.name, final)  # the older two-rename layout: the old folder was moved in here
            path.rmdir()
            actions.append(f"restored {final} from {path.name}")
    marker = read_tool_json(final / SWAP_MARKER_NAME) if final.is_dir() else None
    if marker is not None and not pid_alive(marker.get("pid"), marker.get("host")):
        (final / SWAP_MARKER_NAME).unlink()
        actions.append(f"removed the stale swap marker in {final}")
    return actions

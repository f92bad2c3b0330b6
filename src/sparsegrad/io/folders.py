"""`atomic_directory`: a folder filled beside its final path and swapped in whole, so that a crash at any
instruction leaves the old or the new folder at the path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import NotOursError, disk_errors
from .faults import fault_point
from .fs import fsync_dir, fsync_tree, umask
from .markers import SWAP_MARKER_NAME
from .ownership import is_ours, mark_ours, refuse_foreign
from .recovery import recover_leftovers
from .swap import remove_folder, swap_in, swap_marker, write_small


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, owner: str | None = None, replace: str | None = None,
                     checksums: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final`` (``.NAME.tmp-*``) to fill; when the block ends without error
    it takes the place of ``final``, whole. On error ``final`` is untouched and the temporary folder removed.

    Every file in it is fsynced, then it is swapped with ``renameat2(RENAME_EXCHANGE)``, the folder fsynced, and the
    old folder removed: a crash at any instruction leaves the old or the new folder at ``final``, and
    `recover_leftovers` (run here first, for ``final``) removes what a killed writer left. Where the file system
    cannot exchange (NFS, FAT, some FUSE) it is two renames; a crash between them leaves ``final`` missing until
    `recover_leftovers` puts the complete new folder in place.

    ``owner``: also mark the new folder ours as that kind (`mark_ours`, listing every file written; with
    ``checksums`` their sha256 too, for `verify_ours`). ``replace``:
    "ours" (the default with ``owner``) refuses with `NotOursError`, before anything is written, to replace an
    existing non-empty ``final`` unless it is a folder of that kind holding only what sparsegrad wrote; "any" (the
    default without ``owner``, the legacy behaviour) replaces whatever folder is there.
    """
    final = Path(final)
    replace = replace or ("ours" if owner else "any")
    if replace not in ("ours", "any"):
        raise ValueError(f"replace must be 'ours' or 'any', got {replace!r}")
    _check_replaceable(final, owner if replace == "ours" else None)
    with disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_leftovers(final.parent, names={final.name})
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    swapped = False
    try:
        with disk_errors(final, tmp):
            os.chmod(tmp, 0o777 & ~umask())
            write_small(tmp / SWAP_MARKER_NAME, swap_marker(tmp, final, complete=False))
            yield tmp
            fault_point("dir:filled")
            if owner:
                mark_ours(tmp, owner, checksums=checksums)
            fsync_tree(tmp)
            write_small(tmp / SWAP_MARKER_NAME, swap_marker(tmp, final, complete=True))
            fault_point("dir:before-swap")
            old = swap_in(tmp, final)
            swapped = True
            fault_point("dir:after-swap")
            if old is not None:
                remove_folder(old)
            fault_point("dir:before-unmark")
            (final / SWAP_MARKER_NAME).unlink()
            fsync_dir(final)
    finally:
        if not swapped and tmp.is_dir():
            with contextlib.suppress(OSError):  # the error that brought us here is the one to report
                remove_folder(tmp)


def _check_replaceable(final: Path, owner: str | None) -> None:
    """``final`` is absent, an empty folder, or (``owner`` None) any folder, or a folder of ours of ``owner``'s
    kind holding only what sparsegrad wrote; otherwise `NotOursError`."""
    if not (final.exists() or final.is_symlink()):
        return
    if final.is_symlink() or not final.is_dir():
        raise NotOursError(f"{final} exists and is not a folder; refusing to replace it")
    if owner is None or not any(final.iterdir()):
        return
    if not is_ours(final, owner):
        raise NotOursError(f"refusing to replace {final}: sparsegrad did not write it as a {owner!r} folder (no "
                           "marker of that kind); choose another path or move it away")
    refuse_foreign(final, "replace")

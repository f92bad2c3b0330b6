"""The refusals and write failures of the file primitives: each message is one line naming the path."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for the file system"}


class SafetyError(ValueError):
    """A refusal that protects the user's files; its message is one line naming the path and what to do."""


class NotOursError(SafetyError):
    """A folder this tool cannot prove it wrote (no marker, or files it did not write inside)."""


class EditedError(SafetyError):
    """A file this tool wrote that was changed, replaced or deleted since (its recorded checksum differs)."""


class FolderLockedError(SafetyError):
    """Another live process holds the output folder's lock."""


class PathRelationError(SafetyError):
    """An output path that equals, contains or lies inside an input."""


class NotWritableError(SafetyError):
    """An output folder that cannot be written (a file, read-only, no permission) or lacks free space."""


class WriteFailed(OSError):
    """A write that failed for a reason of the disk (full, quota, read-only, permission): one clear line. The
    previous file or folder, if any, is intact and no half-written file is left. ``errno`` is the original one."""

    def __init__(self, err: int, path: str | os.PathLike):
        super().__init__(err, DISK_ERRNOS.get(err, os.strerror(err)), str(path))

    def __str__(self) -> str:
        return (f"cannot write {self.filename}: {self.strerror} ({os.strerror(self.errno)}); "
                "nothing was half-written and the previous version, if any, is intact")


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike, tmp: Path | None = None) -> Iterator[None]:
    """Turn a disk-level OSError inside the block into `WriteFailed` naming ``path``; one about a file inside the
    temporary folder ``tmp`` names it by its place in ``path`` instead (the temporary folder is gone by then)."""
    try:
        yield
    except WriteFailed as exc:
        if tmp is not None and exc.filename and Path(exc.filename).is_relative_to(tmp):
            raise WriteFailed(exc.errno, Path(path) / Path(exc.filename).relative_to(tmp)) from exc
        raise
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise WriteFailed(exc.errno, path) from exc
        raise

"""One writer per output folder: an exclusive ``flock`` on ``.sparsegrad.lock``, which holds the holder's PID."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any

from .errors import FolderLockedError, disk_errors
from .fs import umask
from .markers import LOCK_NAME


class FolderLock:
    """An exclusive ``flock`` on ``folder/.sparsegrad.lock``, which holds the holder's PID. The kernel releases it
    when the holder dies, so a lock file left by a killed process is simply taken over. `release` (or leaving the
    ``with`` block) unlocks and removes the file."""

    def __init__(self, folder: str | os.PathLike, what: str = "output folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None
        self.created = False  # set by prepare_output_folder
        self.recovered: list[str] = []

    def acquire(self) -> "FolderLock":
        with disk_errors(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise FolderLockedError(
                        f"{self.what} {self.folder} is in use by another sparsegrad process (PID {holder}); wait "
                        "for it to finish, stop it, or choose another folder") from None
                try:  # the holder may have removed the file between our open and our lock: lock the live one
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # while still locked: a waiter re-checks the inode and retries
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike, what: str = "output folder") -> FolderLock:
    """Take the exclusive lock of an output folder (creating it); use as a context manager or call `release`.
    A second writer gets `FolderLockedError` naming the holder's PID."""
    return FolderLock(folder, what).acquire()

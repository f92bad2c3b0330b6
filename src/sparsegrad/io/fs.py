"""Low-level file-system calls the safe writers build on: the umask, folder fsync, and the atomic folder swap
``renameat2(RENAME_EXCHANGE)`` (``SPARSEGRAD_TEST_NO_EXCHANGE=1`` forces the callers' two-rename fallback)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import tempfile
from pathlib import Path

NO_EXCHANGE_ENV = "SPARSEGRAD_TEST_NO_EXCHANGE"
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
AT_FDCWD = -100
_libc = None


def umask() -> int:
    """The process's umask, read without changing it where the OS allows."""
    try:  # Linux >= 4.7 reports it without changing it (os.umask would race with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (after a rename or unlink in it) to disk; a no-op where the OS cannot."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems (and Windows) refuse fsync on a folder
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP, errno.EROFS):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files written by others, e.g. transformers, are not)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if os.path.islink(os.path.join(dirpath, name)):
                continue  # not ours to flush (and perhaps dangling)
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2) via ctypes; False where the OS or the file system lacks it (the caller falls back)."""
    global _libc
    if os.environ.get(NO_EXCHANGE_ENV) or not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    a, b = os.fsencode(src), os.fsencode(dst)
    if hasattr(_libc, "renameat2"):  # glibc >= 2.28
        rc = _libc.renameat2(AT_FDCWD, a, AT_FDCWD, b, ctypes.c_uint(flags))
    elif os.uname().machine in _SYS_RENAMEAT2:
        rc = _libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[os.uname().machine]), AT_FDCWD, a, AT_FDCWD, b,
                           ctypes.c_uint(flags))
    else:
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # e.g. NFS, FAT, some FUSE file systems, kernels before 3.15
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange_supported(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s file system swaps two folders atomically (``renameat2(RENAME_EXCHANGE)``)."""
    a = Path(tempfile.mkdtemp(prefix=".sg-probe-", dir=folder))
    b = Path(tempfile.mkdtemp(prefix=".sg-probe-", dir=folder))
    try:
        return renameat2(a, b, RENAME_EXCHANGE)
    finally:
        os.rmdir(a)
        os.rmdir(b)

"""Safe files and folders: nothing a user saved is ever half-written, lost, or deleted by this tool.

* `atomic_write_bytes` / `atomic_write_json`: a temporary file beside the target, fsynced, renamed over it, the
  folder fsynced; files get ``0666 & ~umask``; a full or read-only disk becomes one `WriteFailed` line.
* `atomic_directory`: a folder filled beside its final path and swapped in with ``renameat2(RENAME_EXCHANGE)``, so
  that a crash at any instruction leaves the old or the new folder at the path; `recover_leftovers` rolls back or
  removes what a killed writer left (``.NAME.tmp-*``, ``.NAME.old-*``, ``.NAME.sg<pid>-*.tmp``), only when a marker
  proves this tool made it and its writer is dead.
* Ownership: `mark_ours` / `is_ours` / `remove_ours` (a ``.sparsegrad`` marker file listing what the tool wrote;
  `remove_ours` refuses a folder holding anything else).
* `lock_folder`: one writer per output folder (``flock`` on ``.sparsegrad.lock`` holding the PID).
* Pre-flight: `check_output_path`, `check_writable` (writable, free space), `check_separate` (output vs inputs).
* Checked reads: `read_safetensors`.

Fault injection for the crash tests: with ``SPARSEGRAD_TEST_KILL_AT=<point>[:<n>]`` the process SIGKILLs itself at
the n-th (default first) pass through `fault_point(<point>)`; ``SPARSEGRAD_TEST_NO_EXCHANGE=1`` forces the
two-rename fallback. Neither has any effect when unset.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors are imported where used: the folder and lock primitives start fast
    from torch import Tensor

MARKER_NAME = ".sparsegrad"  # ownership marker: {"tool": "sparsegrad", "kind": ..., "files": [...]}
SWAP_MARKER_NAME = ".sparsegrad-swap"  # transient: inside a folder being swapped in, names its temporary folder
LOCK_NAME = ".sparsegrad.lock"
TOOL = "sparsegrad"
KILL_ENV = "SPARSEGRAD_TEST_KILL_AT"
NO_EXCHANGE_ENV = "SPARSEGRAD_TEST_NO_EXCHANGE"
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for the file system"}


# ------------------------------------------------------------------------------------------------------ errors
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
def _disk_errors(path: str | os.PathLike, tmp: Path | None = None) -> Iterator[None]:
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


# ---------------------------------------------------------------------------------------------- fault points
_fault_counts: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``$SPARSEGRAD_TEST_KILL_AT`` names this point (tests of crash safety)."""
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    point, _, nth = want.rpartition(":")
    if not nth.isdigit():
        point, nth = want, "1"
    if point != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------- low-level file system
def _umask() -> int:
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


def _fsync_tree(root: Path) -> None:
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


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
AT_FDCWD = -100
_libc = None


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
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
        return _renameat2(a, b, RENAME_EXCHANGE)
    finally:
        os.rmdir(a)
        os.rmdir(b)


def _pid_alive(pid: Any, host: Any) -> bool:
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None


# ------------------------------------------------------------------------------------------------ file writes
def strict_json(obj: Any, **dumps_kwargs: Any) -> str:
    """``json.dumps`` that never writes ``NaN``/``Infinity`` (they become ``null``); Paths become strings and
    tensors lists."""

    def clean(x: Any) -> Any:
        if isinstance(x, float):
            return x if math.isfinite(x) else None
        if isinstance(x, Mapping):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, Path):
            return str(x)
        if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # tensors, numpy arrays and scalars
            return clean(x.tolist())
        return x

    return json.dumps(clean(obj), allow_nan=False, **dumps_kwargs)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path`` (``.NAME.sg<pid>-*.tmp``), fsync it, rename it over
    ``path`` and fsync the folder. The file gets mode ``0666 & ~umask``. A full or read-only disk raises
    `WriteFailed` and leaves ``path`` as it was, with no temporary file."""
    path = Path(path)
    with _disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.sg{os.getpid()}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            fault_point("file:before-rename")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`atomic_write_bytes` of `strict_json` (indent 2, trailing newline): never ``NaN`` in a .json file."""
    atomic_write_bytes(path, (strict_json(obj, indent=2) + "\n").encode())


# -------------------------------------------------------------------------------------------------- ownership
def _tree_names(root: Path) -> list[str]:
    """Relative POSIX paths of every file and folder under ``root`` (markers and the lock excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        for name in dirnames + filenames:
            if rel == Path(".") and name in (MARKER_NAME, SWAP_MARKER_NAME, LOCK_NAME):
                continue
            out.append((rel / name).as_posix())
    return sorted(out)


def mark_ours(folder: str | os.PathLike, kind: str, files: Iterable[str] | None = None, *,
              checksums: bool = False) -> None:
    """Write the ownership marker into ``folder``: it was made by this tool, as a ``kind`` folder (e.g. "run",
    "adapter", "merged", "checkpoint"), holding ``files`` (relative paths; default: what it holds now). With
    ``checksums`` the sha256 of every file is recorded too, for `verify_ours`."""
    folder = Path(folder)
    names = _tree_names(folder) if files is None else sorted(set(files))
    marker: dict[str, Any] = {"tool": TOOL, "kind": kind, "version": 1, "files": names}
    if checksums:
        marker["sha256"] = {n: file_sha256(folder / n) for n in names if (folder / n).is_file()}
    atomic_write_json(folder / MARKER_NAME, marker)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    return _read_json(Path(folder) / MARKER_NAME)


def is_ours(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether ``folder`` carries this tool's marker (of ``kind``, when given)."""
    marker = read_marker(folder)
    return marker is not None and (kind is None or marker.get("kind") == kind)


def make_owned_dir(folder: str | os.PathLike, kind: str) -> bool:
    """Create ``folder`` (and its parents) and mark it ours; an existing folder is left as it is and is not marked
    (the tool did not make it). Returns whether it was created."""
    folder = Path(folder)
    with _disk_errors(folder):
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
        return _tree_names(folder) or ["(no sparsegrad marker)"]
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
            if rel == Path(".") and name in (MARKER_NAME, SWAP_MARKER_NAME, LOCK_NAME):
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
    foreign = foreign_entries(folder)
    if foreign:
        raise NotOursError(f"refusing to delete {folder}: it holds files sparsegrad did not write "
                           f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); move them away first")
    _remove_marked_tree(folder)


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


# ------------------------------------------------------------------------------------------- folder replacement
def _swap_marker(tmp: Path, final: Path, complete: bool) -> dict[str, Any]:
    return {"tool": TOOL, "final": final.name, "swap": tmp.name, "pid": os.getpid(), "host": socket.gethostname(),
            "complete": complete}


def _write_small(path: Path, obj: dict[str, Any]) -> None:
    """A marker: written and fsynced in place (its folder is not yet visible at its final name)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 & ~_umask())
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


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
    with _disk_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        recover_leftovers(final.parent, names={final.name})
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    swapped = False
    try:
        with _disk_errors(final, tmp):
            os.chmod(tmp, 0o777 & ~_umask())
            _write_small(tmp / SWAP_MARKER_NAME, _swap_marker(tmp, final, complete=False))
            yield tmp
            fault_point("dir:filled")
            if owner:
                mark_ours(tmp, owner, checksums=checksums)
            _fsync_tree(tmp)
            _write_small(tmp / SWAP_MARKER_NAME, _swap_marker(tmp, final, complete=True))
            fault_point("dir:before-swap")
            old = _swap_in(tmp, final)
            swapped = True
            fault_point("dir:after-swap")
            if old is not None:
                _remove_folder(old)
            fault_point("dir:before-unmark")
            (final / SWAP_MARKER_NAME).unlink()
            fsync_dir(final)
    finally:
        if not swapped and tmp.is_dir():
            with contextlib.suppress(OSError):  # the error that brought us here is the one to report
                _remove_folder(tmp)


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
    foreign = foreign_entries(final)
    if foreign:
        raise NotOursError(f"refusing to replace {final}: it holds files sparsegrad did not write "
                           f"({', '.join(foreign[:5])}); move them away first")


def _swap_in(tmp: Path, final: Path) -> Path | None:
    """Put the complete folder ``tmp`` at ``final``; returns where the old folder now is (None if there was none)."""
    parent = final.parent
    if not final.exists():
        os.rename(tmp, final)
        fsync_dir(parent)
        return None
    if _renameat2(tmp, final, RENAME_EXCHANGE):
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


def _remove_folder(folder: Path) -> None:
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


_LEFTOVER_DIR = re.compile(r"^\.(?P<name>.+)\.(?P<what>tmp|old)-(?P<id>[A-Za-z0-9_]+)$")
_LEFTOVER_FILE = re.compile(r"^\.(?P<name>.+)\.sg(?P<pid>\d+)-[A-Za-z0-9_]+\.tmp$")


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
                and not _pid_alive(int(m["pid"]), socket.gethostname())):
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
        own = _read_json(path / SWAP_MARKER_NAME)
        if own is not None and own.get("swap") == path.name:  # a new folder: never swapped in
            if _pid_alive(own.get("pid"), own.get("host")):
                continue  # its writer is still at work
            moved_aside = path.name.replace(".tmp-", ".old-", 1) in leftovers
            if not final.exists() and own.get("complete") and moved_aside:
                os.rename(path, final)
                actions.append(f"restored {final} from the complete new folder {path.name}")
            else:
                _remove_folder(path)
                actions.append(f"removed {path} (a new folder that was never swapped in)")
            continue
        swap = _read_json(final / SWAP_MARKER_NAME) if final.is_dir() else None
        tmp_name = path.name.replace(".old-", ".tmp-", 1)
        if swap is not None and swap.get("swap") == tmp_name:  # the old folder this swap replaced
            if not _pid_alive(swap.get("pid"), swap.get("host")):
                _remove_folder(path)
                actions.append(f"removed {path} (the old folder replaced by {final.name})")
        elif ".old-" in path.name and not final.exists() and [c.name for c in path.iterdir()] == [final.name]:
            os.rename(path / final.name, final)  # the older two-rename layout: the old folder was moved in here
            path.rmdir()
            actions.append(f"restored {final} from {path.name}")
    marker = _read_json(final / SWAP_MARKER_NAME) if final.is_dir() else None
    if marker is not None and not _pid_alive(marker.get("pid"), marker.get("host")):
        (final / SWAP_MARKER_NAME).unlink()
        actions.append(f"removed the stale swap marker in {final}")
    return actions


# ------------------------------------------------------------------------------------------------------ locks
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
        with _disk_errors(self.path):
            self.folder.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
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


# ------------------------------------------------------------------------------------------------- pre-flight
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


# -------------------------------------------------------------------------------------------- checked reads
def tensors_sha256(tensors: list[tuple[str, Tensor]]) -> str:
    """sha256 over the names, shapes and raw bytes of named tensors, in order."""
    import torch

    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_json_object(path: str | os.PathLike, what: str, fmt: str | None = None) -> dict[str, Any]:
    """A JSON object file written by this tool: FileNotFoundError if missing; ValueError (one line) if it is not
    valid JSON, not an object, or (with ``fmt``) its ``"format"`` is not ``fmt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not {what}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {what} is corrupt") from None
    if not isinstance(data, dict) or (fmt is not None and data.get("format") != fmt):
        raise ValueError(f"{path} is not {what} (format != {fmt!r})")
    return data


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], bytes]:
    """Load a safetensors file, turning a missing, empty, truncated or corrupt file into a clear ValueError."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{what} {path} is empty")
    try:
        return st_load(data), data
    except (SafetensorError, Exception) as exc:  # safetensors raises several types for bad headers
        raise ValueError(f"{what} {path} is corrupt or truncated ({exc}); save it again") from None

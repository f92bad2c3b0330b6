"""Safe files and folders: nothing a user saved is ever half-written, lost, or deleted by this tool.

One module a concept; every public name is importable from ``sparsegrad.io``:

* `files`: `atomic_write_bytes` / `atomic_write_json`: a temporary file beside the target, fsynced, renamed over it,
  the folder fsynced; files get ``0666 & ~umask``; a full or read-only disk becomes one `WriteFailed` line.
* `folders`: `atomic_directory`: a folder filled beside its final path and swapped in with
  ``renameat2(RENAME_EXCHANGE)`` (`swap`, `fs`), so that a crash at any instruction leaves the old or the new folder
  at the path; `recovery`: `recover_leftovers` rolls back or removes what a killed writer left (``.NAME.tmp-*``,
  ``.NAME.old-*``, ``.NAME.sg<pid>-*.tmp``), only when a marker (`markers`) proves this tool made it and its writer
  is dead.
* `ownership`: `mark_ours` / `is_ours` / `remove_ours` (a ``.sparsegrad`` marker file listing what the tool wrote;
  `remove_ours` refuses a folder holding anything else).
* `locks`: `lock_folder`: one writer per output folder (``flock`` on ``.sparsegrad.lock`` holding the PID).
* `preflight`: `check_output_path`, `check_writable` (writable, free space), `check_separate` (output vs inputs),
  `prepare_output_folder`.
* `reads`: checked reads (`read_safetensors`, `read_json_object`); `checksums`: sha256 of files, bytes, tensors.
* `errors`: the one-line refusals (`SafetyError` and its kinds) and `WriteFailed`.

Fault injection for the crash tests (`faults`): with ``SPARSEGRAD_TEST_KILL_AT=<point>[:<n>]`` the process SIGKILLs
itself at the n-th (default first) pass through `fault_point(<point>)`; ``SPARSEGRAD_TEST_NO_EXCHANGE=1`` forces the
two-rename fallback. Neither has any effect when unset.

The package imports only the standard library at start (torch and safetensors where used), so that the crash tests
can load it alone, fast.
"""

from .checksums import file_sha256, sha256_bytes, tensors_sha256
from .errors import (
    DISK_ERRNOS, EditedError, FolderLockedError, NotOursError, NotWritableError, PathRelationError, SafetyError,
    WriteFailed,
)
from .faults import KILL_ENV, fault_point
from .files import atomic_write_bytes, atomic_write_json, strict_json
from .folders import atomic_directory
from .fs import AT_FDCWD, NO_EXCHANGE_ENV, RENAME_EXCHANGE, RENAME_NOREPLACE, exchange_supported, fsync_dir
from .locks import FolderLock, lock_folder
from .markers import LOCK_NAME, MARKER_NAME, SWAP_MARKER_NAME, TOOL
from .ownership import (
    foreign_entries, is_ours, make_owned_dir, mark_ours, read_marker, record_ours, remove_ours, verify_ours,
)
from .preflight import check_output_path, check_separate, check_writable, prepare_output_folder
from .reads import read_json_object, read_safetensors
from .recovery import recover_leftovers

__all__ = [
    "AT_FDCWD", "DISK_ERRNOS", "KILL_ENV", "LOCK_NAME", "MARKER_NAME", "NO_EXCHANGE_ENV", "RENAME_EXCHANGE",
    "RENAME_NOREPLACE", "SWAP_MARKER_NAME", "TOOL",
    "EditedError", "FolderLock", "FolderLockedError", "NotOursError", "NotWritableError", "PathRelationError",
    "SafetyError", "WriteFailed",
    "atomic_directory", "atomic_write_bytes", "atomic_write_json", "check_output_path", "check_separate",
    "check_writable", "exchange_supported", "fault_point", "file_sha256", "foreign_entries", "fsync_dir", "is_ours",
    "lock_folder", "make_owned_dir", "mark_ours", "prepare_output_folder", "read_json_object", "read_marker",
    "read_safetensors", "recover_leftovers", "record_ours", "remove_ours", "sha256_bytes", "strict_json",
    "tensors_sha256", "verify_ours",
]

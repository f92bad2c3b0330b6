"""Atomic file writes: a temporary file beside the target, fsynced, renamed over it, the folder fsynced; files get
``0666 & ~umask``; a full or read-only disk becomes one `WriteFailed` line. JSON never holds ``NaN``."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import disk_errors
from .faults import fault_point
from .fs import fsync_dir, umask


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
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.sg{os.getpid()}-", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                os.fchmod(handle.fileno(), 0o666 & ~umask())
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

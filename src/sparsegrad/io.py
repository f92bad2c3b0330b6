"""Atomic file writes and checked safetensors reads: nothing a user saved is ever half-written."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as st_load
import torch
from torch import Tensor


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``final`` to fill; when the block ends without error it takes the place
    of ``final`` (an existing ``final`` is first moved aside, then removed). On error, or if the process dies, ``final``
    is untouched and the temporary folder (``.<name>.tmp-*``) is removed or left as a dot-folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def tensors_sha256(tensors: list[tuple[str, Tensor]]) -> str:
    """sha256 over the names, shapes and raw bytes of named tensors, in order."""
    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, Tensor], bytes]:
    """Load a safetensors file, turning a missing, empty, truncated or corrupt file into a clear ValueError."""
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

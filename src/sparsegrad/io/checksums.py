"""sha256 digests of files, bytes and named tensors (what markers, adapters and checkpoints record)."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the folder and lock primitives start fast
    from torch import Tensor


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensors_sha256(tensors: list[tuple[str, Tensor]]) -> str:
    """sha256 over the names, shapes and raw bytes of named tensors, in order."""
    import torch

    digest = hashlib.sha256()
    for name, t in tensors:
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

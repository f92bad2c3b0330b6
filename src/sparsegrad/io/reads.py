"""Checked reads of what this tool wrote: a missing, empty, truncated or corrupt file becomes one clear line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and safetensors are imported where used: the folder and lock primitives start fast
    from torch import Tensor


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

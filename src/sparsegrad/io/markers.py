"""The files this tool keeps inside a folder for itself (ownership marker, swap marker, lock) and how it reads
them back: a JSON object whose ``"tool"`` is ``sparsegrad``, anything else counting as absent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TOOL = "sparsegrad"
MARKER_NAME = ".sparsegrad"  # ownership marker: {"tool": "sparsegrad", "kind": ..., "files": [...]}
SWAP_MARKER_NAME = ".sparsegrad-swap"  # transient: inside a folder being swapped in, names its temporary folder
LOCK_NAME = ".sparsegrad.lock"
BOOKKEEPING_NAMES = (MARKER_NAME, SWAP_MARKER_NAME, LOCK_NAME)  # never listed among a folder's contents


def read_tool_json(path: Path) -> dict[str, Any] | None:
    """The marker at ``path``, or None when it is missing, unreadable or not this tool's."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == TOOL else None

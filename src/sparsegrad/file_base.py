"""`FileBase`: a SparseGrad layer's frozen pretrained weight W0 left in the model's safetensors file, not in memory.

A layer needs W0 only to rebuild its effective weight exactly (every few steps, at save, fold, merge, state_dict).
When the model was loaded from safetensors files and a matrix's tensor in the file is bit for bit the live weight at
conversion (after the cast to the model's dtype), the layer re-reads it from the file at each rebuild instead of
holding a second copy of every converted matrix. Otherwise (a model built in memory or changed after loading, a
transposed Conv1D weight, an unfused expert, a name the file does not hold) the layer keeps its copy as before.

The file must not change while the model is in use: each read checks the file's identity (device, inode, size,
modification time) against the one seen at conversion and refuses, naming the file, when it differs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

_SINGLE, _INDEX = "model.safetensors", "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the JSON header) of a safetensors file: 8 bytes little-endian length, then JSON."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal bit for bit (NaN and -0.0 included), in the same dtype and shape."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.detach().contiguous().view(torch.uint8), b.detach().contiguous().view(torch.uint8))


def weight_files(model: nn.Module) -> dict[str, Path]:
    """Tensor name -> safetensors file, of the checkpoint directory the model was loaded from (transformers'
    ``config._name_or_path``); empty when there is none."""
    where = getattr(getattr(model, "config", None), "_name_or_path", None)
    folder = Path(where) if isinstance(where, (str, os.PathLike)) and str(where) else None
    if folder is None or not folder.is_dir() or sys.byteorder != "little":  # safetensors data is little-endian
        return {}
    folder = folder.resolve()
    try:
        if (folder / _INDEX).is_file():
            weight_map = json.loads((folder / _INDEX).read_text())["weight_map"]
            return {key: folder / name for key, name in weight_map.items()}
        if (folder / _SINGLE).is_file():
            return dict.fromkeys((k for k in _header(folder / _SINGLE)[1] if k != "__metadata__"), folder / _SINGLE)
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable checkpoint: keep every W0 in memory
        return {}
    return {}


class FileBase:
    """Where a layer's W0 lies: tensor ``key`` of the safetensors file ``path``, as the file was at conversion."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self.identity = _identity(path)
        start, header = _header(path)
        begin, end = header[key]["data_offsets"]
        self.offset, self.nbytes = start + begin, end - begin
        self.dtype, self.shape = _DTYPES[header[key]["dtype"]], tuple(header[key]["shape"])

    @classmethod
    def matching(cls, files: dict[str, Path], names: list[str], live: Tensor) -> FileBase | None:
        """The first of ``names`` whose tensor in ``files`` equals ``live`` bit for bit once cast to its dtype."""
        for name in names:
            if name in files:
                try:
                    found = cls(files[name], name)
                    if same_bits(found.read(live.device, live.dtype), live):
                        return found
                except (OSError, ValueError, RuntimeError, KeyError, TypeError):  # unreadable or odd: not this one
                    continue
        return None

    def read(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """W0 as a fresh tensor on ``device`` in ``dtype``."""
        try:
            state = "changed" if _identity(self.path) != self.identity else None
        except OSError:
            state = "is gone"
        if state:
            raise ValueError(f"the model file {self.path} {state} since the model was converted to SparseGrad; the "
                             f"pretrained weight {self.key} is re-read from it: restore the file")
        data = bytearray(self.nbytes)  # read directly: safetensors' get_tensor reads a scalar back (a host sync)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            if f.readinto(data) != self.nbytes:
                raise ValueError(f"the model file {self.path} is shorter than it was at conversion")
        return torch.frombuffer(data, dtype=self.dtype).view(self.shape).to(device=device, dtype=dtype)


def parameter_names(model: nn.Module, name: str) -> list[str]:
    """The names the checkpoint may give module ``name``'s weight: as in the model, without the model's
    ``base_model_prefix`` (a base model's checkpoint loaded under a task head), or with it."""
    full, prefix = f"{name}.weight", getattr(model, "base_model_prefix", "") or ""
    names = [full]
    if prefix and full.startswith(prefix + "."):
        names.append(full[len(prefix) + 1:])
    elif prefix:
        names.append(f"{prefix}.{full}")
    return names

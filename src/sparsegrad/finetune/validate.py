"""Checks on adapter and checkpoint tensors before they are loaded, so that a damaged or hand-edited file is refused
with a message naming the tensor, instead of loading silently wrong values or failing deep inside torch.

`sg.load_adapter` (the core) already checks the format, version, checksum, base fingerprint and index ranges; these
add what it leaves to torch: dtypes, 1-D shapes, strictly increasing (sorted, unrepeated) indices, finite values,
and the presence and shape of every trained parameter the adapter's config lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import sparsegrad as sg

INDEX_DTYPES = (torch.int32, torch.int64)


def check_delta(name: str, indices: torch.Tensor | None, values: torch.Tensor | None, where: str) -> None:
    """One SparseGrad layer's delta: integer 1-D indices, strictly increasing; finite floating 1-D values, as many."""
    if indices is None or values is None:
        raise ValueError(f"{where} lacks the delta of {name} (delta_indices / delta_values)")
    if indices.dtype not in INDEX_DTYPES:
        raise ValueError(f"{where}: {name}.delta_indices is {indices.dtype}; indices must be int32 or int64 (the "
                         "file was not written by sparsegrad or was edited)")
    if not values.is_floating_point():
        raise ValueError(f"{where}: {name}.delta_values is {values.dtype}; values must be floating point")
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(f"{where}: {name} delta must be 1-D, got indices {tuple(indices.shape)} and values "
                         f"{tuple(values.shape)}")
    if indices.numel() and indices.numel() != values.numel():  # no indices: a fixed support still pending
        raise ValueError(f"{where}: {name} has {indices.numel()} delta indices for {values.numel()} values")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{where}: {name}.delta_indices are not strictly increasing (unsorted or repeated "
                         "entries); the file is damaged")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: {name}.delta_values hold NaN or inf; the adapter is unusable (retrain with a "
                         "lower learning rate)")


def check_sparsegrad_adapter(adapter_dir: str | os.PathLike) -> None:
    """Everything `check_delta` checks for every layer of a SparseGrad/MeProp adapter folder, plus its bases
    (finite) and trained parameters (present, with the recorded shape, finite). Raises ValueError."""
    adapter_dir = Path(adapter_dir)
    meta, tensors = sg.read_adapter(adapter_dir)
    where = str(adapter_dir / "adapter_model.safetensors")
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{adapter_dir / 'adapter_config.json'} lists no layers; the adapter is damaged")
    for name in layers:
        check_delta(name, tensors.get(f"{name}.delta_indices"), tensors.get(f"{name}.delta_values"), where)
    for key, t in tensors.items():
        if key.startswith("bases/") and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {key} holds NaN or inf; the adapter is damaged")
    for name, shape in (meta.get("trainable_params") or {}).items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{where} lacks the trained parameter {name} that adapter_config.json lists")
        if list(t.shape) != list(shape):
            raise ValueError(f"{where}: {name} is {list(t.shape)}, adapter_config.json records {list(shape)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} holds NaN or inf; the adapter is unusable")


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    bad = [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{where}: {bad[:3]} hold NaN or inf; the file is unusable")

"""A trained delta, put back: the one way an adapter load (SparseGrad's, and the trained parameters beside a LoRA
or full adapter), a resumed run, a restored best step and the HF Trainer's resume return a saved state to a model
(`restore_delta`), the checks it runs first (`check_delta`, `check_finite`), and what is saved for it
(`trainable_state`; `trained_parameters`, the part outside the deltas).

A saved state names each SparseGrad layer's delta ``<layer>.delta_indices`` / ``<layer>.delta_values`` and every
other trained tensor (biases, norms, heads) by its model name. Loading goes through ``load_state_dict``, whose
`SparseGradLinear._load_from_state_dict` takes the delta's saved length; every layer's weight is then rebuilt from
its frozen base and the delta with the formula training used, so the model is bit for bit the one that was saved.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layer import SparseGradLinear, column_major
from .model import sparsegrad_layers

INDEX_DTYPES = (torch.int32, torch.int64)


def check_delta(name: str, indices: torch.Tensor | None, values: torch.Tensor | None, where: str,
                shape: tuple[int, int] | list[int] | None = None) -> None:
    """One SparseGrad layer's saved delta: integer 1-D indices, strictly increasing (and inside ``shape`` when
    given); finite floating-point 1-D values, as many. No indices at all is a fixed support still pending.
    Raises ValueError naming ``where`` and the tensor."""
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
    if indices.numel() and indices.numel() != values.numel():
        raise ValueError(f"{where}: {name} has {indices.numel()} delta indices for {values.numel()} values")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{where}: {name}.delta_indices are not strictly increasing (unsorted or repeated "
                         "entries); the file is damaged")
    if shape is not None and indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= shape[0] * shape[1]):
        raise ValueError(f"{where}: {name}.delta_indices fall outside its {shape[0]}x{shape[1]} matrix")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{where}: {name}.delta_values hold NaN or inf; the adapter is unusable (retrain with a "
                         "lower learning rate)")


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors that hold NaN or inf."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Every floating-point tensor is finite, or a ValueError names the first few that are not."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ValueError(f"{where}: {bad[:3]} hold NaN or inf; the file is unusable")


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters outside the SparseGrad deltas, by name (biases, norms, heads, attention when trained):
    a layer's dense effective weight is rebuilt from its delta, and a fixed support's values are the delta."""
    owned = set()
    for layer in sparsegrad_layers(model).values():
        owned.update({id(layer.weight), id(layer.delta_values)})
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in owned}


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes, by name, as `restore_delta` takes it back: the `trained_parameters` and every
    SparseGrad layer's ``delta_indices`` / ``delta_values``. Detached contiguous CPU copies."""
    out = {n: p.detach().cpu().contiguous().clone() for n, p in trained_parameters(model).items()}
    for name, layer in sparsegrad_layers(model).items():
        out[f"{name}.delta_indices"] = layer.delta_indices.detach().cpu().contiguous().clone()
        out[f"{name}.delta_values"] = layer.delta_values.detach().float().cpu().contiguous().clone()
    return out


def _is_delta(name: str) -> bool:
    return name.endswith((".delta_indices", ".delta_values"))


def check_restorable(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """What `restore_delta` checks before it changes anything (ValueError naming ``where`` and the tensor):
    every layer's delta (`check_delta`, inside its matrix; a fixed support holds k entries, or none while pending);
    every other tensor names a parameter of ``model``, has its shape, is floating point where the parameter is,
    and is finite (`check_finite`)."""
    own: dict[str, torch.Tensor] = dict(model.named_parameters())
    for name, layer in sparsegrad_layers(model).items():
        indices, values = tensors.get(f"{name}.delta_indices"), tensors.get(f"{name}.delta_values")
        check_delta(name, indices, values, where, (layer.out_features, layer.in_features))
        if layer.support == "fixed" and indices.numel() not in (0, layer.k):
            raise ValueError(f"{where}: the delta of {name} has {indices.numel()} entries, its fixed support needs "
                             f"{layer.k}")
        own[f"{name}.delta_indices"], own[f"{name}.delta_values"] = layer.delta_indices, layer.delta_values
    check_finite(tensors, where)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise ValueError(f"{where} holds tensors the model lacks ({unknown[:3]}): it was written for another model "
                         "or method")
    for name, value in tensors.items():
        target = own[name]
        if _is_delta(name):
            continue  # its length is data (a dynamic support grows), checked above
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{where}: {name} is {tuple(value.shape)}, the model has {tuple(target.shape)}")
        if target.is_floating_point() and not value.is_floating_point():
            raise ValueError(f"{where}: {name} is {value.dtype}; the model's is floating point (the file was edited)")


def check_bases(layers: Mapping[str, SparseGradLinear], bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                where: str) -> None:
    """Every layer's kind has bases (u_out, u_in) of its shapes in ``bases`` (kind -> factors)."""
    for name, layer in layers.items():
        if layer.kind not in bases:
            raise ValueError(f"{where} lacks the bases of kind {layer.kind!r} that {name} needs")
        u_out, u_in = bases[layer.kind]
        if u_out.shape != layer.u_out.shape or u_in.shape != layer.u_in.shape:
            raise ValueError(f"{where}: bases of kind {layer.kind!r} are {tuple(u_out.shape)} and "
                             f"{tuple(u_in.shape)}, the model's {name} needs {tuple(layer.u_out.shape)} and "
                             f"{tuple(layer.u_in.shape)}")


@torch.no_grad()
def restore_delta(model: nn.Module, tensors: Mapping[str, torch.Tensor], where: str, *,
                  bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> nn.Module:
    """Put a saved trained state (``tensors``: each layer's delta and the other trained tensors, by model name)
    back into ``model``, converted the same way; returns it. Everything is checked first (`check_restorable`,
    `check_bases`): a refusal is a ValueError naming ``where`` and the tensor, and changes nothing.

    ``bases`` (kind -> (u_out, u_in), for a model converted with other bases, e.g. a trainer resuming from an
    adapter) replaces the layers' bases, one tensor shared by the layers of a kind. Each layer's weight is rebuilt
    exactly from its frozen base and the restored delta."""
    layers = sparsegrad_layers(model)
    check_restorable(model, tensors, where)
    if bases is not None:
        check_bases(layers, bases, where)
    state = dict(tensors)
    for name, layer in layers.items():
        if layer.support == "fixed" and state[f"{name}.delta_indices"].numel() == 0:
            state[f"{name}.delta_values"] = torch.zeros(layer.k)  # saved before its first step: support pending
    if bases is not None:
        _set_bases(layers, bases)
    model.load_state_dict(state, strict=False)
    for layer in layers.values():
        layer.sync_weight(force=True)
    return model


def _set_bases(layers: Mapping[str, SparseGradLinear],
               bases: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The bases are non-persistent buffers shared by the layers of a kind (one fp32 column-major copy per kind and
    device, as conversion makes them: `column_major`)."""
    shared: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in layers.values():
        key = (layer.kind, layer.u_out.device)
        if key not in shared:
            u_out, u_in = bases[layer.kind]
            shared[key] = (column_major(u_out.to(key[1], torch.float32)), column_major(u_in.to(key[1], torch.float32)))
        layer.u_out, layer.u_in = shared[key]

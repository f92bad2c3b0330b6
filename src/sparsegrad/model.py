"""Wrapping a model: swap the target matrices for SparseGradLinear, choose what trains, count it, merge back."""

from __future__ import annotations

import torch
from torch import nn

from .bases import SparseGradBases
from .config import SparseGradConfig
from .experts import ExpertView, fuse_trained, selected_experts, unfuse, unfused_modules
from .file_base import FileBase, parameter_names, weight_files
from .layer import SparseGradLinear, column_major
from .matrices import LinearView, convert, restore
from .targets import find_targets, kind_of, mlp_kinds, resolve

# PEFT's modules_to_save for sequence classification (its TaskType.SEQ_CLS): the head, found by name.
CLASSIFICATION_HEADS = ("classifier", "score", "classification_head")  # + T5/BART's

CONFIG_ATTR = "sparsegrad_config"
PRETRAINED_HASH_ATTR = "sparsegrad_pretrained_sha256"


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def sparsegrad_layers(model: nn.Module) -> dict[str, SparseGradLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseGradLinear)}


def _bases_on(bases: SparseGradBases, kind: str, device: torch.device,
              cache: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The bases of ``kind`` on ``device`` in fp32, column-major (`column_major`): one copy per kind and device,
    shared by the blocks of a kind."""
    if (kind, device) not in cache:
        u_out, u_in = bases.get(kind)
        cache[(kind, device)] = (column_major(u_out.to(device, torch.float32)), column_major(u_in.to(device, torch.float32)))
    return cache[(kind, device)]


def saved_modules(model: nn.Module, config: SparseGradConfig) -> list[str]:
    """The modules that train densely besides SparseGrad's matrices: ``config.modules_to_save`` (each must match),
    or by default the model's classification head (`CLASSIFICATION_HEADS`) when it has one."""
    names = [n for n, _ in model.named_modules() if n]
    wanted = config.modules_to_save if config.modules_to_save is not None else CLASSIFICATION_HEADS
    chosen = []
    for entry in wanted:
        hits = [n for n in names if n == entry or n.endswith("." + entry)]
        if not hits and config.modules_to_save is not None:
            raise ValueError(f"SparseGradConfig.modules_to_save names {entry!r}, which is no module of the model")
        chosen += [n for n in hits if not any(n.startswith(c + ".") for c in chosen) and n not in chosen]
    return chosen


def _train_only_adapter(model: nn.Module, config: SparseGradConfig) -> None:
    """PEFT's default: only SparseGrad's entries, the converted layers' biases and the saved modules train."""
    keep: set[nn.Parameter] = set()
    for layer in sparsegrad_layers(model).values():
        keep.add(layer.weight if layer.support == "dynamic" else layer.delta_values)
        if layer.bias is not None:
            keep.add(layer.bias)
    for name in saved_modules(model, config):
        keep.update(model.get_submodule(name).parameters())
    for p in model.parameters():
        p.requires_grad_(p in keep)


def _matrix_module(model: nn.Module, name: str, target: object) -> nn.Module:
    """The module to convert for a target: the module itself, a Conv1D behind its view, an unfused expert."""
    if isinstance(target, ExpertView):
        return model.get_submodule(name)
    return target.source if isinstance(target, LinearView) else target


@torch.no_grad()
def _release_checkpoint_mapping(model: nn.Module) -> None:
    """Give every tensor of the model outside its SparseGrad layers a storage of its own. transformers maps the
    checkpoint file into memory and its tensors keep the whole mapping alive, so the pages of the converted
    matrices (read at conversion, then referenced by nothing) would stay resident beside the layers' own weights:
    copied off the mapping, the other tensors let it go (RSS: the converted matrices' pages; the copies replace
    the pages they were)."""
    made = {id(t) for layer in sparsegrad_layers(model).values()  # by the conversion (the bases shared by a kind)
            for t in (layer.weight, *layer._buffers.values())}
    for p in model.parameters():  # each Parameter once (tied ones are one object), the same object after
        if id(p) not in made and p.device.type == "cpu":  # a mapping holds only CPU tensors
            p.data = p.data.clone()
    copies: dict[int, torch.Tensor] = {}  # a buffer shared by modules stays shared
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and id(b) not in made and b.device.type == "cpu":
                if id(b) not in copies:
                    copies[id(b)] = b.clone()
                module._buffers[name] = copies[id(b)]


def get_sparsegrad_model(model: nn.Module, config: SparseGradConfig, bases: SparseGradBases, *,
                         keep_requires_grad: bool = False) -> nn.Module:
    """Swap, in place, every matrix the config selects (``target_modules=None``: the model's MLP, see
    `sparsegrad.targets.MLP_TARGETS`) for a `SparseGradLinear` using ``bases``. Returns the same model object.

    The converted model computes exactly what the original did (same output, input gradient and bias gradient).
    Then, as PEFT's ``get_peft_model`` does, only SparseGrad's entries, the biases of the converted layers and
    ``config.modules_to_save`` (by default a classification head, 'classifier' or 'score') train; every other
    parameter is frozen. ``keep_requires_grad=True`` leaves every other parameter's ``requires_grad`` as it is
    (for callers that choose it themselves, like the CLI's scopes).
    """
    config.validate()
    if not isinstance(bases, SparseGradBases):
        raise ValueError(f"bases must be SparseGradBases (from sg.estimate_bases), got {type(bases).__name__}")
    if sparsegrad_layers(model) or getattr(model, CONFIG_ATTR, None) is not None:
        raise ValueError("the model is already converted to SparseGrad; convert a fresh copy of the base model")
    config = resolve(config, model)
    if config.modules_to_save is not None:
        saved_modules(model, config)  # an unknown name is refused before anything changes
    targets = find_targets(model, config)
    plans = []
    for name, linear in targets:
        kind = kind_of(name, config)
        u_out, u_in = bases.get(kind)
        out_f, in_f = linear.weight.shape
        if tuple(u_out.shape) != (out_f, out_f) or tuple(u_in.shape) != (in_f, in_f):
            raise ValueError(
                f"bases of kind {kind!r} are {tuple(u_out.shape)} and {tuple(u_in.shape)}, but {name} is "
                f"{out_f}x{in_f}: they were calibrated on another model or config"
            )
        plans.append((name, linear, kind, config.budget(out_f, in_f, name=name)))
    for module, pnames in selected_experts(model, [n for n, t in targets if isinstance(t, ExpertView)]).items():
        unfuse(module, pnames)  # per-expert linears over the fused tensor; each is converted below
    on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
    # W0 stays in the checkpoint's file where it is bit for bit the live weight, and only where it is read rarely: a
    # dynamic fp32 layer rebuilds exactly every few steps, while a fixed support or a bf16/fp16 weight rebuilds from
    # W0 at every step (a whole re-read of the MLP each step); no file is opened when no layer can use it
    files = weight_files(model) if config.support == "dynamic" else {}
    for name, target, kind, k in plans:
        u_out, u_in = _bases_on(bases, kind, target.weight.device, on_device)
        fixed = bases.fixed_supports.get(name) if config.support == "fixed" else None
        if fixed is not None and fixed.numel() != k:
            fixed = None  # calibrated for another budget: choose from the first step instead
        layer = convert(_matrix_module(model, name, target), u_out, u_in, k=k, support=config.support, kind=kind,
                        identity_basis=bases.identity, fixed_indices=fixed)
        rare = layer.weight.dtype == torch.float32
        source = FileBase.matching(files, parameter_names(model, name), layer.weight) if files and rare else None
        if source is not None:
            layer.keep_base_in_file(source)
        _set_submodule(model, name, layer)
    _release_checkpoint_mapping(model)  # the converted matrices' original pages: W0 is a copy or in the file
    if not keep_requires_grad:
        _train_only_adapter(model, config)
    setattr(model, CONFIG_ATTR, config)
    return model


def refresh_bases(model: nn.Module, bases: SparseGradBases, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Periodic basis refresh (like GaLore's projection refresh): for every SparseGrad layer, fold its trained
    delta into the frozen weight, switch to the ``bases`` of its kind (calibrated at the current point, e.g. by
    `sparsegrad.estimate_bases` on this converted model) and start an empty delta; the model's function is
    unchanged. The optimizer's state for those layers is dropped (its moments belong to the old basis). Adapters
    saved afterwards hold the folded segments too and load bit-identically. Returns the number of layers folded.
    """
    layers = sparsegrad_layers(model)
    if not layers:
        raise ValueError("refresh_bases needs a model converted with sg.get_sparsegrad_model")
    if not isinstance(bases, SparseGradBases) or bases.identity:
        raise ValueError("refresh_bases needs calibrated (rotated) SparseGradBases")
    if getattr(model, PRETRAINED_HASH_ATTR, None) is None:
        from .io import tensors_sha256  # the adapter's base fingerprint, taken before the first fold changes W0

        setattr(model, PRETRAINED_HASH_ATTR, tensors_sha256([(n, l.base_weight) for n, l in layers.items()]))
    records: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # one CPU copy per kind of the bases folded away
    moved: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in layers.items():
        # taken before this kind's first fold: the layers of a kind share one basis tensor until then
        record = records.setdefault(layer.kind, (layer.u_out.float().cpu(), layer.u_in.float().cpu()))
        fixed = bases.fixed_supports.get(name) if layer.support == "fixed" else None
        layer.fold(*_bases_on(bases, layer.kind, layer.weight.device, moved), record=record,
                   fixed_indices=fixed if fixed is not None and fixed.numel() == layer.k else None)
        if optimizer is not None:
            optimizer.state.pop(layer.weight, None)
            optimizer.state.pop(layer.delta_values, None)
    return len(layers)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every SparseGradLinear by the module it replaced (nn.Linear, Conv1D, ...) holding the trained
    weight, and fused experts by their 3-D parameters again. The result has the base architecture, the same
    state_dict keys as the original model and the trained model's outputs."""
    layers = sparsegrad_layers(model)
    if not layers:
        raise ValueError("the model has no SparseGradLinear to merge")
    for module in unfused_modules(model):
        fuse_trained(module)
    for name, layer in sparsegrad_layers(model).items():
        _set_submodule(model, name, restore(layer))
        for param in (layer.weight, layer.delta_values):  # an optimizer still holding them refuses to step
            param.sparsegrad_merged = True
    for attr in (CONFIG_ATTR, PRETRAINED_HASH_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(entries that train per step, all parameters of the base architecture)."""
    trainable = total = 0
    layer_params: set[int] = set()
    for layer in sparsegrad_layers(model).values():
        layer_params.update({id(layer.weight), id(layer.delta_values)})
        total += layer.weight.numel()
        if layer.weight.requires_grad or layer.delta_values.requires_grad:
            trainable += layer.k
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in layer_params or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_summary(model: nn.Module) -> list[str]:
    """What trains, one line each: SparseGrad's kinds (modules, k), then the dense parameters by module."""
    layers = sparsegrad_layers(model)
    config = getattr(model, CONFIG_ATTR, None)
    lines = []
    if layers and config is not None:
        counts = mlp_kinds(list(layers), config)
        for kind, n in counts.items():
            ks = sorted({l.k for l in layers.values() if l.kind == kind})
            support = next(l.support for l in layers.values() if l.kind == kind)
            lines.append(f"  sparsegrad {kind}: {n} module{'s' * (n > 1)}, k={'/'.join(map(str, ks))} "
                         f"entries each per step ({support})")
    owned = {id(p) for l in layers.values() for p in (l.weight, l.delta_values)}
    biases = {id(l.bias) for l in layers.values() if l.bias is not None}
    dense: dict[str, int] = {}
    n_bias = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in owned or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in biases:
            n_bias += p.numel()
            continue
        owner = name.rpartition(".")[0] or name
        dense[owner] = dense.get(owner, 0) + p.numel()
    if n_bias:
        lines.append(f"  dense: biases of the converted modules ({n_bias:,d} params)")
    shown = sorted(dense.items(), key=lambda kv: -kv[1])
    for owner, n in shown[:8]:
        lines.append(f"  dense: {owner} ({n:,d} params)")
    if len(shown) > 8:
        lines.append(f"  dense: {len(shown) - 8} more modules ({sum(n for _, n in shown[8:]):,d} params)")
    return lines


def print_trainable_parameters(model: nn.Module) -> str:
    """Print PEFT's line (trainable entries per step || all params || trainable%), then what trains: each
    SparseGrad kind with its module count and k, and the densely trained parameters by module. Returns the
    first line."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    print("\n".join([line, *trainable_summary(model)]))
    return line


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def training_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Exact bytes of training state: parameters that train, their gradients (as they are now: call it after
    backward and before zero_grad), the optimizer's state tensors, and ``bookkeeping``: what SparseGrad holds for
    training besides those (a dynamic layer's dense position map, 2 bytes per weight entry while its support holds
    at most 65,535 entries, else 4, and its buffers' spare capacity; the increment journal; a fixed support's
    gradient plan). The frozen W0 is not training state (LoRA's is not either), held or left in the checkpoint file.

    For a SparseGrad layer what trains is its delta (values and indices), not the effective weight it keeps
    merged for the forward; a dynamic layer's dense weight gradient is counted as a gradient.
    """
    layers = sparsegrad_layers(model).values()
    layer_weights = {id(layer.weight) for layer in layers}
    params = grads = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.grad is not None:
            grads += _nbytes(p.grad)
        if p.requires_grad and id(p) not in layer_weights:
            params += _nbytes(p)
    for layer in layers:
        if layer.weight.requires_grad or layer.delta_values.requires_grad:
            params += _nbytes(layer.delta_indices)
            if not isinstance(layer.delta_values, nn.Parameter):
                params += _nbytes(layer.delta_values)
    state = 0
    if optimizer is not None:
        for entry in optimizer.state.values():
            state += sum(_nbytes(v) for v in entry.values() if isinstance(v, torch.Tensor))
    books = sum(layer.bookkeeping_bytes() for layer in layers if layer.weight.requires_grad
                or layer.delta_values.requires_grad)
    books += optimizer.bookkeeping_bytes() if hasattr(optimizer, "bookkeeping_bytes") else 0
    return {"params": params, "grads": grads, "optimizer_state": state, "bookkeeping": books,
            "total": params + grads + state + books}

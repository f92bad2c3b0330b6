"""Which modules a config selects, and which kind (shared basis) each belongs to.

`MLP_TARGETS` is the counterpart of PEFT's per-model-type target mapping, for MLP blocks: for each
``config.model_type`` a regex (full match) of its MLP matrices, in transformers 5 module names. The kind of a
matrix (its basis group) is its name with the block indices replaced by ``*``, so the encoder and decoder MLPs of
T5/BART/Whisper, the two halves of a gated MLP and the experts' ``gate_up_proj``/``down_proj`` are kinds of their
own, shared across blocks (and experts). A model type the registry does not know gets the structural fallback
`structural_mlp_targets`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator

from torch import nn

from .config import BERT_MLP_TARGETS, LLAMA_MLP_TARGETS, SparseGradConfig
from .experts import ExpertView, check_layout, expert_views, fuse, selected_experts, unfuse
from .layer import SparseGradLinear
from .matrices import LinearView, as_linear, is_conv1d, linear_support, out_in_weight, refuse_unsupported

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")

_FC = r".*layers\.\d+\.(fc1|fc2)"  # OPT, BART, Whisper, Marian, ...: fc1/fc2 directly in the block
_H_TO_4H = r".*h\.\d+\.mlp\.(dense_h_to_4h|dense_4h_to_h)"
_T5 = r".*block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)"
_MOE_EXPERTS = r"experts\.\d+\.(gate_up_proj|down_proj)"

MLP_TARGETS: dict[str, str] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra", "deberta", "deberta-v2", "mpnet",
                     "megatron-bert", "data2vec-text", "roberta-prelayernorm", "xlm-roberta-xl"), BERT_MLP_TARGETS),
    "distilbert": r".*layer\.\d+\.ffn\.(lin1|lin2)",
    "albert": r".*albert_layers\.\d+\.(ffn|ffn_output)",
    "modernbert": r".*layers\.\d+\.mlp\.(Wi|Wo)",  # Wi is the fused gated input (2I x H): one kind
    "vit": r".*layers\.\d+\.mlp\.(fc1|fc2)",
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "granite",
                     "olmo", "olmo2", "cohere", "smollm3", "helium"), LLAMA_MLP_TARGETS),
    "phi": r".*layers\.\d+\.mlp\.(fc1|fc2)",
    "phi3": r".*layers\.\d+\.mlp\.(gate_up_proj|down_proj)",  # gate_up_proj fused (2I x H): one kind
    "gpt2": r".*h\.\d+\.mlp\.(c_fc|c_proj)",  # Conv1D
    "gpt_neox": r".*layers\.\d+\.mlp\.(dense_h_to_4h|dense_4h_to_h)",
    "gptj": r".*h\.\d+\.mlp\.(fc_in|fc_out)",
    "bloom": _H_TO_4H,
    "falcon": _H_TO_4H,  # FalconLinear
    "opt": _FC,
    **dict.fromkeys(("t5", "mt5", "umt5"), _T5),
    **dict.fromkeys(("bart", "mbart", "whisper", "marian", "pegasus"), _FC),
    "mixtral": rf".*layers\.\d+\.mlp\.{_MOE_EXPERTS}",
    "qwen2_moe": rf".*layers\.\d+\.mlp\.({_MOE_EXPERTS}|shared_expert\.(gate_proj|up_proj|down_proj))",
    "qwen3_moe": rf".*layers\.\d+\.mlp\.({_MOE_EXPERTS}|gate_proj|up_proj|down_proj)",  # + dense mlp_only_layers
}


def block_index(name: str) -> int | None:
    """The first integer component of a dotted module name (`encoder.layer.3.output.dense` -> 3)."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def starred(name: str) -> str:
    """The name with every integer component replaced by '*' (`h.3.mlp.c_fc` -> `h.*.mlp.c_fc`)."""
    return _BLOCK_INDEX.sub(lambda m: m.group(0).replace(m.group(1), "*"), name)


def kind_of(name: str, config: SparseGradConfig) -> str:
    """The basis group of a module: its name with block indices replaced by '*', or the name itself
    when every layer has its own bases."""
    if config.basis_sharing == "layer":
        return name
    return starred(name)


def name_matches(name: str, config: SparseGradConfig) -> bool:
    if isinstance(config.target_modules, str):
        if re.fullmatch(config.target_modules, name) is None:
            return False
    elif not any(name == t or name.endswith("." + t) for t in config.target_modules):
        return False
    if config.layers_to_transform is not None:
        return block_index(name) in config.layers_to_transform
    return True


def _matrices(model: nn.Module) -> Iterator[tuple[str, object]]:
    """Every named module in model order, each followed by the expert matrices of its fused 3-D parameters."""
    views: dict[str, list[tuple[str, ExpertView]]] = {}
    for name, view in expert_views(model):
        views.setdefault(name.rsplit(".", 2)[0], []).append((name, view))
    for name, module in model.named_modules():
        if name:
            yield name, module
        yield from views.get(name, ())


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _is_matrix(entry: object) -> bool:
    return isinstance(entry, (ExpertView, SparseGradLinear)) or linear_support(entry) is not None


def structural_mlp_targets(model: nn.Module) -> str | None:
    """A regex of the MLP matrices found by shape: within each repeated block (a name with an index), each down
    projection (intermediate -> hidden, intermediate > hidden) and the matrices beside it that map hidden ->
    intermediate (or to twice it: a fused gate/up), preferring siblings of the same parent module (so that a fused
    attention projection of the same shape stays out). None when no block has such a pair."""
    blocks: dict[str, list[tuple[str, tuple[int, int]]]] = {}
    for name, entry in _matrices(model):
        match = _BLOCK_INDEX.search(name)
        if match is None or not _is_matrix(entry):
            continue
        out_f, in_f = out_in_weight(entry).shape if not isinstance(entry, LinearView) else entry.weight.shape
        blocks.setdefault(name[: match.end()], []).append((name, (int(out_f), int(in_f))))
    kinds: list[str] = []
    for members in blocks.values():
        for down, (hidden, inter) in members:
            if inter <= hidden:
                continue
            ups = [n for n, (o, i) in members if n != down and i == hidden and o in (inter, 2 * inter)]
            parent = down.rpartition(".")[0]
            siblings = [n for n in ups if n.rpartition(".")[0] == parent]
            for name in [down, *(siblings or ups)] if ups else []:
                if starred(name) not in kinds:
                    kinds.append(starred(name))
    if not kinds:
        return None
    return "|".join(re.escape(k).replace(r"\*", r"\d+") for k in kinds)


def mlp_target_modules(model: nn.Module) -> str:
    """The regex of ``model``'s MLP matrices: the registry's (`MLP_TARGETS`) for its ``config.model_type``, else
    the BERT or LLaMA naming when it matches, else the structural fallback. ValueError when none finds an MLP."""
    names = [n for n, _ in _matrices(model)]
    model_type = _model_type(model)
    candidates = [MLP_TARGETS[model_type]] if model_type in MLP_TARGETS else []
    for pattern in (*candidates, BERT_MLP_TARGETS, LLAMA_MLP_TARGETS):
        if any(re.fullmatch(pattern, n) for n in names):
            return pattern
    found = structural_mlp_targets(model)
    if found is None:
        what = f"model_type {model_type!r}" if model_type else f"{type(model).__name__} (no config.model_type)"
        raise ValueError(f"found no MLP block in the {what}: pass target_modules=... (a regex of its MLP "
                         "linears' full names, e.g. r'.*layers\\.\\d+\\.mlp\\.(fc1|fc2)'; --target-modules in the CLI)")
    return found


def resolve(config: SparseGradConfig, model: nn.Module) -> SparseGradConfig:
    """``config`` with ``target_modules=None`` replaced by the model's MLP targets (`mlp_target_modules`)."""
    if config.target_modules is not None:
        return config
    return dataclasses.replace(config, target_modules=mlp_target_modules(model))


def find_targets(model: nn.Module, config: SparseGradConfig, *, allow_converted: bool = False) -> list[tuple[str, object]]:
    """Every matrix the config selects, in model order, as (name, module): an nn.Linear (or subclass), a
    SparseGradLinear of a converted model (with ``allow_converted``), or a `LinearView` (``weight`` out x in) of a
    GPT-2 Conv1D or of one expert of a fused experts parameter. A clear error when none or a wrong type matches."""
    config = resolve(config, model)
    found = [(n, m) for n, m in _matrices(model) if name_matches(n, config)]
    if not found:
        layers = "" if config.layers_to_transform is None else f" in blocks {config.layers_to_transform}"
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of the model{layers}")
    targets = []
    for name, module in found:
        if isinstance(module, SparseGradLinear):
            if not allow_converted:
                raise ValueError(f"{name} is already a SparseGradLinear: the model was converted before")
        elif isinstance(module, ExpertView):
            check_layout(name, module.source)
        elif linear_support(module) is None:
            refuse_unsupported(name, module)
        elif is_conv1d(module):
            module = LinearView(module.weight.detach().T, module.bias, module)
        targets.append((name, module))
    return targets


def mlp_kinds(names: list[str], config: SparseGradConfig) -> dict[str, int]:
    """How many of the matrices ``names`` each kind holds, in first-seen order."""
    counts: dict[str, int] = {}
    for name in names:
        kind = kind_of(name, config)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def with_linear_targets(estimate: Callable) -> Callable:
    """Decorator for `estimate_bases(model, config, ...)`: while it runs, the selected matrices that are not
    nn.Linear modules (fused experts, GPT-2 Conv1D) are nn.Linear modules over the same memory, so their gradients
    are captured per matrix, out x in; afterwards the model has its own modules and parameters back, untouched."""

    @functools.wraps(estimate)
    def wrapper(model: nn.Module, config: SparseGradConfig, *args, **kwargs):
        views = [(n, m) for n, m in find_targets(model, config, allow_converted=True) if isinstance(m, LinearView)]
        fused = [(module, dict(unfuse(module, pnames)))
                 for module, pnames in selected_experts(model, [n for n, _ in views]).items()]
        swapped = []
        for name, view in views:
            if not isinstance(view, ExpertView):  # a Conv1D: an nn.Linear over its transposed weight meanwhile
                parent, _, child = name.rpartition(".")
                owner = model.get_submodule(parent) if parent else model
                owner._modules[child] = as_linear(view.source)
                swapped.append((owner, child, view.source))
        try:
            return estimate(model, config, *args, **kwargs)
        finally:
            for owner, child, original in swapped:
                owner._modules[child] = original
            for module, params in fused:
                fuse(module, params)

    return wrapper

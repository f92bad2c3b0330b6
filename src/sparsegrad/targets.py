"""Which modules a config selects, and which kind (shared basis) each belongs to."""

from __future__ import annotations

import re

from torch import nn

from .config import SparseGradConfig

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def block_index(name: str) -> int | None:
    """The first integer component of a dotted module name (`encoder.layer.3.output.dense` -> 3)."""
    match = _BLOCK_INDEX.search(name)
    return int(match.group(1)) if match else None


def kind_of(name: str, config: SparseGradConfig) -> str:
    """The basis group of a module: its name with block indices replaced by '*', or the name itself
    when every layer has its own bases."""
    if config.basis_sharing == "layer":
        return name
    return _BLOCK_INDEX.sub(lambda m: m.group(0).replace(m.group(1), "*"), name)


def name_matches(name: str, config: SparseGradConfig) -> bool:
    if isinstance(config.target_modules, str):
        if re.fullmatch(config.target_modules, name) is None:
            return False
    elif not any(name == t or name.endswith("." + t) for t in config.target_modules):
        return False
    if config.layers_to_transform is not None:
        return block_index(name) in config.layers_to_transform
    return True


def find_targets(model: nn.Module, config: SparseGradConfig, *, allow_converted: bool = False) -> list[tuple[str, nn.Module]]:
    """Every module the config selects, in model order; a clear error when none or a wrong type matches."""
    from .layer import SparseGradLinear  # local: layer imports nothing from here, keep the graph acyclic

    found = [(n, m) for n, m in model.named_modules() if n and name_matches(n, config)]
    if not found:
        layers = "" if config.layers_to_transform is None else f" in blocks {config.layers_to_transform}"
        raise ValueError(f"target_modules={config.target_modules!r} matches no module of the model{layers}")
    for name, module in found:
        if isinstance(module, SparseGradLinear):
            if not allow_converted:
                raise ValueError(f"{name} is already a SparseGradLinear: the model was converted before")
        elif type(module) is not nn.Linear:
            raise ValueError(
                f"target_modules matches {name}, a {type(module).__name__}; SparseGrad converts only nn.Linear "
                "(narrow the pattern)"
            )
    return found

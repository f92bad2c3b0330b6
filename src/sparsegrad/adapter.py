"""Adapters: the trained delta in two files, `adapter_config.json` + `adapter_model.safetensors` (no pickle).

The safetensors file holds the bases once per kind (``bases/u_out/<kind>``, ``bases/u_in/<kind>``; none for
identity bases), per converted module its sparse delta (``<module>.delta_indices`` int32, ``<module>.delta_values``
fp32) and every other parameter that was left trainable, in full, under its model name. The JSON holds the config,
the layers, a fingerprint of the base (shapes and a hash of the target weights) and the sha256 of the safetensors
file, so a torn pair of files is detected; ``config_sha256`` covers the JSON itself (every key but that one, canonical
form), so an edited config is refused too, and ``extra_files`` records the sha256 of sidecar files saved with the
adapter (e.g. the CLI's ``task.json``; `read_adapter_file` reads one back checked). Every file is written atomically
(temp file + rename), the config last.

After basis refreshes (`sparsegrad.refresh_bases`) the file also holds each folded segment s (oldest first):
``folded/<s>/bases/u_out/<kind>``, ``folded/<s>/bases/u_in/<kind>``, ``folded/<s>/<module>.delta_indices`` and
``.delta_values``; such an adapter is format version 2 (``folded_segments`` in the JSON), and loading replays the
segments in order before the live delta, so the weights are bit-identical to the trained model's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from .bases import SparseGradBases, check_orthogonal
from .config import SparseGradConfig
from .delta import check_delta, restore_delta, trained_parameters
from .io import atomic_write_bytes, read_json_object, read_safetensors, sha256_bytes, tensors_sha256
from .model import CONFIG_ATTR, PRETRAINED_HASH_ATTR, get_sparsegrad_model, sparsegrad_layers
from .targets import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "sparsegrad-adapter"
VERSION = 2  # written only when there are folded segments; an adapter without them stays version 1
VERSIONS = (1, 2)


def check_adapter_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> None:
    """The contents of an adapter, before anything is loaded: every listed layer's delta (`check_delta`), finite
    bases, and every trained parameter the config lists, present, with its recorded shape, finite."""
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: {CONFIG_NAME} lists no layers; the adapter is damaged")
    shapes = (meta.get("base_fingerprint") or {}).get("target_shapes") or {}
    for name in layers:
        check_delta(name, tensors.get(f"{name}.delta_indices"), tensors.get(f"{name}.delta_values"), where,
                    shapes.get(name))
    segments = meta.get("folded_segments", 0)
    if isinstance(segments, bool) or not isinstance(segments, int) or segments < 0:
        raise ValueError(f"{where}: {CONFIG_NAME} records folded_segments={segments!r}; the adapter is damaged")
    for s in range(segments):
        for name, info in layers.items():
            prefix = f"folded/{s}/{name}"
            check_delta(f"folded segment {s} of {name}", tensors.get(f"{prefix}.delta_indices"),
                        tensors.get(f"{prefix}.delta_values"), where, shapes.get(name))
            kind = info.get("kind") if isinstance(info, dict) else None
            for side in ("u_out", "u_in"):
                basis = tensors.get(f"folded/{s}/bases/{side}/{kind}")
                if basis is None or basis.dim() != 2 or basis.shape[0] != basis.shape[1]:
                    raise ValueError(f"{where} lacks the {side} basis of folded segment {s}, kind {kind!r} "
                                     "(missing or not square); the adapter is damaged")
    bases = [k for k in tensors if k.startswith("bases/") or k.startswith("folded/") and "/bases/" in k]
    bad_bases = [k for k in bases if not bool(torch.isfinite(tensors[k]).all())]
    if bad_bases:
        raise ValueError(f"{where}: {bad_bases[0]} holds NaN or inf; the adapter is damaged")
    if bases and meta.get("identity_basis"):
        raise ValueError(f"{where} holds bases but {CONFIG_NAME} records identity_basis=true; the config was edited")
    for key in bases:
        check_orthogonal(tensors[key], f"{where}: {key}")
    trained = meta.get("trainable_params") or {}
    for name, shape in trained.items():
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{where} lacks the trained parameter {name} that {CONFIG_NAME} lists")
        if list(t.shape) != list(shape):
            raise ValueError(f"{where}: {name} is {list(t.shape)}, {CONFIG_NAME} records {list(shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{where}: {name} is {t.dtype}; trained parameters are floating point (the file was "
                             "edited)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} holds NaN or inf; the adapter is unusable")
    prefixes = ["", *(f"folded/{s}/" for s in range(segments))]
    deltas = {f"{prefix}{n}.{part}" for prefix in prefixes for n in layers
              for part in ("delta_indices", "delta_values")}
    known = set(bases) | set(trained) | deltas
    unlisted = sorted(set(tensors) - known)
    if unlisted:
        raise ValueError(f"{where} holds {unlisted[:3]}, which {CONFIG_NAME} does not list (as a layer or in "
                         "trainable_params): the config was edited or comes from another save")


def bases_fingerprint(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """sha256 over the kinds and fp32 bytes of a set of bases."""
    return tensors_sha256([(f"{kind}/{side}", t.float())
                          for kind in sorted(factors) for side, t in zip(("u_out", "u_in"), factors[kind])])


def save_adapter(model: nn.Module, path: str | Path, *, save_bases: bool = True,
                 extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write the adapter of a converted (and trained) model into directory ``path``; returns the directory.

    The bases (out² + in² floats per kind) can outweigh the deltas on small models. With ``save_bases=False`` the
    adapter keeps only their fingerprint, and `load_adapter` needs the same bases passed in (e.g. a calibration
    file shared by several adapters of one base), like PEFT's VeRA without ``save_projection``.
    ``extra_files``: sidecar files (plain names -> contents, e.g. ``{"task.json": ...}``) written beside the adapter
    and covered by its checksums: `read_adapter` refuses the adapter if one is edited, missing or replaced.
    """
    extra_files = dict(extra_files or {})
    for name, data in extra_files.items():
        if (not isinstance(name, str) or not name or name in (CONFIG_NAME, WEIGHTS_NAME) or name.startswith(".")
                or Path(name).name != name):
            raise ValueError(f"extra_files: {name!r} must be a plain file name other than {CONFIG_NAME} and "
                             f"{WEIGHTS_NAME}")
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"extra_files[{name!r}] must be bytes, got {type(data).__name__}")
    config: SparseGradConfig | None = getattr(model, CONFIG_ATTR, None)
    layers = sparsegrad_layers(model)
    if config is None or not layers:
        raise ValueError("save_adapter needs a model converted with sg.get_sparsegrad_model")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"adapter path {path} exists and is not a directory")
    tensors: dict[str, torch.Tensor] = {}
    layer_info: dict[str, Any] = {}
    identity = all(layer.identity_basis for layer in layers.values())
    for name, layer in layers.items():
        if not identity and save_bases and f"bases/u_out/{layer.kind}" not in tensors:
            tensors[f"bases/u_out/{layer.kind}"] = layer.u_out.detach().float().cpu().contiguous()
            tensors[f"bases/u_in/{layer.kind}"] = layer.u_in.detach().float().cpu().contiguous()
        tensors[f"{name}.delta_indices"] = layer.delta_indices.detach().to(layer.index_dtype).cpu().contiguous()
        values = layer.delta_values.detach().float().cpu()
        tensors[f"{name}.delta_values"] = (values[:0] if layer.support_pending else values).contiguous()
        layer_info[name] = {"kind": layer.kind, "k": layer.k, "shape": [layer.out_features, layer.in_features],
                            "support_size": int(layer.delta_indices.numel()), "dtype": str(layer.weight.dtype)}
    segments = {len(layer.folded) for layer in layers.values()}
    if len(segments) != 1:
        raise ValueError("the SparseGrad layers were refreshed different numbers of times "
                         f"({sorted(segments)}): refresh the whole model with sg.refresh_bases")
    segments = segments.pop()
    for name, layer in layers.items():
        for s, seg in enumerate(layer.folded):
            for side in ("u_out", "u_in"):
                tensors.setdefault(f"folded/{s}/bases/{side}/{layer.kind}", seg[side].float().contiguous())
            tensors[f"folded/{s}/{name}.delta_indices"] = seg["indices"].to(layer.index_dtype).contiguous()
            tensors[f"folded/{s}/{name}.delta_values"] = seg["values"].float().contiguous()
    extra = trained_parameters(model)
    for name, p in extra.items():
        tensors[name] = p.detach().cpu().contiguous()
    blob = st_save(tensors, metadata={"format": FORMAT})
    meta = {
        "format": FORMAT,
        "version": VERSION if segments else 1,
        "folded_segments": segments,
        "config": config.to_dict(),
        "identity_basis": identity,
        "bases_saved": bool(save_bases and not identity),
        "bases_sha256": None if identity else bases_fingerprint(
            {l.kind: (l.u_out, l.u_in) for l in layers.values()}),
        "layers": layer_info,
        "trainable_params": {n: list(p.shape) for n, p in extra.items()},
        "base_fingerprint": {
            # of the pretrained weights: after a refresh the frozen weight holds folded deltas
            "target_weights_sha256": getattr(model, PRETRAINED_HASH_ATTR, None)
            or tensors_sha256([(n, l.base_weight) for n, l in layers.items()]),
            "target_shapes": {n: [l.out_features, l.in_features] for n, l in layers.items()},
        },
        "weights_sha256": sha256_bytes(blob),
    }
    if extra_files:
        meta["extra_files"] = {name: sha256_bytes(bytes(data)) for name, data in sorted(extra_files.items())}
    meta["config_sha256"] = config_sha256(meta)
    atomic_write_bytes(path / WEIGHTS_NAME, blob)
    for name, data in extra_files.items():
        atomic_write_bytes(path / name, bytes(data))
    atomic_write_bytes(path / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return path


def config_sha256(meta: dict[str, Any]) -> str:
    """sha256 of an adapter config's canonical JSON (sorted keys, no spaces), ``config_sha256`` itself left out:
    re-indenting the file keeps it, changing any value does not."""
    body = {k: v for k, v in meta.items() if k != "config_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# key -> (accepted types, what it must be); checked before any value is used, so an edit is one clear line
_META_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "config": ((dict,), "an object of SparseGradConfig fields"),
    "layers": ((dict,), "an object: module name -> layer record"),
    "trainable_params": ((dict,), "an object: parameter name -> shape"),
    "base_fingerprint": ((dict,), "an object with target_weights_sha256 and target_shapes"),
    "identity_basis": ((bool,), "true or false"),
    "weights_sha256": ((str,), "a sha256 string"),
}


def _check_meta(meta: dict[str, Any], cfg_file: Path) -> None:
    """Every key `load_adapter` reads is there with the right type (before any of them is used)."""
    for key, (types, what) in _META_KEYS.items():
        if key not in meta:
            raise ValueError(f"{cfg_file} lacks the key {key!r}: the adapter is damaged or was edited")
        if not isinstance(meta[key], types):
            raise ValueError(f"{cfg_file}: {key!r} must be {what}, got {json.dumps(meta[key])[:60]}; the adapter is "
                             "damaged or was edited")
    fingerprint = meta["base_fingerprint"]
    for key, types in (("target_weights_sha256", (str,)), ("target_shapes", (dict,))):
        if not isinstance(fingerprint.get(key), types):
            raise ValueError(f"{cfg_file} lacks base_fingerprint.{key}: the adapter is damaged or was edited")
    for name, info in meta["layers"].items():
        if not isinstance(info, dict) or not isinstance(info.get("kind"), str):
            raise ValueError(f"{cfg_file}: layers[{name!r}] lacks its 'kind': the adapter is damaged or was edited")
    if set(meta["layers"]) != set(fingerprint["target_shapes"]):
        raise ValueError(f"{cfg_file}: 'layers' and base_fingerprint.target_shapes list different modules: the "
                         "adapter is damaged or was edited")
    for name, shape in meta["trainable_params"].items():
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise ValueError(f"{cfg_file}: trainable_params[{name!r}] must be a list of sizes, got {shape!r}")
    if not isinstance(meta.get("extra_files", {}), dict):
        raise ValueError(f"{cfg_file}: 'extra_files' must be an object: file name -> sha256")


def _check_config_sha(meta: dict[str, Any], cfg_file: Path) -> None:
    if "config_sha256" in meta and meta["config_sha256"] != config_sha256(meta):  # absent: saved before it existed
        raise ValueError(f"{cfg_file} was edited after saving (config_sha256 differs): restore it or save the "
                         "adapter again")


def read_adapter_file(path: str | Path, name: str) -> bytes:
    """The bytes of a sidecar file saved with ``save_adapter(..., extra_files=...)``, checked against the adapter's
    config (whose own checksum is checked). ValueError if it is missing, edited or not recorded."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    meta = _read_meta(cfg_file)
    _check_meta(meta, cfg_file)
    _check_config_sha(meta, cfg_file)
    return _checked_extra(path, meta, name)


def _checked_extra(path: Path, meta: dict[str, Any], name: str) -> bytes:
    recorded = (meta.get("extra_files") or {}).get(name)
    if not isinstance(recorded, str):
        raise ValueError(f"{path / CONFIG_NAME} records no file {name!r} (saved without it, or edited)")
    file = path / name
    if not file.is_file():
        raise ValueError(f"{file} is missing: the adapter is incomplete (it was saved with it)")
    data = file.read_bytes()
    if sha256_bytes(data) != recorded:
        raise ValueError(f"{file} was edited or replaced after saving (its checksum differs from {CONFIG_NAME}); "
                         "restore it or save the adapter again")
    return data


def read_adapter(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and check an adapter directory: (metadata, tensors). Checks the format, version, the keys and types of
    the config, the weights checksum, the contents (`check_adapter_tensors`), the sidecar files and the config's
    own checksum: a damaged or hand-edited file is refused with a message naming the key, tensor or file."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    meta = _read_meta(cfg_file)
    if meta.get("version") not in VERSIONS:
        raise ValueError(f"adapter format version {meta.get('version')!r} is not supported (this reads "
                         f"{', '.join(map(str, VERSIONS))})")
    if meta.get("version") == 1 and meta.get("folded_segments", 0):
        raise ValueError(f"{cfg_file}: a version-1 adapter cannot hold folded segments; the file was edited")
    _check_meta(meta, cfg_file)
    tensors, blob = read_safetensors(path / WEIGHTS_NAME, "adapter weights")
    if sha256_bytes(blob) != meta.get("weights_sha256"):
        raise ValueError(
            f"{path / WEIGHTS_NAME} does not match {CONFIG_NAME} (checksum differs): the files come from "
            "different saves or one was altered"
        )
    check_adapter_tensors(meta, tensors, str(path / WEIGHTS_NAME))  # the specific message first, if any
    for name in meta.get("extra_files") or {}:
        _checked_extra(path, meta, name)
    _check_config_sha(meta, cfg_file)
    return meta, tensors


def _read_meta(cfg_file: Path) -> dict[str, Any]:
    if not cfg_file.parent.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {cfg_file.parent}")
    return read_json_object(cfg_file, "a sparsegrad adapter config", FORMAT)


def saved_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trained state a `read_adapter` result holds, as `restore_delta` takes it back: each layer's live delta
    and the other trained parameters, by model name (the folded segments and bases aside)."""
    names = [*(f"{name}.{part}" for name in meta["layers"] for part in ("delta_indices", "delta_values")),
             *meta["trainable_params"]]
    return {name: tensors[name] for name in names}


def saved_bases(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """kind -> (u_out, u_in) of the live bases an adapter holds (none for identity bases or ``save_bases=False``)."""
    kinds = {info["kind"] for info in meta["layers"].values()}
    return {kind: (tensors[f"bases/u_out/{kind}"], tensors[f"bases/u_in/{kind}"]) for kind in sorted(kinds)
            if f"bases/u_out/{kind}" in tensors and f"bases/u_in/{kind}" in tensors}


def load_adapter(base_model: nn.Module, path: str | Path, *, bases: SparseGradBases | None = None) -> nn.Module:
    """Convert ``base_model`` in place and load the adapter at ``path`` into it; returns the model, whose outputs
    equal those of the model that was saved. Refuses a base with other shapes, dtype or target weights, and, after
    loading, a result that is not finite (`check_finite_weights`; the model is converted by then: discard it).
    ``bases`` is needed only for an adapter saved with ``save_bases=False`` (it must be the same bases)."""
    meta, tensors = read_adapter(path)
    try:
        config = SparseGradConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{Path(path) / CONFIG_NAME}: 'config' is not a valid SparseGradConfig ({exc})") from None
    targets = dict(find_targets(base_model, config))
    fingerprint = meta["base_fingerprint"]
    expected = fingerprint["target_shapes"]
    if set(targets) != set(expected):
        missing, extra = sorted(set(expected) - set(targets)), sorted(set(targets) - set(expected))
        raise ValueError(f"base model does not fit the adapter (this adapter belongs to another base): modules "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in expected.items():
        if list(targets[name].weight.shape) != shape:
            raise ValueError(
                f"base model does not fit the adapter (this adapter belongs to another base): {name} is "
                f"{list(targets[name].weight.shape)}, the adapter was trained on {shape}"
            )
    _check_base_dtype(targets, meta["layers"])
    if tensors_sha256([(n, targets[n].weight) for n in expected]) != fingerprint["target_weights_sha256"]:
        raise ValueError("base model weights differ from those the adapter was trained on (target weight hash): "
                         "this adapter belongs to another base or another checkpoint of it")
    params = dict(base_model.named_parameters())
    for name, shape in meta["trainable_params"].items():
        if name not in params:
            raise ValueError(f"base model has no parameter {name!r} that the adapter trained")
        if list(params[name].shape) != shape:
            raise ValueError(f"this adapter belongs to another base: its parameter {name} is {shape}, the base's is "
                             f"{list(params[name].shape)} (e.g. another number of labels or another vocabulary)")
    layers = meta["layers"]
    if not meta["identity_basis"] and not meta.get("bases_saved", True):
        if bases is None:
            raise ValueError("this adapter was saved without its bases (save_bases=False): pass bases=... "
                             "(the SparseGradBases it was trained with)")
        kinds = {info["kind"] for info in layers.values()}
        if bases_fingerprint({k: bases.get(k) for k in kinds}) != meta["bases_sha256"]:
            raise ValueError("the bases passed to load_adapter are not the ones the adapter was trained with")
        bases = SparseGradBases(factors={k: bases.get(k) for k in kinds})
    elif meta["identity_basis"]:
        from .bases import identity_bases

        bases = identity_bases(base_model, config)
    else:
        factors = saved_bases(meta, tensors)
        missing = sorted({info["kind"] for info in layers.values()} - set(factors))
        if missing:
            raise ValueError(f"adapter weights lack the bases of kind {missing[0]!r}")
        bases = SparseGradBases(factors=factors)
    get_sparsegrad_model(base_model, config, bases)
    segments = meta.get("folded_segments", 0)
    if segments:  # the frozen weights first: the live delta is restored on top of the replayed segments
        with torch.no_grad():
            for name, layer in sparsegrad_layers(base_model).items():
                layer.replay_folded([
                    {"u_out": tensors[f"folded/{s}/bases/u_out/{layer.kind}"].float(),
                     "u_in": tensors[f"folded/{s}/bases/u_in/{layer.kind}"].float(),
                     "indices": tensors[f"folded/{s}/{name}.delta_indices"],
                     "values": tensors[f"folded/{s}/{name}.delta_values"].float()} for s in range(segments)])
        setattr(base_model, PRETRAINED_HASH_ATTR, fingerprint["target_weights_sha256"])
    restore_delta(base_model, saved_state(meta, tensors), str(Path(path) / WEIGHTS_NAME))
    check_finite_weights(base_model, f"the model loaded with the adapter {path}")
    return base_model


MAX_DELTA_RATIO = 1e4
"""`check_finite_weights` refuses a SparseGrad layer whose trained weight W moved more than this many times the
largest |entry| of its pretrained weight W0 (at least 1): fine-tuning moves weights by a small fraction of W0, and a
delta this large overflows in the forward (a finite 3e38 gave NaN logits) even when every weight is finite."""


def check_finite_weights(model: nn.Module, where: str) -> None:
    """PEFT's safe_merge check, after loading or merging: every floating-point parameter and buffer is finite, and
    no SparseGrad layer's delta exceeds `MAX_DELTA_RATIO` times its base weight. ValueError naming the first."""
    for layer_name, layer in sparsegrad_layers(model).items():
        with torch.no_grad():
            base = float(layer.base_weight.abs().max()) if layer.base_weight.numel() else 0.0
            moved = float((layer.weight.float() - layer.base_weight.float()).abs().max())
        if not math.isfinite(moved) or moved > MAX_DELTA_RATIO * max(base, 1.0):
            raise ValueError(f"{where}: the delta of {layer_name} reaches {moved:.3g}, over {MAX_DELTA_RATIO:g} x the "
                             f"base weight (max {base:.3g}); the adapter is unusable (training diverged)")
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {name} holds NaN or inf (PEFT's safe_merge check); the adapter is unusable "
                             "with this base")


def _check_base_dtype(targets: dict[str, nn.Module], layers: dict[str, Any]) -> None:
    """A base loaded in another dtype than the adapter was trained on: say so (its weight hash differs too)."""
    for name, info in layers.items():
        saved = info.get("dtype")
        now = str(targets[name].weight.dtype)
        if isinstance(saved, str) and saved != now:
            wanted = saved.removeprefix("torch.")
            raise ValueError(f"the base model is {now.removeprefix('torch.')} but the adapter was trained on "
                             f"{wanted} weights ({name}): load the base with torch_dtype=torch.{wanted}")

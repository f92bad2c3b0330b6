"""LoRA (peft) on the same MLP modules, rank matched to the budget so that ``r * (in + out) ~= k`` (rounded, at
least 1), ``lora_alpha = r`` (scale 1), no dropout. The other trained parameters (biases, head; everything in scope
'all') are saved beside peft's adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from sparsegrad.delta import restore_delta
from sparsegrad.io import atomic_write_bytes, read_safetensors
from sparsegrad.matrices import LinearView

from .base import (
    TRAINED_PARAMS_FILE,
    Method,
    Prepared,
    Setup,
    base_param_name,
    prepared,
    quiet_peft,
    select_targets,
    total_numel,
    trainable_numel,
    trained_params,
    write_files,
)


LORA_WEIGHTS = "adapter_model.safetensors"
"""peft's safetensors weights file (with ``safe_serialization``, its default)."""


def lora_rank_for_budget(k: float, in_features: float, out_features: float) -> int:
    """The LoRA rank whose parameters per matrix, r * (in + out), come closest to k (at least 1)."""
    return max(1, int(round(k / (in_features + out_features))))


def check_rank(rank: int, modules: list[tuple[str, nn.Module]]) -> None:
    """A rank above a matrix's smallest dimension adds parameters but no freedom (B @ A is at most that rank):
    refused, naming the matrix (a rank matched to the budget never exceeds it)."""
    name, module = min(modules, key=lambda item: min(item[1].weight.shape))
    out_features, in_features = module.weight.shape[:2]
    if rank > min(out_features, in_features):
        raise ValueError(f"lora_rank {rank} exceeds the smallest dimension of {name} ({out_features}x{in_features}): "
                         f"choose a rank <= {min(out_features, in_features)}")


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """peft LoRA layers of a wrapped model, by base-model module name."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and "default" in getattr(module, "lora_A", {}):
            out[base_param_name(name)] = module
    return out


@torch.no_grad()
def lora_delta(module: nn.Module) -> torch.Tensor:
    """The merged update B @ A * scale of one peft LoRA layer (adapter "default"), fp32."""
    a = module.lora_A["default"].weight.float()
    b = module.lora_B["default"].weight.float()
    return (b @ a) * float(module.scaling["default"])


class Lora(Method):
    name = "lora"
    takes_lora_rank = True

    def prepare(self, model: nn.Module, setup: Setup) -> Prepared:
        from peft import LoraConfig, get_peft_model

        targets = select_targets(model, setup)
        targets.refuse_experts(self.name)
        mods = targets.modules
        n_mat = len(mods)
        mean_in = sum(m.weight.shape[1] for _, m in mods) / n_mat
        mean_out = sum(m.weight.shape[0] for _, m in mods) / n_mat
        rank = setup.lora_rank if setup.lora_rank is not None else lora_rank_for_budget(targets.mean_k, mean_in,
                                                                                         mean_out)
        check_rank(rank, mods)
        keep = {p for p in model.parameters() if p.requires_grad} - targets.weights()
        # peft ignores layers_to_transform for a regex: name the chosen modules instead.
        names = targets.names if setup.layers_to_transform is not None else targets.config.target_modules
        conv1d = any(isinstance(m, LinearView) for _, m in mods)  # GPT-2's Conv1D stores its weight in x out
        lora_cfg = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=names, bias="none",
                              modules_to_save=None, fan_in_fan_out=conv1d)
        with quiet_peft():
            model = get_peft_model(model, lora_cfg)
        lora_params = {p for n, p in model.named_parameters() if "lora_" in n}
        for p in model.parameters():  # LoRA's factors, and the scope's biases, head (and the rest in 'all')
            p.requires_grad_(p in lora_params or p in keep)
        if len(lora_modules(model)) != n_mat:
            raise RuntimeError(f"peft wrapped {len(lora_modules(model))} modules, the target pattern matches {n_mat}")
        k_per_matrix = {n: rank * (m.weight.shape[0] + m.weight.shape[1]) for n, m in mods}
        per = sorted(set(k_per_matrix.values()))
        dims = "/".join(str(s) for s in sorted({m.weight.shape[1] + m.weight.shape[0] for _, m in mods}))
        description = (f"lora: rank {rank} (lora_alpha {rank}, scale 1.0, no dropout) on {n_mat} MLP matrices: "
                       f"r*(in+out) = {rank}*{dims} = {'/'.join(map(str, per))} parameters per matrix, matched to "
                       f"{targets.budget_text}; scope {setup.train_scope}: {targets.scope_text}")
        return prepared(model, self, setup, targets, k_per_matrix, description, trainable_numel(model),
                        total_numel(model), lora_rank=rank, lora_alpha=float(rank))

    def save(self, prepared: Prepared, folder: Path, extra_files: dict[str, bytes]) -> None:
        model = prepared.model
        model.save_pretrained(str(folder))
        write_files(folder, extra_files)  # covered by the folder marker's checksums
        extra = trained_params(model, {id(p) for n, p in model.named_parameters() if "lora_" in n})
        if extra:
            atomic_write_bytes(folder / TRAINED_PARAMS_FILE, st_save(extra, metadata={"format": "pt"}))

    def load(self, base: nn.Module, folder: Path, *, merge: bool) -> nn.Module:
        from peft import PeftModel

        if not (folder / LORA_WEIGHTS).is_file():  # peft would fall back to a pickled adapter_model.bin
            raise ValueError(f"{folder} holds no {LORA_WEIGHTS}: sparsegrad reads LoRA weights from safetensors only "
                             "(never a pickled .bin)")
        extra = folder / TRAINED_PARAMS_FILE
        if extra.is_file():
            restore_delta(base, read_safetensors(extra, "trained parameters")[0], str(extra))
        with quiet_peft():
            wrapped = PeftModel.from_pretrained(base, str(folder))
        return wrapped.merge_and_unload() if merge else wrapped

    def entries_updated(self, prepared: Prepared, snapshot: Any) -> int:
        return sum(int(torch.count_nonzero(lora_delta(m))) for m in lora_modules(prepared.model).values())

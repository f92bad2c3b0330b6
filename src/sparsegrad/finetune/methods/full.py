"""Full fine-tuning of the target MLP matrices: every entry, every step (plain AdamW)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from sparsegrad.delta import restore_delta
from sparsegrad.io import atomic_write_bytes, read_safetensors

from .base import (
    TRAINED_PARAMS_FILE,
    Method,
    Prepared,
    Setup,
    mlp_matrices,
    prepared,
    select_targets,
    total_numel,
    trainable_numel,
    trained_params,
    write_files,
)


class Full(Method):
    name = "full"
    dense = True

    def prepare(self, model: nn.Module, setup: Setup) -> Prepared:
        targets = select_targets(model, setup)
        targets.refuse_experts(self.name)
        description = (f"full: {len(targets.modules)} MLP matrices train densely (every entry every step; the sparse "
                       f"budget would be {targets.budget_text}); scope {setup.train_scope}: {targets.scope_text}")
        k_per_matrix = {n: m.weight.numel() for n, m in targets.modules}
        return prepared(model, self, setup, targets, k_per_matrix, description, trainable_numel(model),
                        total_numel(model))

    def save(self, prepared: Prepared, folder: Path, extra_files: dict[str, bytes]) -> None:
        atomic_write_bytes(folder / TRAINED_PARAMS_FILE,
                           st_save(trained_params(prepared.model), metadata={"format": "pt"}))
        write_files(folder, extra_files)  # covered by the folder marker's checksums

    def load(self, base: nn.Module, folder: Path, *, merge: bool) -> nn.Module:
        tensors, _ = read_safetensors(folder / TRAINED_PARAMS_FILE, "trained parameters")
        restore_delta(base, tensors, str(folder / TRAINED_PARAMS_FILE))  # the trained parameters, checked
        return base

    def snapshot(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        return {n: w.detach().clone() for n, w in mlp_matrices(prepared.model, prepared.target_names).items()}

    @torch.no_grad()
    def entries_updated(self, prepared: Prepared, snapshot: Any) -> int:
        current = mlp_matrices(prepared.model, prepared.target_names)
        return sum(int(torch.count_nonzero(current[n] != snapshot[n])) for n in prepared.target_names)

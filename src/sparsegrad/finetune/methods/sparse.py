"""SparseGrad and MeProp: exactly k entries of each MLP matrix train per step, in HOSVD bases calibrated on a few
training batches (`sg.estimate_bases`, SparseGrad) or in identity bases (MeProp: top-k of the plain gradient; the
basis is the only difference)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from torch import nn

import sparsegrad as sg
from sparsegrad.bases import broadcast_bases
from sparsegrad.model import CONFIG_ATTR

from ..distributed import env_world_size
from .base import Method, Prepared, Setup, apply_scope, prepared, select_targets


def layer_params(model: nn.Module) -> set[nn.Parameter]:
    """What the SparseGrad layers train: a dynamic layer's dense effective weight, a fixed layer's k values (each
    as the layer sets it up), and the MLP biases."""
    out: set[nn.Parameter] = set()
    for layer in sg.sparsegrad_layers(model).values():
        for p in (layer.weight, layer.delta_values, layer.bias):
            if isinstance(p, nn.Parameter) and (p is layer.bias or p.requires_grad):
                out.add(p)
    return out


def check_layerwise_flags(cfg: Any) -> None:
    """``--layerwise-step`` steps each layer inside the backward: refuse what needs the whole step's gradient."""
    world = env_world_size()
    clash = [flag for flag, on in (("--support fixed", cfg.support == "fixed"),
                                   (f"--grad-accum {cfg.grad_accum}", cfg.grad_accum != 1),
                                   (f"torchrun ({world} processes)", world > 1),
                                   ("--on-nonfinite skip", cfg.on_nonfinite == "skip"),
                                   ("--refresh-every", cfg.refresh_every is not None)) if on]
    if clash:
        raise ValueError(f"--layerwise-step does not work with {', '.join(clash)}: each dynamic layer steps inside "
                         "the backward, before the step's whole gradient (all micro-batches, all processes) exists")


class Sparse(Method):
    sparse = True

    def __init__(self, name: str, *, identity: bool) -> None:
        self.name = name
        self.identity = identity
        self.calibrates = not identity

    def prepare(self, model: nn.Module, setup: Setup) -> Prepared:
        targets = select_targets(model, setup)
        calibration_time, bases = 0.0, setup.bases
        if self.identity:
            bases = sg.identity_bases(model, targets.config)
            basis_text = "identity bases (MeProp: top-k of the plain gradient)"
        else:
            if bases is None:
                bases, calibration_time = self._calibrate(model, targets.config, setup)
            calib_steps = next(iter(bases.report.values()), {}).get("steps")
            basis_text = f"HOSVD bases from {calib_steps} calibration steps" if calib_steps else "given HOSVD bases"
        sg.get_sparsegrad_model(model, targets.config, bases)
        apply_scope(model, layer_params(model), setup.train_scope, setup.head_names)
        trainable, total = sg.count_parameters(model)
        description = (f"{self.name}: {len(targets.modules)} MLP matrices, {targets.budget_text} entries each per "
                       f"step, {setup.support} support, {basis_text}; scope {setup.train_scope}: {targets.scope_text}")
        return prepared(model, self, setup, targets, dict(targets.budgets), description, trainable, total,
                        calibration_time_s=calibration_time,
                        bases_report=None if self.identity else bases.report, bases=bases)

    @staticmethod
    def _calibrate(model: nn.Module, config: sg.SparseGradConfig, setup: Setup):
        if setup.calibration_batches is None:
            raise ValueError("method 'sparsegrad' needs calibration_batches (a few training batches)")
        options = dict(setup.calibration_options)
        start = time.perf_counter()
        bases = sg.estimate_bases(model, config, setup.calibration_batches, loss_fn=setup.loss_fn,
                                  steps=setup.calibration_steps, progress=setup.progress, **options)
        if options.get("all_reduce_grads"):  # every rank converts with rank 0's bases
            bases = broadcast_bases(bases, src=0)
        return bases, time.perf_counter() - start

    def save(self, prepared: Prepared, folder: Path, extra_files: dict[str, bytes]) -> None:
        sg.save_adapter(prepared.model, folder, extra_files=extra_files)  # the adapter's checksums cover them

    def load(self, base: nn.Module, folder: Path, *, merge: bool) -> nn.Module:
        sg.load_adapter(base, folder)
        return sg.merge_and_unload(base) if merge else base

    def entries_updated(self, prepared: Prepared, snapshot: Any) -> int:
        return sum(layer.entries_updated() for layer in sg.sparsegrad_layers(prepared.model).values())

    def on_step(self, step: int, prepared: Prepared, upcoming: list[Any], optimizer: Any, cfg: Any) -> float | None:
        """Basis refresh every ``cfg.refresh_every`` steps: recalibrate at the current point on the next
        ``calibration_steps`` batches (they are then trained on as usual), fold the delta into the frozen weight,
        continue in the new bases."""
        if not (self.calibrates and cfg.refresh_every and step and step % cfg.refresh_every == 0):
            return None
        start = time.perf_counter()
        model = prepared.model
        fresh = sg.estimate_bases(model, getattr(model, CONFIG_ATTR), upcoming[: cfg.calibration_steps],
                                  progress=False)
        sg.refresh_bases(model, fresh, optimizer)
        return round(time.perf_counter() - start, 3)

    def check(self, cfg: Any) -> None:
        super().check(cfg)
        if getattr(cfg, "layerwise_step", False):
            check_layerwise_flags(cfg)
        if cfg.refresh_every is not None:
            clash = [flag for flag, on in (("--grad-accum", cfg.grad_accum != 1),
                                           ("--save-every", cfg.save_every is not None),
                                           ("--resume", cfg.resume is not None),
                                           ("--stop-after", cfg.stop_after is not None)) if on]
            if clash:
                raise ValueError(f"--refresh-every does not work with {', '.join(clash)} yet: checkpoints do not "
                                 "hold refreshed bases, and a refresh recalibrates on whole batches")

"""Where a run computes and in what precision.

``--device auto`` takes the GPU when there is one (``cuda``), else the CPU; under torchrun each rank keeps the
device `distributed.setup_distributed` gave it (its local GPU with NCCL, the CPU with gloo). ``--dtype bfloat16``
means, on a GPU, bf16 autocast around the model's forward passes (training, calibration, evaluation, generation)
while the weights, SparseGrad bases and deltas and the optimizer state stay fp32 (conversion stays exact); on the
CPU, where autocast is slow, the weights themselves are loaded in bf16 (SparseGrad bases and deltas stay fp32).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .distributed import DistContext
from .errors import UsageError


def pick_device(choice: str, ctx: DistContext) -> torch.device:
    """The device of this process for ``--device`` ``choice`` (auto, cpu, cuda)."""
    if ctx.enabled:
        if choice != "auto" and choice != ctx.device.type:
            raise UsageError(f"--device {choice}: under torchrun each process uses "
                             f"{'its local GPU' if ctx.device.type == 'cuda' else 'the CPU'} ({ctx.device}); "
                             "leave --device out")
        return ctx.device
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here (no GPU, or a CPU-only torch build); use "
                         "--device cpu or auto")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.reset_peak_memory_stats(device)
        return device
    return torch.device("cpu")


def peak_gpu_memory_mb(device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` of the run's GPU in MB (None on the CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@dataclass(frozen=True)
class Precision:
    device: torch.device
    weights: torch.dtype
    """The dtype the model's weights are loaded in."""
    autocast_dtype: str | None
    """``bfloat16`` when forward passes run under autocast (GPU), else None."""

    @classmethod
    def of(cls, dtype: str, device: torch.device) -> "Precision":
        if dtype == "float32":
            return cls(device, torch.float32, None)
        if device.type == "cuda":
            return cls(device, torch.float32, dtype)
        return cls(device, getattr(torch, dtype), None)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=getattr(torch, self.autocast_dtype))

    def wrap_loss(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
        """``loss_fn`` run under `autocast` (for calibration)."""
        if self.autocast_dtype is None:
            return loss_fn

        def wrapped(model, batch):
            with self.autocast():
                return loss_fn(model, batch)

        return wrapped

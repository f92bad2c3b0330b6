"""Test-only fault injection, read from the environment by the training loop (inactive unless a variable is set)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch
from torch import nn

TEST_NAN_ENV = "SPARSEGRAD_TEST_NAN_AT_STEP"
"""``STEP`` or ``STEP:loss`` makes the loss of that step NaN; ``STEP:grad`` one gradient entry (rank
``SPARSEGRAD_TEST_NAN_RANK``, default 0)."""
TEST_SIGNAL_ENV = "SPARSEGRAD_TEST_SIGNAL_AT_STEP"
"""``STEP:TERM`` or ``STEP:INT``: the process (rank 0) sends itself that signal once that step is done."""


@dataclass
class FaultInjection:
    """Test-only faults read from the environment (see `TEST_NAN_ENV`, `TEST_SIGNAL_ENV`)."""

    nan_step: int | None = None
    nan_kind: str = "loss"
    nan_rank: int = 0
    signal_step: int | None = None
    signal_num: int | None = None

    @classmethod
    def from_env(cls) -> "FaultInjection":
        out = cls()
        spec = os.environ.get(TEST_NAN_ENV)
        if spec:
            step, _, kind = spec.partition(":")
            out.nan_step, out.nan_kind = int(step), (kind or "loss")
            out.nan_rank = int(os.environ.get("SPARSEGRAD_TEST_NAN_RANK", "0"))
        spec = os.environ.get(TEST_SIGNAL_ENV)
        if spec:
            step, _, name = spec.partition(":")
            out.signal_step = int(step)
            out.signal_num = signal.SIGINT if name.upper() in ("INT", "SIGINT") else signal.SIGTERM
        return out

    def poison_loss(self, loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
        if self.nan_step == step and self.nan_kind == "loss" and rank == self.nan_rank:
            return loss * float("nan")
        return loss

    def poison_grad(self, model: nn.Module, step: int, rank: int) -> None:
        if self.nan_step == step and self.nan_kind == "grad" and rank == self.nan_rank:
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.view(-1)[0] = float("nan")
                    return

    def maybe_signal(self, step: int, rank: int) -> None:
        if self.signal_step == step and rank == 0:
            os.kill(os.getpid(), self.signal_num)

"""The product's error types (a leaf: every layer may raise them, the CLI maps them to exit codes)."""

from __future__ import annotations

from pathlib import Path


class UsageError(ValueError):
    """A bad input (flag, file, model path): the CLI reports it as one line and exits with status 2."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (or the ranks disagree): exit status 1."""


class TrainingInterrupted(RuntimeError):
    """Training stopped early (SIGINT, SIGTERM, or ``stop_after``) after saving a checkpoint. ``exit_code`` is what
    the CLI exits with: 130 (SIGINT), 143 (SIGTERM), 0 (``stop_after``)."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint

"""The divergence guard: a finite training loss that rises far above where it started.

A NaN/inf loss is caught by the loop itself; a loss that stays finite but explodes (``--lr 1e3``: 1.1 -> 697 -> 5025
-> 575) would otherwise train on and write a useless adapter with exit status 0. The rule: the start is the lowest
loss of the first `BASELINE_STEPS` applied steps (so far: an explosion from step 2 on does not raise it, as a mean
would); from the second applied step on, a loss above `FACTOR` x the start and above `MIN_LOSS` on `PATIENCE`
consecutive applied steps is a divergence (a run that starts near zero loss and wobbles below 1 nat is not one).
Skipped steps (NaN) neither count nor reset the streak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

BASELINE_STEPS = 3
FACTOR = 10.0
PATIENCE = 3
MIN_LOSS = 1.0


@dataclass
class DivergenceGuard:
    baseline: list[float] = field(default_factory=list)
    streak: int = 0
    diverged_at: int | None = None  # the first step at which the rule fired

    def observe(self, step: int, loss: float) -> bool:
        """Record the loss of an applied step; True the first time the rule fires."""
        if not math.isfinite(loss):
            return False
        first = not self.baseline
        if len(self.baseline) < BASELINE_STEPS:
            self.baseline.append(loss)
        if first:
            return False
        self.streak = self.streak + 1 if loss > max(FACTOR * self.start, MIN_LOSS) else 0
        if self.streak >= PATIENCE and self.diverged_at is None:
            self.diverged_at = step
            return True
        return False

    @property
    def start(self) -> float:
        return min(self.baseline)

    def replay(self, losses: list[float]) -> None:
        """A resumed run: the losses before the checkpoint, so the guard continues as if never interrupted."""
        for i, loss in enumerate(losses, start=1):
            self.observe(i, loss)

    def message(self, loss: float) -> str:
        return (f"the training loss diverged: {loss:.4g} at step {self.diverged_at}, over {FACTOR:g} x its start "
                f"({self.start:.4g}, the lowest of the first {BASELINE_STEPS} steps) for {PATIENCE} steps in a row")

    def record(self) -> dict:
        rule = (f"loss > {FACTOR:g} x the lowest of the first {BASELINE_STEPS} applied steps (and > {MIN_LOSS:g}), "
                f"{PATIENCE} steps in a row")
        return {"rule": rule, "start_loss": self.start if self.baseline else None,
                "diverged_at_step": self.diverged_at}

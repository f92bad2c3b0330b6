"""Layer-wise optimizer step (GaLore's layer-wise mode) for dynamic-support SparseGrad weights.

Ordinarily the backward leaves a dense out x in gradient in every dynamic SparseGrad weight, and all of them are
held together until ``optimizer.step()``. In layer-wise mode each such weight takes its sparse step inside its
``register_post_accumulate_grad_hook``, the moment its gradient is complete, and its gradient is freed at once: at
most one layer's dense gradient (plus its rotation) is alive during the backward. The arithmetic is the ordinary
step's, layer by layer (`SparseGradAdamW.step_weight`), so the weights after N steps are the same
(`tests/test_optim.py`); the cost is one small host read per layer instead of one per step.

``optimizer.step()`` is still called after each backward: it steps every other parameter (AdamW) and finds the
dynamic weights already done (their ``.grad`` is None). A gradient that is not finite is not stepped in the hook but
left in ``.grad``, so that a caller's finiteness check (the training loop's) and ``step()`` refuse it as usual.

The hook fires on every backward, so the mode refuses what needs the whole step's gradient first: gradient
accumulation over several backwards, data parallelism (DDP all-reduces after the hooks), gradient clipping (the
norm needs every gradient). A calibration (``estimate_bases``, ``refresh_bases``) runs its own backwards: pause
the hooks around it (``with handle.paused():``). Core module: torch and stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class LayerwiseStepError(ValueError):
    """The layer-wise step cannot run with this setting."""


def check_layerwise(*, grad_accum: int = 1, max_grad_norm: float | None = None, distributed: bool = False) -> None:
    """Raise `LayerwiseStepError` (one line) when the layer-wise step cannot give the ordinary step's result."""
    if grad_accum != 1:
        raise LayerwiseStepError(f"the layer-wise step needs grad_accum 1, got {grad_accum}: each backward steps "
                                 "the layers at once, before a later micro-batch's gradient arrives")
    if max_grad_norm:
        raise LayerwiseStepError("the layer-wise step does not work with gradient clipping: the norm needs every "
                                 "layer's gradient, and each layer has already stepped when the backward ends")
    if distributed or _distributed():
        raise LayerwiseStepError("the layer-wise step does not work with data parallelism (DDP): the layers would "
                                 "step before the gradients are averaged over the processes")


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class LayerwiseStep:
    """The hooks that step ``optimizer``'s dynamic SparseGrad weights during the backward (`enable_layerwise_step`)."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self._paused = False
        self._handles = [param.register_post_accumulate_grad_hook(self._hook) for param in optimizer._layers]

    @torch.no_grad()
    def _hook(self, param: nn.Parameter) -> None:
        if self._paused:
            return
        if _distributed():
            check_layerwise(distributed=True)
        if not bool(torch.isfinite(param.grad).all()):
            return  # left in .grad: refused by the caller's check or by step(), as without this mode
        self.optimizer.step_weight(param)
        param.grad = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No layer-wise steps inside (a calibration's backwards); gradients accumulate as usual."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def remove(self) -> None:
        """Back to the ordinary step."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def enable_layerwise_step(optimizer, *, grad_accum: int = 1, max_grad_norm: float | None = None) -> LayerwiseStep:
    """Step ``optimizer``'s (a `SparseGradAdamW`) dynamic SparseGrad weights inside the backward, one layer at a
    time, freeing each dense gradient at once. Refuses (`LayerwiseStepError`) gradient accumulation, clipping and
    an initialised multi-process group. Returns the handle (``.paused()``, ``.remove()``)."""
    check_layerwise(grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    if not hasattr(optimizer, "step_weight"):
        raise LayerwiseStepError(f"the layer-wise step needs a SparseGradAdamW, got {type(optimizer).__name__}")
    return LayerwiseStep(optimizer)

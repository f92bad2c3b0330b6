"""transformers.Trainer integration: train a SparseGrad model with ``Trainer`` and keep checkpoints small.

Build the model and optimizer with the core API and hand them to ``Trainer`` (no fork of its loop)::

    model = AutoModelForSequenceClassification.from_pretrained(...)
    bases = sg.estimate_bases(model, cfg, calibration_batches)
    sg.get_sparsegrad_model(model, cfg, bases)
    opt = sg.create_optimizer(model, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / total_steps)
    trainer = SparseGradTrainer(model=model, args=TrainingArguments(...), train_dataset=...,
                                optimizers=(opt, sched))
    trainer.train()
    trainer.save_model("out")            # writes the adapter, not the base weights
    sg.load_adapter(fresh_base_model, "out")

Two ways to get the adapter out, pick one:

* `SparseGradTrainer` (recommended): a ``Trainer`` whose public ``save_model`` writes the SparseGrad adapter
  (``adapter_config.json`` + ``adapter_model.safetensors``, loadable with ``sg.load_adapter``) instead of
  ``model.safetensors``. Checkpoints (``checkpoint-N/``) then hold the adapter plus the usual optimizer, scheduler,
  RNG and trainer state, and *never the base weights*. ``resume_from_checkpoint`` and
  ``load_best_model_at_end`` restore the delta from the adapter (`restore_adapter`). Models without SparseGrad
  layers are saved as usual. ``save_only_model=True`` keeps only the adapter in each checkpoint.
* `SparseGradCallback`: for a ``Trainer`` you cannot subclass (e.g. another library's trainer). It writes the
  adapter into ``<output_dir>/sparsegrad_adapter/`` at the end of training (``on_train_end``) and, when the
  trainer saves checkpoints, into ``checkpoint-N/sparsegrad_adapter/``. Use it with ``save_strategy="no"``: the
  stock ``Trainer`` checkpoints a model by ``save_pretrained`` of its whole state dict, which for a converted model
  would be the base weights plus the layers' bases and deltas, and which fails in transformers 5.24 (the bases are
  non-contiguous buffers shared by all blocks of a kind, and ``save_pretrained``'s shared-tensor check calls
  ``view(-1)`` on them).
  ``TrainingArguments(save_only_model=True)`` does not help: it drops the optimizer state, not the weights.

Data parallelism: DDP under ``torchrun --nproc_per_node N`` or ``accelerate launch --multi_gpu --num_processes N``
works (checked with docs/examples/hf_trainer.py, see docs/reliability.md): DDP all-reduces each dense gradient
before `SparseGradAdamW.step` picks the top-k, so every rank keeps the same delta; calibrate with
``calibration_options={"all_reduce_grads": True}`` (or `sparsegrad.bases.broadcast_bases`) so that every rank
converts with the same bases, pass ``ddp_broadcast_buffers=False`` (the frozen base weights and bases never change),
and only rank 0 writes (``should_save``). DeepSpeed/FSDP sharded saves are not handled.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

import sparsegrad as sg
from sparsegrad.adapter import CONFIG_NAME, FORMAT, saved_bases, saved_state
from sparsegrad.delta import restore_delta

ADAPTER_SUBFOLDER = "sparsegrad_adapter"
TRAINING_ARGS_NAME = "training_args.bin"


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    return model


def is_sparsegrad_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a SparseGrad adapter (``adapter_config.json`` with the sparsegrad format)."""
    cfg = Path(path) / CONFIG_NAME
    if not cfg.is_file():
        return False
    try:
        import json

        return json.loads(cfg.read_text()).get("format") == FORMAT
    except ValueError:
        return False


def restore_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a SparseGrad adapter into an *already converted* model (for resuming): each layer's delta and bases,
    and the other trained parameters (`sparsegrad.delta.restore_delta`, which checks that they fit the model)."""
    model = _unwrap(model)
    meta, tensors = sg.read_adapter(path)
    if meta.get("folded_segments", 0):  # the frozen weights would need the segments replayed onto the pretrained ones
        raise ValueError(f"adapter {path} holds {meta['folded_segments']} basis refresh(es) (folded segments): "
                         "restoring it into a converted model mid-run is not supported; load it onto a fresh base "
                         "model with sg.load_adapter")
    bases = None if meta["identity_basis"] else saved_bases(meta, tensors)
    return restore_delta(model, saved_state(meta, tensors), f"adapter {path}", bases=bases)


class SparseGradTrainer(Trainer):
    """``transformers.Trainer`` that saves a SparseGrad model as its adapter, never its base weights.

    Overrides only ``save_model`` (public: used for checkpoints and by users) and the two checkpoint loaders so that
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` read the adapter back. Everything else, including the
    optimizer you pass with ``optimizers=(sg.create_optimizer(model, ...), scheduler)``, is the stock Trainer.
    """

    def _sparsegrad_model(self) -> nn.Module | None:
        model = _unwrap(self.model)
        return model if sg.sparsegrad_layers(model) else None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        model = self._sparsegrad_model()
        if model is None:
            return super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        sg.save_adapter(model, output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if self._sparsegrad_model() is not None and is_sparsegrad_adapter(resume_from_checkpoint):
            restore_adapter(model if model is not None else self.model, resume_from_checkpoint)
            return None
        return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self._sparsegrad_model() is not None and best is not None and is_sparsegrad_adapter(best):
            restore_adapter(self.model, best)
            return None
        return super()._load_best_model()


class SparseGradCallback(TrainerCallback):
    """Writes the SparseGrad adapter next to the checkpoints of any ``Trainer``.

    At every save: ``<output_dir>/checkpoint-<step>/<subfolder>/``; at the end of training (``on_train_end``,
    also with ``save_strategy="no"``): ``<output_dir>/<subfolder>/``. Load either with ``sg.load_adapter``.
    """

    def __init__(self, subfolder: str = ADAPTER_SUBFOLDER, save_on_train_end: bool = True) -> None:
        self.subfolder = subfolder
        self.save_on_train_end = save_on_train_end

    def _save(self, model: nn.Module | None, folder: Path) -> None:
        if model is None:
            raise ValueError("SparseGradCallback got no model from the Trainer")
        model = _unwrap(model)
        if not sg.sparsegrad_layers(model):
            raise ValueError("SparseGradCallback: the Trainer's model has no SparseGrad layers (convert it first)")
        sg.save_adapter(model, folder)

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero:
            self._save(model, Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.subfolder)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.save_on_train_end and state.is_world_process_zero:
            self._save(model, Path(args.output_dir) / self.subfolder)
        return control

"""The fine-tuning loop, in plain sight: one loop for every task kind and method.

``finetune(FinetuneConfig(...))`` (or ``finetune(method="lora", max_steps=10, ...)``) runs one fine-tune and writes
into ``output_dir``:

* ``metrics.json``: quality (the task's ``eval_*`` keys), cost (median step time, train time, calibration time,
  peak RSS and GPU memory, exact training-state bytes), budget (k, LoRA rank, entries per step, entries ever
  updated, adapter bytes) and every setting of the run;
* ``loss.csv``: ``step,loss``, one row per optimizer step;
* ``adapter/``: what training changed (the method's files) and ``task.json``, enough for `load_finetuned` and
  ``sparsegrad merge`` to rebuild the model.

The task kind (`tasks`: classifier or causal LM) supplies the model, data, batches and evaluation; the method
(`methods.METHODS`) sets the model up, saves it and hooks into the step (basis refresh). Under
``torchrun --nproc_per_node N`` the loop trains with DistributedDataParallel, each rank on its shard of every global
batch (`distributed`); ``grad_accum`` sums the gradients of several micro-batches per step; ``save_every`` writes
checkpoints and ``resume`` continues from the latest one with the same loss sequence as an uninterrupted run
(`checkpoint`); SIGINT/SIGTERM save a checkpoint and stop (`TrainingInterrupted`); a non-finite loss or gradient
stops the run (``on_nonfinite="stop"``) or skips the step (``"skip"``), and no adapter with non-finite values is
ever written.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

import sparsegrad as sg
from sparsegrad.io import tensors_sha256

from . import metrics as M
from .checkpoint import (
    EXIT_CODES,
    CheckpointError,
    StopSignals,
    checkpoints_dir,
    latest_checkpoint,
    load_checkpoint,
    load_trainable_state,
    nonfinite_tensors,
    rng_state,
    save_checkpoint,
    set_rng_state,
    trainable_state,
)
from .distributed import (
    DistContext,
    DistributedSetupError,
    micro_to,
    no_sync_unless,
    scaled_loss_fn,
    setup_distributed,
    step_micro_batches,
    wrap_ddp,
)
from . import lr_search
from .errors import TrainingDiverged, TrainingInterrupted, UsageError
from .methods import METHODS, Method, Prepared, block_indices, mlp_matrices, prepare_method
from .divergence import DivergenceGuard
from .outputs import estimate_run_bytes, run_folder, save_trained, versions, write_json, write_loss_csv
from .precision import Precision, peak_gpu_memory_mb, pick_device
from .selection import Selection, run_metrics, validate
from .settings import RESUME_MAY_CHANGE, FinetuneConfig, resume_config
from .tasks import Task, task_for, usage_errors
from .testing import FaultInjection


def finetune(config: FinetuneConfig | None = None, **overrides: Any) -> dict[str, Any]:
    """Run one fine-tune; returns the metrics dict that is also written to ``output_dir/metrics.json``.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0 evaluates and writes the files, and every rank
    returns rank 0's metrics. Raises `TrainingInterrupted` (after saving a checkpoint) on SIGINT/SIGTERM or at
    ``stop_after``, `TrainingDiverged` on a non-finite loss or gradient with ``on_nonfinite="stop"``.
    """
    cfg = dataclasses.replace(config or FinetuneConfig(), **overrides)
    cfg.validate()
    try:
        ctx = setup_distributed()
    except DistributedSetupError as exc:
        raise UsageError(str(exc)) from None
    if cfg.lr_auto and cfg.lr is None and cfg.resume is None:  # a resumed run has its pick in cfg.lr
        cfg = pick_lr(cfg, ctx)
    return train(cfg, ctx)  # a process group it started is left for the next run


def pick_lr(cfg: FinetuneConfig, ctx: DistContext) -> FinetuneConfig:
    """``lr_auto``: the grid of `lr_search`, each point a short `train` (probe); the record goes into the run folder."""
    log = print if cfg.verbose and ctx.is_main else (lambda *a, **k: None)
    cfg, record = lr_search.search(cfg, lambda c: train(c, ctx, probe=True), log)
    with checked_run_folder(cfg, ctx, log) as out_dir:
        if ctx.is_main:
            write_json(out_dir / lr_search.RECORD_FILE, record)
    return cfg


def train(cfg: FinetuneConfig, ctx: DistContext, probe: bool = False) -> dict[str, Any]:
    """The loop (see the module docstring), in its run folder: checked, locked and cleaned before any model loads.
    ``probe``: a short run for `lr_search` (1/`choices.LR_AUTO_PROBE_SHARE` of the steps) that returns its validation
    metrics, writes nothing and never reads the test split."""
    log = print if cfg.verbose and ctx.is_main else (lambda *a, **k: None)
    with checked_run_folder(cfg, ctx, log) as out_dir:
        return train_in(cfg, ctx, out_dir, probe)


def checked_run_folder(cfg: FinetuneConfig, ctx: DistContext, log):
    """The run folder of ``cfg`` (`outputs.run_folder`): refused, created, marked and locked as it says."""
    inputs = {"--model": cfg.model, "--train-file": cfg.train_file, "--eval-file": cfg.eval_file}
    raw_out = cfg.output_dir if cfg.output_dir is not None else cfg.resolved_output_dir()  # '' stays '' (refused)
    return run_folder(raw_out, ctx, fresh=cfg.resume is None, overwrite=cfg.overwrite, inputs=inputs,
                      need_bytes=estimate_run_bytes(cfg.model, METHODS[cfg.method], cfg.save_every), log=log)


@dataclass
class Setup:
    """What a run is set up with and keeps while it trains (the helpers of `train_in` read it)."""

    cfg: FinetuneConfig
    ctx: DistContext
    task: Task
    method: Method
    precision: Precision
    plan: Plan
    layers: list[int] | None
    lr: float
    out_dir: Path
    log: Callable[..., None]
    probe: bool = False  # a short run of `lr_search`: nothing of it is kept, so a stop signal saves no checkpoint


def train_in(cfg: FinetuneConfig, ctx: DistContext, out_dir: Path, probe: bool = False) -> dict[str, Any]:
    main = ctx.is_main
    log = print if cfg.verbose and main else (lambda *a, **k: None)
    task, method = task_for(cfg), METHODS[cfg.method]
    precision = Precision.of(cfg.dtype, pick_device(cfg.device, ctx))
    resume = load_resume(cfg, ctx.world, method) if cfg.resume is not None else None
    if cfg.refresh_every is not None and ctx.world > 1:
        raise UsageError("--refresh-every trains in one process for now: start it without torchrun")
    wall_start = time.perf_counter()

    # 1. Seeds, model and data (a classifier's head is initialised from the seeded torch RNG), on the device.
    seed_everything(cfg.seed)
    model, _ = task.load(cfg, precision.weights)
    log(task.summary())
    if precision.device.type != "cpu":
        model.to(precision.device)
    with usage_errors():
        layers = cfg.layers_to_transform or block_indices(model, cfg.every_nth_block)

    # 2. Batches: one batch is one optimizer step of batch_size x processes x grad_accum examples, in a seeded
    #    order per epoch, cut into this rank's micro-batches in the loop.
    plan = Plan.of(cfg, task.num_train, ctx.world, probe)
    run_setup = Setup(cfg, ctx, task, method, precision, plan, layers, cfg.resolved_lr(), out_dir, log, probe)
    selection = Selection.of(cfg, task, plan.steps_per_epoch, plan.total_steps)
    first_epoch = task.train_batches(0, plan.global_batch)

    # 3. The method. Calibration batches are the first training batches of epoch 0 (dropout on, as in training).
    model.train()
    prepared = prepare(model, method, task, cfg, ctx, precision, layers, first_epoch, resume)
    model = prepared.model
    log_setup(run_setup, prepared)

    # 4. Seeds again (the same dropout stream for every method from here on: calibration and LoRA's init drew from
    #    the RNG), the method's starting point, optimizer (AdamW, lazy sparse Adam for dynamic SparseGrad weights).
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    snapshot = method.snapshot(prepared)
    optimizer = sg.create_optimizer(model, lr=run_setup.lr, weight_decay=cfg.weight_decay,
                                    layerwise=cfg.layerwise_step)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(plan.total_steps, plan.warmup_steps))

    # 5. Where to start: a fresh run, or the checkpoint's trained state, optimizer, schedule, RNG and position.
    run = RunState(calibration_time_s=prepared.calibration_time_s)
    guard = DivergenceGuard()
    if resume is not None:
        resume_run(run_setup, resume, run, guard, selection, model, optimizer, scheduler)
    net = wrap_ddp(model, ctx)
    trainable = [p for p in model.parameters() if p.requires_grad]
    faults = FaultInjection.from_env()

    def checkpoint(reason: str) -> Path:
        return write_checkpoint(out_dir, reason, cfg, ctx, plan, run, model, optimizer, scheduler,
                                prepared.bases if method.calibrates else None, selection)

    if selection is not None and task.untrained_loss_is_reference and run.step == 0:  # did-not-learn check
        selection.untrained = validate(task, model, precision)

    # 6. The loop.
    bar = tqdm(total=plan.total_steps, initial=run.step, desc=f"{cfg.method} {task.name}", unit="step",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    run.start_clock()
    net.train()
    with StopSignals(verbose=main) as signals:
        for batches, position in plan.positions(run.step, first_epoch, task.train_batches):
            refresh(run_setup, run, prepared, batches[position:], optimizer, selection)
            t0 = time.perf_counter()
            step_lr = optimizer.param_groups[0]["lr"]
            step_loss, loss_bad, grad_bad = forward_backward(net, batches[position], task, cfg, ctx, precision,
                                                             faults, run.step + 1, trainable)
            if loss_bad or grad_bad:
                step_loss = skip_nonfinite_step(run_setup, run, bar, loss_bad, step_loss)  # or stop the run
            else:
                optimizer.step()
                if guard.observe(run.step + 1, step_loss):
                    run.divergence = check_divergence(run_setup, guard, step_loss, bar)
            if run.step == plan.total_steps - 1:  # exact training state at the last step (before zero_grad)
                run.state_bytes = sg.training_state_bytes(model, optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            run.end_step(time.perf_counter() - t0, step_loss)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{step_lr:.2e}")
            bar.update(1)
            faults.maybe_signal(run.step, ctx.rank)
            if validation_says_stop(run_setup, run, selection, model):
                break
            stop_or_save(run_setup, run, signals, bar, checkpoint)
    bar.close()
    run.stop_clock()
    if selection is not None:
        selection.restore_best(model, run.step)
        if probe:
            return {"train_steps": run.step, **selection.metrics()}
    run.state_bytes = run.state_bytes or sg.training_state_bytes(model, optimizer)  # an early stop
    check_ranks_agree(model, ctx)

    # 7. Evaluation (rank 0, eval mode, no grad, on the device) and files: adapter (+ task.json), loss.csv,
    #    metrics.json. Nothing with a non-finite value is written.
    if not main:
        ctx.gather(M.peak_rss_mb())
        return ctx.broadcast(None)
    metrics = evaluate_and_write(run_setup, prepared, run, selection, snapshot, resume, wall_start)
    return ctx.broadcast(metrics)


# ------------------------------------------------------------------------------------------------- loop hooks
def log_setup(s: Setup, prepared: Prepared) -> None:
    """The lines that say what trains, and how big a step is."""
    s.log(prepared.description + (f"; blocks {s.layers}" if s.layers is not None else ""))
    s.log(f"trainable entries per step: {prepared.trainable_entries:,d} of {prepared.total_params:,d} "
          f"({100 * prepared.trainable_entries / prepared.total_params:.4f}%)")
    if s.ctx.enabled or s.cfg.grad_accum > 1:
        s.log(f"global batch {s.plan.global_batch} = {s.cfg.batch_size} per micro-batch x {s.ctx.world} process(es) "
              f"x {s.cfg.grad_accum} micro-batch(es) per step")


def resume_run(s: Setup, resume, run: RunState, guard: DivergenceGuard, selection: Selection | None, model,
               optimizer, scheduler) -> None:
    """Continue from a checkpoint: trained state, optimizer, schedule, RNG, position, loss history, selection."""
    run.restore(resume, model, optimizer, scheduler, s.ctx.rank)
    guard.replay(run.losses)  # skipped steps are NaN: the guard ignores them
    s.log(f"resuming from {resume.path}: step {run.step} of {s.plan.total_steps}")
    if selection is not None:
        selection.restore(resume.state.get("selection"), resume.best_state)


def refresh(s: Setup, run: RunState, prepared: Prepared, next_batches: list, optimizer,
            selection: Selection | None) -> None:
    """The method's hook before a step (SparseGrad's basis refresh); a refresh folds the delta away, so the best
    validation state so far cannot be restored after it."""
    seconds = s.method.on_step(run.step, prepared, next_batches, optimizer, s.cfg)
    if seconds is not None:
        run.refreshes[run.step] = seconds
        if selection is not None:
            selection.forget_best()


def skip_nonfinite_step(s: Setup, run: RunState, bar, loss_bad: bool, loss: float) -> float:
    """A non-finite loss or gradient: ``--on-nonfinite stop`` raises `TrainingDiverged`; ``skip`` warns, records
    the step as skipped (no update) and returns its loss, NaN."""
    what = f"training loss is {loss}" if loss_bad else "a gradient is not finite (NaN or inf)"
    if s.cfg.on_nonfinite == "stop":
        bar.close()
        raise diverged(what, run.step + 1, s.lr, s.out_dir, s.ctx.world)
    if s.ctx.is_main:
        print(f"sparsegrad: warning: {what} at step {run.step + 1}: step skipped (no update)", file=sys.stderr,
              flush=True)
    run.skipped.append(run.step + 1)
    return math.nan


def validation_says_stop(s: Setup, run: RunState, selection: Selection | None, model) -> bool:
    """Evaluate on the validation split when due; whether early stopping ends the run here."""
    if selection is None or not selection.due(run.step):
        return False
    if not selection.observe(run.step, validate(s.task, model, s.precision), model):
        return False
    s.log(f"early stop at step {run.step}: no better validation {selection.metric} in {selection.patience} "
          f"evaluations (best at step {selection.best_step})")
    return True


def stop_or_save(s: Setup, run: RunState, signals: StopSignals, bar, checkpoint: Callable[[str], Path]) -> None:
    """After a step: a stop signal (on any rank) or ``stop_after`` saves a checkpoint and raises
    `TrainingInterrupted`; ``save_every`` saves one and goes on."""
    stop = signals.requested
    if s.ctx.enabled:  # every rank stops at the same step
        stop = s.ctx.all_sum([float(stop)])[0] > 0
    if stop and s.probe:  # its checkpoint would resume the probe's rate and length, not the run's
        bar.close()
        raise TrainingInterrupted(f"interrupted by {signal_name(signals.signum)} during the learning-rate search "
                                  f"(--lr auto: the probe at lr {s.lr:g}, step {run.step} of {s.plan.total_steps}); "
                                  f"no checkpoint is saved for a probe: run the same command again to start over",
                                  EXIT_CODES.get(signals.signum, 143))
    if stop or (s.cfg.stop_after is not None and run.step == s.cfg.stop_after < s.plan.total_steps):
        bar.close()
        raise interrupted(checkpoint("signal" if stop else "stop_after"), signals.signum if stop else None,
                          run.step, s.plan.total_steps, s.out_dir, s.ctx.world)
    if s.cfg.save_every and run.step % s.cfg.save_every == 0:
        checkpoint("save_every")


# ------------------------------------------------------------------------------------------------- the end
def evaluate_and_write(s: Setup, prepared: Prepared, run: RunState, selection: Selection | None, snapshot,
                       resume, wall_start: float) -> dict[str, Any]:
    """Rank 0: evaluate, refuse a run that trained nothing or diverged, write the adapter (+ task.json), loss.csv
    and metrics.json; returns the metrics. The other ranks only gather their peak RSS."""
    cfg, task, method, model = s.cfg, s.task, s.method, prepared.model
    eval_start = time.perf_counter()
    with s.precision.autocast():
        quality = task.evaluate(model)
    eval_time = time.perf_counter() - eval_start
    bad = nonfinite_tensors(trainable_state(model))
    if len(run.skipped) == run.step:
        write_json(s.out_dir / "metrics.json", {"method": cfg.method, "task": task.name, **quality,
                                                **run_record(s, prepared, run), "adapter_bytes": None,
                                                "output_dir": str(s.out_dir)})
        raise TrainingDiverged(f"every one of the {run.step} steps was skipped (--on-nonfinite skip): nothing "
                               f"trained, no adapter written (metrics.json records the run); lower the learning "
                               f"rate (now {s.lr:g}) or check the data")
    if bad:
        raise TrainingDiverged(f"the trained parameters hold non-finite values ({bad[:3]}): no adapter written; "
                               f"lower the learning rate (now {s.lr:g})")
    adapter_bytes = save_trained(prepared, method, s.out_dir / "adapter", task_record(s, prepared))
    write_loss_csv(s.out_dir / "loss.csv", run.losses)
    peak_rss = s.ctx.gather(M.peak_rss_mb())
    metrics = {
        "method": cfg.method, "task": task.name, "seed": cfg.seed, "model": cfg.model or task.default_model,
        **quality,
        **run_metrics(selection, task.learning_check, quality, cfg.val_fraction),
        "lr_search": lr_search.read_record(s.out_dir) if cfg.lr_auto else None,
        **run_record(s, prepared, run),
        **task.describe(),
        "entries_updated": method.entries_updated(prepared, snapshot),
        "mlp_entries": sum(w.numel() for w in mlp_matrices(model, prepared.target_names).values()),
        "adapter_bytes": adapter_bytes,
        "eval_time_s": eval_time,
        "wall_time_s": time.perf_counter() - wall_start,
        "peak_rss_mb": peak_rss[0],
        "peak_rss_mb_per_rank": peak_rss,
        "peak_gpu_memory_mb": peak_gpu_memory_mb(s.precision.device),
        "resumed_from_step": resume.step if resume is not None else None,
        "output_dir": str(s.out_dir),
        "command": cfg.command,
    }
    write_json(s.out_dir / "metrics.json", metrics)
    return metrics


def task_record(s: Setup, prepared: Prepared) -> dict[str, Any]:
    """``task.json`` beside the adapter: what `load_finetuned` needs to rebuild the model."""
    cfg = s.cfg
    return {"format": "sparsegrad-finetune-task", "method": cfg.method, "model": cfg.model or s.task.default_model,
            "task": s.task.name, **s.task.task_info(), "dtype": str(s.precision.weights).removeprefix("torch."),
            "train_scope": cfg.train_scope, "support": cfg.support,
            "max_length": cfg.max_length, "every_nth_block": cfg.every_nth_block,
            "layers_to_transform": s.layers, "lora_rank": prepared.lora_rank, "lora_alpha": prepared.lora_alpha,
            "target_modules": prepared.config.target_modules if prepared.config else None}


# ------------------------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Steps per epoch, total and warmup steps, and the global batch of a run."""

    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int
    global_batch: int

    @classmethod
    def of(cls, cfg: FinetuneConfig, num_train: int, world: int, probe: bool = False) -> "Plan":
        """``probe``: the plan of `lr_search`'s short run (`lr_search.probe_steps` of the full run's steps)."""
        global_batch = cfg.batch_size * world * cfg.grad_accum
        steps_per_epoch = math.ceil(num_train / global_batch)
        if cfg.max_steps is not None:  # max_steps overrides epochs: as many epochs as it takes, the last cut short
            total, epochs = cfg.max_steps, math.ceil(cfg.max_steps / steps_per_epoch)
        else:
            total, epochs = cfg.epochs * steps_per_epoch, cfg.epochs
        if probe:
            return cls.of(dataclasses.replace(cfg, max_steps=lr_search.probe_steps(total)), num_train, world)
        return cls(steps_per_epoch, total, epochs, int(round(cfg.warmup_ratio * total)), global_batch)

    def positions(self, start_step: int, first_epoch: list, batches_of: Callable[[int, int], list]):
        """(the epoch's batches, position) of every step from ``start_step`` to the last."""
        start_epoch, start_in_epoch = divmod(start_step, self.steps_per_epoch)
        step = start_step
        for epoch in range(start_epoch, self.epochs):
            batches = first_epoch if epoch == 0 else batches_of(epoch, self.global_batch)
            for position in range(start_in_epoch if epoch == start_epoch else 0, len(batches)):
                if step >= self.total_steps:
                    return
                yield batches, position
                step += 1


def linear_schedule(total_steps: int, warmup_steps: int):
    """LR multiplier: linear warmup over ``warmup_steps`` (never 0), then linear decay to 0 after the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


# ------------------------------------------------------------------------------------------------- run state
@dataclass
class RunState:
    """What the loop accumulates, and what a checkpoint saves of it."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    state_bytes: dict[str, int] = field(default_factory=dict)
    train_time_before: float = 0.0
    calibration_time_s: float = 0.0
    refreshes: dict[int, float] = field(default_factory=dict)  # step -> seconds the basis refresh took there
    divergence: dict[str, Any] | None = None  # the divergence guard's record, when it fired (--on-nonfinite skip)
    train_start: float = 0.0
    train_time_s: float = 0.0

    def start_clock(self) -> None:
        self.train_start = time.perf_counter()

    def stop_clock(self) -> None:
        self.train_time_s = self.elapsed()

    def elapsed(self) -> float:
        return self.train_time_before + time.perf_counter() - self.train_start

    def end_step(self, seconds: float, loss: float) -> None:
        self.step_times.append(seconds)
        self.losses.append(loss)
        self.step += 1

    def record(self) -> dict[str, Any]:
        return {"step": self.step, "losses": [None if math.isnan(v) else v for v in self.losses],
                "step_times": self.step_times, "skipped_steps": self.skipped, "train_time_s": self.elapsed(),
                "calibration_time_s": self.calibration_time_s, "train_state_bytes": self.state_bytes}

    def restore(self, resume, model, optimizer, scheduler, rank: int) -> None:
        try:
            load_trainable_state(model, resume.tensors, str(resume.path))
            optimizer.load_state_dict(resume.optimizer)
            scheduler.load_state_dict(resume.scheduler)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UsageError(f"cannot resume from {resume.path}: {exc}") from None
        set_rng_state(resume.rng_states[rank])
        saved = resume.state
        self.step = int(saved["step"])
        self.losses = [math.nan if v is None else float(v) for v in saved["losses"]]
        self.step_times = [float(v) for v in saved["step_times"]]
        self.skipped = [int(v) for v in saved.get("skipped_steps", [])]
        self.train_time_before = float(saved.get("train_time_s", 0.0))
        self.calibration_time_s = float(saved.get("calibration_time_s", self.calibration_time_s))
        self.state_bytes = dict(saved.get("train_state_bytes") or {})


def run_record(s: Setup, prepared: Prepared, run: RunState) -> dict[str, Any]:
    """The metrics.json fields every run records, whatever its task."""
    cfg, ctx, plan, lr, layers, precision = s.cfg, s.ctx, s.plan, s.lr, s.layers, s.precision
    calibrates = s.method.calibrates
    finite = [v for v in run.losses if math.isfinite(v)]
    tail = finite[-max(1, min(10, len(finite) // 4)):]
    return {
        "train_steps": run.step, "epochs": plan.epochs, "steps_per_epoch": plan.steps_per_epoch,
        "k": prepared.k, "lora_rank": prepared.lora_rank, "lora_alpha": prepared.lora_alpha,
        "density": cfg.density if cfg.k is None else None, "budget_k": cfg.k, "support": cfg.support,
        "train_scope": cfg.train_scope, "every_nth_block": cfg.every_nth_block, "layers_to_transform": layers,
        "dtype": cfg.dtype, "device": str(precision.device), "autocast": precision.autocast_dtype,
        "lr": lr, "weight_decay": cfg.weight_decay, "warmup_ratio": cfg.warmup_ratio,
        "warmup_steps": plan.warmup_steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
        "world_size": ctx.world, "global_batch_size": plan.global_batch, "distributed_backend": ctx.backend,
        "max_length": cfg.max_length, "max_steps": cfg.max_steps,
        "calibration_steps": cfg.calibration_steps if calibrates else 0, "score_steps": prepared.score_steps,
        "basis_sharing": cfg.basis_sharing if calibrates else None, "refresh_every": cfg.refresh_every,
        "refreshed_at_steps": sorted(run.refreshes), "refresh_time_s": round(sum(run.refreshes.values()), 3),
        "step_time_median_s": M.median(run.step_times[1:] if len(run.step_times) > 1 else run.step_times),
        "step_time_first_s": run.step_times[0] if run.step_times else None,
        "train_time_s": run.train_time_s, "calibration_time_s": run.calibration_time_s,
        "train_state_bytes": run.state_bytes, "trainable_entries": prepared.trainable_entries,
        "total_params": prepared.total_params, "mlp_matrices": len(prepared.target_names),
        "final_train_loss": sum(tail) / len(tail) if tail else None, "skipped_steps": run.skipped,
        "on_nonfinite": cfg.on_nonfinite, "save_every": cfg.save_every, "divergence": run.divergence,
        "ranks_identical": True if ctx.enabled else None, "description": prepared.description,
        "bases_report": prepared.bases_report, "torch_threads": torch.get_num_threads(), "versions": versions(),
    }


# ------------------------------------------------------------------------------------------------- pieces
def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs (``transformers.set_seed`` covers all three)."""
    import transformers

    random.seed(seed)
    torch.manual_seed(seed)
    transformers.set_seed(seed)


def check_divergence(s: Setup, guard: DivergenceGuard, loss: float, bar) -> dict[str, Any]:
    """The guard fired: ``--on-nonfinite stop`` stops (no adapter, as for a NaN loss); ``skip`` warns once and
    trains on (metrics.json records it), as a NaN step is skipped with a warning."""
    if s.cfg.on_nonfinite == "stop":
        bar.close()
        raise diverged(guard.message(loss), guard.diverged_at, s.lr, s.out_dir, s.ctx.world)
    if s.ctx.is_main:
        print(f"sparsegrad: warning: {guard.message(loss)}; training goes on (--on-nonfinite skip), lower the "
              f"learning rate (now {s.lr:g})", file=sys.stderr, flush=True)
    return guard.record()


def calibration_inputs(task: Task, cfg: FinetuneConfig, ctx: DistContext, precision: Precision,
                       first_epoch: list) -> tuple[list, Callable | None, dict[str, Any]]:
    """(batches, loss_fn, options) for `sg.estimate_bases`: the first ``calibration_steps`` training batches; with
    several processes or micro-batches each calibration step is a whole global batch, its gradient accumulated and
    averaged over the ranks."""
    steps = first_epoch[: cfg.calibration_steps]
    if ctx.world == 1 and cfg.grad_accum == 1 and not precision.autocast_dtype:
        return steps, None, {}
    micro = [mb for b in steps for mb in step_micro_batches(b, ctx.rank, ctx.world, cfg.grad_accum, keep_empty=True,
                                                            weight=task.loss_weight, total=task.loss_weight(b))]
    loss_fn = precision.wrap_loss(scaled_loss_fn(ctx.device if ctx.enabled else precision.device))
    return micro, loss_fn, {"grad_accum": cfg.grad_accum, "all_reduce_grads": ctx.enabled}


def prepare(model, method: Method, task: Task, cfg: FinetuneConfig, ctx: DistContext, precision: Precision,
            layers: list[int] | None, first_epoch: list, resume) -> Prepared:
    """The method set up on the model (a resumed run takes the bases from its checkpoint)."""
    batches, loss_fn, options = (calibration_inputs(task, cfg, ctx, precision, first_epoch)
                                 if method.calibrates and resume is None else (None, None, {}))
    try:
        return prepare_method(
            model, cfg.method, budget_k=cfg.k, density=cfg.density if cfg.k is None else None, support=cfg.support,
            train_scope=cfg.train_scope, layers_to_transform=layers, head_names=task.head_names,
            target_modules=cfg.target_modules,
            calibration_batches=batches, loss_fn=loss_fn, calibration_options=options,
            bases=resume.bases if resume is not None else None, calibration_steps=cfg.calibration_steps,
            score_steps=cfg.score_steps, basis_sharing=cfg.basis_sharing, lora_rank=cfg.lora_rank,
            progress=cfg.progress and ctx.is_main)
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(str(exc)) from None


def forward_backward(net, batch: dict, task: Task, cfg: FinetuneConfig, ctx: DistContext, precision: Precision,
                     faults: FaultInjection, step: int, trainable: list) -> tuple[float, bool, bool]:
    """One step's forward and backward over this rank's micro-batches (DDP syncs the gradients at the last one).
    Returns (the global mean loss, whether a loss and whether a gradient was non-finite on any rank)."""
    total = task.loss_weight(batch)
    micros = step_micro_batches(batch, ctx.rank, ctx.world, cfg.grad_accum, weight=task.loss_weight, total=total)
    loss_sum, loss_bad = 0.0, False
    for i, mb in enumerate(micros):
        with no_sync_unless(net, last=i == len(micros) - 1):
            with precision.autocast():
                loss = net(**micro_to(mb, precision.device)).loss
            loss = faults.poison_loss(loss, step, ctx.rank)
            if mb.rows:
                value = float(loss.detach())
                loss_bad |= not math.isfinite(value)
                loss_sum += value * mb.weight
            (loss if mb.scale == 1.0 else loss * mb.scale).backward()
    faults.poison_grad(net, step, ctx.rank)
    grad_bad = not grads_finite(trainable)
    if ctx.enabled:  # the global mean loss, and whether any rank saw a non-finite value
        loss_sum, n_bad_loss, n_bad_grad = ctx.all_sum([loss_sum, float(loss_bad), float(grad_bad)])
        loss_bad, grad_bad = n_bad_loss > 0, n_bad_grad > 0
    return loss_sum / total if total else math.nan, loss_bad, grad_bad


def grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def check_ranks_agree(model, ctx: DistContext) -> None:
    """DDP keeps the ranks in step by construction; check it rather than trust it."""
    if not ctx.enabled:
        return
    state = trainable_state(model)
    digests = ctx.gather(tensors_sha256(sorted(state.items())))
    if len(set(digests)) != 1:
        raise TrainingDiverged(f"the {ctx.world} processes ended training with different parameters "
                               f"(digests {[d[:12] for d in digests]}): this is a bug, please report it")


# ------------------------------------------------------------------------------------------------- checkpoints
def resume_hint(out_dir: Path, world: int) -> str:
    launcher = f"torchrun --nproc_per_node {world} -m sparsegrad" if world > 1 else "sparsegrad"
    return f"{launcher} finetune --resume {out_dir}"


def diverged(what: str, step: int, lr: float, out_dir: Path, world: int) -> TrainingDiverged:
    last = latest_checkpoint(out_dir)
    kept = (f"; the last checkpoint ({last.name}) is intact: resume with "
            f"`{resume_hint(out_dir, world)} --on-nonfinite skip`" if last is not None else "")
    return TrainingDiverged(f"{what} at step {step}: lower the learning rate (now {lr:g}) or check the data; "
                            f"--on-nonfinite skip skips such steps instead. No adapter was written{kept}")


def interrupted(path: Path, signum: int | None, step: int, total: int, out_dir: Path,
                world: int) -> TrainingInterrupted:
    hint = resume_hint(out_dir, world)
    if signum is None:
        return TrainingInterrupted(f"stopped after step {step} of {total} (--stop-after); checkpoint saved in "
                                   f"{path}. Resume with: {hint}", 0, path)
    return TrainingInterrupted(f"interrupted by {signal_name(signum)} after step {step} of {total}; checkpoint "
                               f"saved in {path}. Resume with: {hint}", EXIT_CODES.get(signum, 143), path)


def signal_name(signum: int | None) -> str:
    import signal as _signal

    try:
        return _signal.Signals(signum).name
    except (ValueError, TypeError):
        return "a signal"


def write_checkpoint(out_dir: Path, reason: str, cfg: FinetuneConfig, ctx: DistContext, plan: Plan, run: RunState,
                     model, optimizer, scheduler, bases, selection: Selection | None = None) -> Path:
    """Every rank's RNG state gathered, rank 0 writes ``checkpoints/step-N``, every rank waits for it."""
    rngs = ctx.gather(rng_state())
    if ctx.is_main:
        record = {**run.record(), "epoch": run.step // plan.steps_per_epoch,
                  "step_in_epoch": run.step % plan.steps_per_epoch, "total_steps": plan.total_steps,
                  "steps_per_epoch": plan.steps_per_epoch, "world_size": ctx.world, "batch_size": cfg.batch_size,
                  "grad_accum": cfg.grad_accum, "global_batch_size": plan.global_batch, "reason": reason,
                  "config": dataclasses.asdict(cfg), "selection": selection.record() if selection else None}
        try:
            save_checkpoint(out_dir, run.step, model=model, optimizer=optimizer, scheduler=scheduler, bases=bases,
                            rng_states=rngs, state=record, best_state=selection.best_state if selection else None)
        except CheckpointError as exc:
            raise TrainingDiverged(str(exc)) from None
    ctx.barrier()
    return checkpoints_dir(out_dir) / f"step-{run.step}"


def load_resume(cfg: FinetuneConfig, world: int, method: Method):
    """The latest checkpoint of ``cfg.resume``, checked against this run's settings and world size."""
    resume_config(cfg.resume)  # the folder and a readable checkpoint exist
    path = latest_checkpoint(cfg.resume)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from None
    saved = ckpt.state.get("config") or {}
    diffs = [f"{name}={getattr(cfg, name)!r} (the interrupted run had {saved[name]!r})"
             for name in sorted(saved) if name not in RESUME_MAY_CHANGE and hasattr(cfg, name)
             and saved[name] != getattr(cfg, name)]
    if diffs:
        raise UsageError(f"cannot resume {cfg.resume}: settings differ from the interrupted run: {'; '.join(diffs)}. "
                         f"`sparsegrad finetune --resume {cfg.resume}` alone takes the run's settings")
    if ckpt.state.get("world_size") != world:
        raise UsageError(f"cannot resume {cfg.resume}: it was trained by {ckpt.state.get('world_size')} process(es), "
                         f"this is {world}; resume with the same number (torchrun --nproc_per_node "
                         f"{ckpt.state.get('world_size')}, or no torchrun for 1)")
    if method.calibrates and ckpt.bases is None:
        raise UsageError(f"cannot resume from {path}: it holds no bases.safetensors (the checkpoint is incomplete)")
    return ckpt


# ------------------------------------------------------------------------------------------------- calibration
def calibrate(*, model: str | None = None, task: str | None = "bbc", train_file: str | None = None,
              eval_file: str | None = None, text_column: str = "text", label_column: str = "label",
              max_train: int | None = None, max_length: int = 128, batch_size: int = 16, seed: int = 0,
              density: float | None = 0.01, k: int | None = None, support: str = "dynamic",
              basis_sharing: str = "kind", calibration_steps: int = 2, score_steps: int = 2,
              target_modules: str | None = None, output_dir: str | Path = "runs/calibrate",
              progress: bool = True, prompt_column: str | None = None, response_column: str | None = None,
              device: str = "auto") -> tuple[dict[str, Any], Path, float]:
    """Estimate the SparseGrad bases on the first ``calibration_steps`` training batches (the batches `finetune`
    would use, for either task kind), save ``bases.safetensors`` and ``report.json`` into ``output_dir``.
    Returns (report, bases path, seconds)."""
    from .methods import default_targets

    cfg = FinetuneConfig(task=task, train_file=train_file, eval_file=eval_file, text_column=text_column,
                         label_column=label_column, model=model, max_train=max_train, max_length=max_length,
                         batch_size=batch_size, seed=seed, density=density, k=k, support=support,
                         basis_sharing=basis_sharing, calibration_steps=calibration_steps, progress=progress,
                         prompt_column=prompt_column, response_column=response_column, device=device)
    cfg.validate()
    run_task = task_for(cfg)
    device_ = pick_device(cfg.device, DistContext())
    seed_everything(seed)
    net, _ = run_task.load(cfg, torch.float32)
    if device_.type != "cpu":
        net.to(device_)
    batches = run_task.train_batches(0, batch_size)[:calibration_steps]
    try:
        sg_cfg = sg.SparseGradConfig(target_modules=target_modules or default_targets(net), k=k,
                                     density=None if k is not None else density, support=support,
                                     basis_sharing=basis_sharing, score_steps=score_steps)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    net.train()
    start = time.perf_counter()
    bases = sg.estimate_bases(net, sg_cfg, batches, progress=progress)
    seconds = time.perf_counter() - start
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    bases.save(out / "bases.safetensors")
    write_json(out / "report.json", {"model": model or run_task.default_model, "task": run_task.name, "seed": seed,
                                     "calibration_steps": len(batches), "batch_size": batch_size,
                                     "config": sg_cfg.to_dict(), "seconds": seconds, "report": bases.report})
    return bases.report, out / "bases.safetensors", seconds

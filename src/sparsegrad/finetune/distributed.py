"""Data parallelism and gradient accumulation for the training loop (`loop.train`), every task kind.

``torchrun --nproc_per_node N -m sparsegrad finetune ...`` starts N processes (ranks). Each one builds the same data,
model and method; the model is wrapped in ``DistributedDataParallel`` (gloo on CPU, NCCL with one GPU per rank), and
every optimizer step is one *global batch* of ``batch_size x world_size x grad_accum`` examples, the same examples a
single process would use with ``--batch-size`` equal to that product:

* the global batch is cut into ``grad_accum x world_size`` near-equal parts (each ``batch_size`` rows when the batch
  is full); micro-batch i of rank r is part ``i * world_size + r``, trimmed to its own longest sequence;
* each micro-batch's mean loss is scaled by ``weight x world_size / global weight`` before backward (the weight is
  what the task's loss averages over: rows for a classifier, target tokens for a causal LM), so the gradient
  summed over micro-batches (``no_sync`` until the last) and averaged over ranks by DDP is the gradient of the mean
  loss over the global batch, exactly as in one process (up to float rounding);
* the logged loss is that global mean (one all-reduce of three numbers per step), so ``loss.csv`` compares across
  world sizes.

SparseGrad under DDP: a dynamic layer's dense gradient is all-reduced by DDP before `SparseGradAdamW.step` picks the
top-k, so every rank picks the same entries; calibration averages each step's gradient over the ranks and rank 0's
bases are broadcast (`sparsegrad.bases.broadcast_bases`); a fixed support still pending at the first step is chosen
from the all-reduced rotated gradient (`layer.py`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch


class DistributedSetupError(RuntimeError):
    """The environment asks for several processes but the process group cannot start."""


@dataclass
class DistContext:
    """This process's place in the run: rank, world size, device; the single-process default is rank 0 of 1."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    created: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.cpu().tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group if this context created it. `setup_distributed` registers this at exit rather
        than after each run: a process group destroyed and started again in one torchrun worker can hang, and a
        second `finetune` call in the same worker reuses the group."""
        if self.created:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            self.created = False

    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when absent or unreadable)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def setup_distributed() -> DistContext:
    """Join (or start) the default process group when the environment asks for several processes (torchrun sets
    WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). NCCL with one GPU per rank when CUDA is available,
    else gloo on the CPU. A single process gets the CPU context, as before."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        if world == 1:
            return DistContext()
        backend = dist.get_backend()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        return DistContext(rank=rank, world=world, local_rank=local_rank, device=device, backend=backend)
    world = env_world_size()
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise DistributedSetupError(f"WORLD_SIZE={world} asks for {world} processes but this torch build has no "
                                    "torch.distributed; run a single process (unset WORLD_SIZE)")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: start "
            f"several processes with `torchrun --nproc_per_node {world} -m sparsegrad finetune ...`, or unset "
            "WORLD_SIZE for one process")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend)
    except Exception as exc:  # a bad address, a port in use, a peer that never came
        raise DistributedSetupError(f"could not start the {backend} process group ({exc}); check MASTER_ADDR/"
                                    "MASTER_PORT or launch with torchrun") from None
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    ctx = DistContext(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device,
                      backend=backend, created=True)
    import atexit

    atexit.register(ctx.close)
    return ctx


def wrap_ddp(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``model`` (itself when single-process). Buffers are not re-broadcast at
    each forward: the frozen base weights and bases never change, and every rank updates the SparseGrad deltas
    identically from the all-reduced gradients."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    # torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers (the init sync it keeps is harmless here).
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=device_ids, **no_sync)


# ------------------------------------------------------------------------------------------------- micro-batches
@dataclass
class MicroBatch:
    """One forward/backward of one rank: its rows of the global batch, how many real rows it holds (0: a stand-in
    row so that the rank still takes part in the gradient all-reduce) and the factor its mean loss is scaled by."""

    batch: dict[str, torch.Tensor]
    rows: int
    scale: float
    weight: float = 0.0
    """What this micro-batch's mean loss averages over (rows, or target tokens), 0 for a stand-in row."""


def even_parts(n: int, parts: int) -> list[range]:
    """``range(n)`` cut into ``parts`` contiguous near-equal pieces (the first ``n % parts`` one longer)."""
    q, r = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = q + (1 if i < r else 0)
        out.append(range(start, start + size))
        start += size
    return out


def take_rows(batch: dict[str, torch.Tensor], rows: range) -> dict[str, torch.Tensor]:
    """Rows of a padded batch, with the padding columns no kept row needs dropped (right or left padding)."""
    n = next(iter(batch.values())).shape[0]
    if rows.start == 0 and rows.stop == n:
        out = batch
    else:
        out = {k: v[rows.start:rows.stop] for k, v in batch.items()}
    mask = out.get("attention_mask")
    if mask is None or mask.dim() != 2:
        return out
    keep = mask.bool().any(dim=0)
    if bool(keep.all()):
        return out
    length = mask.shape[1]
    return {k: (v[:, keep] if v.dim() >= 2 and v.shape[1] == length else v) for k, v in out.items()}


def step_micro_batches(batch: dict[str, torch.Tensor], rank: int, world: int, grad_accum: int, *,
                       keep_empty: bool = False, weight: Callable[[dict[str, torch.Tensor]], float] | None = None,
                       total: float | None = None) -> list[MicroBatch]:
    """This rank's micro-batches of one global batch (see the module docstring). A micro-batch slot that is empty
    on every rank (a short last batch) is left out on every rank unless ``keep_empty``; a slot empty only here gets
    a stand-in row with scale 0. ``weight`` (default: rows) is what a micro-batch's mean loss averages over, and
    ``total`` its sum over the global batch: each loss is scaled by ``weight x world / total``."""
    n = next(iter(batch.values())).shape[0]
    parts = even_parts(n, grad_accum * world)
    total = float(n if total is None else total)
    out = []
    for i in range(grad_accum):
        slot = parts[i * world:(i + 1) * world]
        if not keep_empty and sum(len(p) for p in slot) == 0:
            continue
        mine = slot[rank]
        if len(mine):
            rows = take_rows(batch, mine)
            w = float(len(mine)) if weight is None else float(weight(rows))
            out.append(MicroBatch(rows, len(mine), w * world / total if total else 0.0, w))
        else:
            out.append(MicroBatch(take_rows(batch, range(0, 1)), 0, 0.0, 0.0))
    return out


def micro_to(mb: MicroBatch, device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return mb.batch
    return {k: v.to(device, non_blocking=True) for k, v in mb.batch.items()}


def scaled_loss_fn(device: torch.device):
    """``loss_fn`` for `sg.estimate_bases` over `MicroBatch` items: the micro-batch's scaled mean loss."""

    def loss_fn(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        loss = model(**micro_to(mb, device)).loss
        return loss if mb.scale == 1.0 else loss * mb.scale

    return loss_fn


def no_sync_unless(model: torch.nn.Module, last: bool):
    """DDP's ``no_sync`` for every micro-batch but the last of a step (a null context otherwise)."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()

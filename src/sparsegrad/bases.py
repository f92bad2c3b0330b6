"""Calibration: HOSVD bases of the weight gradients, from streaming Gram matrices.

For the gradients G_1..G_n (out x in) of every block of one kind over the calibration steps, the HOSVD factors
of the stacked n x out x in tensor are the left singular vectors of its mode unfoldings. Those equal the
eigenvectors of S_out = Σ G Gᵀ and S_in = Σ Gᵀ G (sorted by descending eigenvalue), so only the two Gram matrices
are accumulated and the stack is never stored. The rotated gradient u_outᵀ G u_in is then a slice of the HOSVD
core, where the gradient energy concentrates.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import SparseGradConfig
from .io import atomic_write_bytes, read_safetensors
from .layer import topk_energy_share, topk_indices
from .targets import find_targets, kind_of, with_linear_targets

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class SparseGradBases:
    """Per kind, the orthogonal pair (u_out, u_in) in fp32; optionally a fixed support per module and a report."""

    factors: dict[str, tuple[Tensor, Tensor]]
    identity: bool = False
    fixed_supports: dict[str, Tensor] = field(default_factory=dict)
    report: dict[str, dict[str, Any]] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return list(self.factors)

    def get(self, kind: str) -> tuple[Tensor, Tensor]:
        if kind not in self.factors:
            raise ValueError(f"the bases have no factors for kind {kind!r} (they hold: {sorted(self.factors)}): they "
                             "were calibrated for another model or target_modules; calibrate on this one")
        return self.factors[kind]

    def save(self, path: str | Path) -> None:
        """One safetensors file (atomic write): factors, fixed supports, and the report as metadata."""
        tensors: dict[str, Tensor] = {}
        for kind, (u_out, u_in) in self.factors.items():
            tensors[f"u_out/{kind}"] = u_out.detach().float().cpu().contiguous()
            tensors[f"u_in/{kind}"] = u_in.detach().float().cpu().contiguous()
        for name, idx in self.fixed_supports.items():
            tensors[f"support/{name}"] = idx.detach().to(torch.int64).cpu().contiguous()
        meta = {"format": "sparsegrad-bases", "version": "1", "identity": json.dumps(self.identity),
                "report": json.dumps(self.report)}
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> "SparseGradBases":
        tensors, data = read_safetensors(path, "bases file")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        if meta.get("format") != "sparsegrad-bases":
            raise ValueError(f"{path} is not a sparsegrad bases file (no 'sparsegrad-bases' metadata); write bases "
                             "with SparseGradBases.save or `sparsegrad calibrate`")
        factors: dict[str, list[Tensor | None]] = {}
        supports: dict[str, Tensor] = {}
        for key, tensor in tensors.items():
            group, _, name = key.partition("/")
            if group in ("u_out", "u_in"):
                factors.setdefault(name, [None, None])[0 if group == "u_out" else 1] = tensor
            elif group == "support":
                supports[name] = tensor
        for kind, (u_out, u_in) in factors.items():
            if u_out is None or u_in is None:
                raise ValueError(f"bases file {path} lacks a factor of kind {kind!r}: the file is damaged or was not "
                                 "written by SparseGradBases.save; calibrate again")
            check_orthogonal(u_out, f"u_out of {kind!r} in {path}")
            check_orthogonal(u_in, f"u_in of {kind!r} in {path}")
        try:
            identity, report = json.loads(meta.get("identity", "false")), json.loads(meta.get("report", "{}"))
        except ValueError:
            identity = report = None
        if not isinstance(identity, bool) or not isinstance(report, dict):
            raise ValueError(f"bases file {path}: its 'identity' or 'report' metadata is damaged; calibrate again")
        return cls(factors={k: (v[0], v[1]) for k, v in factors.items()}, identity=identity,
                   fixed_supports=supports, report=report)


ORTHOGONALITY_TOL = 1e-3
"""Largest accepted |uᵀ(u x) - x| / max|x| over the probes of `check_orthogonal`. Calibrated bases (fp32 storage)
measured 7e-7 at n=64 to 2.7e-6 at n=3072 (the rounding grows like eps·sqrt(n)), so ~300x margin at n=3072; a whole
basis scaled by 1.001 (error 2e-3) fails."""


def check_orthogonal(u: Tensor, what: str, tol: float = ORTHOGONALITY_TOL) -> None:
    """Refuse a square basis that is not orthogonal (damaged or edited): uᵀ(u x) must give back x for 4 fixed
    random probe vectors x. O(n²) per probe instead of the n³ of forming uᵀu, so it stays cheap on 14336-wide
    layers; a non-orthogonal u passes only if the probes miss uᵀu - I, which random probes do with probability 0."""
    if u.dim() != 2 or u.shape[0] != u.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(u.shape)}: the file is damaged; "
                         "calibrate again")
    probes = torch.randn(u.shape[0], 4, generator=torch.Generator().manual_seed(0)).to(u.device)
    uf = u.float()
    err = float((uf.T @ (uf @ probes) - probes).abs().max() / probes.abs().max())
    if not err <= tol:  # a NaN error fails too
        raise ValueError(f"{what} is not orthogonal (|uᵀu x - x| reaches {err:.3g} of |x|, tolerance {tol:g}): the "
                         "basis was damaged or edited; calibrate again")


def factors_from_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of a symmetric PSD Gram matrix, columns sorted by descending eigenvalue, each column's sign
    fixed so that its largest-magnitude entry is positive. Returns (vectors, eigenvalues)."""
    threads = torch.get_num_threads()
    if gram.device.type == "cpu":
        torch.set_num_threads(1)  # LAPACK's threaded eigh slows down 10-50x on a busy CPU; one thread is steady
    try:
        evals, evecs = torch.linalg.eigh(gram)
    finally:
        torch.set_num_threads(threads)
    evals, evecs = evals.flip(0), evecs.flip(1)
    pivot = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs[pivot, torch.arange(evecs.shape[1], device=evecs.device)])
    signs[signs == 0] = 1
    return (evecs * signs).contiguous(), evals.contiguous()


def identity_bases(model: nn.Module, config: SparseGradConfig) -> SparseGradBases:
    """Identity bases for every kind the config selects: SparseGrad with them is MeProp (top-k of ∂L/∂W)."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, module in find_targets(model, config):
        out_f, in_f = module.weight.shape
        factors.setdefault(kind_of(name, config), (torch.eye(out_f), torch.eye(in_f)))
    return SparseGradBases(factors=factors, identity=True)


def broadcast_bases(bases: SparseGradBases | None, src: int = 0, group: Any = None) -> SparseGradBases:
    """Rank ``src``'s bases on every rank of an initialised ``torch.distributed`` process group (call it on every
    rank; other ranks may pass None). Factors, fixed supports, the identity flag and the report are copied, so every
    rank converts its model with bit-identical bases and supports. Without an initialised process group the bases
    are returned as they are."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if not isinstance(bases, SparseGradBases):
            raise ValueError("broadcast_bases needs SparseGradBases when torch.distributed is not initialised")
        return bases
    is_src = dist.get_rank() == src  # src is a global rank, as in torch.distributed.broadcast
    meta: dict[str, Any] | None = None
    if is_src:
        if isinstance(bases, SparseGradBases):
            meta = {"identity": bool(bases.identity), "report": bases.report,
                    "factors": [(k, tuple(a.shape), tuple(b.shape)) for k, (a, b) in bases.factors.items()],
                    "supports": [(n, int(t.numel())) for n, t in bases.fixed_supports.items()]}
        else:
            meta = {"error": f"rank {src} has no SparseGradBases to broadcast (got {type(bases).__name__})"}
    box = [meta]
    dist.broadcast_object_list(box, src=src, group=group)
    meta = box[0]
    if "error" in meta:  # raised on every rank, not only the source: no rank is left waiting
        raise ValueError(meta["error"])
    device = _comm_device(group)

    def send(tensor: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        buf = (tensor.detach().to(device=device, dtype=dtype).contiguous() if is_src
               else torch.empty(shape, dtype=dtype, device=device))
        dist.broadcast(buf, src=src, group=group)
        return buf.cpu()

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for kind, out_shape, in_shape in meta["factors"]:
        a, b = bases.factors[kind] if is_src else (None, None)
        factors[kind] = (send(a, out_shape, torch.float32), send(b, in_shape, torch.float32))
    supports = {}
    for name, numel in meta["supports"]:
        supports[name] = send(bases.fixed_supports[name] if is_src else None, (numel,), torch.int64)
    if is_src:
        return bases
    return SparseGradBases(factors=factors, identity=meta["identity"], fixed_supports=supports, report=meta["report"])


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out["loss"]
    if loss is None:
        raise ValueError("model(**batch) returned no loss: pass labels in the batch or give loss_fn")
    return loss


def _check_batch(model: nn.Module, batch: Any, step: int, default_loss: bool) -> None:
    """Before the forward: a batch ``model(**batch)`` can take, with rows, and labels the model can score."""
    if not isinstance(batch, Mapping):
        if default_loss:
            raise TypeError(f"calibration batch {step} is a {type(batch).__name__}: batches must be dicts fed as "
                            "model(**batch), or pass loss_fn(model, batch) for other batches")
        return
    tensors = {k: v for k, v in batch.items() if isinstance(v, Tensor)}
    empty = [k for k, v in tensors.items() if v.dim() > 0 and v.shape[0] == 0]
    if empty:
        raise ValueError(f"calibration batch {step} has 0 rows ({empty[0]} is {tuple(tensors[empty[0]].shape)}): drop "
                         "empty batches")
    labels = tensors.get("labels")
    config = getattr(model, "config", None)
    if labels is None or config is None or labels.is_floating_point() or labels.numel() == 0:
        return
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if labels.dim() > 1 and lm_head is not None:  # one label per token of a language model: its vocabulary
        bound, what = lm_head.weight.shape[0], "an output vocabulary of "
    else:  # one label per row (sequence classification) or per token (token classification)
        bound, what = getattr(config, "num_labels", None), "num_labels="
    used = labels[labels != -100]  # -100: ignored by cross-entropy
    if isinstance(bound, int) and used.numel() and (int(used.min()) < 0 or int(used.max()) >= bound):
        raise ValueError(f"calibration batch {step}: labels range over [{int(used.min())}, {int(used.max())}] but the "
                         f"model has {what}{bound} (labels must be in 0..{bound - 1}, or -100 to ignore)")


def _checked_loss(loss: Any, step: int) -> Tensor:
    """The loss of one calibration batch: a scalar tensor that depends on the model."""
    if not isinstance(loss, Tensor):
        raise ValueError(f"loss_fn returned a {type(loss).__name__} at calibration step {step}: it must return the "
                         "loss as a scalar tensor (not .item(), not a float)")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn returned a tensor of shape {tuple(loss.shape)} at calibration step {step}: it "
                         "must be one scalar (take .mean() or .sum() of per-example losses)")
    if not loss.requires_grad:
        raise ValueError(f"the loss at calibration step {step} does not depend on the model's weights (no grad): "
                         "compute it from the model's outputs, outside torch.no_grad()")
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    return batch


def _distributed_world() -> int:
    """The world size of the initialised default process group (1 when torch.distributed is not in use)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _comm_device(group: Any = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    import torch.distributed as dist

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _GradCapture:
    """Makes only the target weights require grad and hands each gradient to a callback as soon as it has been
    accumulated (then frees it). Restores every requires_grad flag and .grad on exit.

    With ``accumulate`` the gradients are summed over backward passes instead and handed over by `flush` (one
    calibration step of several micro-batches); with ``sync`` `flush` also averages them over the ranks of the
    default process group first, so every rank sees the gradient of the global batch."""

    def __init__(self, model: nn.Module, targets: list[tuple[str, nn.Module]], *, accumulate: bool = False,
                 sync: bool = False):
        self.model, self.targets = model, targets
        self.accumulate, self.sync = accumulate or sync, sync
        self.pending: dict[str, Tensor] = {}

    def __enter__(self) -> "_GradCapture":
        self.saved = [(p, p.requires_grad, p.grad) for p in self.model.parameters()]
        for p, _, _ in self.saved:
            p.requires_grad_(False)
            p.grad = None
        for _, module in self.targets:
            module.weight.requires_grad_(True)
        self.handles: list[Any] = []
        self.callback: Callable[[str, Tensor], None] | None = None
        for name, module in self.targets:
            self.handles.append(module.weight.register_post_accumulate_grad_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(param: Tensor) -> None:
            grad, param.grad = param.grad, None
            if self.accumulate:
                prev = self.pending.get(name)
                self.pending[name] = grad if prev is None else prev.add_(grad)
            elif self.callback is not None:
                self.callback(name, grad)
        return hook

    def flush(self, bad_loss: bool = False) -> bool:
        """Hand the accumulated gradient of every target to the callback, in model order (the same order on every
        rank), averaged over the ranks when syncing. Returns whether a loss of the step was not finite on any
        rank (all ranks agree)."""
        if self.sync:
            import torch.distributed as dist

            world = dist.get_world_size()
            device = _comm_device()
            flag = torch.tensor([float(bad_loss)], dtype=torch.float64, device=device)
            dist.all_reduce(flag)
            bad_loss = bool(flag.item() > 0)
        if bad_loss:  # every rank agrees: drop the step's gradients, the caller raises
            self.pending.clear()
            return True
        for name, module in self.targets:
            grad = self.pending.pop(name, None)
            if grad is None:  # no gradient reached this target on this rank: it still takes part in the reduction
                grad = torch.zeros_like(module.weight)
            if self.sync:
                on_device = grad.to(device)
                dist.all_reduce(on_device)
                grad = on_device.to(grad.device).div_(world)
            if self.callback is not None:
                self.callback(name, grad)
        return False

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for p, flag, grad in self.saved:
            p.requires_grad_(flag)
            p.grad = grad


@with_linear_targets  # fused MoE experts and GPT-2 Conv1D calibrate as nn.Linear modules (targets.py)
def estimate_bases(
    model: nn.Module,
    config: SparseGradConfig,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    steps: int | None = None,
    *,
    progress: bool = True,
    grad_accum: int = 1,
    all_reduce_grads: bool = False,
) -> SparseGradBases:
    """Calibrate the HOSVD bases of every kind of target module.

    ``batches``: dicts fed as ``model(**batch)`` (loss = ``.loss``) unless ``loss_fn(model, batch)`` is given.
    ``model`` may already be converted (its SparseGrad layers' dense weight gradients are used): that is how a
    basis refresh recalibrates at the current point (`sparsegrad.refresh_bases`).
    ``steps``: how many calibration steps to use (default: all the batches). No optimizer step is taken; the
    model's parameters, ``requires_grad`` flags and ``.grad`` are exactly as before on return. With
    ``config.score_steps`` > 0 the first steps are run once more to measure, on the calibration gradients, the share
    of gradient energy the top-k entries hold in the rotated vs the original basis (``bases.report``), and, for
    ``support="fixed"``, to choose each module's support from its accumulated rotated-gradient energy.

    Gradient accumulation and data parallelism, as in training: with ``grad_accum`` = N every N consecutive batches
    (micro-batches) form one calibration step whose gradients are summed before they enter the Gram matrices (scale
    each micro-batch's loss in ``loss_fn`` so that the sum is the gradient of the whole step). With
    ``all_reduce_grads=True``, called on every rank of an initialised ``torch.distributed`` process group on that
    rank's shard of each step, each step's gradient is averaged over the ranks (as DDP does) before it is used, so
    every rank computes the bases of the global batches; follow with `broadcast_bases` to make them bit-identical
    whatever the hardware. Every rank must then pass the same number of batches.
    """
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(grad_accum, bool) or not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be a positive integer, got {grad_accum!r}")
    sync = bool(all_reduce_grads) and _distributed_world() > 1
    loss_fn = loss_fn or _default_loss
    targets = find_targets(model, config, allow_converted=True)  # a converted model too: a basis refresh
    kinds = {name: kind_of(name, config) for name, _ in targets}
    budgets = {name: config.budget(*m.weight.shape, name=name) for name, m in targets}
    device = targets[0][1].weight.device
    acc_dtype = torch.float64 if config.calibration_dtype == "float64" else torch.float32
    gram_out: dict[str, Tensor] = {}
    gram_in: dict[str, Tensor] = {}
    energy: dict[str, float] = {}
    for name, module in targets:
        out_f, in_f = module.weight.shape
        kind = kinds[name]
        if kind in gram_out and gram_out[kind].shape[0] != out_f or kind in gram_in and gram_in[kind].shape[0] != in_f:
            raise ValueError(f"modules of kind {kind!r} have different shapes; use basis_sharing='layer'")
        gram_out.setdefault(kind, torch.zeros(out_f, out_f, dtype=acc_dtype, device=device))
        gram_in.setdefault(kind, torch.zeros(in_f, in_f, dtype=acc_dtype, device=device))
        energy.setdefault(kind, 0.0)

    def accumulate(name: str, grad: Tensor) -> None:
        g = grad.to(acc_dtype)
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"calibration gradient of {name} is not finite (NaN or inf): check the data and loss")
        kind = kinds[name]
        gram_out[kind].addmm_(g, g.T)
        gram_in[kind].addmm_(g.T, g)
        energy[kind] += float(g.square().sum())

    want_scores = config.score_steps is None or config.score_steps > 0
    grouped = grad_accum > 1 or sync
    kept: list[Any] = []
    start = time.perf_counter()
    used = 0
    in_step = 0
    bad_loss = None
    with _GradCapture(model, targets, accumulate=grouped, sync=sync) as capture:
        capture.callback = accumulate
        bar = tqdm(total=steps, desc="calibrating SparseGrad bases", unit="step", disable=not progress)
        for batch in batches:
            if steps is not None and used >= steps:
                break
            batch = _to_device(batch, device)
            _check_batch(model, batch, used, loss_fn is _default_loss)
            loss = _checked_loss(loss_fn(model, batch), used)
            if not bool(torch.isfinite(loss.detach()).all()):
                message = (f"calibration loss is not finite at step {used}: {float(loss.detach()):.4g}; check the "
                           "batches (labels in range, no empty inputs) and the model's dtype")
                if not sync:
                    raise ValueError(message)
                bad_loss = bad_loss or message  # raised on every rank at the end of the step
            loss.backward()
            if want_scores and (config.score_steps is None or len(kept) < config.score_steps * grad_accum):
                kept.append(batch)
            in_step += 1
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if grouped and in_step < grad_accum:
                continue
            if grouped and capture.flush(bad_loss is not None):
                raise ValueError(bad_loss or f"calibration loss is not finite on another rank at step {used}")
            used += 1
            in_step = 0
            bar.update(1)
        if grouped and in_step:  # a last, shorter step
            if capture.flush(bad_loss is not None):
                raise ValueError(bad_loss or f"calibration loss is not finite on another rank at step {used}")
            used += 1
        bar.close()
        if used == 0:
            raise ValueError("calibration got no batches: pass a non-empty iterable of batches")
        zero = [kind for kind, e in energy.items() if e == 0.0]
        if zero:
            raise ValueError(
                f"calibration gradients of {zero} are all zero over {used} steps: the targets do not reach "
                "the loss (check target_modules and that the batches carry labels)"
            )
        factors: dict[str, tuple[Tensor, Tensor]] = {}
        for kind in gram_out:
            u_out, _ = factors_from_gram(gram_out[kind])
            u_in, _ = factors_from_gram(gram_in[kind])
            factors[kind] = (u_out.float(), u_in.float())
        gram_out.clear()
        gram_in.clear()
        bases = SparseGradBases(factors={k: (a.cpu(), b.cpu()) for k, (a, b) in factors.items()})
        bases.report = {kind: {"modules": sum(1 for n in kinds if kinds[n] == kind), "steps": used}
                        for kind in factors}
        if kept:
            _score(model, config, kept, loss_fn, capture, kinds, budgets, factors, bases, grad_accum if grouped else 1)
    elapsed = time.perf_counter() - start
    for entry in bases.report.values():
        entry["calibration_time_s"] = round(elapsed, 3)
    return bases


def _score(model, config, kept, loss_fn, capture, kinds, budgets, factors, bases, grad_accum: int = 1) -> None:
    """Second pass over the kept batches: top-k energy shares (report) and accumulated rotated energy (support).
    With ``grad_accum`` > 1 (or a synced capture) every ``grad_accum`` batches are one step, as in calibration."""
    shares: dict[str, list[tuple[float, float]]] = {name: [] for name in kinds}
    scores: dict[str, Tensor] = {}

    def score(name: str, grad: Tensor) -> None:
        u_out, u_in = factors[kinds[name]]
        g = grad.float()
        rotated = u_out.T @ g @ u_in
        shares[name].append((topk_energy_share(rotated, budgets[name]), topk_energy_share(g, budgets[name])))
        if config.support == "fixed":
            sq = rotated.square()
            scores[name] = sq if name not in scores else scores[name].add_(sq)

    capture.callback = score
    for i, batch in enumerate(kept):
        loss_fn(model, batch).backward()
        if capture.accumulate and ((i + 1) % grad_accum == 0 or i == len(kept) - 1):
            capture.flush()
    for kind, entry in bases.report.items():
        names = [n for n in kinds if kinds[n] == kind]
        pairs = [p for n in names for p in shares[n]]
        entry["k"] = round(sum(budgets[n] for n in names) / len(names))
        entry["score_steps"] = -(-len(kept) // grad_accum)
        entry["energy_topk_rotated"] = round(sum(p[0] for p in pairs) / len(pairs), 4)
        entry["energy_topk_original"] = round(sum(p[1] for p in pairs) / len(pairs), 4)
        entry["per_module"] = {
            n: {"rotated": round(sum(p[0] for p in shares[n]) / len(shares[n]), 4),
                "original": round(sum(p[1] for p in shares[n]) / len(shares[n]), 4)}
            for n in names
        }
    for name, sq in scores.items():
        bases.fixed_supports[name] = topk_indices(sq, budgets[name]).cpu()

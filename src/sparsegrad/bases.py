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
from .targets import find_targets, kind_of

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
            raise ValueError(f"the bases have no factors for kind {kind!r} (they hold: {sorted(self.factors)})")
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
            raise ValueError(f"{path} is not a sparsegrad bases file (no 'sparsegrad-bases' metadata)")
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
                raise ValueError(f"bases file {path} lacks a factor of kind {kind!r}")
            _check_square(u_out, f"u_out of {kind!r}")
            _check_square(u_in, f"u_in of {kind!r}")
        return cls(
            factors={k: (v[0], v[1]) for k, v in factors.items()},
            identity=json.loads(meta.get("identity", "false")),
            fixed_supports=supports,
            report=json.loads(meta.get("report", "{}")),
        )


def _check_square(t: Tensor, what: str) -> None:
    if t.dim() != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{what} must be a square matrix, got shape {tuple(t.shape)}")


def factors_from_gram(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of a symmetric PSD Gram matrix, columns sorted by descending eigenvalue, each column's sign
    fixed so that its largest-magnitude entry is positive. Returns (vectors, eigenvalues)."""
    evals, evecs = torch.linalg.eigh(gram)
    evals, evecs = evals.flip(0), evecs.flip(1)
    pivot = evecs.abs().argmax(dim=0)
    signs = torch.sign(evecs[pivot, torch.arange(evecs.shape[1], device=evecs.device)])
    signs[signs == 0] = 1
    return evecs * signs, evals


def identity_bases(model: nn.Module, config: SparseGradConfig) -> SparseGradBases:
    """Identity bases for every kind the config selects: SparseGrad with them is MeProp (top-k of ∂L/∂W)."""
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    for name, module in find_targets(model, config):
        out_f, in_f = module.weight.shape
        factors.setdefault(kind_of(name, config), (torch.eye(out_f), torch.eye(in_f)))
    return SparseGradBases(factors=factors, identity=True)


def _default_loss(model: nn.Module, batch: Any) -> Tensor:
    out = model(**batch)
    loss = out.loss if hasattr(out, "loss") else out["loss"]
    if loss is None:
        raise ValueError("model(**batch) returned no loss: pass labels in the batch or give loss_fn")
    return loss


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    return batch


class _GradCapture:
    """Makes only the target weights require grad and hands each gradient to a callback as soon as it has been
    accumulated (then frees it). Restores every requires_grad flag and .grad on exit."""

    def __init__(self, model: nn.Module, targets: list[tuple[str, nn.Module]]):
        self.model, self.targets = model, targets

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
            if self.callback is not None:
                self.callback(name, grad)
        return hook

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        for p, flag, grad in self.saved:
            p.requires_grad_(flag)
            p.grad = grad


def estimate_bases(
    model: nn.Module,
    config: SparseGradConfig,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    steps: int | None = None,
    *,
    progress: bool = True,
) -> SparseGradBases:
    """Calibrate the HOSVD bases of every kind of target module.

    ``batches``: dicts fed as ``model(**batch)`` (loss = ``.loss``) unless ``loss_fn(model, batch)`` is given.
    ``steps``: how many batches to use (default: all of them). No optimizer step is taken; the model's parameters,
    ``requires_grad`` flags and ``.grad`` are exactly as before on return. With ``config.score_steps`` > 0 the
    first batches are run once more to measure, on the calibration gradients, the share of gradient energy the
    top-k entries hold in the rotated vs the original basis (``bases.report``), and, for ``support="fixed"``,
    to choose each module's support from its accumulated rotated-gradient energy.
    """
    if steps is not None and (not isinstance(steps, int) or steps <= 0):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    loss_fn = loss_fn or _default_loss
    targets = find_targets(model, config)
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
    kept: list[Any] = []
    start = time.perf_counter()
    used = 0
    with _GradCapture(model, targets) as capture:
        capture.callback = accumulate
        bar = tqdm(total=steps, desc="calibrating SparseGrad bases", unit="step", disable=not progress)
        for batch in batches:
            if steps is not None and used >= steps:
                break
            batch = _to_device(batch, device)
            loss = loss_fn(model, batch)
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(f"calibration loss is not finite at step {used}: {float(loss.detach()):.4g}")
            loss.backward()
            if want_scores and (config.score_steps is None or len(kept) < config.score_steps):
                kept.append(batch)
            used += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
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
            _score(model, config, kept, loss_fn, capture, kinds, budgets, factors, bases)
    elapsed = time.perf_counter() - start
    for entry in bases.report.values():
        entry["calibration_time_s"] = round(elapsed, 3)
    return bases


def _score(model, config, kept, loss_fn, capture, kinds, budgets, factors, bases) -> None:
    """Second pass over the kept batches: top-k energy shares (report) and accumulated rotated energy (support)."""
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
    for batch in kept:
        loss_fn(model, batch).backward()
    for kind, entry in bases.report.items():
        names = [n for n in kinds if kinds[n] == kind]
        pairs = [p for n in names for p in shares[n]]
        entry["k"] = round(sum(budgets[n] for n in names) / len(names))
        entry["score_steps"] = len(kept)
        entry["energy_topk_rotated"] = round(sum(p[0] for p in pairs) / len(pairs), 4)
        entry["energy_topk_original"] = round(sum(p[1] for p in pairs) / len(pairs), 4)
        entry["per_module"] = {
            n: {"rotated": round(sum(p[0] for p in shares[n]) / len(shares[n]), 4),
                "original": round(sum(p[1] for p in shares[n]) / len(shares[n]), 4)}
            for n in names
        }
    for name, sq in scores.items():
        bases.fixed_supports[name] = topk_indices(sq, budgets[name]).cpu()

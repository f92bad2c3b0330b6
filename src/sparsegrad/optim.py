"""`SparseGradAdamW`: AdamW for every parameter, plus the paper's dynamic top-k step for SparseGrad weights.

For a dynamic-support `SparseGradLinear`, ``weight.grad`` holds the plain dense gradient G (summed over
micro-batches, all-reduced under DDP). The step rotates it (u_outᵀ G u_in), keeps exactly the k entries of
largest magnitude, and applies a lazy Adam to them: moments and bias correction are kept per entry and touched only
where the gradient is. Moments are stored only for entries that have ever been selected (aligned with the layer's
``delta_indices``), so the state grows with the union of supports, never to a dense out x in pair.

Fixed-support layers train ``delta_values`` (k long) as an ordinary parameter under AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .layer import SparseGradLinear, topk_candidates, topk_indices
from .layerwise import enable_layerwise_step


def sparse_adam_update(
    values: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    entry_steps: Tensor,
    pos: Tensor,
    grad: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> None:
    """In place, at positions ``pos`` only: decoupled weight decay, Adam moments, per-entry bias correction."""
    if maximize:
        grad = -grad
    steps = entry_steps[pos] + 1
    entry_steps[pos] = steps
    m = exp_avg[pos].mul_(beta1).add_(grad, alpha=1 - beta1)
    v = exp_avg_sq[pos].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg[pos], exp_avg_sq[pos] = m, v
    bias1 = 1 - beta1**steps
    bias2 = 1 - beta2**steps
    denom = (v / bias2).sqrt_().add_(eps)
    new = values[pos]
    if weight_decay:
        new.mul_(1 - lr * weight_decay)
    values[pos] = new - lr * (m / bias1) / denom


def _foreach_lazy_adam(values: list[Tensor], exp_avg: list[Tensor], exp_avg_sq: list[Tensor], steps: list[Tensor],
                       grads: list[Tensor], group: dict) -> list[Tensor]:
    """`sparse_adam_update`'s arithmetic on gathered entries of several layers at once (one kernel per operation
    for all of them), in place; returns each layer's change of its values."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    if group.get("maximize", False):
        grads = torch._foreach_neg(grads)
    torch._foreach_add_(steps, 1.0)
    torch._foreach_mul_(exp_avg, beta1)
    torch._foreach_add_(exp_avg, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    bias1, bias2 = torch._foreach_pow(beta1, steps), torch._foreach_pow(beta2, steps)
    for bias in (bias1, bias2):  # 1 - beta**steps
        torch._foreach_neg_(bias)
        torch._foreach_add_(bias, 1.0)
    denom = torch._foreach_div(exp_avg_sq, bias2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    change = torch._foreach_div(exp_avg, bias1)
    torch._foreach_div_(change, denom)
    torch._foreach_mul_(change, -lr)
    if wd:
        torch._foreach_add_(change, values, alpha=-lr * wd)
    torch._foreach_add_(values, change)
    return change


# Exact rebuild of an incrementally updated weight every this many steps of its layer (fp32 drift: docs/benchmarks.md
# §7). Rebuilds also happen at every sync_weight, fold and eval-mode forward; the increments since the last one
# travel in the optimizer's state_dict, so that a resumed run replays them bit for bit.
EXACT_REBUILD_EVERY = 16
_JOURNAL_KEYS = ("rebuilt_indices", "rebuilt_values", "increment_indices", "increment_values", "increment_counts")


def _host_read(t: Tensor) -> list:
    """The step's one device-to-host read (a named range, so benchmarks/op_count.py counts it as a sync)."""
    with torch.profiler.record_function("sparsegrad::host_read"):
        return t.tolist()


class _Support:
    """A dynamic layer's support as the optimizer keeps it: a dense int32 position map (-1 = absent) over the
    out x in entries and append-only, capacity-doubling buffers aligned with it (indices, values, Adam's moments,
    per-entry step counts). The layer's delta and the optimizer state are views of the first ``n`` entries."""

    NAMES = ("exp_avg", "exp_avg_sq", "entry_steps")

    def __init__(self, layer: SparseGradLinear, state: dict):
        indices, values = layer._stored_delta()
        self.n = indices.numel()
        self.pos_map = torch.full((layer.out_features * layer.in_features,), -1, dtype=torch.int32,
                                  device=indices.device)
        self.pos_map[indices.long()] = torch.arange(self.n, dtype=torch.int32, device=indices.device)
        self.buffers = {"indices": indices.to(layer.index_dtype), "values": values.detach().float(),
                        **{name: state[name] for name in self.NAMES}}
        self.steps = int(state["step"])  # the layer's step count, kept on the host: exact rebuilds at multiples
        self.publish(layer, state, appended=False)

    def reserve(self, size: int, k: int) -> None:
        """Capacity for ``size`` entries (doubling, at least 4 steps' worth: appends cost O(k) amortised)."""
        cap = self.buffers["values"].numel()
        if size <= cap:
            return
        cap = max(size, 2 * cap, 4 * k)
        for name, buf in self.buffers.items():
            grown = buf.new_zeros(cap)
            grown[: self.n] = buf[: self.n]
            self.buffers[name] = grown

    def publish(self, layer: SparseGradLinear, state: dict, *, appended: bool) -> None:
        """Point the layer's delta and the optimizer state at the first ``n`` entries."""
        b, n = self.buffers, self.n
        layer.set_delta_storage(b["indices"][:n], b["values"][:n], appended=appended)
        for name in self.NAMES:
            state[name] = b[name][:n]
        self.key = layer._delta_key()
        self.state_ref = state["exp_avg"]


class SparseGradAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay) whose dynamic-support SparseGrad weights take the rotated top-k step.

    ``sparse_layers``: the dynamic-support `SparseGradLinear` modules whose ``weight`` is among ``params``.
    Arguments are validated by torch.optim.AdamW; everything else about the optimizer (param_groups, schedulers,
    state_dict) is standard. The state of a sparse weight is ``step`` and, aligned with the layer's
    ``delta_indices`` (sorted in a state_dict), ``exp_avg``, ``exp_avg_sq`` and ``entry_steps``.

    A step reads one small tensor back to the host for all layers together (finiteness, ties at the top-k cut,
    new support entries), keeps the support in O(k) (see `_Support`), and updates an fp32 weight by the step's k
    changes only (`SparseGradLinear.apply_increment`), with an exact rebuild every `EXACT_REBUILD_EVERY` steps.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, sparse_layers: Iterable[SparseGradLinear] = ()):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._layers: dict[nn.Parameter, SparseGradLinear] = {}
        self._supports: dict[nn.Parameter, _Support] = {}
        known = {p for g in self.param_groups for p in g["params"]}
        for layer in sparse_layers:
            if layer.support != "dynamic":
                raise ValueError(f"sparse_layers takes dynamic-support layers; {layer.kind} is {layer.support!r}")
            if layer.weight not in known:
                raise ValueError("a sparse layer's weight is not among the optimizer's params")
            self._layers[layer.weight] = layer

    # ------------------------------------------------------------------------------------------ support state
    def _support_of(self, param: nn.Parameter, layer: SparseGradLinear) -> _Support:
        """The layer's `_Support`, rebuilt when the layer's delta or the state changed behind the optimizer's back
        (sorted by a read, loaded, refreshed); a sort's permutation is applied to the moments."""
        state = self.state[param]
        support = self._supports.get(param)
        key = layer._delta_key()
        if support is not None and state and support.key == key and state.get("exp_avg") is support.state_ref:
            return support
        n = layer._stored_delta()[0].numel()
        if not state:  # a layer may arrive with a support already (resumed, loaded): fresh moments for it
            zeros = torch.zeros(n, dtype=torch.float32, device=param.device)
            state.update(step=torch.tensor(0.0), exp_avg=zeros, exp_avg_sq=zeros.clone(), entry_steps=zeros.clone())
        elif support is not None and state.get("exp_avg") is support.state_ref and layer._sort_record is not None \
                and layer._sort_record[0] == support.key and layer._sort_record[2] == key:
            order = layer._sort_record[1]
            for name in _Support.NAMES:
                state[name] = state[name][order]
        if state["exp_avg"].numel() != n:
            raise ValueError(
                f"optimizer state holds {state['exp_avg'].numel()} entries but the {layer.kind!r} layer's support "
                f"has {n}: restore the model and the optimizer from the same checkpoint"
            )
        support = self._supports[param] = _Support(layer, state)
        return support

    def state_dict(self):
        """The standard state_dict, every sparse layer's delta sorted (its moments along). A sparse weight's entry
        also holds the layer's increments since its last exact rebuild (`_JOURNAL_KEYS`), which `load_state_dict`
        replays so that the resumed weight is bit-identical; the live state is not changed."""
        for param, layer in self._layers.items():
            if self.state.get(param):
                if layer._delta_unsorted:
                    layer._sort_delta()
                self._support_of(param, layer)
        packed = super().state_dict()
        ids = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for param, layer in self._layers.items():
            journal = layer.increment_journal()
            if journal is not None and ids[id(param)] in packed["state"]:
                packed["state"][ids[id(param)]] = {**packed["state"][ids[id(param)]], **journal}
        return packed

    def bookkeeping_bytes(self) -> int:
        """Bytes the sparse step holds outside ``self.state``: each dynamic layer's dense int32 position map
        (4 bytes per weight entry) and the spare capacity of its append-only buffers (`_Support`)."""
        total = 0
        for support in self._supports.values():
            total += support.pos_map.numel() * support.pos_map.element_size()
            total += sum((buf.numel() - support.n) * buf.element_size() for buf in support.buffers.values())
        return total

    def load_state_dict(self, state_dict):
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        journals = {}
        for i, entry in state_dict["state"].items():
            if any(key in entry for key in _JOURNAL_KEYS):
                journals[i] = {key: entry[key] for key in _JOURNAL_KEYS if key in entry}
                state_dict["state"][i] = {k: v for k, v in entry.items() if k not in _JOURNAL_KEYS}
        super().load_state_dict(state_dict)
        self._supports.clear()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, journal in journals.items():
            layer = self._layers.get(params[int(i)])
            if layer is not None:
                layer.replay_increments(journal)

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def _select(self, param: nn.Parameter, layer: SparseGradLinear) -> tuple:
        """The step's top-k of the rotated gradient and where each entry sits (or will be appended) in the
        support, with the flags the host must read: (finite, tie, new entries). No host sync."""
        support = self._support_of(param, layer)
        rotated = layer.rotate(param.grad).reshape(-1)
        idx, tie, top = topk_candidates(rotated, layer.k)
        if not layer.identity_basis:  # the sparse-first weight update takes the entries in index order
            idx = idx.sort().values
        idx = idx.to(layer.index_dtype)
        pos, new_count = self._positions(support, idx)
        return [idx, rotated[idx], pos], (torch.isfinite(top), tie, new_count)

    @staticmethod
    def _positions(support: _Support, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Positions of ``idx`` in the support, new entries numbered from ``support.n`` on; their count."""
        pos = support.pos_map[idx]
        new = pos < 0
        rank = new.cumsum(0, dtype=torch.int32)
        return torch.where(new, rank + (support.n - 1), pos), rank[-1]

    @torch.no_grad()
    def _place(self, param: nn.Parameter, layer: SparseGradLinear, pick: list, tie: bool, new_count: int) -> None:
        """Write the step's new entries into the support (``pick`` = [idx, grad, pos], updated on a tie)."""
        support = self._supports[param]
        if tie:  # a tie straddles the cut (rare): the exact, lower-index-first set, with host syncs
            rotated = layer.rotate(param.grad).reshape(-1)
            idx = topk_indices(rotated, layer.k).to(layer.index_dtype)
            pos, count = self._positions(support, idx)
            pick[:] = [idx, rotated[idx], pos]
            new_count = int(count)
        idx, _, pos = pick
        state = self.state[param]
        state["step"] += 1
        support.reserve(support.n + new_count, layer.k)
        support.buffers["indices"][pos] = idx
        support.pos_map[idx] = pos
        support.n += new_count
        support.publish(layer, state, appended=new_count > 0)

    @torch.no_grad()
    def _sparse_steps(self, work: list, picks: list, group: dict) -> None:
        """Lazy Adam at the step's entries of every layer in ``group`` together, then each weight's update."""
        bufs = [self._supports[p].buffers for p, _ in work]
        names = ("values", "exp_avg", "exp_avg_sq", "entry_steps")
        gathered = {name: [b[name][pick[2]] for b, pick in zip(bufs, picks)] for name in names}
        changes = _foreach_lazy_adam(*(gathered[name] for name in names), [pick[1] for pick in picks], group)
        for j, ((param, layer), b, pick, change) in enumerate(zip(work, bufs, picks, changes)):
            for name in names:
                b[name][pick[2]] = gathered[name][j]
            support = self._supports[param]
            support.key = layer._delta_key()  # before any sort below, so that its permutation is recognised
            support.steps += 1
            if layer.weight.dtype == torch.float32 and support.steps % EXACT_REBUILD_EVERY:
                layer.apply_increment(pick[0], change)
            else:  # bf16/fp16 weights would round small increments away: rebuild exactly
                layer.sync_weight()

    @torch.no_grad()
    def _step_sparse(self, work: list) -> None:
        """The top-k lazy-Adam step of the dynamic weights in ``work`` ((param, layer, group), gradients complete)."""
        selected = [self._select(p, layer) for p, layer, _ in work]
        flags = []
        if selected:  # the step's one read back to the host, for all layers
            finite, tie, new = (torch.stack(column) for column in zip(*(flag for _, flag in selected)))
            flags = list(zip(*_host_read(torch.stack((finite.long(), tie.long(), new.long())))))
        for (_, layer, _), (finite, _, _) in zip(work, flags):
            if not finite:
                raise ValueError(f"non-finite gradient in SparseGrad layer of kind {layer.kind!r}")
        picks = [pick for pick, _ in selected]
        for (p, layer, _), pick, (_, tie, new_count) in zip(work, picks, flags):
            self._place(p, layer, pick, bool(tie), new_count)
        for group in self.param_groups:
            members = [i for i, (_, _, g) in enumerate(work) if g is group]
            if members:
                self._sparse_steps([work[i][:2] for i in members], [picks[i] for i in members], group)

    def step_weight(self, param: nn.Parameter) -> None:
        """The sparse step of one dynamic SparseGrad weight alone, its gradient complete: what `step` does to it,
        for the layer-wise mode (`sparsegrad.layerwise`), which calls it from the weight's post-accumulate-grad hook
        and then frees the gradient."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        self._step_sparse([(param, self._layers[param], group)])

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, self._layers[p], group) for group in self.param_groups for p in group["params"]
                if p in self._layers and p.grad is not None]
        self._step_sparse(work)
        stashed = []
        for p, _, _ in work:
            stashed.append((p, p.grad))
            p.grad = None  # hidden from AdamW's dense step, restored below
        try:
            super().step()
        finally:
            for p, grad in stashed:
                p.grad = grad
        return loss


def _no_decay(name: str, param: nn.Parameter) -> bool:
    lowered = name.lower()
    return param.dim() < 2 or lowered.endswith("bias") or "norm" in lowered


def create_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.0, betas=(0.9, 0.999),
                     eps: float = 1e-8, *, layerwise: bool = False) -> SparseGradAdamW:
    """One optimizer for every trainable parameter of ``model``.

    Dynamic-support SparseGrad weights take the rotated top-k lazy-Adam step; fixed-support delta values and all
    other trainable parameters (biases, LayerNorm, heads, attention when trained) take AdamW. Weight decay is
    decoupled and skips biases, norms and other 1-D parameters. ``layerwise``: the dynamic weights step inside the
    backward, one layer at a time (`sparsegrad.layerwise`; no gradient accumulation, clipping or DDP); the handle
    is ``optimizer.layerwise``.
    """
    layers = [m for m in model.modules() if isinstance(m, SparseGradLinear)]
    dynamic = [m for m in layers if m.support == "dynamic" and m.weight.requires_grad]
    sparse_weights = {m.weight for m in dynamic}
    decay, no_decay, sparse = [], [], []
    seen: set[nn.Parameter] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or p in seen:
            continue
        seen.add(p)
        if p in sparse_weights:
            sparse.append(p)
        elif name.endswith("delta_values"):
            decay.append(p)
        elif _no_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": sparse, "weight_decay": weight_decay, "name": "sparsegrad_dynamic"},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    optimizer = SparseGradAdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, sparse_layers=dynamic)
    if layerwise:
        optimizer.layerwise = enable_layerwise_step(optimizer)
    return optimizer

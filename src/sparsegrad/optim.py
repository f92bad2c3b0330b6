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

from .layer import SparseGradLinear, add_increments, increment_order_key, topk_indices, topk_rows
from .layerwise import enable_layerwise_step
from .position_map import PositionMap


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


_SLOTS = ("values", "exp_avg", "exp_avg_sq", "entry_steps")  # the float arrays aligned with a support
_MOMENTS = _SLOTS[1:]


class _Stack:
    """The dynamic layers of one param group that share a shape, k, dtype and device, stepped together: one
    top-k, one gather and one scatter per array and (for layers that share their bases, as the blocks of a kind
    do) one sparse product for all L layers, so that the ops per matrix fall by about L (on a GPU each op is a
    kernel launch).

    Per layer l: a row of a dense position map over the out x in entries (`PositionMap`: int16 while a row holds
    at most 65,535 entries, then int32) and a row of
    append-only, capacity-doubling buffers aligned with it (indices; values and Adam's moments and per-entry step
    counts in one float buffer). The layer's delta and its optimizer state are views of the first n[l] entries of
    its rows; `SparseGradAdamW` re-imports the stack when a layer's delta or state changed behind its back."""

    def __init__(self, members: list, states: list[dict], offsets: list[int]):
        self.params = [p for p, _ in members]
        self.offsets = offsets  # each layer's place among the optimizer's sparse layers: its rebuild phase
        self.layers = [layer for _, layer in members]
        first = self.layers[0]
        self.shape = (first.out_features, first.in_features)
        self.k, self.identity = first.k, first.identity_basis
        # each layer's (u_outᵀ, u_in) for the rotation, the transpose a view made once (one op fewer per step)
        self.bases = [] if self.identity else [(layer.u_out, layer.u_out.T, layer.u_in) for layer in self.layers]
        device = first.weight.device
        L, numel = len(self.layers), self.shape[0] * self.shape[1]
        stored = [layer._stored_delta() for layer in self.layers]
        self.n = [idx.numel() for idx, _ in stored]
        cap = max(max(self.n), 4 * self.k)
        self.pos_map = PositionMap(L, numel, max(self.n), device)
        self.indices = torch.zeros((L, cap), dtype=first.index_dtype, device=device)
        self.slots = torch.zeros((len(_SLOTS), L, cap), dtype=torch.float32, device=device)
        self.steps = torch.zeros(L, dtype=torch.float32)  # each layer's state["step"], on the host as torch keeps it
        for l, ((idx, vals), state) in enumerate(zip(stored, states)):
            n = self.n[l]
            self.pos_map.write(idx.long()[None], torch.arange(n, dtype=torch.int32, device=device)[None], row=l)
            self.indices[l, :n] = idx
            self.slots[0, l, :n] = vals.detach()
            for s, name in enumerate(_MOMENTS, 1):
                self.slots[s, l, :n] = state[name]
            self.steps[l] = float(state["step"])
        self.step_counts = [int(t) for t in self.steps.tolist()]  # host copies: exact rebuilds at multiples
        self.last = torch.tensor(self.n, dtype=torch.int32, device=device).sub_(1)[:, None]  # n - 1, on the device
        self.publish(states, appended=False)

    def valid(self, states: list[dict]) -> bool:
        """Whether every layer's delta, state and bases are still the ones this stack published and holds."""
        return all(layer._delta_key() == key and state.get("exp_avg") is ref and state.get("step") is step
                   for layer, state, (key, ref, step) in zip(self.layers, states, self.published)) and all(
            layer.u_out is u_out and layer.u_in is u_in for layer, (u_out, _, u_in) in zip(self.layers, self.bases))

    def publish(self, states: list[dict], *, appended: bool) -> None:
        """Point each layer's delta and optimizer state at the first n[l] entries of its rows."""
        cap = self.indices.shape[1]
        sizes = [size for n in self.n for size in (n, cap - n)]
        indices = self.indices.view(-1).split_with_sizes(sizes)[0::2]
        slots = self.slots.view(-1).split_with_sizes(sizes * len(_SLOTS))[0::2]
        L, self.published = len(self.layers), []
        steps = self.steps.unbind(0)
        for l, (layer, state) in enumerate(zip(self.layers, states)):
            layer.set_delta_storage(indices[l], slots[l], appended=appended)
            state["step"] = steps[l]
            for s, name in enumerate(_MOMENTS, 1):
                state[name] = slots[s * L + l]
            self.published.append((layer._delta_key(), state["exp_avg"], state["step"]))

    @torch.no_grad()
    def select(self) -> tuple:
        """The step's top-k of every layer's rotated gradient, in the order `add_increments` takes, and where each
        entry sits (or will be appended) in its row (L x k each: idx, grad, pos; new: the count of new entries per
        row), and the flags the host must read (3 x L: finite, tie, new). No host sync."""
        L, (o, i), k = len(self.layers), self.shape, self.k
        grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in self.params]
        if self.identity:  # the gradients themselves, unstacked (a stacked copy would be a pass over them)
            rotated = grads
        else:
            rotated = torch.empty((L, o, i), dtype=torch.float32, device=grads[0].device)
            for (_, u_out_t, u_in), grad, out in zip(self.bases, grads, rotated.unbind(0)):
                torch.mm(torch.mm(u_out_t, grad), u_in, out=out)  # = layer.rotate(grad)
            rotated = rotated.view(L, o * i)
        idx, grad, tie, top = topk_rows(rotated, k)  # per layer's row: no host sync
        idx, grad = self._ordered(idx, grad)
        pos, new = self._positions(idx)
        pick = {"idx": idx, "grad": grad, "pos": pos, "new": new}
        return pick, torch.stack((torch.isfinite(top), tie, new))  # int32, as ``new``

    def _ordered(self, idx: Tensor, grad: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """``idx`` (L x k) and ``grad`` (its scores) with each row sorted by `increment_order_key` (identity bases
        need no order)."""
        if self.identity:
            return idx, grad
        order = increment_order_key(idx, self.shape).sort(dim=1).indices
        return idx.gather(1, order), None if grad is None else grad.gather(1, order)

    def _positions(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Positions of ``idx`` in each row, new entries numbered from n[l] on; their count per row."""
        pos = self.pos_map.lookup(idx)
        new = pos < 0
        rank = new.cumsum(1, dtype=torch.int32)
        return torch.where(new, rank + self.last, pos), rank[:, -1]

    @torch.no_grad()
    def place(self, pick: dict, ties: list[bool], counts: list[int]) -> None:
        """Write the step's new entries into the rows; tied rows first get the exact, lower-index-first set (with
        host syncs: rare)."""
        if any(ties):
            for l in (l for l, tie in enumerate(ties) if tie):
                rotated = self.layers[l].rotate(self.params[l].grad).reshape(-1)
                exact = self._ordered(topk_indices(rotated, self.k)[None])[0][0]
                pick["idx"][l], pick["grad"][l] = exact, rotated[exact]
            pick["pos"], pick["new"] = self._positions(pick["idx"])
            counts = pick["new"].tolist()
        self.reserve(max(n + c for n, c in zip(self.n, counts)))
        idx, pos = pick["idx"], pick["pos"]
        pick["pos"] = pos.long()
        pick["stored"] = idx.to(self.indices.dtype)
        self.indices.scatter_(1, pick["pos"], pick["stored"])
        self.pos_map.write(idx, pos)
        self.last += pick["new"][:, None]
        self.n = [n + c for n, c in zip(self.n, counts)]
        self.steps += 1
        self.step_counts = [s + 1 for s in self.step_counts]

    def reserve(self, size: int) -> None:
        """Capacity for ``size`` entries per row (doubling, at least 4 steps' worth: appends cost O(k) amortised)."""
        self.pos_map.reserve(size)
        cap = self.indices.shape[1]
        if size <= cap:
            return
        cap = max(size, 2 * cap, 4 * self.k)
        for name in ("indices", "slots"):
            old = getattr(self, name)
            grown = old.new_zeros((*old.shape[:-1], cap))
            grown[..., : old.shape[-1]] = old
            setattr(self, name, grown)

    def gather(self, pick: dict) -> Tensor:
        """The step's entries of every float array in one gather: a (4, L, k) block, `_SLOTS` in order."""
        return self.slots.gather(2, pick["pos"].expand(len(_SLOTS), -1, -1))

    @torch.no_grad()
    def finish(self, pick: dict, block: Tensor, change: Tensor, states: list[dict]) -> None:
        """Scatter the updated entries back, hand the rows to the layers, and update each weight: by the step's
        changes (one stacked sparse product), or by an exact rebuild once every `EXACT_REBUILD_EVERY` steps of
        the layer and at every step for bf16/fp16 weights (small increments would round away)."""
        pos = pick["pos"].expand(len(_SLOTS), -1, -1)
        self.slots.scatter_(2, pos, block)
        self.publish(states, appended=True)
        # the optimizer's sparse layer l rebuilds at its steps EXACT_REBUILD_EVERY - l, 2 * EXACT_REBUILD_EVERY - l,
        # ...: staggered, so that no step rebuilds a whole stack at once (each rebuild is a dozen ops of its own);
        # the phase is the layer's own, not its place in a stack, so a layer steps alike alone (layer-wise) or stacked
        exact = [self.layers[0].weight.dtype != torch.float32 or (count + l) % EXACT_REBUILD_EVERY == 0
                 for l, count in zip(self.offsets, self.step_counts)]
        if not all(exact):
            bases = [layer._rotation() for layer in self.layers]
            add_increments([layer.weight.data for layer in self.layers], pick["stored"], change,
                           [u for u, _ in bases], [u for _, u in bases], self.shape)
        for layer, rebuild, stored, delta in zip(self.layers, exact, pick["stored"].unbind(0), change.unbind(0)):
            if rebuild:
                layer.sync_weight()
            else:
                layer.note_increment(stored, delta)


class SparseGradAdamW(torch.optim.AdamW):
    """AdamW (decoupled weight decay) whose dynamic-support SparseGrad weights take the rotated top-k step.

    ``sparse_layers``: the dynamic-support `SparseGradLinear` modules whose ``weight`` is among ``params``.
    Arguments are validated by torch.optim.AdamW; everything else about the optimizer (param_groups, schedulers,
    state_dict) is standard. The state of a sparse weight is ``step`` and, aligned with the layer's
    ``delta_indices`` (sorted in a state_dict), ``exp_avg``, ``exp_avg_sq`` and ``entry_steps``.

    A step reads one small tensor back to the host for all layers together (finiteness, ties at the top-k cut,
    new support entries), steps the layers of one shape together (`_Stack`: one top-k, gather, scatter
    and sparse product for all of them), keeps the support in O(k), and updates an fp32 weight by the step's k
    changes only (`add_increments`), with an exact rebuild every `EXACT_REBUILD_EVERY` steps.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, sparse_layers: Iterable[SparseGradLinear] = ()):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        self._layers: dict[nn.Parameter, SparseGradLinear] = {}
        self._stacks: dict[tuple[nn.Parameter, ...], _Stack] = {}
        known = {p for g in self.param_groups for p in g["params"]}
        for layer in sparse_layers:
            if layer.support != "dynamic":
                raise ValueError(f"sparse_layers takes dynamic-support layers; {layer.kind} is {layer.support!r}")
            if layer.weight not in known:
                raise ValueError("a sparse layer's weight is not among the optimizer's params")
            self._layers[layer.weight] = layer

    # ------------------------------------------------------------------------------------------ support state
    def _stacks_for(self, work: list) -> list[tuple[_Stack, dict, list[dict]]]:
        """The step's layers as `_Stack`s (one per param group, shape, k, dtype, device), each with its param
        group and its layers' states; a stack is (re)built when its members changed or a layer's delta or state
        changed behind the optimizer's back (sorted by a read, loaded, refreshed)."""
        buckets: dict[tuple, tuple[dict, list]] = {}
        for p, layer, group in work:
            key = (id(group), layer.out_features, layer.in_features, layer.k, layer.identity_basis,
                   layer.weight.dtype, layer.weight.device, layer.index_dtype)
            buckets.setdefault(key, (group, []))[1].append((p, layer))
        stacks = []
        for group, members in buckets.values():
            params = tuple(p for p, _ in members)
            stack = self._stacks.get(params)
            states = [self.state[p] for p in params]
            if stack is None or not stack.valid(states):
                states = [self._aligned_state(p, layer) for p, layer in members]
                order = {p: i for i, p in enumerate(self._layers)}
                stack = _Stack(members, states, [order[p] for p in params])
                self._stacks = {key: s for key, s in self._stacks.items() if not set(key) & set(params)}
                self._stacks[params] = stack
            stacks.append((stack, group, states))
        return stacks

    def _aligned_state(self, param: nn.Parameter, layer: SparseGradLinear) -> dict:
        """The layer's optimizer state, aligned with its stored delta: fresh moments for a delta that arrived
        without state (resumed, loaded), a sort's permutation applied to the moments the optimizer published."""
        state = self.state[param]
        n = layer._stored_delta()[0].numel()
        if not state:
            zeros = torch.zeros(n, dtype=torch.float32, device=param.device)
            state.update(step=torch.tensor(0.0), exp_avg=zeros, exp_avg_sq=zeros.clone(), entry_steps=zeros.clone())
        else:
            key, ref = next(((k, r) for stack in self._stacks.values()
                             for p, (k, r, _) in zip(stack.params, stack.published) if p is param), (None, None))
            record = layer._sort_record
            if state.get("exp_avg") is ref and record is not None and record[0] == key \
                    and record[2] == layer._delta_key():
                for name in _MOMENTS:
                    state[name] = state[name][record[1]]
        if state["exp_avg"].numel() != n:
            raise ValueError(
                f"optimizer state holds {state['exp_avg'].numel()} entries but the {layer.kind!r} layer's support "
                f"has {n}: restore the model and the optimizer from the same checkpoint"
            )
        return state

    def state_dict(self):
        """The standard state_dict, every sparse layer's delta sorted (its moments along), its tensors compact
        copies. A sparse weight's entry also holds the layer's increments since its last exact rebuild
        (`_JOURNAL_KEYS`), which `load_state_dict` replays so that the resumed weight is bit-identical."""
        for param, layer in self._layers.items():
            if self.state.get(param):
                if layer._delta_unsorted:
                    layer._sort_delta()
                self._aligned_state(param, layer)
        packed = super().state_dict()
        ids = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for param, layer in self._layers.items():
            i = ids[id(param)]
            if i in packed["state"]:  # views of a stack's rows: copied, so that a saved entry holds only its own
                entry = {name: t.clone() if isinstance(t, Tensor) else t for name, t in packed["state"][i].items()}
                packed["state"][i] = {**entry, **(layer.increment_journal() or {})}
        return packed

    def bookkeeping_bytes(self) -> int:
        """Bytes the sparse step holds outside ``self.state``: each dynamic layer's row of a stack's dense
        position map (`PositionMap`: 2 bytes per weight entry while its support holds at most 65,535 entries, else 4)
        and the spare capacity of its append-only buffers (`_Stack`)."""
        total = 0
        for stack in self._stacks.values():
            total += stack.pos_map.nbytes()
            per_entry = stack.indices.element_size() + len(_SLOTS) * stack.slots.element_size()
            total += sum(stack.indices.shape[1] - n for n in stack.n) * per_entry
        return total

    def load_state_dict(self, state_dict):
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        journals = {}
        for i, entry in state_dict["state"].items():
            if any(key in entry for key in _JOURNAL_KEYS):
                journals[i] = {key: entry[key] for key in _JOURNAL_KEYS if key in entry}
                state_dict["state"][i] = {k: v for k, v in entry.items() if k not in _JOURNAL_KEYS}
        super().load_state_dict(state_dict)
        self._stacks.clear()
        params = [p for g in self.param_groups for p in g["params"]]
        for i, journal in journals.items():
            layer = self._layers.get(params[int(i)])
            if layer is not None:
                layer.replay_increments(journal)

    # ------------------------------------------------------------------------------------------------- step
    @torch.no_grad()
    def _sparse_step(self, work: list) -> None:
        """The rotated top-k lazy-Adam step of the dynamic layers in ``work`` ((param, layer, group) with a
        gradient), stacked, with one read back to the host for all of them (finiteness, ties at the top-k cut,
        new support entries); nothing changes when a gradient is not finite."""
        stacks = self._stacks_for(work)
        selected = [stack.select() for stack, _, _ in stacks]
        finite, ties, counts = _host_read(torch.cat([flags for _, flags in selected], dim=1))
        at = 0
        for stack, _, _ in stacks:
            for layer, ok in zip(stack.layers, finite[at:at + len(stack.layers)]):
                if not ok:
                    raise ValueError(f"non-finite gradient in SparseGrad layer of kind {layer.kind!r}")
            at += len(stack.layers)
        at = 0
        for (stack, _, _), (pick, _) in zip(stacks, selected):
            end = at + len(stack.layers)
            stack.place(pick, [bool(t) for t in ties[at:end]], counts[at:end])
            at = end
        blocks = [stack.gather(pick) for (stack, _, _), (pick, _) in zip(stacks, selected)]
        for group in {id(g): g for _, g, _ in stacks}.values():
            members = [j for j, (_, g, _) in enumerate(stacks) if g is group]
            slots = list(zip(*(blocks[j].unbind(0) for j in members)))  # per slot, its block of each stack
            changes = _foreach_lazy_adam(*slots, [selected[j][0]["grad"] for j in members], group)
            for j, change in zip(members, changes):
                stack, _, states = stacks[j]
                stack.finish(selected[j][0], blocks[j], change, states)

    def step_weight(self, param: nn.Parameter) -> None:
        """The sparse step of one dynamic SparseGrad weight alone, its gradient complete: what `step` does to it,
        for the layer-wise mode (`sparsegrad.layerwise`), which calls it from the weight's post-accumulate-grad hook
        and then frees the gradient."""
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        self._sparse_step([(param, self._layers[param], group)])

    def step(self, closure=None):
        if any(getattr(p, "sparsegrad_merged", False) for group in self.param_groups for p in group["params"]):
            raise ValueError("optimizer.step(): its SparseGrad layers were merged into the model by merge_and_unload "
                             "(the merged model holds plain layers and shares their biases); create a new optimizer "
                             "for the merged model")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(p, self._layers[p], group) for group in self.param_groups for p in group["params"]
                if p in self._layers and p.grad is not None]
        if work:
            self._sparse_step(work)
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

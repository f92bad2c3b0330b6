"""`SparseGradLinear`: an nn.Linear whose weight trains only through k entries of a rotated basis.

The layer keeps three things per matrix:

* ``base_weight`` W0: the pretrained weight, frozen, in the original basis;
* the delta in the rotated basis, sparse: flat ``delta_indices`` into an out x in matrix and ``delta_values``;
* ``weight`` = W0 + U_out · scatter(delta) · U_inᵀ, the effective weight the forward uses. It is rebuilt from W0
  and the delta, so a model loaded from an adapter has bit-identical weights. Between rebuilds, `SparseGradAdamW`
  adds each step's change of its k entries to an fp32 weight (`add_increments`: O(k) plus one thin product instead
  of a rebuild); such a weight is rebuilt exactly every few steps, at every ``sync_weight``/``state_dict``/fold,
  and at every forward in eval mode, so inference and adapters see exactly W0 + delta.

During training the optimizer appends new support entries at the end of ``delta_indices`` / ``delta_values``
(unsorted, O(k) per step). Any read of those attributes from outside sorts them first (indices increasing, as
adapters and checkpoints store them) and records the permutation (``_sort_record``) so that the optimizer can carry
its aligned moments along.

Rotated gradient (what the top-k is taken of): ``u_out.T @ G @ u_in`` with G = ∂L/∂W, the ordinary weight gradient.

Two support modes:

* ``dynamic`` (the paper): ``weight`` receives the plain dense gradient G from autograd (the cheapest backward there
  is); `SparseGradAdamW` rotates it, keeps exactly the top-k entries and updates them with a lazy sparse Adam. The
  delta holds every entry ever updated, so its length is the count the paper does not report.
* ``fixed``: the support is chosen once and ``delta_values`` (k long) is an ordinary Parameter whose gradient the
  backward computes directly at the support, so any optimizer keeps k-sized state. A support still pending at the
  first step is chosen there, from the rotated gradient averaged over the ranks when torch.distributed is
  initialised (every rank of a DDP run picks the same support).

The bias stays in the original output space, and its gradient is Σ ∂L/∂Y over batch and tokens.

A basis refresh (`fold`) moves the trained delta into the frozen weight (W0 <- W0 + U_out D U_inᵀ, exactly the
effective weight), records it in ``folded`` (its bases, indices and values, on the CPU), and continues with new
bases and an empty delta. The effective weight is then W0 with every folded segment added in order, then the live
delta: an adapter replays the same additions, so its weights stay bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .file_base import FileBase, same_bits
from .support_gradient import SupportGradient


def index_dtype(numel: int) -> torch.dtype:
    """int32 flat indices where they fit (half the memory of int64), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


_TOPK_BLOCK = 8  # entries per block of `topk_rows`' first pass


def topk_rows(rows: Tensor | list[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For L rows of scores (an L x n tensor, or a list of L tensors of n entries each, read flat: then the rows
    need not be stacked, which would cost a copy of them all): per row the flat indices of ``k`` entries of largest
    magnitude (L x k, unsorted) and their scores, without a host sync, with ``tie`` (true when a tie straddles the
    cut, so the set is not unique: call `topk_indices` instead) and ``top`` (the largest magnitude; NaN or inf
    exactly when the row holds a non-finite entry, since topk ranks NaN and inf above every finite value)."""
    L, n = len(rows), rows.shape[1] if isinstance(rows, Tensor) else rows[0].numel()
    if k >= n or n % _TOPK_BLOCK or 2 * (k + 1) * _TOPK_BLOCK > n:
        scores = rows if isinstance(rows, Tensor) else torch.stack([row.reshape(-1) for row in rows])
        if k >= n:
            every = torch.arange(n, device=scores.device).expand(L, n)
            return every, scores, torch.zeros(L, dtype=torch.bool, device=scores.device), scores.abs().amax(-1)
        values, indices = scores.abs().topk(k + 1, dim=-1)  # descending: the cut is between columns k - 1 and k
        return indices[:, :k], scores.gather(1, indices[:, :k]), values[:, k - 1] == values[:, k], values[:, 0]
    # The k + 1 largest entries lie in the k + 1 blocks of largest maxima (an entry outside them is at most the
    # (k + 1)-th largest block maximum, and those k + 1 maxima are entries), so two top-k's of about n / 8 and 8k
    # entries replace one over n, whose CPU kernel takes its slow heap path when 64k <= n: the same k + 1 values,
    # so the same cut. Block j is the strided column j of a row viewed as 8 x n/8 (entries j, j + n/8, ...): its
    # largest magnitude is an elementwise max and min over 8 contiguous vectors (no |scores| copy), and its
    # entries come back by an index_select of the view's columns. On 12 real MiniLM gradients (1536 x 384,
    # k = 1 %, one thread): 40 -> 20 ms against contiguous blocks of 8, a stacked copy and a sorted
    # second pass.
    m = n // _TOPK_BLOCK
    views = rows.view(L, _TOPK_BLOCK, m) if isinstance(rows, Tensor) else [row.reshape(_TOPK_BLOCK, m) for row in rows]
    maxima = _block_maxima(views)
    blocks = maxima.topk(k + 1, dim=-1, sorted=False).indices  # L x (k + 1)
    candidates = _block_entries(views, blocks).view(L, -1)  # entry r of block blocks[l, j] at r * (k + 1) + j
    values, at = candidates.abs().topk(k + 1, dim=-1, sorted=False)  # unsorted: no sort of k entries per row
    # the (k + 1)-th largest (ranked as topk ranks, NaN above all: min() would return a NaN); the k-th equals it
    # exactly at a tie
    low, last = values.topk(1, dim=-1, largest=False)
    tie, top = (values == low).sum(-1) > 1, values.amax(-1)
    at = at.scatter(1, last, at[:, k:])[:, :k]  # drop the (k + 1)-th: the last one takes its place
    indices = torch.add(blocks.gather(1, at.remainder(k + 1)), at.div(k + 1, rounding_mode="floor"), alpha=m)
    return indices, candidates.gather(1, at), tie, top


def _block_maxima(views: Tensor | list[Tensor]) -> Tensor:
    """L x m: the largest magnitude of each column of each 8 x m view (an L x 8 x m tensor or L such views); NaN
    propagates, so a block holding one ranks first."""
    if isinstance(views, Tensor):
        return torch.maximum(views.amax(1), views.amin(1).neg_())
    high = views[0].new_empty((len(views), views[0].shape[1]))
    low = torch.empty_like(high)
    for view, h, lo in zip(views, high.unbind(0), low.unbind(0)):  # into rows of one buffer: no stacking copy
        torch.amax(view, 0, out=h)
        torch.amin(view, 0, out=lo)
    return torch.maximum(high, low.neg_(), out=high)


def _block_entries(views: Tensor | list[Tensor], blocks: Tensor) -> Tensor:
    """L x 8 x (k + 1): the 8 entries of each chosen block (``blocks``: L x (k + 1) columns of the views)."""
    if isinstance(views, Tensor):
        return views.gather(2, blocks[:, None].expand(-1, views.shape[1], -1))
    out = views[0].new_empty((len(views), views[0].shape[0], blocks.shape[1]))
    for view, chosen, o in zip(views, blocks.unbind(0), out.unbind(0)):
        torch.index_select(view, 1, chosen, out=o)
    return out


def topk_candidates(scores: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """`topk_rows` of the rows of ``scores`` (its last dimension; a 1-D tensor is one row): (indices, tie, top),
    each shaped as ``scores`` without its last dimension."""
    rows = scores.shape[:-1]
    indices, _, tie, top = topk_rows(scores.reshape(-1, scores.shape[-1]), k)
    return indices.view(*rows, -1), tie.view(rows), top.view(rows)


def topk_indices(scores: Tensor, k: int) -> Tensor:
    """Sorted flat indices of exactly ``k`` entries of largest magnitude; ties go to the lower index."""
    indices, tie, _ = topk_candidates(scores.reshape(-1), k)
    if not bool(tie):  # the k-th largest beats the (k+1)-th: no tie straddles the cut, the set is unique
        return indices.sort().values
    flat = scores.reshape(-1).abs()
    kth = flat[indices].min()
    above = torch.nonzero(flat > kth).squeeze(1)
    ties = torch.nonzero(flat == kth).squeeze(1)[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def topk_energy_share(scores: Tensor, k: int) -> float:
    """Share of Σ scores² held by the k entries of largest magnitude."""
    sq = scores.double().reshape(-1).square()
    total = sq.sum()
    if total == 0:
        return 0.0
    return float(torch.topk(sq, min(k, sq.numel())).values.sum() / total)


def _mean_over_ranks(t: Tensor) -> Tensor:
    """``t`` averaged over the ranks of the default process group when torch.distributed is initialised with more
    than one rank (as DDP averages gradients), else ``t`` itself. A fixed support still pending at the first step is
    chosen from this all-reduced rotated gradient, so every rank picks the same support (the all-reduce runs inside
    the backward, in the same order on every rank, like SyncBatchNorm's)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return t
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    buf = t.to(device).contiguous()
    dist.all_reduce(buf)
    return buf.to(t.device).div_(dist.get_world_size())


def _support_blocks(indices: Tensor, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rows and columns a flat support touches, and each entry's flat position in that sub-block."""
    rows, cols = indices // in_features, indices % in_features
    urows, inv_r = torch.unique(rows, return_inverse=True)
    ucols, inv_c = torch.unique(cols, return_inverse=True)
    return urows, ucols, inv_r * ucols.numel() + inv_c


# A multiply-add of the sparse-first product (`_bag_rows`: embedding_bag's weighted row sums over a contiguous
# table) costs about this many of a dense GEMM's on the CPU (measured at MiniLM width: 1536x384, 1 % density, one
# thread: 9M multiply-adds in 0.65-1.2 ms against 35 GMAC/s dense); it decides when the sparse-first association pays.
SPARSE_MAC_COST = 4


def _sparse_first_cost(nnz: int, shape: tuple[int, int]) -> int:
    """Dense-GEMM-equivalent multiply-adds of U_out · D · U_inᵀ with the sparse D multiplied first."""
    o, i = shape
    return SPARSE_MAC_COST * nnz * max(o, i) + o * i * min(o, i)


_ROW_EDGES: dict[tuple, Tensor] = {}
_INDEX_TENSORS: dict[tuple, Tensor] = {}


def _index_tensor(rows: tuple[int, ...], device: torch.device) -> Tensor:
    """``rows`` as an int64 tensor on ``device``, made once (no host-to-device copy per step)."""
    key = (rows, device)
    if key not in _INDEX_TENSORS:
        _INDEX_TENSORS[key] = torch.tensor(rows, device=device)
    return _INDEX_TENSORS[key]


def _row_edges(n: int, like: Tensor) -> Tensor:
    """arange(n + 1) in ``like``'s dtype and device, made once."""
    key = (n, like.dtype, like.device)
    if key not in _ROW_EDGES:
        _ROW_EDGES[key] = torch.arange(n + 1, device=like.device, dtype=like.dtype)
    return _ROW_EDGES[key]


def column_major(basis: Tensor) -> Tensor:
    """``basis`` stored column by column (its transpose contiguous; a copy only when it is not already): the
    sparse-first products and the support gradient's sampled dot products read a basis's columns, so stored so
    they are contiguous rows of ``basis.T`` (measured: `_bag_rows` 0.65-1.2 ms against 25 ms on a strided table,
    and 6-7 ms for torch's CSR product, per 1 % of a MiniLM matrix)."""
    return basis if basis.mT.is_contiguous() else basis.mT.contiguous().mT


def _bag_rows(bags: Tensor, members: Tensor, weights: Tensor, n_bags: int, table: Tensor) -> Tensor:
    """The n_bags x table-width matrix whose row b is Σ weights[e] · table[members[e]] over the entries e with
    bags[e] == b (``bags`` increasing): the sparse (n_bags x rows-of-table) matrix times ``table``, each row summed
    on its own and in entry order, so a row does not depend on the others (no host sync)."""
    offsets = torch.searchsorted(bags, _row_edges(n_bags, bags), out_int32=bags.dtype == torch.int32)
    if offsets.dtype != members.dtype:
        offsets = offsets.to(members.dtype)
    return F.embedding_bag(members, table.contiguous(), offsets, mode="sum", per_sample_weights=weights.float(),
                           include_last_offset=True)


def _sparse_first(indices: Tensor, values: Tensor, u_out: Tensor, u_in: Tensor, shape: tuple[int, int]) -> Tensor:
    """U_out · D · U_inᵀ with the sparse D (flat ``indices`` increasing) multiplied first by the basis of the larger
    side: nnz·max(o, i) sparse plus o·i·min(o, i) dense multiply-adds."""
    o, i = shape
    rows, cols = indices // i, indices % i
    if o > i:  # (U_out·D)ᵀ = Dᵀ·U_outᵀ: bags are D's columns, entries in column-major order
        order = (cols.long() * o + rows).argsort()
        return _bag_rows(cols[order], rows[order], values[order], i, u_out.T).T @ u_in.T
    return u_out @ _bag_rows(rows, cols, values, o, u_in.T)


def increment_order_key(indices: Tensor, shape: tuple[int, int]) -> Tensor:
    """The key `add_increments` wants its entries sorted by: the flat index (row-major) when out <= in, else the
    column-major index (its sparse product runs on the transpose)."""
    o, i = shape
    return indices if o <= i else (indices % i) * o + indices // i


def add_increments(weights: list[Tensor], indices: Tensor, changes: Tensor, u_outs: list[Tensor | None],
                   u_ins: list[Tensor | None], shape: tuple[int, int]) -> None:
    """weights[l] += U_out[l] · scatter(indices[l], changes[l]) · U_in[l]ᵀ in place for L layers of one shape
    (``indices``, ``changes``: L x k, each row sorted by `increment_order_key`; bases None for the identity),
    sparse-first, with ONE sparse product for the layers that share a pair of bases (the blocks of a kind): their
    sparse deltas stacked into one matrix (`_bag_rows`). Each row of that product is summed on its own, so a layer's result does not depend on the
    others stacked with it (a replay with L = 1 is bit-identical)."""
    if u_outs[0] is None:  # identity basis (MeProp): k scattered adds
        for weight, idx, change in zip(weights, indices.unbind(0), changes.unbind(0)):
            weight.view(-1).index_add_(0, idx, change)
        return
    u_out, u_in = u_outs[0], u_ins[0]
    n = len(weights)
    if any(a is not u_out or b is not u_in for a, b in zip(u_outs, u_ins)):  # one product per pair of bases
        kinds: dict[tuple[int, int], list[int]] = {}
        for l, (a, b) in enumerate(zip(u_outs, u_ins)):
            kinds.setdefault((id(a), id(b)), []).append(l)
        for rows in kinds.values():
            at = _index_tensor(tuple(rows), indices.device)
            add_increments([weights[l] for l in rows], indices[at], changes[at], [u_outs[rows[0]]] * len(rows),
                           [u_ins[rows[0]]] * len(rows), shape)
        return
    o, i = shape
    row, col = indices // i, indices % i
    if o > i:  # (U_out·D)ᵀ = Dᵀ·U_outᵀ: the stacked Dᵀ, i rows per layer
        row, col, rows_per, dense = col, row, i, u_out.T
    else:  # D·U_inᵀ: the stacked D, o rows per layer
        rows_per, dense = o, u_in.T
    row = row + _row_edges(n, row)[:n, None] * rows_per
    parts = _bag_rows(row.view(-1), col.view(-1), changes.reshape(-1), n * rows_per, dense)
    parts = parts.view(n, rows_per, -1).unbind(0)
    if o > i:
        u_in_t = u_in.T
        for weight, part in zip(weights, parts):
            weight.addmm_(part.T, u_in_t)
    else:
        for weight, part in zip(weights, parts):
            weight.addmm_(u_out, part)


def rotated_to_weight(
    indices: Tensor, values: Tensor, u_out: Tensor | None, u_in: Tensor | None, shape: tuple[int, int]
) -> Tensor:
    """U_out · scatter(indices, values) · U_inᵀ in fp32 (``indices`` increasing, as a layer stores them when read),
    by the cheapest of: the sparse-first product, the rows and columns the support touches, two dense products."""
    out_features, in_features = shape
    if u_out is not None and 0 < indices.numel() and (
            _sparse_first_cost(indices.numel(), shape) < out_features * in_features * (out_features + in_features)):
        return _sparse_first(indices, values, u_out, u_in, shape)
    dense = torch.zeros(out_features * in_features, dtype=torch.float32, device=values.device)
    if indices.numel() == 0:
        return dense.view(shape)
    if u_out is None:  # identity basis (MeProp)
        dense[indices] = values.float()
        return dense.view(shape)
    urows, ucols, local = _support_blocks(indices, in_features)
    if urows.numel() * ucols.numel() * 2 > out_features * in_features:
        # The support spans most of the matrix: two dense products beat gathering the bases' columns.
        dense[indices] = values.float()
        dense = dense.view(shape)
        if out_features >= in_features:
            return u_out @ (dense @ u_in.T)
        return (u_out @ dense) @ u_in.T
    block = torch.zeros(urows.numel() * ucols.numel(), dtype=torch.float32, device=values.device)
    block[local] = values.float()
    block = block.view(urows.numel(), ucols.numel())
    left, right = u_out[:, urows], u_in[:, ucols]
    # Pick the cheaper association of left @ block @ right.T.
    if out_features * ucols.numel() * (urows.numel() + in_features) <= in_features * urows.numel() * (
        ucols.numel() + out_features
    ):
        return (left @ block) @ right.T
    return left @ (block @ right.T)


class _FixedSupportLinear(torch.autograd.Function):
    """y = x Wᵀ + b, where W is the layer's effective weight; the gradient of the k support values is taken
    directly in the rotated basis."""

    @staticmethod
    def forward(ctx, x: Tensor, values: Tensor, bias: Tensor | None, weight: Tensor, layer: "SparseGradLinear"):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        layer: SparseGradLinear = ctx.layer
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        gy = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = gy.sum(0)
        if ctx.needs_input_grad[1]:
            grad_values = layer._support_gradient(x.reshape(-1, x.shape[-1]), gy)
        return grad_x, grad_values, grad_bias, None, None


_DELTA_NAMES = ("delta_indices", "delta_values")


class SparseGradLinear(nn.Module):
    """Drop-in replacement of an nn.Linear trained by SparseGrad.

    Attributes kept for users: ``in_features``, ``out_features``, ``bias`` (original output space, or None),
    ``u_out`` (out x out) and ``u_in`` (in x in) in fp32, ``k`` (entries per step), ``support`` and ``kind``.
    """

    def __init__(
        self,
        linear: nn.Linear,
        u_out: Tensor,
        u_in: Tensor,
        *,
        k: int,
        support: str,
        kind: str,
        identity_basis: bool = False,
        fixed_indices: Tensor | None = None,
    ) -> None:
        super().__init__()
        if type(linear) is not nn.Linear:
            raise ValueError(f"SparseGradLinear wraps an nn.Linear, got {type(linear).__name__}")
        out_features, in_features = linear.weight.shape
        if tuple(u_out.shape) != (out_features, out_features) or tuple(u_in.shape) != (in_features, in_features):
            raise ValueError(
                f"bases of shapes u_out={tuple(u_out.shape)}, u_in={tuple(u_in.shape)} do not fit a "
                f"{out_features}x{in_features} weight (need {out_features}x{out_features} and "
                f"{in_features}x{in_features})"
            )
        if not 0 < k <= out_features * in_features:
            raise ValueError(f"k={k} must be in [1, {out_features * in_features}]")
        if support not in ("dynamic", "fixed"):
            raise ValueError(f"unknown support mode {support!r}")
        self.in_features, self.out_features = in_features, out_features
        self.k, self.support, self.kind = int(k), support, kind
        self.identity_basis = bool(identity_basis)
        self.base_requires_grad = linear.weight.requires_grad
        device = linear.weight.device
        self.register_buffer("base_weight", linear.weight.detach().clone())
        self.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=(support == "dynamic"))
        self.bias = linear.bias
        # Not in the state_dict: one tensor is shared by every block of a kind (safetensors and save_pretrained
        # refuse shared tensors), and the bases never change after conversion; adapters save them once per kind.
        self.register_buffer("u_out", column_major(u_out), persistent=False)
        self.register_buffer("u_in", column_major(u_in), persistent=False)
        self.index_dtype = index_dtype(out_features * in_features)
        indices, values = self._empty_delta(device, fixed_indices)
        self.register_buffer("delta_indices", indices)
        if support == "fixed":
            self.delta_values = nn.Parameter(values)
        else:
            self.register_buffer("delta_values", values)
        self.folded: list[dict[str, Tensor | None]] = []  # refreshed-away segments, oldest first (see `fold`)
        self._delta_unsorted = False  # the optimizer appended entries since the last sort
        self._weight_inexact = False  # ``weight`` was updated incrementally since the last exact rebuild
        self._sort_record: tuple | None = None  # (key before, permutation, key after) of the last sort
        self._journal: dict | None = None  # the delta at the last exact rebuild and the increments added since
        self._merged_key: tuple | None = None
        self._plan_key: tuple | None = None
        self._plan: SupportGradient | None = None  # the fixed support's gradient plan
        self._file_base: FileBase | None = None  # where W0 lies when it is not held (`keep_base_in_file`)
        self._merged_key = self._delta_key()  # weight == base_weight holds for an empty delta
        if support == "dynamic":
            self._journal = {"indices": indices, "values": values, "steps": []}
        self.train(linear.training)  # a drop-in replacement keeps the mode of the module it replaces

    # ----------------------------------------------------------------------------------------------- helpers
    def __getattr__(self, name: str):
        # Whoever reads the delta from outside (adapters, checkpoints, tests) sees it sorted; the hot paths below
        # use `_stored_delta`, which does not sort.
        if name in _DELTA_NAMES and self.__dict__.get("_delta_unsorted", False):
            self._sort_delta()
        if name == "base_weight" and self.__dict__.get("_file_base") is not None:
            return self._base()
        return super().__getattr__(name)

    def keep_base_in_file(self, source: FileBase) -> None:
        """Drop the held copy of W0: it is re-read from ``source`` (bit for bit the same tensor) when needed."""
        self._file_base = source
        del self._buffers["base_weight"]

    def _base(self) -> Tensor:
        """W0: the held buffer, or a fresh read of the file it lies in (`FileBase`)."""
        if self._file_base is None:
            return self._buffers["base_weight"]
        return self._file_base.read(self.weight.device, self.weight.dtype)

    def _store_base(self, new: Tensor) -> None:
        """Set W0 to ``new`` (a fold, a replay of folded segments, a differing state_dict): held from then on."""
        if self._file_base is not None:
            self._file_base = None
            self._buffers = {"base_weight": new.detach().clone(), **self._buffers}  # first, where it was
        else:
            self._buffers["base_weight"].copy_(new)

    def _stored_delta(self) -> tuple[Tensor, Tensor]:
        """(indices, values) as stored, in the optimizer's append order while training."""
        values = self._parameters.get("delta_values")
        return self._buffers["delta_indices"], (self._buffers["delta_values"] if values is None else values)

    def _sort_delta(self) -> None:
        """Sort the stored delta by index; record the permutation for the optimizer's aligned state."""
        indices, values = self._stored_delta()
        before = self._delta_key()
        order = torch.argsort(indices)
        self._buffers["delta_indices"], self._buffers["delta_values"] = indices[order], values[order]
        self._delta_unsorted = False
        after = self._delta_key()
        self._sort_record = (before, order, after)
        if self._merged_key == before:  # the same delta in another order: the weight still matches it
            self._merged_key = after

    def set_delta_storage(self, indices: Tensor, values: Tensor, *, appended: bool) -> None:
        """The optimizer's hand-over of the (dynamic) delta it keeps: ``appended`` when entries were added at the
        end, out of index order."""
        self._buffers["delta_indices"], self._buffers["delta_values"] = indices, values
        self._delta_unsorted = self._delta_unsorted or appended

    @torch.no_grad()
    def apply_increment(self, indices: Tensor, change: Tensor) -> None:
        """Add U_out · scatter(indices, change) · U_inᵀ to the fp32 weight in place (``change``: what a step did to
        the delta at ``indices``), and take the stored delta as merged. The weight then equals W0 + delta up to
        fp32 rounding, until the next exact rebuild. The same sums as `SparseGradAdamW`'s stacked step."""
        shape = (self.out_features, self.in_features)
        if not self.identity_basis:
            order = increment_order_key(indices, shape).argsort()
            indices, change = indices[order], change[order]
        u_out, u_in = self._rotation()
        add_increments([self.weight.data], indices[None], change[None], [u_out], [u_in], shape)
        self.note_increment(indices, change)

    def note_increment(self, indices: Tensor, change: Tensor) -> None:
        """Record that ``weight`` was increased by the step's ``change`` at ``indices`` (`add_increments`): the
        stored delta counts as merged, the weight as inexact until the next rebuild; the journal keeps the step."""
        self._merged_key = self._delta_key()
        self._weight_inexact = True
        if self._journal is not None:
            self._journal["steps"].append((indices, change))

    def increment_journal(self) -> dict[str, Tensor] | None:
        """What reproduces the incrementally updated weight bit for bit (`replay_increments`): the delta at the last
        exact rebuild and the increments since, or None when the weight is exact."""
        if not self._weight_inexact or self._journal is None:
            return None
        steps = self._journal["steps"]
        return {"rebuilt_indices": self._journal["indices"], "rebuilt_values": self._journal["values"],
                "increment_indices": torch.cat([i for i, _ in steps]),
                "increment_values": torch.cat([c for _, c in steps]),
                "increment_counts": torch.tensor([i.numel() for i, _ in steps])}

    def bookkeeping_bytes(self) -> int:
        """Bytes the layer holds for training besides its delta: the increment journal (the delta at the last exact
        rebuild and the changes since) and the fixed support's gradient plan (`SupportGradient.nbytes`)."""
        held = []
        if self._journal is not None:
            journal = self._journal
            held = [journal["indices"], journal["values"], *(t for step in journal["steps"] for t in step)]
        plan = self._plan.nbytes() if self._plan is not None else 0
        return plan + sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def replay_increments(self, journal: dict[str, Tensor]) -> None:
        """Rebuild the weight from the journal's delta, then add its increments in order: the weight of the run
        that wrote it (call after the layer's delta is loaded)."""
        device = self.weight.device
        indices = journal["rebuilt_indices"].to(device, self.index_dtype)
        values = journal["rebuilt_values"].to(device, torch.float32)
        self.weight.copy_(self._plus_delta(self._base(), indices, values, *self._rotation()))
        self._journal = {"indices": indices, "values": values, "steps": []}
        counts = journal["increment_counts"].tolist()
        for idx, change in zip(journal["increment_indices"].to(device, self.index_dtype).split(counts),
                               journal["increment_values"].to(device, torch.float32).split(counts)):
            self.apply_increment(idx, change)

    def _empty_delta(self, device: torch.device, fixed_indices: Tensor | None) -> tuple[Tensor, Tensor]:
        """(indices, values) of a delta that has not trained: a fixed support gets k zero values at
        ``fixed_indices`` (or no indices: pending, chosen at the first step); a dynamic one starts empty."""
        indices = torch.empty(0, dtype=self.index_dtype, device=device)
        if self.support != "fixed":
            return indices, torch.empty(0, dtype=torch.float32, device=device)
        if fixed_indices is not None:
            indices = self._checked_indices(fixed_indices.to(device=device, dtype=self.index_dtype))
        return indices, torch.zeros(self.k, dtype=torch.float32, device=device)

    def _checked_indices(self, indices: Tensor) -> Tensor:
        n = self.out_features * self.in_features
        if indices.dim() != 1 or indices.numel() != self.k:
            raise ValueError(f"a fixed support needs {self.k} indices, got shape {tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"support indices fall outside the {self.out_features}x{self.in_features} matrix")
        indices = indices.sort().values
        if indices.numel() > 1 and bool((indices[1:] == indices[:-1]).any()):
            raise ValueError("support indices repeat an entry")
        return indices

    @property
    def support_pending(self) -> bool:
        """A fixed support not yet chosen (it will be, from the first step's rotated gradient)."""
        return self.support == "fixed" and self.delta_indices.numel() == 0

    def rotate(self, grad: Tensor) -> Tensor:
        """The rotated gradient u_out.T @ grad @ u_in, in fp32."""
        grad = grad.float()
        if self.identity_basis:
            return grad
        return self.u_out.T @ grad @ self.u_in

    def _delta_key(self) -> tuple:
        """Identity of the stored delta, to tell when the weight must be rebuilt. A dynamic delta is written in
        place only by `SparseGradAdamW`, which keeps the key itself, or by DDP's initial broadcast of identical
        values: its key has no version counters, but an epoch that every load_state_dict advances."""
        i, v = self._stored_delta()
        if self.support == "dynamic":
            return (v.data_ptr(), v.numel(), i.data_ptr(), i.numel(), self.__dict__.get("_delta_epoch", 0))
        return (v.data_ptr(), v._version, v.numel(), i.data_ptr(), i._version, i.numel())

    def _rotation(self) -> tuple[Tensor | None, Tensor | None]:
        """(u_out, u_in), or (None, None) for the identity basis (MeProp: the delta is in the original basis)."""
        return (None, None) if self.identity_basis else (self.u_out, self.u_in)

    def delta_weight(self) -> Tensor:
        """The trained change of the weight in the original basis since the last fold, fp32."""
        return rotated_to_weight(
            self.delta_indices, self.delta_values.detach(), *self._rotation(), (self.out_features, self.in_features)
        )

    def _plus_delta(self, base: Tensor, indices: Tensor, values: Tensor, u_out: Tensor | None,
                    u_in: Tensor | None) -> Tensor:
        """base + U_out · scatter(indices, values) · U_inᵀ in fp32, in the weight's dtype: the one formula every
        rebuild, fold and adapter load uses, so that they agree bit for bit."""
        if indices.numel() == 0:
            return base.clone()
        if u_out is None:  # identity basis: the same sums entry by entry, without a dense delta (2 passes fewer)
            out = (base.float() + 0.0).to(self.weight.dtype)  # off the support, base + the delta's 0.0 (-0.0 -> 0.0)
            at = indices.long()
            out.view(-1)[at] = (base.reshape(-1)[at].float() + values.float()).to(self.weight.dtype)
            return out
        delta = rotated_to_weight(indices, values, u_out, u_in, (self.out_features, self.in_features))
        return (base.float() + delta).to(self.weight.dtype)

    def sync_weight(self, force: bool = False) -> None:
        """Rebuild ``weight`` = W0 + delta exactly when the delta changed since the last rebuild or the weight was
        updated incrementally since."""
        if force or self._weight_inexact or self._delta_key() != self._merged_key:
            self._rebuild()

    @torch.no_grad()
    def _rebuild(self) -> None:
        indices, values = self._stored_delta()
        # a sorted copy (the sparse-first products need it; the identity's sums do not): the storage keeps the
        # optimizer's order (and its positions)
        if self._delta_unsorted and not self.identity_basis:
            order = torch.argsort(indices)
            indices, values = indices[order], values[order]
        self.weight.copy_(self._plus_delta(self._base(), indices, values.detach(), *self._rotation()))
        self._merged_key = self._delta_key()
        self._weight_inexact = False
        if self.support == "dynamic":  # increments may follow: keep what they start from
            self._journal = {"indices": indices.clone(), "values": values.detach().clone(), "steps": []}

    @torch.no_grad()
    def fold(self, u_out: Tensor, u_in: Tensor, *, fixed_indices: Tensor | None = None,
             record: tuple[Tensor, Tensor] | None = None) -> None:
        """Basis refresh: move the delta into the frozen weight, record it in ``folded``, and continue with the
        bases ``u_out``, ``u_in`` (fp32, on this layer's device) and an empty delta. A fixed support starts
        pending (chosen at the next step) unless ``fixed_indices`` gives it. ``record``: CPU copies of the bases
        in use to store in ``folded`` (shared by the layers of a kind); made here when not given. The optimizer's
        state for this layer belongs to the old basis: drop it (`sparsegrad.refresh_bases` does)."""
        if self.identity_basis:
            raise ValueError("a basis refresh needs rotated bases; this layer uses the identity basis (MeProp)")
        if tuple(u_out.shape) != tuple(self.u_out.shape) or tuple(u_in.shape) != tuple(self.u_in.shape):
            raise ValueError(f"new bases {tuple(u_out.shape)}, {tuple(u_in.shape)} do not fit a "
                             f"{self.out_features}x{self.in_features} layer")
        self.sync_weight()
        # One segment per refresh, even an empty one (a support still pending): segment s is refresh s everywhere.
        old_out, old_in = record if record is not None else (self.u_out.float().cpu(), self.u_in.float().cpu())
        indices = self.delta_indices.detach().cpu().clone()
        values = self.delta_values.detach().float().cpu().clone() if indices.numel() else torch.zeros(0)
        self.folded.append({"u_out": old_out, "u_in": old_in, "indices": indices, "values": values})
        self._store_base(self.weight)
        device = self.weight.device
        self.u_out = column_major(u_out.to(device, torch.float32))
        self.u_in = column_major(u_in.to(device, torch.float32))
        self.delta_indices, values = self._empty_delta(device, fixed_indices)
        if isinstance(self.delta_values, nn.Parameter):  # fixed: the same Parameter, so the optimizer keeps it
            self.delta_values.data = values
        else:
            self.delta_values = values
        self._plan = self._plan_key = None
        self.sync_weight(force=True)

    @torch.no_grad()
    def replay_folded(self, segments: list[dict[str, Tensor]]) -> None:
        """Adapter load: add the folded segments (oldest first) to the frozen weight as training's `fold` did,
        and keep them in ``folded``. Call on a freshly converted layer, before its live delta is set."""
        device = self.weight.device
        for seg in segments:
            indices = seg["indices"].to(device=device, dtype=self.index_dtype)
            values = seg["values"].to(device=device, dtype=torch.float32)
            u_out = column_major(seg["u_out"].to(device, torch.float32))  # the layout training's fold used
            u_in = column_major(seg["u_in"].to(device, torch.float32))
            self._store_base(self._plus_delta(self._base(), indices, values, u_out, u_in))
            self.folded.append(seg)
        self.sync_weight(force=True)

    def entries_updated(self) -> int:
        """Distinct entries of the rotated matrix whose delta is non-zero, summed over the folded segments (each
        counted in its own basis) after basis refreshes."""
        folded = sum(int(torch.count_nonzero(seg["values"])) for seg in self.folded)
        return folded + int(torch.count_nonzero(self._stored_delta()[1].detach()))

    def _support_plan(self) -> SupportGradient:
        """The fixed support's `SupportGradient` (the rows and columns it touches, its sampling patterns), kept
        until the support or the bases change."""
        key = (self.delta_indices.data_ptr(), self.delta_indices._version, self.delta_indices.numel(),
               self.u_out.data_ptr(), self.u_in.data_ptr())
        if self._plan is None or key != self._plan_key:
            self._plan = SupportGradient(self.delta_indices, *self._rotation(), (self.out_features, self.in_features))
            self._plan_key = key
        return self._plan

    @torch.no_grad()
    def _support_gradient(self, x: Tensor, gy: Tensor) -> Tensor:
        """Gradient of the fixed-support values: (u_out.T G u_in)[support], G = gyᵀ x, without forming the whole
        rotated matrix once the support is known (`SupportGradient`: one-sided products, then k sampled dot
        products). Token rows with zero output gradient (padding) are skipped."""
        live = gy.any(dim=1)
        if not bool(live.all()):
            x, gy = x[live], gy[live]
        x, gy = x.float(), gy.float()
        if self.support_pending:  # first step chooses the support from the whole rotated gradient
            rotated = _mean_over_ranks(self.rotate(gy.T @ x))
            self.delta_indices = topk_indices(rotated, self.k).to(self.index_dtype)
            return rotated.reshape(-1)[self.delta_indices]
        return self._support_plan()(x, gy)

    # ----------------------------------------------------------------------------------------------- forward
    def _forward_sync(self) -> None:
        """The rebuild a forward needs: when the delta changed since the last one, or, in eval mode (inference,
        evaluation: what an adapter reload reproduces), when the weight was updated incrementally since. Training
        forwards use the incrementally updated weight."""
        if self._delta_key() != self._merged_key or (self._weight_inexact and not self.training):
            self._rebuild()

    def forward(self, x: Tensor) -> Tensor:
        self._forward_sync()
        if self.support == "fixed" and torch.is_grad_enabled() and self.delta_values.requires_grad:
            return _FixedSupportLinear.apply(x, self.delta_values, self.bias, self.weight, self)
        return F.linear(x, self.weight, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._load_base(state_dict, prefix + "base_weight")
        # The delta's length is data (it grows in dynamic mode): take the incoming length before copying.
        for name in ("delta_indices", "delta_values"):
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if incoming is not None and incoming.shape != current.shape:
                fresh = torch.zeros(incoming.shape, dtype=current.dtype, device=current.device)
                if isinstance(current, nn.Parameter):
                    current.data = fresh
                else:
                    self._buffers[name] = fresh
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._merged_key = None
        self._delta_epoch = self.__dict__.get("_delta_epoch", 0) + 1
        self._delta_unsorted = self._weight_inexact = False
        self._sort_record = self._journal = None

    def _load_base(self, state_dict, key: str) -> None:
        """A state_dict's W0 for a layer whose W0 lies in a file: nothing to load when it is the file's tensor,
        else held from now on (the buffer made here, filled by the ordinary load)."""
        incoming = state_dict.get(key)
        if self._file_base is None or incoming is None:
            return
        if same_bits(self._base(), incoming.to(self.weight.dtype)):
            del state_dict[key]
        else:
            self._store_base(torch.empty_like(self.weight))

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_merged_in_copy"] = self._delta_key() == self._merged_key  # the copy's tensors get new keys
        state["_plan"] = state["_plan_key"] = None  # a cache (its CSR patterns do not copy); remade on use
        return state

    def __setstate__(self, state):
        merged = state.pop("_merged_in_copy", False)
        super().__setstate__(state)
        if merged:
            self._merged_key = self._delta_key()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._delta_unsorted:
            self._sort_delta()
        self.sync_weight()  # sorted delta and the exact weight: what loading this state dict reproduces
        if self._file_base is None:
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        held = self._buffers  # W0 read back for the copy: the same keys, in the same order, as when it is held
        self._buffers = {"base_weight": self._base(), **held}
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers = held

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the trained weight (the bias Parameter is shared, not copied)."""
        self.sync_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = nn.Parameter(self.weight.detach().clone(), requires_grad=self.base_requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        basis = "identity" if self.identity_basis else "rotated"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"k={self.k}, support={self.support}, basis={basis}, kind={self.kind!r}"
        )

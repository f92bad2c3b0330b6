"""The gradient of a fixed support's k values, (U_outᵀ G U_in)[support] with G = gyᵀ x, without the rotated matrix.

The value at support entry (r, c) is u_out[:, r]ᵀ · gyᵀ · x · u_in[:, c]: a chain of four factors whose last
product is needed only at the k support positions. Each route cuts the chain at one of its three inner dimensions
(the out side o, the tokens n, the in side i), multiplies each half densely, thin where the support touches few
rows (R) or columns (C), and takes the k dot products across the cut with `torch.sparse.sampled_addmm` (k·length
multiply-adds plus a per-entry overhead, instead of the |R|·|C| block the k entries sit in):

* ``G, in side``:       P = (gyᵀ x) · u_in[:, C]                       n·o·i + o·i·|C|,   then k·o
* ``tokens, in side``:  P = gyᵀ · (x · u_in[:, C])                     n·i·|C| + n·o·|C|, then k·o
* ``G, out side``:      Q = u_out[:, R]ᵀ · (gyᵀ x)                     n·o·i + |R|·o·i,   then k·i
* ``tokens, out side``: Q = (gy · u_out[:, R])ᵀ · x                    n·o·|R| + n·|R|·i, then k·i
* ``tokens, both``:     A = gy · u_out[:, R], B = x · u_in[:, C]        n·o·|R| + n·i·|C|, then k·n

`SupportGradient.route` takes the cheapest by a cost model (dense multiply-adds, plus `SAMPLED_ENTRY_COST` and the
dot's length per sampled entry; measured: `benchmarks/support_gradient.py`). An identity basis (MeProp) is the chain
gyᵀ · x alone: k·n. `sampled_addmm` is about 2x slower when its left factor is not contiguous, so every route puts
a product it has just made on the left and a basis (any layout) on the right. Core module: torch only.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

# One entry of `torch.sparse.sampled_addmm` costs about this many dense-GEMM multiply-adds on the CPU, nearly
# whatever the dot's length up to 3072 (measured at 1 % of 1536x384, 384x1536 and 3072x768, 2 threads: about 2 µs
# an entry against 17 GMAC/s dense; benchmarks/support_gradient.py).
SAMPLED_ENTRY_COST = 32768


def _csr_pattern(rows: Tensor, cols: Tensor, shape: tuple[int, int], zeros: Tensor) -> Tensor:
    """The fp32 CSR matrix with ``zeros`` at (rows, cols), ``rows`` increasing (and ``cols`` within a row)."""
    edges = torch.arange(shape[0] + 1, device=rows.device, dtype=rows.dtype)
    crow = torch.searchsorted(rows, edges, out_int32=rows.dtype == torch.int32)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is long stable
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols.to(rows.dtype), zeros, shape, check_invariants=False)


def sampled(pattern: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """(left @ right) at ``pattern``'s entries, in its (row-major) order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.sparse.sampled_addmm(pattern, left.contiguous(), right, beta=0.0).values()


def _thin(basis: Tensor, cols: Tensor) -> Tensor | None:
    """``basis[:, cols]`` when it can be kept for free: the basis itself when ``cols`` (sorted, unique) is every
    column; else None, gathered per step and freed. A kept copy per layer would cost more memory than it saves time:
    on real MiniLM supports 27 MB over 12 matrices (`benchmarks/memory.py`), against a gather of at most o x |C|
    entries per step next to products of n·o·i."""
    return basis if cols.numel() == basis.shape[1] else None


class SupportGradient:
    """What a fixed support's gradient needs between steps: the rows and columns it touches, their basis columns
    (the basis itself or None, see `_thin`), and its positions as a CSR pattern for each cut of the chain a step has used (made on first use
    from the layer's own ``indices``, int32 where they fit: about 4 bytes an entry per pattern, see `nbytes`)."""

    ROUTES = ("G, in side", "tokens, in side", "G, out side", "tokens, out side", "tokens, both")

    def __init__(self, indices: Tensor, u_out: Tensor | None, u_in: Tensor | None, shape: tuple[int, int]):
        self.shape = shape
        self.u_out, self.u_in = u_out, u_in
        self.indices, self.k = indices, indices.numel()
        r, c = self._rows_cols()
        self.urows, self.ucols = torch.unique(r), torch.unique(c)
        self._patterns: dict[str, Tensor] = {}
        self._zeros = torch.zeros(self.k, device=indices.device)  # the patterns' values (sampled_addmm's beta = 0)
        self._by_column: Tensor | None = None  # the support's order sorted by (column, row), for the in-side cut
        self.left = _thin(u_out, self.urows) if u_out is not None else None
        self.right = _thin(u_in, self.ucols) if u_in is not None else None

    def _rows_cols(self) -> tuple[Tensor, Tensor]:
        i = self.shape[1]
        return self.indices // i, self.indices % i

    def coordinates(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each entry's row and column, and their positions among the touched rows and columns (made per call)."""
        r, c = self._rows_cols()
        return r, c, torch.searchsorted(self.urows, r), torch.searchsorted(self.ucols, c)

    def _pattern(self, cut: str) -> Tensor:
        if cut not in self._patterns:
            o, i = self.shape
            nr, nc = self.urows.numel(), self.ucols.numel()
            r, c, inv_r, inv_c = (t.to(self.indices.dtype) for t in self.coordinates())
            if cut == "o":  # transposed: (local column, row), in column-major order of the support
                self._by_column = torch.argsort(inv_c.long() * o + r).to(self.indices.dtype)
                rows, cols, shape = inv_c[self._by_column], r[self._by_column], (nc, o)
            else:
                rows, cols, shape = {"i": (inv_r, c, (nr, i)), "n": (inv_r, inv_c, (nr, nc)),
                                     "full": (r, c, (o, i))}[cut]
            self._patterns[cut] = _csr_pattern(rows, cols, shape, self._zeros)
        return self._patterns[cut]

    def nbytes(self) -> int:
        """Bytes this plan holds beyond the layer's own tensors (patterns, touched rows and columns)."""
        held = [self.urows, self.ucols, self._zeros, *(t for t in (self._by_column,) if t is not None)]
        for pattern in self._patterns.values():
            held += [pattern.crow_indices(), pattern.col_indices()]
        return sum(t.numel() * t.element_size() for t in held)

    def costs(self, n: int) -> dict[str, float]:
        """Dense-GEMM-equivalent multiply-adds of each route for ``n`` tokens."""
        o, i = self.shape
        nr, nc, k, s = self.urows.numel(), self.ucols.numel(), self.k, SAMPLED_ENTRY_COST
        return {"G, in side": n * o * i + o * i * nc + k * (s + o),
                "tokens, in side": n * nc * (i + o) + k * (s + o),
                "G, out side": n * o * i + nr * o * i + k * (s + i),
                "tokens, out side": n * nr * (o + i) + k * (s + i),
                "tokens, both": n * (o * nr + i * nc) + k * (s + n)}

    def route(self, n: int) -> str:
        costs = self.costs(n)
        return min(costs, key=costs.get)

    def _columns(self, basis: Tensor, kept: Tensor | None, cols: Tensor) -> Tensor:
        return basis[:, cols] if kept is None else kept

    def __call__(self, x: Tensor, gy: Tensor, route: str | None = None) -> Tensor:
        """The k support values' gradient (fp32, in index order) for tokens ``x`` (n x in), ``gy`` (n x out)."""
        if self.u_out is None:  # identity basis: the chain is gyᵀ x, sampled at the support
            return sampled(self._pattern("full"), gy.T, x)
        route = route or self.route(x.shape[0])
        if route in ("G, in side", "tokens, in side"):  # (Pᵀ u_out)[c, r], P = G u_in[:, C]
            right = self._columns(self.u_in, self.right, self.ucols)
            p_t = right.T @ (x.T @ gy) if route == "G, in side" else (x @ right).T @ gy
            pattern = self._pattern("o")
            values = p_t.new_empty(self.k)
            values[self._by_column] = sampled(pattern, p_t, self.u_out)
            return values
        left = self._columns(self.u_out, self.left, self.urows)
        if route == "G, out side":
            return sampled(self._pattern("i"), left.T @ (gy.T @ x), self.u_in)
        if route == "tokens, out side":
            return sampled(self._pattern("i"), (gy @ left).T @ x, self.u_in)
        right = self._columns(self.u_in, self.right, self.ucols)
        return sampled(self._pattern("n"), left.T @ gy.T, x @ right)

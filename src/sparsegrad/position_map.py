"""`PositionMap`: where each entry of a dynamic support sits in its append-only aligned state, one row per layer.

A dense table over the out x in entries (O(1) lookup and write per entry, no host sync), in the narrowest dtype
that holds the row's capacity: int16 (2 bytes per weight entry) while every row holds at most 65,535 entries, else
int32. The int16 table stores ``position - 32767``, so that its most negative value, -32768, reads back as -1
(absent) and the positions 0..65,534 fit; `reserve` promotes the table to int32 in place the first time a row
needs more (a dynamic support is a growing union: a long run can pass 65,535 entries per matrix).
"""

from __future__ import annotations

import torch
from torch import Tensor

_NARROW = torch.int16
_NARROW_OFFSET = 32767  # a stored int16 value v means position v + 32767; -32768 means absent
NARROW_CAPACITY = 65535  # positions 0..65,534


class PositionMap:
    """Positions (int32 on read, -1 = absent) of ``rows`` x ``numel`` entries; ``capacity``: the most entries
    any row will hold before the next `reserve`."""

    def __init__(self, rows: int, numel: int, capacity: int, device: torch.device):
        narrow = capacity <= NARROW_CAPACITY
        self.offset = _NARROW_OFFSET if narrow else 0
        self.table = torch.full((rows, numel), -1 - self.offset, dtype=_NARROW if narrow else torch.int32,
                                device=device)

    def lookup(self, idx: Tensor) -> Tensor:
        """Positions (int32, -1 = absent) of the entries ``idx`` (rows x m, int64) of each row."""
        pos = self.table.gather(1, idx)
        return pos.to(torch.int32).add_(self.offset) if self.offset else pos

    def write(self, idx: Tensor, pos: Tensor, row: int | None = None) -> None:
        """Record that entry ``idx[r, j]`` of row r sits at ``pos[r, j]`` (int32, below the reserved capacity);
        ``row``: ``idx`` and ``pos`` are one row's (1 x m), that row."""
        table = self.table if row is None else self.table[row:row + 1]
        table.scatter_(1, idx, pos.sub(self.offset).to(table.dtype) if self.offset else pos)

    def reserve(self, capacity: int) -> None:
        """Room for positions below ``capacity`` in every row: int16 -> int32 once a row needs more than 65,535."""
        if self.offset and capacity > NARROW_CAPACITY:
            self.table = self.table.to(torch.int32).add_(self.offset)
            self.offset = 0

    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

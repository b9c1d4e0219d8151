"""Consecutive tiles joined along time: the decoded overlap cross-faded once, everything else passed on.

A `Seam` takes each tile's decoded output (video frames along axis 0, audio samples along the last
axis) in chunks, in order, and returns what can be written: the items the tile shares with the
previous tile's kept tail are a linear blend of the two (the new tile's weight j / (n - 1) at the
j-th of n shared items: the first shared item is the previous tile's alone, which also leaves out
the new tile's causally decoded first frame; the last is the new tile's), the items only this tile
has are passed on as they are, and the items the next tile will share are kept, not written. So
what comes out is each item of the whole video exactly once, in order (checked: `written` must
reach each tile's start before the tile begins), and only one tail is held between tiles.
"""

from __future__ import annotations

import torch


class Seam:
    def __init__(self, axis: int):
        self.axis = axis
        self.written = 0  # items returned so far: the video's first `written` items are out
        self._kept: torch.Tensor | None = None  # the previous tile's tail, starting at this tile's start
        self._tile = None

    def begin(self, start: int, keep_from: int | None) -> None:
        """A tile whose first item is the video's item `start`; the next tile starts at `keep_from`
        (None: this is the last tile, nothing is kept)."""
        kept = 0 if self._kept is None else self._kept.shape[self.axis]
        if self.written != start:  # a gap or a repeat between tiles
            raise ValueError(f"tile starts at item {start}, but {self.written} items are written")
        if keep_from is not None and keep_from <= start:
            raise ValueError(f"the next tile must start after this one ({keep_from} <= {start})")
        self._tile = (start, keep_from, kept)
        self._pos = start
        self._tail: list[torch.Tensor] = []

    def push(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        """The next items of this tile -> the pieces to write now (in order)."""
        start, keep_from, kept = self._tile
        lo, n = self._pos, chunk.shape[self.axis]
        self._pos += n
        if lo < start + kept:  # items the previous tile also has: blended
            k = min(n, start + kept - lo)
            old = self._kept.narrow(self.axis, lo - start, k)
            chunk = torch.cat([_blend(old, chunk.narrow(self.axis, 0, k), lo - start, kept, self.axis),
                               chunk.narrow(self.axis, k, n - k)], dim=self.axis)
        split = n if keep_from is None else max(0, min(n, keep_from - lo))
        if split < n:  # items the next tile also has: kept (a copy: the chunk itself is not held)
            self._tail.append(chunk.narrow(self.axis, split, n - split).clone())
        out = [chunk.narrow(self.axis, 0, split)] if split else []
        self.written += split
        return out

    def end(self) -> None:
        """This tile is complete: its tail becomes what the next tile is blended with."""
        start, keep_from, kept = self._tile
        if self._pos < start + kept or (keep_from is not None and self._pos <= keep_from):
            raise ValueError(f"tile ended at item {self._pos}: too short for its overlaps")
        self._kept = torch.cat(self._tail, dim=self.axis) if self._tail else None
        self._tile = None


def _blend(old: torch.Tensor, new: torch.Tensor, first: int, n: int, axis: int) -> torch.Tensor:
    """Items first .. first + k - 1 of an n-item overlap: old * (1 - w) + new * w, w_j = j / (n - 1)."""
    k = new.shape[axis]
    j = torch.arange(first, first + k, device=new.device, dtype=torch.float32)
    w = j / (n - 1) if n > 1 else torch.zeros_like(j)
    shape = [1] * new.ndim
    shape[axis] = k
    w = w.reshape(shape)
    mixed = old.float() * (1 - w) + new.float() * w
    if new.dtype == torch.uint8:
        return mixed.round_().clamp_(0, 255).to(torch.uint8)
    return mixed.to(new.dtype)

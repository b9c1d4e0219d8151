"""The two loops over token chunks that a block's sub-layers are made of.

`add_residual(x, chunks, branch)` is `x = x + branch(x) * gate`, in place, chunk by chunk.
`branch(s, e, xc)` gets the chunk xc of the residual (tokens [s, e)), computes up to the
row-parallel projection and returns its output in flight (a `Pending`: the TP all-reduce not yet
waited for) with the chunk's gate (None: ungated). A chunk is completed (waited, gated, added)
only after the next chunk is issued, so its all-reduce runs under the next chunk's GEMMs. Chunks
are disjoint token ranges, so completing chunk i late never changes what chunk i+1 reads. The
residual is a device tensor (chunks are views of it) or parked in host memory (memory/offload.py:
each chunk copied in, updated, copied back).

`stitch(n, chunks, project)` runs a per-chunk projection and returns its outputs for all n tokens
(the q/k/v that whole-sequence attention needs when it runs in one pass).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ltx2_tp.distributed.collectives import Pending
from ltx2_tp.memory.offload import rows

Branch = Callable[[int, int, torch.Tensor], tuple[Pending, "torch.Tensor | None"]]


def add_residual(x, chunks: list[tuple[int, int]], branch: Branch) -> None:
    walk = rows(x, chunks, write=True)
    issued = None
    for s, e in chunks:
        xc = walk.load(s, e)
        nxt = (s, e, xc, *branch(s, e, xc))
        if issued is not None:
            _complete(walk, *issued)
        issued = nxt
    if issued is not None:
        _complete(walk, *issued)


def _complete(walk, s: int, e: int, xc: torch.Tensor, out: Pending, gate: torch.Tensor | None) -> None:
    y = out.wait()
    xc.add_(y if gate is None else y * gate)
    walk.store(s, e, xc)


def stitch(n: int, chunks: list[tuple[int, int]], project) -> tuple:
    """`project(s, e)` -> a tuple of (B, e - s, ...) tensors (or None in a slot). One chunk: its
    outputs as they are, no copy. Several: each output is written into a buffer for this rank's n
    tokens (tokens x D each), allocated at the first chunk. No tokens: one empty chunk, so the
    outputs still have their shapes (an SP rank with no tokens still joins the attention)."""
    if len(chunks) <= 1:
        return project(*(chunks[0] if chunks else (0, n)))
    bufs = None
    for s, e in chunks:
        parts = project(s, e)
        if bufs is None:
            bufs = tuple(None if p is None else p.new_empty(p.shape[0], n, *p.shape[2:]) for p in parts)
        for buf, part in zip(bufs, parts):
            if buf is not None:
                buf[:, s:e] = part
    return bufs

"""The parallel context a model receives: which groups exist and where this rank sits.

Layout of a world of tp * ulysses * ring ranks, TP innermost (it talks most):
    rank = (ring_idx * ulysses + ulysses_idx) * tp + tp_idx
The sequence-parallel (SP) group is ulysses x ring; sequence part `sp_rank = ring_idx * ulysses
+ ulysses_idx`, so one Ulysses group holds consecutive parts and a ring passes contiguous blocks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ParallelContext:
    tp_size: int = 1
    tp_rank: int = 0
    tp_group: object = None
    ulysses_size: int = 1
    ulysses_rank: int = 0
    ulysses_group: object = None
    ring_size: int = 1
    ring_rank: int = 0
    ring_group: object = None
    sp_group: object = None  # ulysses x ring

    @property
    def sp_size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    @property
    def is_parallel(self) -> bool:
        return self.tp_size > 1 or self.sp_size > 1

    def describe(self) -> str:
        return f"tp={self.tp_size} ulysses={self.ulysses_size} ring={self.ring_size}"


SINGLE = ParallelContext()


def init_parallel(tp_size: int = 1, ulysses_size: int = 1, ring_size: int = 1, backend: str | None = None) -> ParallelContext:
    """Create the groups from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    world = tp_size * ulysses_size * ring_size
    if world == 1 and not dist.is_initialized():
        return ParallelContext()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                f"tp_size*sp_size={world} needs {world} processes: launch with "
                f"`torchrun --nproc-per-node {world} ...`"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.get_world_size() != world:
        raise ValueError(
            f"world size {dist.get_world_size()} != tp_size*ulysses_size*ring_size = "
            f"{tp_size}*{ulysses_size}*{ring_size} = {world}"
        )
    return build_groups(tp_size, ulysses_size, ring_size)


def build_groups(tp_size: int, ulysses_size: int, ring_size: int) -> ParallelContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    if tp_size * ulysses_size * ring_size != world:
        raise ValueError(f"tp_size*ulysses_size*ring_size = {tp_size}*{ulysses_size}*{ring_size} must equal "
                         f"the world size {world}")
    ctx = ParallelContext(tp_size=tp_size, ulysses_size=ulysses_size, ring_size=ring_size)
    tp_idx = rank % tp_size
    uly_idx = (rank // tp_size) % ulysses_size
    ring_idx = rank // (tp_size * ulysses_size)

    def rank_of(r, u, t):
        return (r * ulysses_size + u) * tp_size + t

    # new_group must be called by every rank for every group, in the same order.
    for r in range(ring_size):
        for u in range(ulysses_size):
            g = dist.new_group([rank_of(r, u, t) for t in range(tp_size)])
            if (r, u) == (ring_idx, uly_idx):
                ctx.tp_group, ctx.tp_rank = g, tp_idx
    for r in range(ring_size):
        for t in range(tp_size):
            g = dist.new_group([rank_of(r, u, t) for u in range(ulysses_size)])
            if (r, t) == (ring_idx, tp_idx):
                ctx.ulysses_group, ctx.ulysses_rank = g, uly_idx
    for u in range(ulysses_size):
        for t in range(tp_size):
            g = dist.new_group([rank_of(r, u, t) for r in range(ring_size)])
            if (u, t) == (uly_idx, tp_idx):
                ctx.ring_group, ctx.ring_rank = g, ring_idx
    for t in range(tp_size):
        g = dist.new_group([rank_of(r, u, t) for r in range(ring_size) for u in range(ulysses_size)])
        if t == tp_idx:
            ctx.sp_group = g
    return ctx


def from_groups(tp_group=None, ulysses_group=None, ring_group=None, sp_group=None) -> ParallelContext:
    """Wrap groups someone else created (sglang's TP / Ulysses / ring groups)."""

    def size_rank(g):
        return (1, 0) if g is None else (dist.get_world_size(g), dist.get_rank(g))

    ctx = ParallelContext()
    ctx.tp_size, ctx.tp_rank = size_rank(tp_group)
    ctx.ulysses_size, ctx.ulysses_rank = size_rank(ulysses_group)
    ctx.ring_size, ctx.ring_rank = size_rank(ring_group)
    ctx.tp_group, ctx.ulysses_group, ctx.ring_group = tp_group, ulysses_group, ring_group
    ctx.sp_group = sp_group
    return ctx

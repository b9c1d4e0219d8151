"""The parallel context a model receives: which groups exist and where this rank sits.

Layout of a world of guidance * ring * ulysses * tp ranks, TP innermost (it talks most):
    rank = ((guidance_idx * ring + ring_idx) * ulysses + ulysses_idx) * tp + tp_idx
The sequence-parallel (SP) group is ulysses x ring; sequence part `sp_rank = ring_idx * ulysses
+ ulysses_idx`, so one Ulysses group holds consecutive parts and a ring passes contiguous blocks.
Guidance groups (G, pipelines/guidance.py) are outermost: each is a contiguous block of tp x sp
ranks running its share of a step's guidance passes; the guidance group of a rank (the ranks at
its place in every guidance group) moves one latent-sized all-gather per step (~0.4 MB at
768x512x121's stage 1, against ~48 MB per block for TP), so it can take the slowest links
(across NVLink islands or nodes) while TP and SP, which talk in every block, stay on the fastest.
"""

from __future__ import annotations

import itertools
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
    guidance_size: int = 1
    guidance_rank: int = 0
    guidance_group: object = None  # this rank's place (ring, ulysses, tp) in every guidance group

    @property
    def sp_size(self) -> int:
        return self.ulysses_size * self.ring_size

    @property
    def sp_rank(self) -> int:
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    @property
    def is_parallel(self) -> bool:
        return self.tp_size > 1 or self.sp_size > 1 or self.guidance_size > 1

    def describe(self) -> str:
        g = f" guidance={self.guidance_size}" if self.guidance_size > 1 else ""
        return f"tp={self.tp_size} ulysses={self.ulysses_size} ring={self.ring_size}{g}"


SINGLE = ParallelContext()


def init_parallel(tp_size: int = 1, ulysses_size: int = 1, ring_size: int = 1, backend: str | None = None,
                  guidance_size: int = 1) -> ParallelContext:
    """Create the groups from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    world = tp_size * ulysses_size * ring_size * guidance_size
    if world == 1 and not dist.is_initialized():
        return ParallelContext()
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            raise ValueError(
                f"guidance_size*tp_size*sp_size={world} needs {world} processes: launch with "
                f"`torchrun --nproc-per-node {world} ...`"
            )
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    if dist.get_world_size() != world:
        raise ValueError(
            f"world size {dist.get_world_size()} != guidance_size*tp_size*ulysses_size*ring_size = "
            f"{guidance_size}*{tp_size}*{ulysses_size}*{ring_size} = {world}"
        )
    return build_groups(tp_size, ulysses_size, ring_size, guidance_size)


def build_groups(tp_size: int, ulysses_size: int, ring_size: int, guidance_size: int = 1) -> ParallelContext:
    rank, world = dist.get_rank(), dist.get_world_size()
    if guidance_size * tp_size * ulysses_size * ring_size != world:
        raise ValueError(f"guidance_size*tp_size*ulysses_size*ring_size = {guidance_size}*{tp_size}*{ulysses_size}*"
                         f"{ring_size} must equal the world size {world}")
    ctx = ParallelContext(tp_size=tp_size, ulysses_size=ulysses_size, ring_size=ring_size, guidance_size=guidance_size)
    tp_idx = rank % tp_size
    uly_idx = (rank // tp_size) % ulysses_size
    ring_idx = (rank // (tp_size * ulysses_size)) % ring_size
    g_idx = rank // (tp_size * ulysses_size * ring_size)
    sizes = (guidance_size, ring_size, ulysses_size, tp_size)  # outermost first: rank order
    mine = (g_idx, ring_idx, uly_idx, tp_idx)

    def group(*axes: int):
        """This rank's group: the ranks that differ from it only along `axes` (0 guidance, 1 ring,
        2 Ulysses, 3 TP). new_group must be called by every rank for every group, in the same order."""
        def others(coords):
            return tuple(v for i, v in enumerate(coords) if i not in axes)

        members: dict[tuple, list[int]] = {}
        for r, coords in enumerate(itertools.product(*map(range, sizes))):  # r = ((g*R + r)*U + u)*T + t
            members.setdefault(others(coords), []).append(r)
        ours = None
        for key, ranks in members.items():
            pg = dist.new_group(ranks)
            if key == others(mine):
                ours = pg
        return ours

    ctx.tp_group, ctx.tp_rank = group(3), tp_idx
    ctx.ulysses_group, ctx.ulysses_rank = group(2), uly_idx
    ctx.ring_group, ctx.ring_rank = group(1), ring_idx
    ctx.sp_group = group(1, 2)
    if guidance_size > 1:
        ctx.guidance_group, ctx.guidance_rank = group(0), g_idx
    return ctx


def from_groups(tp_group=None, ulysses_group=None, ring_group=None, sp_group=None,
                guidance_group=None) -> ParallelContext:
    """Wrap groups someone else created (sglang's TP / Ulysses / ring groups)."""

    def size_rank(g):
        return (1, 0) if g is None else (dist.get_world_size(g), dist.get_rank(g))

    ctx = ParallelContext()
    ctx.tp_size, ctx.tp_rank = size_rank(tp_group)
    ctx.ulysses_size, ctx.ulysses_rank = size_rank(ulysses_group)
    ctx.ring_size, ctx.ring_rank = size_rank(ring_group)
    ctx.guidance_size, ctx.guidance_rank = size_rank(guidance_group)
    ctx.tp_group, ctx.ulysses_group, ctx.ring_group, ctx.guidance_group = tp_group, ulysses_group, ring_group, guidance_group
    ctx.sp_group = sp_group
    return ctx

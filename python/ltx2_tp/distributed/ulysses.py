"""Ulysses sequence parallelism: an all-to-all turns sequence-split q/k/v into head-split ones,
each rank attends over the whole sequence for 1/U of the heads, and an all-to-all turns the output
back. `ulysses_attention` does it in pipelined head groups; the entry point that chooses between
Ulysses and ring is distributed/sequence.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ltx2_tp.distributed.collectives import (ulysses_heads_to_seq_packed_start, ulysses_pack,
                                            ulysses_seq_to_heads_packed_start, ulysses_unpack)
from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.layers.attention_backend import local_attention


def ulysses_attention(q, k, v, sizes: list[int], ctx: ParallelContext, q_chunk: int | None,
                      head_groups: int = 1, attend=local_attention) -> torch.Tensor:
    """q/k/v (B, n_local, H, d) of the parts `sizes` of this Ulysses group -> (B, n_local, H, d).
    Packing for the all-to-all and unpacking after it are plain tensor ops, traced with the block:
    compiled, they fuse with RoPE and the output gate instead of being eager copies.
    `attend(q, k, v, q_chunk)` runs on every token of this rank's heads (local_attention, or the
    temporal window's)."""
    g = head_group_count(q.shape[2], ctx.ulysses_size, head_groups)
    qs, ks, vs = (ulysses_pack(t, sizes, ctx.ulysses_size, g) for t in (q, k, v))
    out = ulysses_pipelined((qs, ks, vs), sizes, ctx, lambda i, qi, ki, vi: attend(qi, ki, vi, q_chunk))
    return ulysses_unpack(out, q.shape[1])


def head_group_count(heads: int, ulysses_size: int, head_groups: int) -> int:
    """The plan's head groups where they divide this rank's heads evenly over the Ulysses ranks, else 1."""
    return head_groups if head_groups > 1 and heads % (head_groups * ulysses_size) == 0 else 1


@torch.compiler.disable  # left eager inside compiled blocks: its all-to-alls stay async and overlap
def ulysses_pipelined(packed: tuple[torch.Tensor, ...], sizes: list[int], ctx: ParallelContext,
                      attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Ulysses over packed (G, U, B, nmax, hg, d) tensors (q/k/v, or q alone when K/V went ahead) in
    G head groups: group g+1's all-to-all is in flight while group g attends (`attend(g, *heads-split
    tensors)`), and group g's way back while group g+1 attends. Each group is an independent Ulysses
    attention over its heads, so the result equals one all-to-all of all heads. Returns the packed
    (G, U, B, nmax, hg, d) outputs for ulysses_unpack."""
    group, out = ctx.ulysses_group, torch.empty_like(packed[0])

    def send(i):
        return [ulysses_seq_to_heads_packed_start(t[i], sizes, group) for t in packed]

    inflight, back = send(0), []
    for i in range(packed[0].shape[0]):
        received = [p.wait() for p in inflight]
        if i + 1 < packed[0].shape[0]:
            inflight = send(i + 1)
        back.append(ulysses_heads_to_seq_packed_start(attend(i, *received), sizes, group, out[i]))
    for p in back:
        p.wait()
    return out

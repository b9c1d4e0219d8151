"""Sequence-parallel self-attention: Ulysses all-to-all, ring, or both (Ulysses inside a ring).

SequenceLayout says which tokens each SP rank holds; `sp_self_attention` takes this rank's
q/k/v (B, n_local, H_tp, d) and returns its attention output, equal to attention over the whole
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ltx2_tp.distributed.collectives import (part_range, part_sizes, ulysses_heads_to_seq,
                                            ulysses_heads_to_seq_packed_start, ulysses_pack, ulysses_seq_to_heads,
                                            ulysses_seq_to_heads_packed_start, ulysses_unpack)
from ltx2_tp.distributed.context import ParallelContext
from ltx2_tp.distributed.ring import ring_attention
from ltx2_tp.layers.attention_backend import attention
from ltx2_tp.memory.plan import token_chunks


@dataclass(frozen=True)
class SequenceLayout:
    total: int
    sizes: tuple[int, ...]  # tokens of every SP part, in sequence order
    ulysses_size: int = 1
    sp_rank: int = 0

    @classmethod
    def for_context(cls, total: int, ctx: ParallelContext) -> "SequenceLayout":
        return cls(total, tuple(part_sizes(total, ctx.sp_size)), ctx.ulysses_size, ctx.sp_rank)

    @property
    def local_range(self) -> tuple[int, int]:
        return part_range(self.total, len(self.sizes), self.sp_rank)

    @property
    def ulysses_sizes(self) -> list[int]:
        g = self.sp_rank // self.ulysses_size
        return list(self.sizes[g * self.ulysses_size : (g + 1) * self.ulysses_size])

    @property
    def ring_block_sizes(self) -> list[int]:
        u = self.ulysses_size
        return [sum(self.sizes[i : i + u]) for i in range(0, len(self.sizes), u)]


def local_attention(q, k, v, q_chunk: int | None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Queries in chunks against the full K/V; each chunk's output is written over its q rows."""
    chunks = token_chunks(q.shape[1], q_chunk)
    if len(chunks) == 1:
        return attention(q, k, v, mask)
    out = torch.empty_like(q)
    for s, e in chunks:
        m = None if mask is None else mask[..., s:e, :]
        out[:, s:e] = attention(q[:, s:e], k, v, m)
    return out


def sp_self_attention(q, k, v, layout: SequenceLayout, ctx: ParallelContext, q_chunk: int | None,
                      mask: torch.Tensor | None = None, head_groups: int = 1) -> torch.Tensor:
    if ctx.sp_size == 1:  # traced with the rest of a compiled block: no graph break on one GPU
        return local_attention(q, k, v, q_chunk, mask)
    if mask is not None:
        raise NotImplementedError("a self-attention mask (Modality.attention_mask) is supported only with sp_size=1")
    if ctx.ulysses_size > 1 and ctx.ring_size == 1:
        # Packing for the all-to-all and unpacking after it are plain tensor ops, traced with the
        # block: compiled, they fuse with RoPE and the output gate instead of being eager copies.
        u, h = ctx.ulysses_size, q.shape[2]
        g = head_groups if head_groups > 1 and h % (head_groups * u) == 0 else 1
        sizes = layout.ulysses_sizes
        qs, ks, vs = (ulysses_pack(t, sizes, u, g) for t in (q, k, v))
        return ulysses_unpack(_ulysses_pipelined(qs, ks, vs, sizes, ctx, q_chunk), q.shape[1])
    return _sp_attention(q, k, v, layout, ctx, q_chunk)


@torch.compiler.disable  # left eager inside compiled blocks: its collectives stay async and overlap
def _sp_attention(q, k, v, layout: SequenceLayout, ctx: ParallelContext, q_chunk: int | None) -> torch.Tensor:
    """Ring attention, with Ulysses inside each ring member when ulysses_size > 1."""
    if ctx.ulysses_size > 1:
        sizes = layout.ulysses_sizes
        q, k, v = (ulysses_seq_to_heads(t, sizes, ctx.ulysses_group) for t in (q, k, v))
    out = ring_attention(q, k, v, layout.ring_block_sizes, ctx.ring_group, q_chunk)
    if ctx.ulysses_size > 1:
        out = ulysses_heads_to_seq(out, layout.ulysses_sizes, ctx.ulysses_group)
    return out


@torch.compiler.disable  # eager inside compiled blocks, as above
def _ulysses_pipelined(qs, ks, vs, sizes: list[int], ctx: ParallelContext, q_chunk: int | None) -> torch.Tensor:
    """Ulysses over packed (G, U, B, nmax, hg, d) q/k/v in G head groups: group g+1's all-to-all is
    in flight while group g attends, and group g's way back while group g+1 attends. Each group is
    an independent Ulysses attention over its heads, so the result equals one all-to-all of all
    heads. Returns the packed (G, U, B, nmax, hg, d) outputs for ulysses_unpack."""
    group, out = ctx.ulysses_group, torch.empty_like(qs)

    def send(i):
        return [ulysses_seq_to_heads_packed_start(t[i], sizes, group) for t in (qs, ks, vs)]

    inflight, back = send(0), []
    for i in range(qs.shape[0]):
        qi, ki, vi = (p.wait() for p in inflight)
        if i + 1 < qs.shape[0]:
            inflight = send(i + 1)
        back.append(ulysses_heads_to_seq_packed_start(local_attention(qi, ki, vi, q_chunk), sizes, group, out[i]))
    for p in back:
        p.wait()
    return out
